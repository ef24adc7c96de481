"""Nothing capsdist writes in a run folder goes through a link planted after the start (issue 28 item 1): files it
opens in place refuse a link or FIFO (O_NOFOLLOW), files it writes atomically replace the link, never its target.
The refusal at the start of a run: tests/integration/test_hostile_folders.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from capsdist.cluster.runlock import RunLock
from capsdist.core.files import LinkedPathError, atomic_write, no_follow_opener, refuse_links
from capsdist.training.run import RUN_FILES, WANDB_LINKS, PredictionWriter, run_loggers


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A user's file outside the run folder, the target of the planted links."""
    target = tmp_path / "notes.txt"
    target.write_text("precious notes\n")
    return target


def plant(root: Path, name: str, target: Path) -> Path:
    """A link ``root/name`` -> ``target``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / name).symlink_to(target)
    return root / name


def test_the_lock_refuses_a_link(tmp_path: Path, outside: Path) -> None:
    """main: the lock opened through the link, and the PID truncated the target."""
    link = plant(tmp_path / "run", ".fit.lock", outside)
    with pytest.raises(LinkedPathError, match=f"{link} is a symbolic link to {outside}"):
        RunLock(tmp_path / "run").acquire()
    assert outside.read_text() == "precious notes\n" and link.is_symlink()


def test_predictions_refuse_a_link(tmp_path: Path, outside: Path) -> None:
    """main: predict emptied the target, then appended its rows to it."""
    plant(tmp_path / "run", "predictions.csv", outside)
    writer = PredictionWriter(tmp_path / "run")
    with pytest.raises(LinkedPathError, match="predictions.csv is a symbolic link"):
        writer.on_predict_start(SimpleNamespace(world_size=1, global_rank=0), None)
    assert outside.read_text() == "precious notes\n"


def test_the_stored_wandb_id_is_not_read_through_a_link(tmp_path: Path, outside: Path) -> None:
    """main: the target's first line became the W&B run id of the resumed run."""
    plant(tmp_path / "run", "wandb_run_id", outside)
    with pytest.raises(LinkedPathError, match="wandb_run_id is a symbolic link"):
        run_loggers(tmp_path / "run", "offline", None, resuming=True)


def test_atomic_writes_replace_a_link_never_its_target(tmp_path: Path, outside: Path) -> None:
    """config.yaml, wandb_run_id, slurm_job, figures and checkpoints go through the atomic writer: a link planted
    at the name is replaced by the new file."""
    link = plant(tmp_path / "run", "config.yaml", outside)
    atomic_write(link, lambda f: f.write(b"model: {}\n"))
    assert not link.is_symlink() and link.read_text() == "model: {}\n"
    assert outside.read_text() == "precious notes\n"


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO opened to read or write would block until another process opens it."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    for mode in ("rb", "ab"):
        with pytest.raises(LinkedPathError, match="is a FIFO"), open(fifo, mode, opener=no_follow_opener):
            pass


def test_the_start_check_lets_wandb_keep_its_own_links(tmp_path: Path, outside: Path) -> None:
    """W&B's own links in its folder pass; the same name deeper, or any other link, is refused."""
    run = tmp_path / "run"
    (run / "wandb" / "offline-run-1" / "logs").mkdir(parents=True)
    for name in ("latest-run", "debug.log", "offline-run-1/logs/debug-core.log"):
        (run / "wandb" / name).symlink_to(outside)
    refuse_links(run, RUN_FILES, WANDB_LINKS)
    plant(run / "csv", "debug.log", outside)
    with pytest.raises(LinkedPathError, match=f"holds csv/debug.log, a symbolic link to {outside}"):
        refuse_links(run, RUN_FILES, WANDB_LINKS)


def test_the_start_check_reads_only_the_runs_own_entries(tmp_path: Path, outside: Path) -> None:
    """A run folder of `.` may hold links that are not the run's (a venv's lib64): only the run's names count."""
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "lib64").symlink_to(tmp_path / "venv")
    (tmp_path / "notes").symlink_to(outside)
    refuse_links(tmp_path, RUN_FILES, WANDB_LINKS)
    (tmp_path / "predictions-rank1.csv").symlink_to(outside)
    with pytest.raises(LinkedPathError, match="holds predictions-rank1.csv, a symbolic link"):
        refuse_links(tmp_path, RUN_FILES, WANDB_LINKS)


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    """A bare ENOSPC from a writer (no file name in it) comes out naming the file; the old file is intact and no temp
    file is left."""
    dest = tmp_path / "last.ckpt"
    dest.write_bytes(b"old")

    def full(handle: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(dest, full)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(dest)
    assert dest.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
