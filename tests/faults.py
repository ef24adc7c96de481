"""Faults planted into real `python -m capsdist.train` runs through a config's ``trainer.callbacks``."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml


class RaiseBeforeStep(pl.Callback):
    """Raise inside the training step that would make ``step`` (before its optimizer step), once: a bug in user
    code mid-step. ``marker`` is created when it fires, and a run that finds it raises nothing (the resume)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        """Raise at the chosen step, the first time only."""
        if trainer.global_step + 1 == self.step and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError(f"planted failure in step {self.step}")


class KillRankOnce(pl.Callback):
    """SIGKILL rank ``rank`` after step ``step`` in torchrun's first attempt (TORCHELASTIC_RESTART_COUNT 0)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        """Die at the chosen step, in the first attempt only."""
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if first and trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalOnce(pl.Callback):
    """Send this process the real ``signal`` (a number), once (``marker`` is created when it fires): after the
    training batch that makes ``step`` (``where="train"``), or in the first batch of the validation at ``step``
    (``where="val"``)."""

    def __init__(self, signal: int, step: int, marker: str, where: str = "train") -> None:
        self.signal, self.step, self.marker, self.where = signal, step, Path(marker), where

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        """Signal at the chosen step, if asked to in training."""
        if self.where == "train":
            self._fire(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        """Signal in the chosen validation, if asked to there."""
        if self.where == "val" and not trainer.sanity_checking:
            self._fire(trainer)

    def _fire(self, trainer: pl.Trainer) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), self.signal)


def fault_config(path: Path, fault: str, **init_args: Any) -> Path:
    """A config snippet adding the fault callback ``fault`` (a class of this module) to the trainer's callbacks."""
    callback = {"class_path": f"tests.faults.{fault}", "init_args": init_args}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return path
