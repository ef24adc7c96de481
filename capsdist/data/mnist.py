"""MNIST intake: find, download or copy, verify and read the four official IDX files (the CLI is data_prep.mnist).

Folder resolution (``resolve_dir``): an explicit argument -> ``$CAPSDIST_MNIST_DIR`` -> the repository's
``data/mnist`` -> a download into ``~/.cache/capsdist/mnist``. Downloads try each mirror in turn, check the
official md5 of every file, and only ever rename a fully verified temporary file into place.

    python -m data_prep.mnist                 # resolve (download if needed), verify, print the folder
    python -m data_prep.mnist --from ~/mnist  # verify local copies and install them into the cache
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from tqdm import tqdm

from capsdist import CapsdistError

Split = Literal["train", "test"]

# Official file names and md5s (LeCun, Cortes & Burges); the same list torchvision verifies against.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
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


def file_names(split: Split) -> tuple[str, str]:
    """Return the (images, labels) file names of a split."""
    if split not in _PREFIX:
        raise MnistError(f"unknown MNIST split {split!r}: use 'train' or 'test'")
    p = _PREFIX[split]
    return f"{p}-images-idx3-ubyte.gz", f"{p}-labels-idx1-ubyte.gz"


def _fix(folder: Path) -> str:
    """The standard remedy sentence for a bad MNIST folder."""
    return (
        f"Fix: run `python -m data_prep.mnist --dir {folder}` to download verified copies, "
        f"or `python -m data_prep.mnist --dir {folder} --from DIR` to install files you already have."
    )


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path, names: Sequence[str] = tuple(MD5)) -> None:
    """Raise MnistError unless every named file exists in ``folder`` with its official md5."""
    for name in names:
        path = folder / name
        if not path.is_file():
            raise MnistError(f"MNIST file missing: {path}. {_fix(folder)}")
        got = md5sum(path)
        if got != MD5[name]:
            raise MnistError(
                f"MNIST file {path} has md5 {got}, expected the official {MD5[name]} "
                f"(corrupt, truncated or not the official file). Delete it. {_fix(folder)}"
            )


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds all four files (presence only; ``verify`` checks content)."""
    return all((folder / name).is_file() for name in MD5)


def _read_idx(path: Path, kind: Literal["images", "labels"], folder: Path) -> np.ndarray:
    """Parse one gzipped IDX file, checking magic, dimensions and payload length."""
    if not path.is_file():
        raise MnistError(f"MNIST file missing: {path}. {_fix(folder)}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip header, CRC error or cut-off stream
        raise MnistError(f"MNIST file {path} is not a readable gzip file ({e}). Delete it. {_fix(folder)}") from e
    ndim = 3 if kind == "images" else 1
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise MnistError(f"MNIST file {path} is truncated: {len(raw)} bytes, no IDX header. {_fix(folder)}")
    magic, *dims = (int(x) for x in np.frombuffer(raw, ">u4", 1 + ndim))
    if magic != _MAGIC[kind]:
        raise MnistError(
            f"MNIST file {path} has magic {magic}, expected {_MAGIC[kind]} for an IDX {kind} file "
            f"(wrong file under this name?). {_fix(folder)}"
        )
    if kind == "images" and dims[1:] != [28, 28]:
        raise MnistError(f"MNIST file {path} holds {dims[1]}x{dims[2]} images, expected 28x28. {_fix(folder)}")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise MnistError(
            f"MNIST file {path} is truncated or padded: header promises {expected} payload bytes, "
            f"found {len(raw) - header}. Delete it. {_fix(folder)}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()  # writable, owns its memory


def load(folder: str | os.PathLike, split: Split, check_md5: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a split: (images uint8 [N,28,28], labels uint8 [N]); md5-checked against the official files."""
    folder = Path(folder)
    names = file_names(split)
    if check_md5:
        verify(folder, names)
    images = _read_idx(folder / names[0], "images", folder)
    labels = _read_idx(folder / names[1], "labels", folder)
    if len(images) != len(labels):
        raise MnistError(
            f"MNIST {split} split in {folder}: {len(images)} images but {len(labels)} labels. {_fix(folder)}"
        )
    if labels.size and labels.max() > 9:
        raise MnistError(f"MNIST file {folder / names[1]} has label {labels.max()} > 9. {_fix(folder)}")
    return images, labels


def _mirrors() -> list[str]:
    """Mirror base URLs: ``$CAPSDIST_MNIST_MIRRORS`` (comma-separated) or the public defaults."""
    env = os.environ.get(ENV_MIRRORS, "").strip()
    return [m.strip() for m in env.split(",") if m.strip()] if env else list(MIRRORS)


def _atomic_write(dest: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write ``dest`` via ``fill(fileobj)`` into a temporary sibling, then rename; never leaves partials."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_verified(src: BinaryIO, dest: Path, name: str, total: int | None, desc: str) -> None:
    """Stream ``src`` into ``dest`` atomically with a progress bar, refusing content with the wrong md5."""

    def fill(out: BinaryIO) -> None:
        h = hashlib.md5()
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False, disable=None) as bar:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
        if h.hexdigest() != MD5[name]:
            raise MnistError(f"{desc}: md5 {h.hexdigest()} != official {MD5[name]}")

    _atomic_write(dest, fill)


def download(folder: str | os.PathLike, mirrors: Sequence[str] | None = None, timeout: float = 30.0) -> Path:
    """Download every missing or bad file into ``folder``, trying mirrors in order; return the folder."""
    folder = Path(folder)
    mirrors = list(mirrors) if mirrors else _mirrors()
    for name in MD5:
        dest = folder / name
        if dest.is_file() and md5sum(dest) == MD5[name]:
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
                f"`python -m data_prep.mnist --dir {folder} --from DIR`, set ${ENV_DIR} to a folder holding them, "
                f"or point ${ENV_MIRRORS} at a reachable mirror."
            )
    return folder


def install_from(source: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Verify the four files in ``source`` and copy them atomically into ``folder``; return the folder."""
    source, folder = Path(source), Path(folder)
    verify(source)
    if source.resolve() == folder.resolve():
        return folder
    for name in MD5:
        with open(source / name, "rb") as src:
            _copy_verified(src, folder / name, name, (source / name).stat().st_size, str(source / name))
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

