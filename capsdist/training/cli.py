"""`python -m capsdist.train` (`capsdist-train`): the LightningCLI (fit/validate/test/predict) over CapsNetModule.

Thin on purpose: the LightningModule is capsdist.training.module, the data modules capsdist.data.modules, the run policy
(loggers, checkpoints, saved config) capsdist.training.run, the resume rule capsdist.training.resume,
signals and exit codes
capsdist.training.stop, and the private Lightning overrides capsdist.compat.lightning.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from capsdist.cluster import signals
from capsdist.cluster.allocator import keep_freed_memory
from capsdist.cluster.runlock import RunLock, release_all
from capsdist.compat.jsonargparse import ShortUsageErrors
from capsdist.compat.lightning import PrivateOverrides
from capsdist.core import shipped
from capsdist.core.errors import CapsdistError, prog, user_errors
from capsdist.data.modules import CapsDataModule
from capsdist.parallel import process_group
from capsdist.training import resume, startup
from capsdist.training.config import bound_config_loading, check_argv, check_run
from capsdist.training.diagnostics import CapsuleDiagnostics, batch_images
from capsdist.training.guards import fault_callbacks, warn_emulated_bf16
from capsdist.training.module import CapsNetModule, CheckpointMismatchError
from capsdist.training.nosync import LoggedThroughput
from capsdist.training.run import (
    Bar,
    LineProgress,
    LoggedConfig,
    PredictionWriter,
    WallClock,
    best_checkpoint,
    check_run_folder,
    finish_wandb,
    open_wandb_run,
    run_checkpoints,
    run_folder,
    run_loggers,
)
from capsdist.training.stop import GracefulStop, fit_summary

__all__ = ["CapsCLI", "CapsNetModule", "CheckpointMismatchError", "main"]


CONFIGS_EPILOG = "shipped configs (-c/--config NAME, listed by `capsdist-train configs`): " + ", ".join(
    shipped.config_names()
)


class OptimizerFlagError(CapsdistError):
    """--optimizer/--lr_scheduler given: capsdist trains with the paper's Adam schedule only."""


def quiet_known_warnings() -> None:
    """Silence, by exact message, Lightning's warnings that every capsdist run would print and that say nothing
    about the user's run."""
    for message in (
        # the datasets know their length per rank and split batches across workers themselves (capsdist.data)
        r"Your `IterableDataset` has `__len__` defined",
        # OnExceptionCheckpoint makes Lightning look for a "last" checkpoint on every fit (capsdist.training.run)
        r"`\.fit\(ckpt_path=None\)` was called without a model",
        r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint available",
        # jsonargparse deprecations of the calls Lightning 2.6.6 itself makes (skip_none, instantiate_classes)
        r"\s*By default only one JsonargparseDeprecationWarning per type is shown",
        r"\s*skip_none parameter was deprecated",
        r"\s*``instantiate_classes`` was deprecated",
        # predict's loader is a plain iterable on purpose (capsdist.data.modules.BaseData.predict_dataloader)
        r"Couldn't infer the batch indices fetched from your dataloader",
        # main() passes the command line as `args` after resolving shipped config names
        r"LightningCLI's args parameter is intended to run from within Python",
        # the missing-monitor warning of the best checkpoint before the first validation (short runs)
        r"`ModelCheckpoint\(monitor='val/error'\)` could not find the monitored key",
        # Lightning 2.6.6's _pytree against torch >= 2.10, at every checkpoint load
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)
    if not os.environ.get("SLURM_JOB_ID"):  # srun on PATH but no SLURM job: nothing was launched wrongly
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_no_litlogger_tip)  # once per process


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    """Drop Lightning 2.6's advertisement for its litlogger package, printed at every Trainer construction."""
    return "litlogger" not in record.getMessage()


class CapsParser(ShortUsageErrors, LightningArgumentParser):
    """The training CLI's parser (and its subcommands'): an unknown flag or subcommand is a short usage error that
    names the closest valid one, not the subcommand's 96-line usage."""


class CapsCLI(PrivateOverrides):
    """LightningCLI with the model's image size, channels and digit count taken from the data, and run-local
    outputs."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link data -> model shapes and add the logging switches."""
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_targets", "model.num_targets", apply_on="instantiate")
        parser.add_argument(
            "--wandb_mode",
            type=Literal["offline", "online", "disabled"] | None,
            default=None,
            help="W&B mode (default: $WANDB_MODE, else offline)",
        )
        parser.add_argument(
            "--wandb_project", type=str | None, default=None, help="W&B project (default: $WANDB_PROJECT, capsdist)"
        )
        for flag in ("--optimizer", "--lr_scheduler"):  # LightningCLI's would silently replace the paper's schedule
            parser.add_argument(flag, type=Any, default=None, help="not supported: set --model.lr, --model.lr_decay*")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=1000,
            help="rolling snapshot and last.ckpt every n steps; 0: at each epoch end",
        )

    def before_instantiate_classes(self) -> None:
        """Load checkpoints with weights_only unless told otherwise (they hold tensors and plain types only); refuse
        a run folder holding links, or one that cannot be written, before anything is written; turn `--ckpt_path
        best` into the run's best file (Lightning knows none in a new process); refuse --optimizer."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and config.get("weights_only") is None:
            config["weights_only"] = True
        root = run_folder(self._get(config or {}, "trainer", default={}))
        check_run_folder(root)
        check_run(config or {})
        if config is not None and config.get("ckpt_path") == "best":
            config["ckpt_path"] = str(best_checkpoint(root / "checkpoints"))
        if config is not None and (config.get("optimizer") is not None or config.get("lr_scheduler") is not None):
            raise OptimizerFlagError(
                "--optimizer/--lr_scheduler (or optimizer:/lr_scheduler: in a config) are not supported: capsdist "
                "trains with the paper's Adam and exponential learning-rate decay. Fix: drop them and set "
                "--model.lr, --model.lr_decay, --model.lr_decay_steps and --model.min_lr."
            )

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Default loggers, best/last checkpoints (all under trainer.default_root_dir) and safe SLURM requeue; for
        ``fit``, the run folder's lock (rank 0) and the resume plan. Before anything is written: the data found,
        and for ``fit`` the batch size against the data and the memory one step needs (capsdist.training.startup)."""
        config = self._get(self.config_init, "trainer", default={})
        root = run_folder(config)
        kwargs["default_root_dir"] = str(root)
        self.datamodule.check_inputs(self.subcommand)  # the data found (MNIST downloaded): before anything is written
        default_loggers = config.get("logger") in (None, True)
        if default_loggers:
            kwargs["logger"] = False  # set below, once the resume plan says which W&B run this is
        callbacks = list(config.get("callbacks") or [])
        self.checkpoint_dir, self.position = None, resume.EpochPosition()
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            self.checkpoint_dir = root / "checkpoints"
            callbacks += run_checkpoints(self.checkpoint_dir, self._get(self.config_init, "checkpoint_every_n_steps"))
        if not any(isinstance(c, GracefulStop) for c in callbacks):  # replaces Lightning's deadlock-prone handlers
            callbacks.append(GracefulStop((self.checkpoint_dir or root) / "interrupted.ckpt"))
        if config.get("logger") is not False:  # `--trainer.logger false` trains without loggers
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks += [WallClock(), CapsuleDiagnostics(), self.position, resume.RecordTrainerSettings()]
        callbacks += fault_callbacks(callbacks)  # non-finite guard, the data/skipped metric
        # images/s end to end (data wait included) per device and in total, and MFU on GPUs Lightning knows
        callbacks.append(LoggedThroughput(batch_size_fn=batch_images))  # CUDA sync on logging steps only
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(root))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            plain_log = not sys.stdout.isatty()  # SLURM, nohup, CI: lines, not a bar redrawn at every step
            callbacks.append(LineProgress(config.get("log_every_n_steps") or 50) if plain_log else Bar())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        warn_emulated_bf16(trainer)
        trainer.strategy.checkpoint_io = resume.AtomicCheckpointIO()  # every save: temp file beside it, fsync, rename
        ckpt_path = self._get(self.config_init, "ckpt_path")
        self.lock, self.plan = None, (ckpt_path, "")
        if self.subcommand == "fit":  # the batch against the data and the memory, before the folder is taken
            self.datamodule.train_batches(getattr(trainer.strategy, "data_parallel_size", None) or trainer.world_size)
            startup.check_memory(self.model.model, self.datamodule.batch_size, trainer)
            self.lock = RunLock(root).acquire() if trainer.global_rank == 0 else None
            with self._discard_lock_on_error():
                self.plan = resume.plan(ckpt_path, root)
        if default_loggers:
            wandb = (self._get(self.config_init, "wandb_mode"), self._get(self.config_init, "wandb_project"))
            with self._discard_lock_on_error():  # a refused W&B key or stored id leaves the folder as it was
                trainer.loggers = run_loggers(root, *wandb, resuming=self.plan[0] is not None)
            if self.subcommand != "fit":
                open_wandb_run(trainer.loggers, root)
        return trainer

    @contextmanager
    def _discard_lock_on_error(self) -> Iterator[None]:
        """A refused fit leaves the folder as it found it: drop the lock and the lock file it created."""
        try:
            yield
        except BaseException:
            if self.lock is not None:
                self.lock.release(discard=True)
            raise

    def before_fit(self) -> None:
        """Apply the resume rule (capsdist.training.resume) before anything is written: refuse a used run folder unless
        resuming was asked for or this is a restart of the launch that owns it, refuse a resume that would not be
        exact; then take the folder (lock owner, W&B run, launch) and say what happens."""
        config, root = self.config_init[self.subcommand], Path(self.trainer.default_root_dir)
        ckpt_path, how = self.plan
        with self._discard_lock_on_error():
            if ckpt_path is None:
                outcome, config["ckpt_path"] = how, None  # `auto` on an empty folder included
            else:
                path, step = resume.resolve(str(ckpt_path), root)
                path = path.resolve()
                checkpoint = resume.read_checkpoint(path)
                model, data = dict(self.model.hparams), dict(getattr(self.datamodule, "hparams", {}))
                resume.check_identity(checkpoint, path, model, data)
                resume.check_trainer(checkpoint, path, resume.trainer_settings(self.trainer))
                strategy = self.trainer.strategy
                world = getattr(strategy, "data_parallel_size", None) or self.trainer.world_size
                workers = self.datamodule.num_workers  # the count the loaders run with (a default resolved)
                same_workers = getattr(self.datamodule, "resume_needs_same_workers", False)  # in-memory: any count
                resume.check_loader(checkpoint, world, workers, same_workers)
                del checkpoint
                config["ckpt_path"] = str(path)
                outcome = f"{how} from {path} at step {step}"
        if self.lock is not None:
            self.lock.record_pid()
        resume.init_restarted_process_group(self.trainer)
        if self.trainer.is_global_zero:
            resume.claim(root)
            open_wandb_run(self.trainer.loggers, root)
        rank_zero_info(f"capsdist: run folder {root.resolve()}: {outcome}")

    def after_fit(self) -> None:
        """Save the final state as last.ckpt (it supersedes any hpc checkpoint) and print the outcome as one JSON
        line (metrics, checkpoints) and how to continue the run."""
        trainer = self.trainer
        last = None
        if self.checkpoint_dir is not None and self.position.trained:
            last = self.checkpoint_dir / "last.ckpt"
            trainer.save_checkpoint(last, weights_only=False)
        if trainer.is_global_zero and self.checkpoint_dir is not None:
            # hpc files older than the state kept: last.ckpt, or (nothing left to train) the one resumed from
            resume.remove_stale_hpc(trainer.default_root_dir, trainer.global_step + (1 if last else 0))
        if trainer.is_global_zero:
            print(fit_summary(trainer, last_checkpoint=str(last) if last else None), flush=True)
            rank_zero_info(resume.how_to_resume(trainer.default_root_dir, finished=True))
        finish_wandb(trainer)
        if self.lock is not None:
            self.lock.release()

    def after_validate(self) -> None:
        """Close the W&B run."""
        finish_wandb(self.trainer)

    def after_test(self) -> None:
        """Print the test metrics and the checkpoint they are of as one JSON line."""
        trainer = self.trainer
        if trainer.is_global_zero:
            metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            print(json.dumps({"checkpoint": trainer.ckpt_path, **metrics}))
        finish_wandb(trainer)

    def after_predict(self) -> None:
        """Print where the predictions went as one JSON line."""
        writer = next(c for c in self.trainer.callbacks if isinstance(c, PredictionWriter))
        if self.trainer.is_global_zero:
            written = {"predictions": str(writer.path), "rows": writer.rows}
            print(json.dumps({"checkpoint": self.trainer.ckpt_path, **written}))
        finish_wandb(self.trainer)


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m capsdist.train`; bad input exits with status 2 and a one-paragraph message."""
    signals.install()  # first: a stop during the slow setup is recorded, not fatal (capsdist.cluster.signals)
    keep_freed_memory()  # no page faults re-zeroing each step's activations (capsdist.cluster.allocator)
    quiet_known_warnings()
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["configs"]:  # `capsdist-train configs`: what --config NAME can name
        print(shipped.config_listing())
        return
    with user_errors():
        args = shipped.resolve_config_args(args)
        check_argv(args)
        bound_config_loading()
        try:
            CapsCLI(
                CapsNetModule,
                CapsDataModule,
                parser_class=CapsParser,
                save_config_callback=LoggedConfig,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
                parser_kwargs={"allow_abbrev": False, "prog": prog("capsdist.train"), "epilog": CONFIGS_EPILOG},
                load_from_checkpoint_support=False,  # a mismatching checkpoint is an error, not a silent config swap
                auto_configure_optimizers=False,  # the paper's schedule is the module's; see --optimizer's refusal
                args=args,
            )
            process_group.end()  # joins gloo's threads before the interpreter ends (capsdist.parallel.process_group)
        finally:
            release_all()  # the run folder's lock; in-process callers (tests, notebooks) may fit there again


if __name__ == "__main__":
    main()
