"""Hostile run folders, sharded checkpoints and configs through the commands users run (issue 28 items 1, 2, 8):
nothing is written through a planted link, nothing outside a checkpoint directory is read, nothing a config names
outside capsdist, Lightning and torch is imported; each case is one paragraph with exit 2, refused before the run
writes anything. Every command runs in this process (refusals come before any training: seconds each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capsdist.training import cli as train
from tests.conftest import TINY

RUN = [*TINY, "--wandb_mode=disabled", "--trainer.max_steps=1", "--data.train_samples=32"]


def refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``python -m capsdist.train ARGS`` here; its one-paragraph error (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("capsdist: error:")]
    assert stop.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


# ------------------------------------------------------------------------ item 1: nothing written through a link

LINKS = {  # the file a run writes -> the command that wrote through it on main
    ".fit.lock": ["fit"],
    "config.yaml": ["fit", "--ckpt_path=auto"],
    "predictions.csv": ["predict"],
    "wandb_run_id": ["fit", "--ckpt_path=auto", "--wandb_mode=offline"],
    "checkpoints": ["fit"],
}


@pytest.mark.parametrize("name", LINKS)
def test_a_planted_link_in_the_run_folder_is_refused(name: str, tmp_path: Path, capsys) -> None:
    """RUN/NAME -> a file (a folder for checkpoints/) outside: exit 2 naming the link and its target before
    anything is written (main: the lock, config, predictions or W&B id went into the target)."""
    target = tmp_path / ("elsewhere" if name == "checkpoints" else "notes.txt")
    if name == "checkpoints":
        target.mkdir()
        (target / "keep.txt").write_text("a teammate's file\n")
    else:
        target.write_text("precious notes\n")
    before, run = snapshot(target), tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    command, *flags = LINKS[name]
    error = refused([command, *RUN, f"--trainer.default_root_dir={run}", *flags], capsys)
    assert f"holds {name}, a symbolic link to {target}" in error and f"Fix: remove it (`rm {run / name}`" in error
    assert snapshot(target) == before and os.listdir(run) == [name]


def test_a_fifo_in_the_run_folder_is_refused(tmp_path: Path, capsys) -> None:
    """config.yaml as a FIFO (writing it would block for ever): refused at the start."""
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "config.yaml")
    error = refused(["fit", *RUN, f"--trainer.default_root_dir={run}"], capsys)
    assert "holds config.yaml, a FIFO" in error and os.listdir(run) == ["config.yaml"]
