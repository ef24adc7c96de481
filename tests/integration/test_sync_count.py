"""The training step does not wait for the device: device->host reads per step of a real CLI fit, counted with a
dispatch-mode counter (capsdist.bench.syncs), and the non-finite guard that works without per-step reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from capsdist.bench.syncs import SyncCounter
from capsdist.training import cli as train
from capsdist.training.guards import NonFiniteError, NonFiniteGuard
from tests.conftest import TINY

FIT = ["fit", *[f for f in TINY if "num_workers" not in f and "log_every" not in f], "--data.val_samples=64"]


def counted_fit(monkeypatch: pytest.MonkeyPatch, root: Path, *flags: str) -> SyncCounter:
    """Run the CLI's fit in this process with a SyncCounter as the first callback; return the counter."""
    counter, instantiate = SyncCounter(), train.CapsCLI.instantiate_trainer

    def with_counter(self: train.CapsCLI, **kwargs: object) -> pl.Trainer:
        trainer = instantiate(self, **kwargs)
        trainer.callbacks.insert(0, counter)  # first: its window opens before any other callback's hook
        return trainer

    monkeypatch.setattr(train.CapsCLI, "instantiate_trainer", with_counter)
    train.main([*FIT, f"--trainer.default_root_dir={root}", *flags])
    return counter


def test_ordinary_step_never_reads_the_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Defaults on (W&B offline, diagnostics, guard, stop flag, throughput, progress lines), loader workers on: a step
    that is not a logging step makes no device->host read at all; logging steps may read, and the loss they log
    reaches the progress lines."""
    flags = ["--trainer.log_every_n_steps=5", "--trainer.max_steps=12", "--data.train_samples=640"]
    counter = counted_fit(monkeypatch, tmp_path, "--wandb_mode=offline", "--data.num_workers=2", *flags)
    logging = {5, 10}
    ordinary = {step: reads for step, reads in counter.steps.items() if step not in logging and 1 < step < 12}
    assert len(ordinary) == 8
    assert all(not reads for reads in ordinary.values()), {s: r for s, r in ordinary.items() if r}
    assert all(len(counter.steps[step]) > 1 for step in logging)  # the counter sees reads where there are some


class Line(pl.LightningModule):
    """A linear regression with the fused Adam capsdist trains with."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.1, fused=True)


class PoisonGrads(pl.Callback):
    """NaN gradients on the given steps (before the guard looks at them)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.weights = steps, {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: object) -> None:
        if trainer.global_step in self.steps:
            pl_module.net.weight.grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.weights[trainer.global_step] = pl_module.net.weight.detach().clone()


def _fit(max_skips: int, tmp_path: Path) -> tuple[Line, PoisonGrads]:
    """Six steps with NaN gradients on steps 2 and 3 (0-based), logging every 3 steps."""
    torch.manual_seed(0)
    module, poison = Line(), PoisonGrads({2, 3})
    trainer = pl.Trainer(
        max_steps=6, log_every_n_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[poison, NonFiniteGuard(max_skips)], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=8))
    return module, poison


def test_bad_gradients_are_skipped_on_the_device(tmp_path: Path) -> None:
    """max_skips=2: the two NaN steps leave the weights and Adam's step count untouched, training goes on."""
    module, poison = _fit(2, tmp_path)
    assert torch.equal(poison.weights[2], poison.weights[4]) and not torch.equal(poison.weights[4], poison.weights[6])
    optimizer = module.trainer.optimizers[0]
    assert int(optimizer.state[module.net.weight]["step"]) == 4
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_too_many_bad_gradients_stop_at_the_check(tmp_path: Path) -> None:
    """max_skips=1: the second NaN step stops the run at the next check, naming the first bad step."""
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 3 \(2 bad steps, 1 allowed\)"):
        _fit(1, tmp_path)
