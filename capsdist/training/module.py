"""The CapsNet LightningModule: thin glue over the plain-torch model, losses, metrics and evaluation step.

Logging, checkpoint policy and the CLI are elsewhere (capsdist.training.run, capsdist.train); this module never imports
W&B (images go to any logger with a ``log_image`` method).
"""

from __future__ import annotations

import json
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from capsdist.compat.lightning import is_logging_step
from capsdist.core.errors import CapsdistError
from capsdist.core.rules import check
from capsdist.model.capsnet import MODEL_ARGS, CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.model.metrics import CapsMetrics, topk_hits
from capsdist.model.pretrained import init_from
from capsdist.model.rules import MODEL_RULES
from capsdist.model.scoring import eval_batch
from capsdist.training.images import reconstruction_sheet


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
        warmup_steps: int = 0,
        log_images_every_n_steps: int = 500,
        log_diagnostics_every_n_steps: int = 100,
        init_weights: str | None = None,
        **model_args: Any,
    ) -> None:
        """The paper's training setup around a CapsNet; the learning rate decays as
        lr * lr_decay ** (step / lr_decay_steps), floored at min_lr.

        Args:
            num_targets: digits per image (1: MNIST, 2: MultiMNIST; the CLI takes it from the data).
            recon_weight: weight of the sum-squared reconstruction error in the loss (paper: 0.0005).
            lr: Adam's initial learning rate (paper: 1e-3).
            lr_decay: learning-rate factor per lr_decay_steps steps (paper: 0.96).
            lr_decay_steps: steps per lr_decay factor (paper: 2000 for MNIST, 20000 for MultiMNIST).
            min_lr: floor of the decayed learning rate.
            warmup_steps: ramp the learning rate linearly from lr/warmup_steps up to lr over this many steps
                (large batches with a scaled lr: configs/mnist_large_batch.yaml); 0: none (the paper).
            log_images_every_n_steps: send an input/reconstruction grid to W&B every n steps (0: never).
            log_diagnostics_every_n_steps: how often capsdist.training.diagnostics logs routing statistics and the
                gradient norm in training (0: no capsule diagnostics at all, none at validation either).
            init_weights: a .safetensors file (e.g. pretrained/capsnet-mnist.safetensors) to start the model from
                (fine-tuning).
            model_args: CapsNet's settings (capsdist.model.CapsNet; the CLI lists each with its help).
        """
        super().__init__()
        self.save_hyperparameters()
        check("model", self.hparams, MODEL_RULES)
        self.model = CapsNet(**model_args)
        if init_weights:
            init_from(self.model, init_weights)
        self.val_metrics = CapsMetrics()
        self.test_metrics = CapsMetrics()
        self._step_values: dict[str, torch.Tensor] = {}  # this step's training values, logged on logging steps
        # the progress bars' training loss (capsdist.training.run.ShowsLoss)
        self.shown: dict[str, torch.Tensor | float] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Capsule lengths [B, num_classes]: the class scores."""
        return self.model(images, k=self.hparams.num_targets).lengths

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Margin + weighted reconstruction loss, decoder masked by the true labels."""
        labels = batch["labels"]
        out = self.model(batch["image"], labels)
        total, margin, recon = capsnet_loss(out, labels, batch["recon"], self.hparams.recon_weight)
        acc = topk_hits(out.lengths.detach(), labels).all(dim=1).float().mean()
        values = {"train/margin": margin, "train/recon": recon, "train/acc": acc, "train/loss": total}
        if is_logging_step(self.trainer):
            self._log_train(values)
        else:  # logged after all by on_train_batch_end if a stop makes this step a logging step
            self._step_values = values
        every = self.hparams.log_images_every_n_steps
        if every and self.global_step % every == 0 and out.recon is not None:
            self._log_images("train/reconstructions", batch, out.recon, out.lengths, "the true label")
        return total

    def _log_train(self, values: dict[str, torch.Tensor]) -> None:
        """Log training values; only on logging steps: Lightning's self.log costs ~0.5 ms of host time per value,
        and values between logging steps are never written anywhere. The progress bars get the loss through
        ``shown`` (read there once): a progress-bar value kept by Lightning is read back after every step."""
        self.log_dict({k: v.detach() for k, v in values.items()})
        self.shown["train/loss"] = values["train/loss"].detach()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """A stop requested during this step (by a callback) makes it a logging step: log its values now."""
        values, self._step_values = self._step_values, {}
        if values and is_logging_step(self.trainer):
            self._log_train(values)

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: CapsMetrics, stage: str) -> dict[str, Any]:
        """Test-time forward (decoder masked by the longest capsules), loss and metrics; the outputs for callbacks."""
        total, out = eval_batch(self.model, batch, self.hparams.recon_weight, metrics)
        self.log(f"{stage}/loss", total, sync_dist=True, batch_size=batch["labels"].shape[0])
        return {"lengths": out.lengths, "recon": out.recon}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Validation loss and metrics; capsule lengths and reconstructions go on to capsdist.training.diagnostics."""
        return self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Test loss and metrics."""
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per image: the true labels, the k longest capsules (the prediction) and every capsule's length."""
        lengths = self(batch["image"])
        predictions = lengths.topk(self.hparams.num_targets, dim=1).indices
        return {"labels": batch["labels"], "predictions": predictions, "lengths": lengths}

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

    def _image_loggers(self) -> list[Any]:
        """The loggers that take images (W&B's log_image), when image logging is on and there is a decoder."""
        if not self.hparams.log_images_every_n_steps or self.model.decoder is None:
            return []
        return [logger for logger in self.loggers if callable(getattr(logger, "log_image", None))]

    def _log_images(
        self, key: str, batch: dict[str, torch.Tensor], recon: torch.Tensor, lengths: torch.Tensor, masked_by: str
    ) -> None:
        """Send up to 8 inputs beside their reconstructions as one labelled 8-bit picture (W&B casts float pixels
        to uint8 unscaled: [0, 1] became black), captioned with each row's label(s) and prediction; rank 0 only."""
        if not self.trainer.is_global_zero:
            return
        rows = min(8, batch["image"].shape[0])
        picture, texts = reconstruction_sheet(
            batch["image"][:rows], recon[:rows], batch["labels"][:rows], lengths[:rows].detach(), scale=2
        )
        caption = f"step {self.global_step}, decoder masked by {masked_by}; rows: " + "; ".join(texts)
        for logger in self._image_loggers():
            logger.log_image(key, [picture], step=self.global_step, caption=[caption])

    def on_validation_batch_end(
        self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Once per validation (first batch, not the sanity check): log the validation step's reconstructions,
        whose decoder was masked by the predicted (longest) capsules."""
        if batch_idx or self.trainer.sanity_checking or not self._image_loggers() or outputs.get("recon") is None:
            return
        self._log_images("val/reconstructions", batch, outputs["recon"], outputs["lengths"], "the predicted capsule")

    def configure_optimizers(self) -> dict[str, Any]:
        """Fused Adam with exponential decay applied every step (the official code's schedule)."""
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, fused=True)  # one kernel: ~15% of a CPU step
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _decay(self, step: int) -> float:
        """The learning-rate factor at ``step`` under the configured schedule (linear warm-up, then decay)."""
        hp = self.hparams
        warmup = hp.get("warmup_steps", 0)
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return max(ramp * hp.lr_decay ** (step / hp.lr_decay_steps), hp.min_lr / hp.lr)

    def _schedule_from_here(self, checkpoint: dict[str, Any]) -> None:
        """Resume with the configured schedule, not the checkpoint's: the scheduler keeps its step count, and the
        base and current rates are recomputed from the configured lr settings (the same values when nothing
        changed, so an unchanged resume stays exact). A change is said in the log."""
        keys = ("lr", "lr_decay", "lr_decay_steps", "min_lr", "warmup_steps")
        saved = checkpoint.get("hyper_parameters", {})
        changed = {k: f"{saved[k]} -> {self.hparams[k]}" for k in keys if k in saved and saved[k] != self.hparams[k]}
        schedulers, optimizers = checkpoint.get("lr_schedulers") or [], checkpoint.get("optimizer_states") or []
        for scheduler, optimizer in zip(schedulers, optimizers, strict=False):
            step = int(scheduler.get("last_epoch", 0))
            scheduler["base_lrs"] = [self.hparams.lr for _ in scheduler.get("base_lrs", [])]
            scheduler["_last_lr"] = [self.hparams.lr * self._decay(step) for _ in scheduler.get("_last_lr", [])]
            for group in optimizer.get("param_groups", []):
                group["initial_lr"], group["lr"] = self.hparams.lr, self.hparams.lr * self._decay(step)
            if changed:
                rank_zero_info(
                    f"capsdist: learning-rate settings changed on resume ({changed}): the configured schedule "
                    f"applies from step {step} on (learning rate now {self.hparams.lr * self._decay(step):.4g})"
                )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model with a clear message instead of a size-mismatch wall; apply the
        configured learning-rate schedule from the resume step."""
        self._schedule_from_here(checkpoint)
        if "state_dict" not in checkpoint:  # FSDP's strategy popped it and loaded the weights itself, strictly
            return
        own = self.state_dict()
        theirs = checkpoint["state_dict"]
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
