"""A sharded save never leaves a run without a loadable ``last`` (issue 28 item 2): a kill between the two renames
of ``_replace`` leaves the previous checkpoint as ``.last.ckpt.old``, where ``--ckpt_path last`` finds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from capsdist.checkpoint import sharded
from capsdist.training import resume


def state(step: int) -> dict:
    """A small checkpoint of ``step``."""
    return {"state_dict": {"w": torch.full((8, 4), float(step))}, "global_step": step}


def test_a_kill_between_the_renames_leaves_a_loadable_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kill (main: only .last.ckpt.old/ and .last.ckpt.tmp/ left, and `--ckpt_path last` found neither)."""
    folder = tmp_path / "checkpoints"
    sharded.save(state(5), folder / "last.ckpt", {})
    rename = os.replace

    def killed(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == ".last.ckpt.tmp":  # the new checkpoint about to be renamed into place
            raise KeyboardInterrupt("killed")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        sharded.save(state(6), folder / "last.ckpt", {})
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == [".last.ckpt.old", ".last.ckpt.tmp"]
    path, step = resume.resolve("last", tmp_path)
    assert (path.name, step) == (".last.ckpt.old", 5)
    loaded = resume.AtomicCheckpointIO().load_checkpoint(path)  # what the resumed fit loads
    assert loaded["global_step"] == 5 and torch.equal(loaded["state_dict"]["w"], torch.full((8, 4), 5.0))
    sharded.save(state(7), folder / "last.ckpt", {})  # the resumed run's next save: the old copy goes only now
    assert os.listdir(folder) == ["last.ckpt"] and resume.resolve("last", tmp_path)[1] == 7
