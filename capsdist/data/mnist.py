"""MNIST intake: find, download or copy, verify and read the four official IDX files (the CLI is data_prep.mnist).

Folder resolution (``resolve_dir``): an explicit argument -> ``$CAPSDIST_MNIST_DIR`` -> the repository's
``data/mnist`` -> a download into ``~/.cache/capsdist/mnist``. Downloads try each mirror in turn, check the
official md5 of every file, and only ever rename a fully verified temporary file into place.

A folder may hold the files gzipped or not, directly or in torchvision's ``raw/`` or ``MNIST/raw/``. The shipped
copy and the download cache are held to the official md5s; a folder the user names (``--mnist-dir``,
``data.mnist_dir``, ``$CAPSDIST_MNIST_DIR``) may hold any IDX files of the same structure (Fashion-MNIST, KMNIST,
a re-compressed copy): they are read with a warning saying they are not the official files.

    python -m data_prep.mnist                 # resolve (download if needed), verify, print the folder
    python -m data_prep.mnist --from ~/mnist  # verify local copies and install them into the cache
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from tqdm import tqdm

from capsdist.core.errors import CapsdistError
from capsdist.core.files import atomic_write
from capsdist.core.shipped import data_tool

Split = Literal["train", "test"]

# Official file names and md5s (LeCun, Cortes & Burges); the same list torchvision verifies against.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The same files uncompressed (torchvision's raw/ keeps both); md5s of the official files' decompressed bytes.
MD5_UNCOMPRESSED = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
OFFICIAL = {**MD5, **MD5_UNCOMPRESSED}
LAYOUTS = (".", "raw", "MNIST/raw")  # sub-folders searched, in order: plain, torchvision's root/MNIST and root
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
ENV_DIR = "CAPSDIST_MNIST_DIR"
ENV_MIRRORS = "CAPSDIST_MNIST_MIRRORS"
REPO_DIR = Path(__file__).resolve().parents[2] / "data" / "mnist"
CACHE_DIR = Path("~/.cache/capsdist/mnist").expanduser()
_PREFIX = {"train": "train", "test": "t10k"}
_MAGIC = {"images": 2051, "labels": 2049}
_CHUNK = 1 << 16


class MnistError(CapsdistError):
    """A missing, truncated, corrupt or unexpected MNIST file; the message names the file and the fix."""


class UnofficialMnistWarning(UserWarning):
    """A user-named folder holds IDX files that are not the official MNIST files; they are used as given."""


def file_names(split: Split) -> tuple[str, str]:
    """Return the (images, labels) file names of a split."""
    if split not in _PREFIX:
        raise MnistError(f"unknown MNIST split {split!r}: use 'train' or 'test'")
    p = _PREFIX[split]
    return f"{p}-images-idx3-ubyte.gz", f"{p}-labels-idx1-ubyte.gz"


def _fix(folder: Path) -> str:
    """The standard remedy sentence for a bad MNIST folder."""
    return (
        f"Fix: run `{data_tool('mnist')} --dir {folder}` to download verified copies, "
        f"or `{data_tool('mnist')} --dir {folder} --from DIR` to install files you already have."
    )


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def find(folder: Path, name: str) -> Path | None:
    """The file standing for official ``name`` (``*.gz``) in ``folder``: gzipped or not, directly or under
    torchvision's ``raw/`` or ``MNIST/raw/``; None if there is none."""
    for sub in LAYOUTS:
        for candidate in (name, name.removesuffix(".gz")):
            if (folder / sub / candidate).is_file():
                return folder / sub / candidate
    return None


def _located(folder: Path, name: str) -> Path:
    """``find``, or an error naming the missing file and the places looked in."""
    path = find(folder, name)
    if path is None:
        raise MnistError(
            f"MNIST file missing: {folder / name} (also looked for it uncompressed and under raw/ and MNIST/raw/). "
            f"{_fix(folder)}"
        )
    return path


def verify(folder: Path, names: Sequence[str] = tuple(MD5)) -> None:
    """Raise MnistError unless every named file exists in ``folder`` (any accepted layout) with its official md5."""
    for name in names:
        path = _located(folder, name)
        got = md5sum(path)
        if got != OFFICIAL[path.name]:
            raise MnistError(
                f"MNIST file {path} has md5 {got}, expected the official {OFFICIAL[path.name]} "
                f"(corrupt, truncated or not the official file). Delete it. {_fix(folder)}"
            )


def _warn_if_unofficial(folder: Path, names: Sequence[str]) -> bool:
    """Warn once per file of a user-named folder whose md5 is not the official one; whether all are official."""
    official = True
    for name in names:
        path = find(folder, name)
        if path is not None and md5sum(path) != OFFICIAL[path.name]:
            official = False
            warnings.warn(
                f"{path} is not the official MNIST file (its md5 differs): using it as given, since you named "
                f"{folder} (fine for Fashion-MNIST, KMNIST or a re-compressed copy; only the shipped copy and "
                "downloads are held to the official checksums)",
                UnofficialMnistWarning,
                stacklevel=3,
            )
    return official


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds all four files in an accepted layout (presence only; ``verify`` checks content)."""
    return all(find(folder, name) for name in MD5)


def _read_idx(path: Path, kind: Literal["images", "labels"], folder: Path, first: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzipped if named .gz), checking magic, dimensions and payload length. ``first``: read
    only the first records (for a file whose md5 was checked: its length is then known to be right), so a run on a
    few thousand digits does not decompress all 47 MB of the training images."""
    ndim = 3 if kind == "images" else 1
    header = 4 * (1 + ndim)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read(header)
            if len(raw) < header:
                raise MnistError(f"MNIST file {path} is truncated: {len(raw)} bytes, no IDX header. {_fix(folder)}")
            magic, *dims = (int(x) for x in np.frombuffer(raw, ">u4", 1 + ndim))
            record = int(np.prod(dims[1:]))
            if first is not None and first >= dims[0]:  # the whole file: read it as any other
                first = None
            payload = f.read() if first is None else f.read(first * record)
    except (OSError, EOFError) as e:  # bad gzip header, CRC error or cut-off stream
        raise MnistError(f"MNIST file {path} is not a readable gzip file ({e}). Delete it. {_fix(folder)}") from e
    if magic != _MAGIC[kind]:
        raise MnistError(
            f"MNIST file {path} has magic {magic}, expected {_MAGIC[kind]} for an IDX {kind} file "
            f"(wrong file under this name?). {_fix(folder)}"
        )
    if kind == "images" and dims[1:] != [28, 28]:
        raise MnistError(f"MNIST file {path} holds {dims[1]}x{dims[2]} images, expected 28x28. {_fix(folder)}")
    if first is not None:
        dims[0] = first
    expected = dims[0] * record
    if len(payload) != expected:
        raise MnistError(
            f"MNIST file {path} is truncated or padded: header promises {expected} payload bytes, "
            f"found {len(payload)}. Delete it. {_fix(folder)}"
        )
    return np.frombuffer(payload, np.uint8).reshape(dims).copy()  # writable, owns its memory


def load(
    folder: str | os.PathLike, split: Split, check_md5: bool | None = None, first: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a split: (images uint8 [N,28,28], labels uint8 [N]). ``check_md5``: True holds the files to the
    official md5s, False skips the check, None (default) holds the shipped copy and the download cache to them
    and reads any other folder's files with a warning if they are not the official ones. ``first``: only the first
    N samples (an official file has only those decompressed)."""
    folder = Path(folder)
    names = file_names(split)
    official = False
    if check_md5 or (check_md5 is None and folder.resolve() in (REPO_DIR.resolve(), CACHE_DIR.resolve())):
        verify(folder, names)
        official = True
    elif check_md5 is None:
        official = _warn_if_unofficial(folder, names)
    records = first if official else None  # any other file is read whole, so its length is checked
    images = _read_idx(_located(folder, names[0]), "images", folder, records)
    labels = _read_idx(_located(folder, names[1]), "labels", folder, records)
    if len(images) != len(labels):
        raise MnistError(
            f"MNIST {split} split in {folder}: {len(images)} images but {len(labels)} labels. {_fix(folder)}"
        )
    images, labels = images[:first], labels[:first]
    if labels.size and labels.max() > 9:
        raise MnistError(f"MNIST file {folder / names[1]} has label {labels.max()} > 9. {_fix(folder)}")
    return images, labels


def _mirrors() -> list[str]:
    """Mirror base URLs: ``$CAPSDIST_MNIST_MIRRORS`` (comma-separated) or the public defaults."""
    env = os.environ.get(ENV_MIRRORS, "").strip()
    return [m.strip() for m in env.split(",") if m.strip()] if env else list(MIRRORS)


def _copy_verified(src: BinaryIO, dest: Path, name: str, total: int | None, desc: str) -> None:
    """Stream ``src`` into ``dest`` atomically with a progress bar, refusing content with the wrong md5."""

    def fill(out: BinaryIO) -> None:
        h = hashlib.md5()
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None) as bar:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
        if h.hexdigest() != OFFICIAL[name]:
            raise MnistError(f"{desc}: md5 {h.hexdigest()} != official {OFFICIAL[name]}")

    atomic_write(dest, fill)


def download(folder: str | os.PathLike, mirrors: Sequence[str] | None = None, timeout: float = 30.0) -> Path:
    """Download every missing or bad file into ``folder``, trying mirrors in order; return the folder."""
    folder = Path(folder)
    mirrors = list(mirrors) if mirrors else _mirrors()
    for name in MD5:
        dest, have = folder / name, find(folder, name)
        if have is not None and md5sum(have) == OFFICIAL[have.name]:
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + name
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    _copy_verified(resp, dest, name, int(length) if length else None, url)
                break
            except (urllib.error.URLError, OSError, MnistError) as e:
                errors.append(f"  {url}: {e}")
        else:
            raise MnistError(
                f"could not download {name} from any mirror:\n" + "\n".join(errors) + "\n"
                f"Fix: get the four official files some other way and run "
                f"`{data_tool('mnist')} --dir {folder} --from DIR`, set ${ENV_DIR} to a folder holding them, "
                f"or point ${ENV_MIRRORS} at a reachable mirror."
            )
    return folder


def install_from(source: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Verify the four official files in ``source`` (any accepted layout) and copy them atomically into
    ``folder``, under the names they have; return the folder."""
    source, folder = Path(source), Path(folder)
    verify(source)
    if source.resolve() == folder.resolve():
        return folder
    for name in MD5:
        path = _located(source, name)
        with open(path, "rb") as src:
            _copy_verified(src, folder / path.name, path.name, path.stat().st_size, str(path))
    return folder


def resolve_dir(explicit: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """Pick the MNIST folder: explicit -> $CAPSDIST_MNIST_DIR -> repo data/mnist -> (downloaded) user cache."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    if is_complete(REPO_DIR):
        return REPO_DIR
    missing = [name for name in MD5 if not (REPO_DIR / name).is_file()]
    if len(missing) < len(MD5):  # a damaged checkout, not a missing copy: say which file, not a download error
        raise MnistError(f"the repository's MNIST copy {REPO_DIR} lacks {', '.join(missing)}. Fix: restore it "
                         f"(`git checkout -- data/mnist`), or pass --mnist-dir / data.mnist_dir.")  # fmt: skip
    if fetch and not is_complete(CACHE_DIR):
        download(CACHE_DIR)
    return CACHE_DIR

