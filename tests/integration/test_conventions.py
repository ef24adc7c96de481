"""Lightning and W&B conventions a user expects of a run: everything in the run folder (config.yaml with or
without W&B, W&B's staging and logs; nothing under HOME), the W&B config nested once, `--trainer.logger false`,
and none of the warnings that say nothing about the user's run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capsdist.training.cli import main
from tests.conftest import TINY, subprocess_env
from tests.wandb_records import finished_records, read_run

SHORT = [*TINY, "--trainer.max_steps=3", "--data.train_samples=128", "--data.val_samples=64"]
NOISE = ("The anonymous setting has no effect", "`srun` command is available", "could not find the monitored key")


def test_wandb_run_keeps_home_clean_logs_config_once_and_prints_no_noise(tmp_path: Path) -> None:
    """A default (W&B offline) fit as a user runs it, with HOME in a temp folder: HOME stays empty, the config is
    nested once with no null entries, the checkpoints are artifacts by reference, and no known noise is printed."""
    home, root = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    env = {k: v for k, v in subprocess_env(HOME=str(home)).items() if not k.startswith(("WANDB_", "SLURM_"))}
    cmd = [sys.executable, "-m", "capsdist.train", "fit", *SHORT, f"--trainer.default_root_dir={root}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert [n for n in NOISE if n in output] == [], output[-3000:]
    assert [str(p) for p in home.rglob("*") if p.is_file()] == []
    (run_file,) = root.glob("wandb/offline-run-*/run-*.wandb")
    config = read_run(run_file)["config"]
    assert {"trainer", "model", "data"} <= set(config)
    assert not {"lr", "batch_size", "optimizer", "lr_scheduler"} & set(config)  # no flat copies, no unset flags
    assert config["model"]["lr"] == 0.003 and config["data"]["batch_size"] == 32
    assert None not in config.values()
    artifacts = [r.artifact for r in finished_records(run_file.parent) if r.WhichOneof("record_type") == "artifact"]
    (entry,) = [e for a in artifacts if a.type == "model" for e in a.manifest.contents]
    assert entry.ref == (root / "checkpoints" / "last.ckpt").resolve().as_uri()  # no copy staged anywhere
    assert (root / "config.yaml").is_file()


def test_no_wandb_and_no_logger_keep_config_in_the_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--wandb_mode disabled`: config.yaml in the run folder (not csv/version_0); `--trainer.logger false`
    trains without any logger (no LearningRateMonitor crash)."""
    for name, flag in (("csv", "--wandb_mode=disabled"), ("none", "--trainer.logger=false")):
        main(["fit", *SHORT, flag, f"--trainer.default_root_dir={tmp_path / name}"])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["global_step"] == 3, name
        assert (tmp_path / name / "config.yaml").is_file() and not list((tmp_path / name).glob("csv/*/config.yaml"))
    assert not (tmp_path / "none" / "csv").exists() and not (tmp_path / "none" / "wandb").exists()
    assert os.path.isfile(tmp_path / "none" / "checkpoints" / "last.ckpt")
