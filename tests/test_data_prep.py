"""Tests for data_prep: MNIST intake (real files, loopback HTTP) and MultiMNIST shards (real subprocesses)."""

from __future__ import annotations

import gzip
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from data_prep import mnist

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "mnist"


def _write_idx(path: Path, magic: int, dims: list[int], payload: bytes) -> None:
    """Write a gzipped IDX file with an arbitrary header and payload."""
    header = np.array([magic, *dims], ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    root = tmp_path_factory.mktemp("www")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root
    server.shutdown()


def test_shipped_copy_loads_with_official_stats() -> None:
    """The shipped files pass md5 and match the statistics recorded in PROVENANCE.md."""
    images, labels = mnist.load(SHIPPED, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert round(float(images.mean()), 4) == 33.7912


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit beats the env var, which beats the repo copy."""
    monkeypatch.setenv(mnist.ENV_DIR, str(tmp_path / "env"))
    assert mnist.resolve_dir(tmp_path / "x") == tmp_path / "x"
    assert mnist.resolve_dir() == tmp_path / "env"
    monkeypatch.delenv(mnist.ENV_DIR)
    assert mnist.resolve_dir(fetch=False) == mnist.REPO_DIR


def test_download_with_mirror_fallback(http_root: tuple[str, Path], tmp_path: Path) -> None:
    """A dead mirror and a mirror with a corrupt file are skipped; the good one wins, md5-verified."""
    base, root = http_root
    (root / "good").mkdir()
    (root / "bad").mkdir()
    for name in mnist.MD5:
        shutil.copy(SHIPPED / name, root / "good" / name)
        (root / "bad" / name).write_bytes((SHIPPED / name).read_bytes()[:100])
    dest = tmp_path / "dl"
    mirrors = ["http://127.0.0.1:9/", base + "bad/", base + "good/"]
    mnist.download(dest, mirrors)
    mnist.verify(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(mnist.MD5)  # no temporaries left behind


def test_download_all_mirrors_fail_names_fix(http_root: tuple[str, Path], tmp_path: Path) -> None:
    """When no mirror serves a verified file, the error lists each mirror and the --from fix."""
    base, _ = http_root
    with pytest.raises(mnist.MnistError, match=r"(?s)404.*--from DIR"):
        mnist.download(tmp_path / "dl", [base + "nowhere/"])
    assert not any((tmp_path / "dl").glob("*"))


def test_cli_from_installs_and_verifies(tmp_path: Path) -> None:
    """`--from` verifies local files and installs them into --dir."""
    assert mnist.main(["--from", str(SHIPPED), "--dir", str(tmp_path)]) == 0
    mnist.verify(tmp_path)


def test_missing_file_named(tmp_path: Path) -> None:
    """A missing file gives an error naming it and the download command."""
    with pytest.raises(mnist.MnistError, match=r"missing: .*t10k-images-idx3-ubyte.gz.*python -m data_prep.mnist"):
        mnist.load(tmp_path, "test")


def test_bad_checksum_named(tmp_path: Path) -> None:
    """A file that is not the official one fails the md5 check, naming the file."""
    for name in mnist.file_names("test"):
        shutil.copy(SHIPPED / name, tmp_path / name)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mnist.MnistError, match=r"t10k-labels-idx1-ubyte.gz has md5 .* expected the official"):
        mnist.load(tmp_path, "test")


@pytest.mark.parametrize(
    ("magic", "dims", "payload", "message"),
    [
        (2051, [3, 28, 28], bytes(2 * 784), r"truncated or padded: header promises 2352 .* found 1568"),
        (2049, [3, 28, 28], bytes(3 * 784), r"magic 2049, expected 2051"),
        (2051, [3, 32, 32], bytes(3 * 1024), r"32x32 images, expected 28x28"),
        (2051, [3], b"", r"truncated: 8 bytes, no IDX header"),
    ],
)
def test_corrupt_idx_named(tmp_path: Path, magic: int, dims: list[int], payload: bytes, message: str) -> None:
    """Truncated, wrong-magic and wrong-shape IDX files give a named error."""
    images, labels = mnist.file_names("train")
    _write_idx(tmp_path / images, magic, dims, payload)
    _write_idx(tmp_path / labels, 2049, [3], bytes(3))
    with pytest.raises(mnist.MnistError, match=message) as info:
        mnist.load(tmp_path, "train", check_md5=False)
    assert images in str(info.value)


def test_cut_gzip_named(tmp_path: Path) -> None:
    """A gzip stream cut mid-file is reported as unreadable, naming the file."""
    images, labels = mnist.file_names("train")
    _write_idx(tmp_path / labels, 2049, [3], bytes(3))
    (tmp_path / images).write_bytes((SHIPPED / "train-images-idx3-ubyte.gz").read_bytes()[:5000])
    with pytest.raises(mnist.MnistError, match=r"train-images-idx3-ubyte.gz is not a readable gzip"):
        mnist.load(tmp_path, "train", check_md5=False)


def test_small_valid_idx_roundtrip(tmp_path: Path) -> None:
    """A hand-written 3-image split reads back exactly."""
    pix = np.arange(3 * 784, dtype=np.uint32).astype(np.uint8)
    images, labels = mnist.file_names("train")
    _write_idx(tmp_path / images, 2051, [3, 28, 28], pix.tobytes())
    _write_idx(tmp_path / labels, 2049, [3], bytes([4, 0, 9]))
    x, y = mnist.load(tmp_path, "train", check_md5=False)
    assert np.array_equal(x, pix.reshape(3, 28, 28)) and y.tolist() == [4, 0, 9]
