"""Training: the CapsNet LightningModule and `python -m capsdist.train`, a LightningCLI (fit/validate/test).

The module is thin glue: the model, losses and metrics are plain torch in model.py, losses.py and metrics.py.
Every run lives in `trainer.default_root_dir`: checkpoints/ (best and last), csv/, wandb/ (offline by default)
and, on SLURM preemption, hpc_ckpt_N.ckpt, which Lightning resumes from automatically.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from capsdist import CapsdistError, user_errors
from capsdist.data import CapsDataModule
from capsdist.images import image_grid
from capsdist.losses import capsnet_loss
from capsdist.metrics import CapsMetrics, topk_hits
from capsdist.model import CapsNet
from capsdist.parallel import SlurmRequeue

MODEL_ARGS = tuple(inspect.signature(CapsNet).parameters)


class CheckpointMismatchError(CapsdistError):
    """A checkpoint written by a model of another shape than the one configured."""


class CapsNetModule(pl.LightningModule):
    """CapsNet + margin/reconstruction loss + Adam with the paper's exponential decay, for any precision/strategy."""

    def __init__(
        self,
        num_targets: int = 1,
        recon_weight: float = 0.0005,
        lr: float = 1e-3,
        lr_decay: float = 0.96,
        lr_decay_steps: int = 2000,
        min_lr: float = 1e-6,
        log_images_every_n_steps: int = 500,
        **model_args: Any,
    ) -> None:
        """`model_args` are CapsNet's (capsdist.model; the CLI lists them with their types and defaults);
        num_targets is digits per image (2: MultiMNIST); the learning rate decays as
        lr * lr_decay ** (step / lr_decay_steps), floored at min_lr."""
        super().__init__()
        self.save_hyperparameters()
        self.model = CapsNet(**model_args)
        self.val_metrics = CapsMetrics()
        self.test_metrics = CapsMetrics()
        self._batch_started = 0.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Capsule lengths [B, num_classes]: the class scores."""
        return self.model(images, k=self.hparams.num_targets).lengths

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Margin + weighted reconstruction loss, decoder masked by the true labels."""
        labels = batch["labels"]
        out = self.model(batch["image"], labels)
        total, margin, recon = capsnet_loss(out, labels, batch["recon"], self.hparams.recon_weight)
        acc = topk_hits(out.lengths.detach(), labels).all(dim=1).float().mean()
        self.log_dict({"train/margin": margin, "train/recon": recon, "train/acc": acc})
        self.log("train/loss", total, prog_bar=True)
        every = self.hparams.log_images_every_n_steps
        if every and self.global_step % every == 0 and out.recon is not None:
            self._log_images(batch["image"], out.recon)
        return total

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: CapsMetrics, stage: str) -> None:
        """Test-time forward (decoder masked by the longest capsules), loss and metrics."""
        labels = batch["labels"]
        out = self.model(batch["image"], k=labels.shape[1])
        total, _, _ = capsnet_loss(out, labels, batch["recon"], self.hparams.recon_weight)
        metrics.update(out.lengths, labels)
        self.log(f"{stage}/loss", total, sync_dist=True, batch_size=labels.shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Validation loss and metrics."""
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Test loss and metrics."""
        self._eval_step(batch, self.test_metrics, "test")

    def _log_metrics(self, metrics: CapsMetrics, stage: str) -> None:
        """Log the rank-reduced metrics of an epoch and reset them."""
        values = metrics.compute()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        """Log validation accuracy/error."""
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        """Log test accuracy/error."""
        self._log_metrics(self.test_metrics, "test")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Start the images/s clock."""
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Log training throughput over all ranks."""
        seconds = time.perf_counter() - self._batch_started
        images = batch["image"].shape[0] * self.trainer.world_size
        self.log("train/images_per_s", images / max(seconds, 1e-9), prog_bar=True)

    def _log_images(self, images: torch.Tensor, recon: torch.Tensor) -> None:
        """Send a grid of inputs beside their reconstructions to the loggers that take images (W&B)."""
        rows = min(8, images.shape[0])
        columns = torch.cat([images[:rows].unsqueeze(1), recon[:rows]], dim=1).detach().float().cpu()
        picture = image_grid(columns).numpy().transpose(1, 2, 0)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("train/reconstructions", [picture], step=self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        """Fused Adam with exponential decay applied every step (the official code's schedule)."""
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, fused=True)  # one kernel: ~15% of a CPU step
        floor = hp.min_lr / hp.lr

        def decay(step: int) -> float:
            return max(hp.lr_decay ** (step / hp.lr_decay_steps), floor)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model with a clear message instead of a size-mismatch wall."""
        own = self.state_dict()
        theirs = checkpoint.get("state_dict", {})
        wrong = [
            f"{name}: checkpoint {tuple(theirs[name].shape)} vs configured {tuple(tensor.shape)}"
            for name, tensor in own.items()
            if name in theirs and theirs[name].shape != tensor.shape
        ]
        missing = sorted(set(own) ^ set(theirs))
        if not wrong and not missing:
            return
        saved = checkpoint.get("hyper_parameters", {})
        plain = {k: (json.dumps(saved.get(k)), json.dumps(self.hparams.get(k))) for k in MODEL_ARGS}
        differ = {k: f"{a} vs {b}" for k, (a, b) in plain.items() if a != b}
        details = "; ".join(wrong[:3] + [f"only in one of them: {n}" for n in missing[:3]])
        raise CheckpointMismatchError(
            "the checkpoint was written by a different model than the one configured "
            f"(model settings checkpoint vs configured: {differ or 'same'}; {details}). "
            "Fix: use the model settings of the run that wrote it (its config.yaml sits in that run's "
            "default_root_dir), or start a fresh run without --ckpt_path."
        )


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
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        job = os.environ.get("SLURM_JOB_ID")  # a requeued SLURM job keeps its id: one W&B run across restarts
        run_id = f"{root.name}-slurm{job}" if job else None
        loggers.insert(0, WandbLogger(project=project, save_dir=str(root), offline=mode == "offline", id=run_id))
    return loggers


def run_checkpoints(folder: Path, every_n_steps: int) -> list[Callback]:
    """Best checkpoint by val/error, a rolling snapshot (and last.ckpt) every n steps (0: every epoch), and one on
    a crash or Ctrl-C, so `--ckpt_path last` resumes from the freshest state, mid-epoch included."""
    return [
        ModelCheckpoint(folder, "best-{epoch}-{step}", monitor="val/error", mode="min", enable_version_counter=False),
        ModelCheckpoint(
            folder,
            "snapshot-{step}",
            every_n_train_steps=every_n_steps or None,
            save_last=True,
            enable_version_counter=False,
        ),
        OnExceptionCheckpoint(folder, "interrupted"),
    ]


class CapsCLI(LightningCLI):
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

    def _parse_ckpt_path(self) -> None:
        """Keep the configured model: Lightning would silently swap in the checkpoint's hyperparameters; a
        checkpoint that does not fit the configured model is refused in CapsNetModule.on_load_checkpoint."""

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
        callbacks.append(LearningRateMonitor(logging_interval="step"))
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
                "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
                "last_checkpoint": str(last) if last else None,
            }
            print(json.dumps(summary))
        for logger in trainer.loggers:  # close the W&B run, so a later run in this process gets its own
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.finish()


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m capsdist.train`; bad input exits with status 2 and a one-paragraph message."""
    with user_errors():
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
