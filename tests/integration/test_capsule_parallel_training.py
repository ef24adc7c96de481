"""Capsule parallelism through the training CLI (configs/strategy/capsule_parallel.yaml, real gloo): 2 processes
sharing each batch and splitting the routed layers train to the same weights as 1 process, across a resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsdist.checkpoint.__main__ import main
from capsdist.checkpoint.sharded import read_full
from capsdist.model.trained import load_trained
from tests.conftest import REPO, TINY_MODEL
from tests.scale_probe import train_env, write_yaml


def _fit(tmp_path: Path, name: str, devices: int, steps: int, *extra: str, strategy: str = "capsule_parallel") -> Path:
    """`python -m capsdist.train fit` of the tiny two-layer CapsNet; returns the run's last.ckpt."""
    config = write_yaml(tmp_path / "tiny.yaml", {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "precision": 32, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": TINY_MODEL,  # one routed layer, 144 input capsules (a second one would start with ~0 gradients)
        "data": {"source": "mnist", "batch_size": 8, "train_samples": 16, "val_samples": 8},  # default loader workers
    })  # fmt: skip
    overlay = ["--config", str(REPO / "configs" / "strategy" / f"{strategy}.yaml")] if devices > 1 else []
    cmd = [sys.executable, "-m", "capsdist.train", "fit", "--config", str(config), *overlay, "--wandb_mode=disabled",
           f"--trainer.devices={devices}", f"--trainer.max_steps={steps}",
           f"--trainer.default_root_dir={tmp_path / name}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=train_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / name / "checkpoints" / "last.ckpt"


def _load(path: Path) -> dict:
    """A single-file checkpoint, or a sharded directory read whole."""
    return read_full(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)


def _assert_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_two_process_capsule_parallel_run_equals_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    """2 steps (batches of 8) with 1 process and with 2 capsule-parallel processes (each rank the full batch): the
    same weights and Adam moments, saved sharded (a directory). Resumed from it to step 4 by 2 capsule-parallel
    processes (`--ckpt_path last`) and, the directory itself, by 1 plain process: the same weights. evaluate's loader
    reads the directory into a plain CapsNet."""
    single = _load(_fit(tmp_path, "single", 1, 2))
    first = _fit(tmp_path, "sharded", 2, 2)
    sharded = _load(first)
    _assert_close(sharded["state_dict"], single["state_dict"])
    moments = sharded["optimizer_states"][0]["state"]
    assert moments[4]["exp_avg"].shape == (144, 10, 16, 4)  # the routed layer's W: full Adam moments
    for index, state in single["optimizer_states"][0]["state"].items():
        _assert_close(moments[index], state)

    assert first.is_dir()  # sharded: each rank wrote its rows (capsdist.checkpoint.sharded)
    one_file = tmp_path / "one.ckpt"
    main(["convert", str(first), str(one_file)])
    _assert_close(_load(one_file)["state_dict"], sharded["state_dict"])
    alone = _load(_fit(tmp_path, "alone", 1, 4, f"--ckpt_path={first}"))  # a plain run resumes the directory
    resumed = _load(_fit(tmp_path, "sharded", 2, 4, "--ckpt_path=last"))
    assert resumed["global_step"] == alone["global_step"] == 4
    _assert_close(resumed["state_dict"], alone["state_dict"])
    assert (resumed["state_dict"]["model.caps.0.weight"] != sharded["state_dict"]["model.caps.0.weight"]).any()

    trained = load_trained(tmp_path / "sharded" / "checkpoints" / "last.ckpt")  # what evaluate/figures load
    assert type(trained.model.caps[0]).__name__ == "CapsLayer"  # a plain CapsNet, strict load, one process
    assert trained.global_step == 4 and torch.isfinite(trained.model(torch.rand(2, 1, 28, 28)).lengths).all()



@pytest.mark.slow
def test_two_capsule_groups_of_two_train_like_ddp_on_two_ranks(tmp_path: Path) -> None:
    """4 processes = 2 capsule groups x 2 ranks: group g reads data stream g and DDP runs across the groups, so the
    weights equal plain DDP on 2 processes (streams 0 and 1, gradients averaged)."""
    ddp = _load(_fit(tmp_path, "ddp", 2, 2, strategy="ddp"))
    groups = _load(_fit(tmp_path, "groups", 4, 2, "--trainer.strategy.init_args.group_size=2"))
    _assert_close(groups["state_dict"], ddp["state_dict"])


def test_group_size_that_does_not_divide_the_job_is_refused(tmp_path: Path) -> None:
    """group_size 2 in a 1-process job: a one-paragraph capsdist error (exit 2) naming the fix, no traceback."""
    config = write_yaml(tmp_path / "tiny.yaml", {"model": TINY_MODEL, "data": {"source": "mnist", "num_workers": 0}})
    cmd = [sys.executable, "-m", "capsdist.train", "fit", "--config", str(config), "--config",
           str(REPO / "configs" / "strategy" / "capsule_parallel.yaml"), "--trainer.strategy.init_args.group_size=2",
           "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=1", "--wandb_mode=disabled",
           f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, env=train_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "capsdist: error: capsule group size 2 does not divide the 1 ranks" in proc.stderr
    assert "Traceback" not in proc.stderr
