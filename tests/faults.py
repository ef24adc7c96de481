"""Faults planted into real `python -m capsdist.train` runs through a config's ``trainer.callbacks``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl


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


def fault_config(path: Path, marker: Path, step: int) -> Path:
    """A config snippet adding :class:`RaiseBeforeStep` to the trainer's callbacks."""
    import yaml

    callback = {"class_path": "tests.faults.RaiseBeforeStep", "init_args": {"step": step, "marker": str(marker)}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return path
