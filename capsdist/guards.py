"""Training guards: stop at the first non-finite loss or gradient, and log the skipped-sample count.

``NonFiniteGuard`` checks the gradients in ``on_before_optimizer_step`` (after backward and the DDP all-reduce,
before the weights change), then the loss and the updated weights in ``on_train_batch_end`` (Lightning runs the
checkpoint callbacks after all others). Finite gradients can still overflow the weights (Adam's first step with
lr 1e38 is inf), so the guard keeps a copy of the weights from before each step and puts it back before it stops:
no checkpoint, not even the one written on the exception, holds non-finite weights. The copy costs one extra set
of weights in memory (Adam already holds two). ``max_skips=N`` drops up to N bad steps (non-finite gradients or
loss) before stopping; configure it as a trainer callback:
``--trainer.callbacks+=capsdist.guards.NonFiniteGuard --trainer.callbacks.max_skips=3``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from capsdist import CapsdistError


class NonFiniteError(CapsdistError):
    """A NaN or infinite loss or gradient: the run stops at the step it happened."""


class NonFiniteGuard(Callback):
    """Raise NonFiniteError at the first non-finite loss or gradient (or skip up to ``max_skips`` bad steps)."""

    def __init__(self, max_skips: int = 0) -> None:
        """``max_skips``: bad steps to drop (optimizer step skipped) before stopping; 0 stops at the first."""
        if max_skips < 0:
            raise CapsdistError(f"NonFiniteGuard max_skips={max_skips}: must be >= 0.")
        self.max_skips, self.skipped, self.step_dropped = max_skips, 0, False
        self.before: list[torch.Tensor] = []  # the weights before the current optimizer step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """A new step: nothing dropped yet."""
        self.step_dropped = False

    def _stop(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
        """Put back the weights from before this step, then raise the one-paragraph error (step, likely cause)."""
        params = list(pl_module.parameters())
        if len(self.before) == len(params):
            with torch.no_grad():
                for p, saved in zip(params, self.before, strict=True):
                    p.copy_(saved)
        lr = f"{trainer.optimizers[0].param_groups[0]['lr']:.3g}" if trainer.optimizers else "unknown"
        raise NonFiniteError(
            f"non-finite {what} at step {trainer.global_step} (epoch {trainer.current_epoch}); training stopped "
            f"with the weights of before that step, so every checkpoint holds finite weights. Likely cause: a "
            f"learning rate "
            f"too high for this model (lr now {lr}), or low precision ({trainer.precision}) overflowing. Fix: "
            "lower --model.lr, train with --trainer.precision 32, or resume from the last checkpoint with "
            "--trainer.callbacks+=capsdist.guards.NonFiniteGuard --trainer.callbacks.max_skips N to drop rare "
            "bad steps."
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Check every gradient (all ranks agree); skip the step or stop on a non-finite one."""
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16's GradScaler skips inf steps itself and lowers its scale; the loss check still applies
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if trainer.strategy.reduce_boolean_decision(not finite, all=False):
            self.skipped, self.step_dropped = self.skipped + 1, True
            if self.skipped > self.max_skips:
                self._stop(trainer, pl_module, "gradient")
            optimizer.zero_grad(set_to_none=True)  # Adam leaves parameters without gradients untouched
            return
        params = list(pl_module.parameters())
        if len(self.before) != len(params):
            self.before = [p.detach().clone() for p in params]
        with torch.no_grad():
            for saved, p in zip(self.before, params, strict=True):
                saved.copy_(p)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop on non-finite weights; a non-finite loss is a bad step (counted once); stop past the limit."""
        weights = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        if trainer.strategy.reduce_boolean_decision(not weights, all=False):
            self._stop(trainer, pl_module, "weights after the optimizer step")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        self.skipped += 0 if self.step_dropped else 1
        if self.skipped > self.max_skips:
            self._stop(trainer, pl_module, "loss")


class DataSkips(Callback):
    """Logs ``data/skipped``: corrupt samples skipped so far, summed over loader workers and ranks."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log this rank's count, summed over ranks by Lightning."""
        count = getattr(trainer.datamodule, "skipped", lambda: 0)()
        pl_module.log("data/skipped", float(count), reduce_fx="sum", sync_dist=True, on_step=True, on_epoch=False)


def fault_callbacks(configured: list[Callback]) -> list[Callback]:
    """The guards a run gets: the default NonFiniteGuard unless one is configured, and the skip count."""
    own = [] if any(isinstance(c, NonFiniteGuard) for c in configured) else [NonFiniteGuard()]
    return [*own, DataSkips()]
