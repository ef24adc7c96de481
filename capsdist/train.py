"""`python -m capsdist.train`: the training CLI, a LightningCLI (fit/validate/test) over CapsNetModule and the data.

Thin on purpose: the LightningModule is capsdist.module, the data modules capsdist.data.modules, the run policy
(loggers, checkpoints, saved config) capsdist.run, and the private Lightning overrides capsdist.lightning_compat.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

from capsdist import user_errors
from capsdist.data.modules import CapsDataModule
from capsdist.guards import fault_callbacks
from capsdist.lightning_compat import PrivateOverrides
from capsdist.module import CapsNetModule, CheckpointMismatchError
from capsdist.parallel import SlurmRequeue
from capsdist.run import LoggedConfig, WallClock, finish_wandb, run_checkpoints, run_loggers
from capsdist.validate import check_argv, check_run

__all__ = ["CapsCLI", "CapsNetModule", "CheckpointMismatchError", "main"]


class CapsCLI(PrivateOverrides):
    """LightningCLI with the model's image size and digit count taken from the data, and run-local outputs."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link data -> model shapes and add the logging switches."""
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.num_targets", "model.num_targets", apply_on="instantiate")
        parser.add_argument("--wandb_mode", type=Literal["offline", "online", "disabled"], default="offline")
        parser.add_argument("--wandb_project", type=str, default="capsdist")
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=1000,
            help="rolling snapshot and last.ckpt every n steps; 0: at each epoch end",
        )

    def before_instantiate_classes(self) -> None:
        """Load checkpoints with weights_only unless told otherwise: they hold tensors and plain types only."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None and config.get("weights_only") is None:
            config["weights_only"] = True
        check_run(config or {})

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Default loggers, best/last checkpoints (all under trainer.default_root_dir) and safe SLURM requeue."""
        config = self._get(self.config_init, "trainer", default={})
        root = Path(config.get("default_root_dir") or "runs/default")
        kwargs["default_root_dir"] = str(root)
        if config.get("logger") in (None, True):
            wandb = (self._get(self.config_init, "wandb_mode"), self._get(self.config_init, "wandb_project"))
            kwargs["logger"] = run_loggers(root, *wandb)
        callbacks = list(config.get("callbacks") or [])
        self.checkpoint_dir = None
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            self.checkpoint_dir = root / "checkpoints"
            callbacks += run_checkpoints(self.checkpoint_dir, self._get(self.config_init, "checkpoint_every_n_steps"))
        if not any(isinstance(c, SlurmRequeue) for c in callbacks):
            callbacks.append(SlurmRequeue())  # inert outside SLURM; replaces Lightning's deadlock-prone handler
        callbacks += [LearningRateMonitor(logging_interval="step"), WallClock(), *fault_callbacks(callbacks)]
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Save the final state as last.ckpt and print the outcome as one JSON line (metrics, checkpoints)."""
        trainer = self.trainer
        last = None
        if self.checkpoint_dir is not None:
            last = self.checkpoint_dir / "last.ckpt"
            trainer.save_checkpoint(last, weights_only=False)
        if trainer.is_global_zero:
            summary = {
                "global_step": trainer.global_step,
                **{k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
                "data_skipped": int(trainer.callback_metrics.get("data/skipped", 0)),
                "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
                "last_checkpoint": str(last) if last else None,
            }
            print(json.dumps(summary))
        finish_wandb(trainer)


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m capsdist.train`; bad input exits with status 2 and a one-paragraph message."""
    with user_errors():
        check_argv(sys.argv[1:] if args is None else args)
        CapsCLI(
            CapsNetModule,
            CapsDataModule,
            save_config_callback=LoggedConfig,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs={"allow_abbrev": False},
            load_from_checkpoint_support=False,  # a mismatching checkpoint is an error, not a silent config swap
            args=args,
        )


if __name__ == "__main__":
    main()
