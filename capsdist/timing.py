"""Wall-clock time of a fit as a logged metric, so learning curves can be read against time as well as steps."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class WallClock(Callback):
    """Logs `time/elapsed_s`, the seconds since this process's fit started, at the end of every validation."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock."""
        self.started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the elapsed seconds beside the validation metrics (not during the sanity check)."""
        if not trainer.sanity_checking and hasattr(self, "started"):
            pl_module.log("time/elapsed_s", time.perf_counter() - self.started)
