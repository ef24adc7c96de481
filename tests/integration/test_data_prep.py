"""Tests for data_prep: MNIST intake (real files, loopback HTTP) and MultiMNIST shards (real subprocesses)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsdist.data import mnist
from data_prep import mnist as mnist_cli
from data_prep import multimnist
from tests.conftest import REPO, SHIPPED


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
    assert mnist_cli.main(["--from", str(SHIPPED), "--dir", str(tmp_path)]) == 0
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
        mnist.load(tmp_path, "test", check_md5=True)


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


def test_first_samples_of_an_official_split_read_alone(tmp_path: Path) -> None:
    """``first=N`` gives the whole read's first N samples; a file not held to the official md5 is still read whole,
    so its padding is found even when only its start is wanted."""
    whole = mnist.load(SHIPPED, "test")
    for n in (1, 500, 10_000, 20_000):
        part = mnist.load(SHIPPED, "test", first=n)
        assert all(np.array_equal(a, b[:n]) for a, b in zip(part, whole, strict=True))
    images, labels = mnist.file_names("train")
    _write_idx(tmp_path / images, 2051, [2, 28, 28], bytes(3 * 784))
    _write_idx(tmp_path / labels, 2049, [2], bytes(2))
    with pytest.raises(mnist.MnistError, match=r"truncated or padded: header promises 1568 .* found 2352"):
        mnist.load(tmp_path, "train", check_md5=False, first=1)


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


# ---------------------------------------------------------------- MultiMNIST shards


def _run_cli(*args: str, **kw: object) -> subprocess.CompletedProcess:
    """Run `python -m data_prep.multimnist` in a real subprocess with the repo on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "data_prep.multimnist", "--mnist-dir", str(SHIPPED), "--split", "test", *args]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120, **kw)


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a tar shard: key -> {extension: bytes}."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    """Every visible file of a folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shard set (250 test-split samples, shards of 100) written by the CLI with 2 workers."""
    out = tmp_path_factory.mktemp("mm")
    _run_cli("--num-samples", "250", "--shard-size", "100", "--seed", "7", "--workers", "2", "--out", str(out))
    return out


def test_shards_geometry_exact(shard_dir: Path) -> None:
    """Every sample: digits are the source digits at offsets 0..8, labels differ, input = clip(d0 + d1)."""
    images, labels = mnist.load(SHIPPED, "test")
    seen = 0
    for path in sorted(shard_dir.glob("test-*.tar")):
        for key, s in _read_shard(path).items():
            assert sorted(s) == ["digit0.png", "digit1.png", "input.png", "meta.json"]
            meta = json.loads(s["meta.json"])
            x, d0, d1 = (np.array(Image.open(io.BytesIO(s[k]))) for k in ("input.png", "digit0.png", "digit1.png"))
            assert x.shape == d0.shape == (36, 36) and x.dtype == np.uint8
            assert np.array_equal(x, np.minimum(d0.astype(int) + d1, 255))
            for digit, idx, label, (r, c) in zip(
                (d0, d1), meta["indices"], meta["labels"], meta["offsets"], strict=True
            ):
                assert 0 <= r <= 8 and 0 <= c <= 8
                assert label == labels[idx]
                canvas = np.zeros((36, 36), np.uint8)
                canvas[r : r + 28, c : c + 28] = images[idx]
                assert np.array_equal(digit, canvas)
            assert meta["labels"][0] != meta["labels"][1]
            assert int(key) == seen
            seen += 1
    assert seen == 250


def test_manifest_matches_files(shard_dir: Path) -> None:
    """The manifest lists exactly the shards on disk, with their real counts and sha256."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["total"] == 250
    assert manifest["params"]["num_samples"] == 250 and manifest["params"]["shard_size"] == 100
    assert [s["name"] for s in manifest["shards"]] == sorted(p.name for p in shard_dir.glob("*.tar"))
    for s in manifest["shards"]:
        path = shard_dir / s["name"]
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert s["count"] == len(_read_shard(path))
    assert [s["count"] for s in manifest["shards"]] == [100, 100, 50]
    assert not list(shard_dir.glob(".*"))  # no journal or temporaries left


def test_tar_members_fixed_metadata(shard_dir: Path) -> None:
    """Tar members carry mtime 0, uid/gid 0, mode 0644, in sorted order."""
    with tarfile.open(shard_dir / "test-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}


def test_deterministic_across_worker_counts(shard_dir: Path, tmp_path: Path) -> None:
    """One worker gives byte-identical shards and manifest to two workers."""
    _run_cli("--num-samples", "250", "--shard-size", "100", "--seed", "7", "--workers", "1", "--out", str(tmp_path))
    assert _tree(tmp_path) == _tree(shard_dir)


def test_per_digit_rounds_cover_each_digit_k_times() -> None:
    """With --per-digit K, every source digit is the first digit of exactly K samples."""
    plan = multimnist.Plan("test", 10000, 3, None, 1000, 0)
    first = plan.first_digits(0, plan.total, torch.Generator())
    assert torch.bincount(first, minlength=10000).tolist() == [3] * 10000
    assert first[:100].tolist() != list(range(100))  # rounds are shuffled, not in split order
    assert torch.equal(plan.first_digits(9500, 10500, torch.Generator()), first[9500:10500])


def test_kill9_then_resume_is_byte_identical(shard_dir: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run leaves only complete shards; a re-run keeps verified ones and ends byte-identical."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--num-samples", "2000", "--shard-size", "25", "--seed", "3", "--workers", "1"]
    _run_cli(*args, "--out", str(ref))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "data_prep.multimnist", "--mnist-dir", str(SHIPPED), "--split", "test", *args]
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.tar"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("*.tar"))
    assert 3 <= len(finished) < 80 and not (out / "manifest.json").exists()
    for path in finished:  # nothing partial under a final name
        assert (out / path.name).read_bytes() == (ref / path.name).read_bytes()
    victim = finished[0]  # a kept shard damaged after the crash must be regenerated, not trusted
    victim.write_bytes(victim.read_bytes()[:-1])
    _run_cli(*args, "--out", str(out))
    assert _tree(out) == _tree(ref)
    assert not list(out.glob(".*"))


def test_rerun_with_other_params_refused(shard_dir: Path) -> None:
    """Re-running into a folder made with other parameters is refused with the fix named (the CLI's main in this
    process: the refusal comes before any work; the other cases run the real command)."""
    argv = ["--mnist-dir", str(SHIPPED), "--split", "test", "--num-samples", "250", "--shard-size", "100", "--seed",
            "8", "--out", str(shard_dir)]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        multimnist.main(argv)
    assert "other parameters" in str(info.value.code) and "another --out" in str(info.value.code)


def test_progress_lines_when_stdout_is_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`data_prep.multimnist ... > log` prints plain lines (count, rate, ETA), not a bar and not nothing; lines come
    at most every `every` seconds (here 0: one per update) and at the end."""
    from capsdist.core.progress import Progress

    line = re.compile(r"^(\d+)/(\d+) samples \(\d+%\), [\d,]+ samples/s, ETA (\d+:\d\d:\d\d|\?)$")
    done = _run_cli("--num-samples", "40", "--shard-size", "10", "--workers", "1", "--out", str(tmp_path / "s"))
    lines = done.stdout.splitlines()
    assert line.match(lines[-2]) and line.match(lines[-2]).group(1) == "40", done.stdout
    assert lines[-1].endswith("manifest.json") and "\r" not in done.stdout + done.stderr
    with Progress(30, initial=10, every=0) as bar:
        for _ in range(2):
            bar.update(10)
    counts = [int(line.match(row).group(1)) for row in capsys.readouterr().out.splitlines()]
    assert counts == [20, 30]
    with Progress(None, unit="images", every=60, label="evaluate", stream=sys.stderr) as bar:  # count unknown
        bar.update(5)
    assert re.match(r"^evaluate: 5 images, [\d,]+ images/s$", capsys.readouterr().err)  # the last line, at the end
