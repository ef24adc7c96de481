"""`torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m capsdist.train fit ...` of a tiny config, for the
torchrun restart test and the fault matrix's torchrun cells."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TINY_MODEL
from tests.scale_probe import train_env, write_yaml


def torchrun_command(root: Path, *extra: str) -> list[str]:
    """The torchrun command line (gloo, 2 ranks, loader workers on, W&B offline, 12 steps); ``extra`` comes last, so
    it overrides (another --config, --trainer.strategy, ...)."""
    config = write_yaml(root.parent / "tiny.yaml", {"model": TINY_MODEL})
    args = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--config", str(config),
            "--data.source=mnist", "--data.batch_size=16", "--data.train_samples=1024", "--data.val_samples=32",
            "--data.num_workers=2", "--wandb_mode=offline", "--trainer.max_steps=12", "--checkpoint_every_n_steps=4",
            "--trainer.enable_progress_bar=false", "--trainer.deterministic=true", f"--trainer.default_root_dir={root}"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
            "--monitor-interval=0.5", "-m", "capsdist.train", "fit", *args, *extra]  # fmt: skip


def torchrun_env() -> dict[str, str]:
    """The training environment without a fixed rendezvous port (``--standalone`` picks one)."""
    return {k: v for k, v in train_env(WANDB_SILENT="true").items() if k not in ("MASTER_PORT", "MASTER_ADDR")}


def torchrun(root: Path, log: Path, *extra: str, cwd: Path = REPO) -> int:
    """Run :func:`torchrun_command` to the end, output into ``log``; returns torchrun's exit code."""
    with log.open("w") as out:
        return subprocess.run(torchrun_command(root, *extra), env=torchrun_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=600, cwd=cwd).returncode  # fmt: skip
