"""Run policy: where a run's outputs go, which loggers and checkpoints it gets, and how its config is logged.

Every run lives in ``trainer.default_root_dir``: checkpoints/ (best and last), csv/, wandb/ (offline by default)
and, when a SLURM job is stopped, hpc_ckpt_N.ckpt (which one a run resumes from: capsdist.resume). W&B is
imported only when a W&B logger is asked for (``--wandb_mode offline|online``), so ``disabled`` runs where
wandb is not installed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.trainer.states import TrainerFn


class LoggedConfig(SaveConfigCallback):
    """Save the resolved config beside the run and send it to every logger (W&B shows it as the run config)."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the whole parsed config as hyperparameters."""
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


def run_loggers(root: Path, mode: str, project: str) -> list[Logger]:
    """CSV logger, plus W&B (offline unless mode='online'; none if 'disabled'), both writing under `root`."""
    loggers: list[Logger] = [CSVLogger(root, name="csv")]
    if mode != "disabled":
        from pytorch_lightning.loggers import WandbLogger  # needs the wandb package only here

        (root / "wandb").mkdir(parents=True, exist_ok=True)
        job = os.environ.get("SLURM_JOB_ID")  # a requeued SLURM job keeps its id: one W&B run across restarts
        run_id = f"{root.name}-slurm{job}" if job else None
        loggers.insert(0, WandbLogger(project=project, save_dir=str(root), offline=mode == "offline", id=run_id))
    return loggers


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close the W&B run on rank 0, so a later run in this process gets its own (no-op without W&B)."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
            logger.experiment.finish()


class WallClock(Callback):
    """Logs `time/elapsed_s`, seconds since this process's fit started, with every validation: learning curves
    against wall time as well as steps (the CSV has no clock of its own)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock."""
        self.started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the elapsed seconds beside the validation metrics (not during the sanity check, not in validate)."""
        if not trainer.sanity_checking and hasattr(self, "started"):
            pl_module.log("time/elapsed_s", time.perf_counter() - self.started)


class InterruptCheckpoint(Checkpoint):
    """``interrupted.ckpt`` when fit crashes. Unlike Lightning's OnExceptionCheckpoint: never at step 0, never for
    a deliberate exit (a SystemExit such as capsdist.stop's, which saved already), never deleted afterwards (its
    teardown deletes the file, also after validate/test), and no silent "last" resume of fresh fits."""

    def __init__(self, path: str | Path) -> None:
        """``path``: the checkpoint file to write."""
        self.path = Path(path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save the state reached, if fitting took an optimizer step."""
        if isinstance(exception, SystemExit) or trainer.global_step == 0 or trainer.state.fn != TrainerFn.FITTING:
            return
        trainer.save_checkpoint(self.path)


def run_checkpoints(folder: Path, every_n_steps: int) -> list[Callback]:
    """Best checkpoint by val/error, a rolling snapshot (and last.ckpt) every n steps (0: every epoch), and one on
    a crash, so `--ckpt_path last` resumes from the freshest state, mid-epoch included. Signals are
    capsdist.stop's; all writes go through capsdist.resume.AtomicCheckpointIO."""
    return [
        ModelCheckpoint(folder, "best-{epoch}-{step}", monitor="val/error", mode="min", enable_version_counter=False),
        ModelCheckpoint(
            folder,
            "snapshot-{step}",
            every_n_train_steps=every_n_steps or None,
            save_last=True,
            enable_version_counter=False,
        ),
        InterruptCheckpoint(folder / "interrupted.ckpt"),
    ]
