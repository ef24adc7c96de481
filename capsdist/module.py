"""The CapsNet LightningModule: thin glue over the plain-torch model, losses, metrics and evaluation step.

Logging, checkpoint policy and the CLI are elsewhere (capsdist.run, capsdist.train); this module never imports
W&B (images go to any logger with a ``log_image`` method).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytorch_lightning as pl
import torch

from capsdist import CapsdistError
from capsdist.checkpoint import MODEL_ARGS
from capsdist.images import image_grid
from capsdist.losses import capsnet_loss
from capsdist.metrics import CapsMetrics, topk_hits
from capsdist.model import CapsNet
from capsdist.scoring import eval_batch
from capsdist.validate import MODEL_RULES, check


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
        check("model", self.hparams, MODEL_RULES)
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
        total = eval_batch(self.model, batch, self.hparams.recon_weight, metrics)
        self.log(f"{stage}/loss", total, sync_dist=True, batch_size=batch["labels"].shape[0])

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
        """Send a grid of inputs beside their reconstructions to the loggers that take images (W&B's log_image)."""
        rows = min(8, images.shape[0])
        columns = torch.cat([images[:rows].unsqueeze(1), recon[:rows]], dim=1).detach().float().cpu()
        picture = image_grid(columns).numpy().transpose(1, 2, 0)
        for logger in self.loggers:
            if callable(getattr(logger, "log_image", None)):
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
