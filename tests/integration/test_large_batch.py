"""configs/mnist_large_batch.yaml as a user runs it (here on the CPU, a tiny model): the digits composed where the
batch lives (no workers), and the learning rate warmed up linearly, then decayed as configured."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from capsdist.training import cli as train
from tests.conftest import REPO

TINY_OVERRIDES = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32", "--trainer.max_steps=6",
    "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
    "--model.conv_channels=16", "--model.primary_channels=4", "--model.decoder_hidden=[32, 64]",
    "--model.log_images_every_n_steps=0", "--model.warmup_steps=4", "--data.batch_size=32",
    "--data.train_samples=256", "--data.val_samples=64", "--wandb_mode=disabled",
]  # fmt: skip


def test_large_batch_recipe_warms_up_then_decays(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """lr at step k is lr * min(1, (k+1)/warmup) * decay^(k/period): a ramp to the scaled lr, then the decay."""
    config = REPO / "configs" / "mnist_large_batch.yaml"
    train.main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", *TINY_OVERRIDES])
    assert '"global_step": 6' in capsys.readouterr().out
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).open()))
    lrs = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    expected = [0.0028 * min(1.0, (k + 1) / 4) * 0.96 ** (k / 250) for k in range(6)]
    assert lrs == pytest.approx(expected, rel=1e-6)
