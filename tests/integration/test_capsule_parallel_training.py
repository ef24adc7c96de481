"""Capsule parallelism through the training CLI (configs/strategy/capsule_parallel.yaml, real gloo): 2 processes
sharing each batch and splitting the routed layers train to the same weights as 1 process, across a resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL
from tests.scale_probe import train_env, write_yaml


def _fit(tmp_path: Path, name: str, devices: int, steps: int, *extra: str) -> Path:
    """`python -m capsdist.train fit` of the tiny two-layer CapsNet; returns the run's last.ckpt."""
    config = write_yaml(tmp_path / "tiny.yaml", {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "precision": 32, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "model": {**TINY_MODEL, "caps_layers": [[7, 6], [10, 8]]},  # 2 routed layers, 144 and 7 inputs (odd)
        "data": {"source": "mnist", "batch_size": 8, "num_workers": 0, "train_samples": 16, "val_samples": 8},
    })  # fmt: skip
    overlay = ["--config", str(REPO / "configs" / "strategy" / "capsule_parallel.yaml")] if devices > 1 else []
    cmd = [sys.executable, "-m", "capsdist.train", "fit", "--config", str(config), *overlay, "--wandb_mode=disabled",
           f"--trainer.devices={devices}", f"--trainer.max_steps={steps}",
           f"--trainer.default_root_dir={tmp_path / name}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=train_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / name / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_two_process_capsule_parallel_run_equals_one_process_and_resumes_exactly(tmp_path: Path) -> None:
    """1 process x 4 steps vs 2 capsule-parallel processes x 2 steps + resume to 4 (Adam moments of the sharded
    W re-sliced from the full checkpoint): the same final weights; the checkpoint loads into a plain CapsNet."""
    single = torch.load(_fit(tmp_path, "single", 1, 4), map_location="cpu", weights_only=True)
    first = _fit(tmp_path, "sharded", 2, 2)
    sharded = torch.load(first, map_location="cpu", weights_only=True)
    assert sharded["state_dict"]["model.caps.0.weight"].shape == single["state_dict"]["model.caps.0.weight"].shape
    moments = sharded["optimizer_states"][0]["state"]
    assert any(s["exp_avg"].shape == (144, 7, 6, 4) for s in moments.values())  # full Adam moments of W
    resumed = torch.load(_fit(tmp_path, "sharded", 2, 4, f"--ckpt_path={first}"), map_location="cpu",
                         weights_only=True)  # fmt: skip
    assert resumed["global_step"] == single["global_step"] == 4
    assert single["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)

    from capsdist.module import CapsNetModule

    module = CapsNetModule.load_from_checkpoint(tmp_path / "sharded" / "checkpoints" / "last.ckpt", map_location="cpu")
    assert type(module.model.caps[0]).__name__ == "CapsLayer"  # a plain CapsNet, strict load, one process
    assert torch.isfinite(module(torch.rand(2, 1, 28, 28))).all()
