"""Run policy: where a run's outputs go, which loggers and checkpoints it gets, and how its config is logged.

Every run lives in ``trainer.default_root_dir``: checkpoints/ (best and last), csv/, wandb/ (offline by default)
and, when a SLURM job is stopped, hpc_ckpt_N.ckpt (which one a run resumes from: capsdist.training.resume). W&B is
imported only when a W&B logger is asked for (``--wandb_mode offline|online``), so ``disabled`` runs where
wandb is not installed.
"""

from __future__ import annotations

import csv
import netrc
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.callbacks.prediction_writer import BasePredictionWriter
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from capsdist.cluster import wandb_shield
from capsdist.cluster.runlock import LOCK_FILE
from capsdist.compat.lightning import experiment_started, skip_flat_hparams
from capsdist.core.errors import CapsdistError
from capsdist.core.files import atomic_write, no_follow_opener, refuse_links
from capsdist.training.resume import JOB_FILE, how_to_resume, rewind_untrained
from capsdist.training.startup import check_writable

RUN_ID_FILE = "wandb_run_id"  # in the run folder: `--ckpt_path` runs continue this W&B run
# the links W&B itself keeps in its folder (it replaces them by rename, never writes through them): the only links a
# run folder may hold
WANDB_LINKS = ("wandb/latest-run", "wandb/debug.log", "wandb/debug-internal.log", "wandb/*/logs/debug-core.log")
# what a run writes in its folder (the other entries of a folder such as `.` are not the run's, left unread)
RUN_FILES = (LOCK_FILE, "config.yaml", RUN_ID_FILE, JOB_FILE, "predictions*.csv", "checkpoints", "csv", "wandb",
             "figures")  # fmt: skip
MAX_RUN_ID = 1024  # characters read from the file: an id is a few dozen
# the W&B summary of each metric: its best value over the run, not the last one logged
BEST = {"val/error": "min", "val/loss": "min", "val/acc": "max", "val/digit_acc": "max"}


def run_folder(trainer: Mapping[str, Any]) -> Path:
    """The run folder of a trainer config: its default_root_dir, else runs/default."""
    return Path(trainer.get("default_root_dir") or "runs/default")


def check_run_folder(root: Path) -> None:
    """Refuse, before a run writes anything, a run folder whose own files and folders hold a symbolic link (but
    W&B's own) or a special file (the lock, config.yaml, logs, checkpoints and the W&B id would be written through
    it: capsdist.core.files), or that cannot be created or written (capsdist.training.startup)."""
    refuse_links(root, RUN_FILES, WANDB_LINKS)
    check_writable(root)


class LoggedConfig(SaveConfigCallback):
    """Save the resolved config in the run folder and send it to every logger, once and nested (W&B shows it as
    the run config)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """config.yaml in trainer.default_root_dir, with or without W&B (Lightning's puts it in the first logger's
        folder: csv/version_N without W&B), and no flat second copy of the model's and data's settings. Written by
        the atomic writer: a link planted at config.yaml is replaced, its target never written."""
        skip_flat_hparams(pl_module)  # Lightning would log model+data hparams flat beside the nested config
        if trainer.datamodule is not None:
            skip_flat_hparams(trainer.datamodule)
        if self.already_saved:
            return
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_unset=False)  # what parser.save writes, written atomically
            atomic_write(Path(trainer.default_root_dir) / self.config_filename, lambda f: f.write(text.encode()))
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Log the parsed config as nested hyperparameters (trainer/model/data/...), and W&B's best-value summaries."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False, format="yaml"))
        config.pop("config", None)  # the --config file paths; their contents are the rest
        config = {k: v for k, v in config.items() if v is not None}  # unset flags (--optimizer, --wandb_mode, ...)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if is_wandb(logger):
                for name, summary in BEST.items():
                    logger.experiment.define_metric(name, summary=summary, step_metric="trainer/global_step")


def is_wandb(logger: Logger) -> bool:
    """Whether `logger` is a W&B logger (without importing wandb)."""
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


class WandbKeyError(CapsdistError):
    """`online` W&B logging without an API key."""


def _has_api_key() -> bool:
    """WANDB_API_KEY or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_run_id(root: Path, resuming: bool) -> str | None:
    """The W&B run id: WANDB_RUN_ID's (None: wandb reads it), the stored one when the fit resumes (a requeue, a
    torchrun restart, a resubmission with --ckpt_path), else the SLURM job's or a fresh one. Nothing is written
    here (a refused fit writes nothing): :func:`open_wandb_run` stores it once the fit is accepted."""
    if os.environ.get("WANDB_RUN_ID"):
        return None
    stored = root / RUN_ID_FILE
    if resuming and os.path.lexists(stored):  # a link or FIFO there is refused, not read
        return checked_run_id(stored)
    if job := os.environ.get("SLURM_JOB_ID"):
        return f"{root.name}-slurm{job}"
    return secrets.token_hex(4)


class WandbIdError(CapsdistError):
    """The run folder's stored W&B run id is not one W&B takes."""


# what W&B refuses in a run id: wandb 0.31's settings check and the characters its docs forbid; control characters
# (a second line of the file) are no part of an id either
NOT_IN_RUN_ID = re.compile(r"[/\\#?%:;,'\x00-\x1f\x7f]")


def checked_run_id(stored: Path) -> str:
    """The W&B run id ``stored`` holds, refused unless W&B takes it (W&B would stop the run after the setup with
    a UsageError, or at a step with "Invalid name")."""
    with open(stored, encoding="utf-8", errors="replace", opener=no_follow_opener) as handle:
        text = handle.read(MAX_RUN_ID + 1)
    run_id = text.strip()
    if not run_id or len(text) > MAX_RUN_ID or NOT_IN_RUN_ID.search(run_id):
        raise WandbIdError(
            f"{stored} holds {text[:80]!r}, which is not a W&B run id (W&B refuses an empty one and any with "
            "/ \\ # ? % : ; , ' or a control character such as a second line); W&B would stop the run after its setup. "
            "Nothing was written. Fix: put the id of this folder's W&B run in it (the ID that ends the name of "
            f"wandb/offline-run-DATE_TIME-ID or run-DATE_TIME-ID), or delete {stored.name} to log the resumed run as a "
            "new W&B run."
        )
    return run_id


def open_wandb_run(loggers: list[Logger], root: Path) -> None:
    """Once a run is accepted (rank 0): W&B's folder, and the run id stored for later resumes of this folder."""
    for logger in loggers:
        if is_wandb(logger) and rank_zero_only.rank == 0:
            if not os.environ.get("WANDB_DIR"):
                (root / "wandb").mkdir(parents=True, exist_ok=True)
            if logger.version:  # atomic: a link planted at the name is replaced, its target never written
                atomic_write(root / RUN_ID_FILE, lambda f, run=logger.version: f.write(f"{run}\n".encode()))


class RunWandbLogger(WandbLogger):
    """Lightning's WandbLogger (wandb is imported only when its run starts) whose save_dir, Lightning's log_dir and
    so config.yaml's folder, stays the run folder also where $WANDB_DIR puts W&B's own files elsewhere."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = str(root)
        self._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb >= 0.19 warns that it is unused

    @property
    def save_dir(self) -> str:
        """The run folder."""
        return self.root

    @property
    def experiment(self) -> Any:
        """The W&B run; its service process is started shielded from the job's stop signals first
        (capsdist.cluster.wandb_shield)."""
        if not experiment_started(self) and rank_zero_only.rank == 0:
            wandb_shield.install()
            # wandb is heavy and optional: its seam is imported when a W&B run starts
            from capsdist.compat import wandb as wandb_private

            wandb_private.skip_unstaged_launch_inputs()  # ~1 CPU-s of every run's start
        return super().experiment


_OUR_WANDB_DIRS: set[str] = set()  # the variables keep_wandb_files_in set (a later run in this process resets them)


def keep_wandb_files_in(folder: Path) -> None:
    """Point W&B's staging, cache and service logs (by default under ~/.local/share/wandb and ~/.cache/wandb) into
    the run's wandb/ folder, so a copied run folder holds everything; variables the user set are kept."""
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        if var not in os.environ or var in _OUR_WANDB_DIRS:
            os.environ[var] = str(folder.resolve() / sub)
            _OUR_WANDB_DIRS.add(var)


def run_loggers(root: Path, mode: str | None, project: str | None, resuming: bool = False) -> list[Logger]:
    """CSV logger, plus W&B under `root` unless the mode is 'disabled'.

    W&B's own environment variables keep working: only settings given as flags are passed (the mode defaults to
    $WANDB_MODE, then offline; the project to $WANDB_PROJECT, then capsdist; the folder to $WANDB_DIR, then
    `root`); entity and group come from $WANDB_ENTITY and $WANDB_RUN_GROUP. The run is named after `root`."""
    loggers: list[Logger] = [CSVLogger(root, name="csv")]
    effective = mode or os.environ.get("WANDB_MODE") or "offline"
    if effective == "disabled":
        return loggers
    if effective in ("online", "run") and not _has_api_key():
        raise WandbKeyError(
            "W&B online logging needs an API key, and none is in WANDB_API_KEY or ~/.netrc. "
            "Fix: run `wandb login` or export WANDB_API_KEY, or log offline (--wandb_mode offline)."
        )
    settings: dict[str, Any] = {"project": project or os.environ.get("WANDB_PROJECT") or "capsdist"}
    if mode or not os.environ.get("WANDB_MODE"):
        settings["mode"] = effective
    save_dir = None
    if not os.environ.get("WANDB_DIR"):
        # absolute: a W&B service shared with another process (WANDB_SERVICE inherited from a parent that logged)
        # would resolve a relative folder against its own working directory
        save_dir = str(root.resolve())
    name = None if os.environ.get("WANDB_NAME") else root.name
    run_id = _wandb_run_id(root, resuming)
    keep_wandb_files_in(Path(os.environ.get("WANDB_DIR") or root) / "wandb")
    loggers.insert(0, RunWandbLogger(root, name=name, save_dir=save_dir, id=run_id, **settings))
    return loggers


def finish_wandb(trainer: pl.Trainer, preempting: bool = False, exit_code: int = 0) -> None:
    """Close the W&B run on rank 0, so a later run in this process gets its own (no-op without W&B); a run that
    stops to be resumed is marked preempting first, and its exit code recorded."""
    for logger in trainer.loggers:
        if is_wandb(logger) and trainer.is_global_zero and experiment_started(logger):
            if preempting:
                logger.experiment.mark_preempting()
            logger.experiment.finish(exit_code=exit_code)


class PredictionWriter(BasePredictionWriter):
    """Writes `predict`'s per-image rows to the run folder: predictions.csv (predictions-rankN.csv with N ranks)
    with the position in the rank's test stream, label(s), predicted class(es) and every capsule's length."""

    def __init__(self, root: Path) -> None:
        super().__init__(write_interval="batch")
        self.root, self.path, self.rows = root, None, 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a fresh file for this rank."""
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        self.path, self.rows = self.root / name, 0
        self.root.mkdir(parents=True, exist_ok=True)
        open(self.path, "w", opener=no_follow_opener).close()  # a link there is refused, its target never emptied

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any, *_: Any) -> None:
        """Append one row per image (never through a link planted since the start)."""
        labels, predicted, lengths = (prediction[k].cpu().tolist() for k in ("labels", "predictions", "lengths"))
        with open(self.path, "a", newline="", opener=no_follow_opener) as f:
            out = csv.writer(f)
            if self.rows == 0:
                k, n = len(labels[0]), len(lengths[0])
                out.writerow(["sample", *[f"label_{i}" for i in range(k)], *[f"prediction_{i}" for i in range(k)],
                              *[f"length_{j}" for j in range(n)]])  # fmt: skip
            for row in zip(labels, predicted, lengths, strict=True):
                out.writerow([self.rows, *row[0], *row[1], *(f"{x:.6f}" for x in row[2])])
                self.rows += 1


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
    """``interrupted.ckpt`` when fit crashes. Unlike Lightning's OnExceptionCheckpoint: never before this process's
    first step (a refused or failed start leaves nothing a later `--ckpt_path last` would take), never for
    a deliberate exit (a SystemExit such as
    capsdist.training.stop's, which saved already), never deleted afterwards (its
    teardown deletes the file, also after validate/test), and no silent "last" resume of fresh fits."""

    def __init__(self, path: str | Path) -> None:
        """``path``: the checkpoint file to write."""
        self.path = Path(path)
        self.start: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the step this process started at (a resume's): a crash before the next one saves nothing."""
        self.start = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save the state reached, if this process took an optimizer step; the loader state is that of the last
        completed step (the batch a step failed on is not counted)."""
        if isinstance(exception, SystemExit) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.start is None or trainer.global_step <= self.start:
            return
        rewind_untrained(trainer)
        trainer.save_checkpoint(self.path)
        rank_zero_info(f"capsdist: {type(exception).__name__} at step {trainer.global_step + 1}: saved {self.path}")
        rank_zero_info(how_to_resume(trainer.default_root_dir))


def run_checkpoints(folder: Path, every_n_steps: int) -> list[Callback]:
    """Best checkpoint by val/error, a rolling snapshot (and last.ckpt) every n steps (0: every epoch), and one on
    a crash, so `--ckpt_path last` resumes from the freshest state, mid-epoch included. Signals are
    capsdist.training.stop's; all writes go through capsdist.training.resume.AtomicCheckpointIO."""
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


class ShowsLoss:
    """Progress-bar mixin: adds the module's host-side training values (``CapsNetModule.shown``, set on logging
    steps), so no device value sits among Lightning's progress-bar metrics to be read back after every step."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        """Lightning's progress-bar metrics plus the last logged training loss (read from the device once)."""
        shown = getattr(pl_module, "shown", {})
        shown.update({k: float(v) for k, v in shown.items() if isinstance(v, torch.Tensor)})
        return {**super().get_metrics(trainer, pl_module), **shown}


class Bar(ShowsLoss, TQDMProgressBar):
    """Lightning's terminal progress bar, showing the training loss of the last logging step."""


class LineProgress(ShowsLoss, ProgressBar):
    """The progress bar for logs that are not a terminal (SLURM, nohup, CI): one line every `every` training steps
    and one per validation, instead of a bar redrawn at every step (269 KB for the 937-step quickstart)."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every, self.enabled = max(1, every), True

    def disable(self) -> None:
        """Lightning turns the bar off where it must not print (non-zero ranks)."""
        self.enabled = False

    def enable(self) -> None:
        """And back on."""
        self.enabled = True

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, head: str) -> None:
        """Print `head` and the progress-bar metrics on one line."""
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"{head} {values}", flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        """A line every `every` steps."""
        if self.enabled and trainer.global_step % self.every == 0:
            of = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
            self._line(trainer, pl_module, f"epoch {trainer.current_epoch} step {trainer.global_step}{of}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A line per validation (not the sanity check)."""
        if self.enabled and not trainer.sanity_checking:
            self._line(trainer, pl_module, f"validation at step {trainer.global_step}:")


def best_checkpoint(folder: Path) -> Path:
    """What `--ckpt_path best` means in a new process (Lightning knows "best" only within the fit that saved it):
    of the best-*.ckpt files in `folder`, the one with the lowest val/error recorded in it."""
    candidates = sorted(folder.glob("best-*.ckpt"))
    if not candidates:
        raise CapsdistError(
            f"--ckpt_path best: no best-*.ckpt in {folder} (they are written at each validation of `fit`). "
            "Fix: check trainer.default_root_dir, or give --ckpt_path last or a checkpoint's path."
        )

    def score(path: Path) -> float:
        states = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
        scores = [s.get("current_score") for s in states.values() if s.get("monitor") == "val/error"]
        return float(scores[0]) if scores and scores[0] is not None else float("inf")

    return candidates[0] if len(candidates) == 1 else min(candidates, key=score)
