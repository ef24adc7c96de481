"""Data people already have is usable, and what data_prep writes is readable by teammates: MNIST folders in
other layouts (uncompressed, torchvision's MNIST/raw/), user-named folders of other IDX data (with a warning), and
files created under the caller's umask."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from capsdist.data import mnist
from tests.conftest import REPO, SHIPPED, TINY, subprocess_env


def gunzip(name: str, dest: Path) -> Path:
    """Decompress a shipped file into ``dest`` under its uncompressed name, as torchvision's raw/ holds it."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / name.removesuffix(".gz")
    out.write_bytes(gzip.decompress((SHIPPED / name).read_bytes()))
    return out


def fashion_like(folder: Path, split: str, count: int) -> np.ndarray:
    """A valid IDX split that is not MNIST (inverted digits, ``count`` of them), gzipped; returns its images."""
    images, labels = mnist.load(SHIPPED, split)
    folder.mkdir(parents=True, exist_ok=True)
    names = mnist.file_names(split)  # type: ignore[arg-type]
    for name, magic, array in ((names[0], 2051, 255 - images[:count]), (names[1], 2049, labels[:count])):
        header = np.array([magic, *array.shape], ">u4").tobytes()
        (folder / name).write_bytes(gzip.compress(header + array.tobytes()))
    return 255 - images[:count]


def test_torchvision_raw_layout_uncompressed_loads_silently(tmp_path: Path) -> None:
    for name in mnist.file_names("test"):
        gunzip(name, tmp_path / "MNIST" / "raw")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official files, uncompressed: no warning
        images, labels = mnist.load(tmp_path, "test")
    expected = mnist.load(SHIPPED, "test")
    assert np.array_equal(images, expected[0]) and np.array_equal(labels, expected[1])


def test_from_installs_a_torchvision_folder(tmp_path: Path) -> None:
    for name in mnist.MD5:
        gunzip(name, tmp_path / "root" / "MNIST" / "raw")
    done = subprocess.run(
        [sys.executable, "-m", "data_prep.mnist", "--from", str(tmp_path / "root"), "--dir", str(tmp_path / "d")],
        env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    mnist.verify(tmp_path / "d")  # installed uncompressed, still held to the official checksums
    assert "test: 10000 images" in done.stdout


def test_named_folder_with_other_idx_data_is_used_with_a_warning(tmp_path: Path) -> None:
    expected = fashion_like(tmp_path / "fashion", "test", 300)
    with pytest.warns(mnist.UnofficialMnistWarning, match=r"t10k-images-idx3-ubyte.gz is not the official"):
        images, _ = mnist.load(tmp_path / "fashion", "test")
    assert np.array_equal(images, expected)


def test_training_on_a_named_folder_of_other_idx_data(tmp_path: Path) -> None:
    """The command a user runs: `fit --data.mnist_dir DIR` trains on it, saying the files are not MNIST's."""
    for split in ("train", "test"):
        fashion_like(tmp_path / "fashion", split, 96)
    args = ["fit", *TINY, "--trainer.max_steps=2", "--data.train_samples=64", "--data.val_samples=32",
            f"--data.mnist_dir={tmp_path / 'fashion'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--wandb_mode=disabled"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "capsdist.train", *args], env=subprocess_env(), capture_output=True, text=True,
        timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train-images-idx3-ubyte.gz is not the official MNIST file" in done.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_shipped_copy_and_cache_stay_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fashion_like(tmp_path, "test", 10)
    monkeypatch.setattr(mnist, "REPO_DIR", tmp_path)
    with pytest.raises(mnist.MnistError, match="expected the official"):
        mnist.load(tmp_path, "test")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Shards, manifest and installed MNIST files get 0666 & ~umask, like any file `open()` creates."""
    run = f"umask {umask:03o} && exec {sys.executable} -m"
    commands = [
        f"{run} data_prep.multimnist --mnist-dir {SHIPPED} --split test --num-samples 20 --shard-size 10 "
        f"--workers 1 --out {tmp_path / 'shards'}",
        f"{run} data_prep.mnist --from {SHIPPED} --dir {tmp_path / 'mnist'}",
    ]
    for command in commands:
        done = subprocess.run(["sh", "-c", command], env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 3 + 4  # two shards + manifest.json, the four MNIST files
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


def test_official_copy_elsewhere_loads_silently(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED, tmp_path / "copy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mnist.load(tmp_path / "copy", "test")  # an official copy elsewhere: no warning
