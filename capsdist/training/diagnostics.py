"""Capsule diagnostics for the dashboard: what routing does, per-class accuracy, capsule lengths, confusions.

`CapsuleDiagnostics` (added by the training CLI) logs, at every validation and every
`model.log_diagnostics_every_n_steps` training steps (0 switches it off):
  - scalars to every logger (W&B and CSV): ``val/class_acc/<c>`` (per-digit recall), ``val/routing_entropy/iter<k>``
    and ``val/routing_max_coupling/iter<k>`` (how sharp the coupling coefficients get per routing round),
    ``val/capsule_length_present``/``_absent`` (the margin loss's view), ``train/grad_norm``, the same routing
    statistics for training batches, and ``train/gpu_peak_memory_gib`` on CUDA;
  - W&B objects on rank 0: ``val/capsule_length`` (histogram), ``val/confusion_matrix`` (table + chart),
    ``val/misclassified`` (table of up to 32 images), the figures of `capsdist.figures` at the end of fit, and the
    best/last checkpoints as model artifacts.
Metrics are torchmetrics states, so they reduce across ranks before they are logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.throughput import measure_flops
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import grad_norm
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from capsdist.cluster import signals
from capsdist.model.capsnet import MODEL_ARGS, CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.model.metrics import topk_hits
from capsdist.model.routing import RoutingStats, attach_routing_stats
from capsdist.training.figures import write_figures
from capsdist.training.images import to_pil
from capsdist.training.run import is_wandb

MAX_MISCLASSIFIED = 32
MAX_HISTOGRAM = 20_000


class ClassRecall(Metric):
    """Per-class recall: of the images containing digit c, the share whose k longest capsules include c."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.add_state("hits", torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, lengths: torch.Tensor, labels: torch.Tensor) -> None:
        """Count each label and whether it was found."""
        n = self.counts.numel()
        self.counts += torch.bincount(labels.flatten(), minlength=n).float()
        self.hits += torch.bincount(labels.flatten(), weights=topk_hits(lengths, labels).flatten().float(), minlength=n)

    def compute(self) -> torch.Tensor:
        """Recall per class (NaN for a class that never occurred)."""
        return self.hits / self.counts


def paired_predictions(lengths: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, actual) digit pairs for a confusion matrix: the k longest capsules and the k labels, each
    sorted, so a correctly recognised pair lands on the diagonal (k = 1: plain argmax against the label)."""
    top = lengths.topk(labels.shape[1], dim=1).indices.sort(dim=1).values
    return top.flatten(), labels.sort(dim=1).values.flatten()


class CapsuleDiagnostics(Callback):
    """The dashboard's capsule panels (see the module docstring); cheap when off, rank-0 for W&B objects."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the rank-reduced metrics on the module's device, and count the train step's FLOPs per image."""
        n = pl_module.model.caps[-1].n_out
        self.every = int(pl_module.hparams.get("log_diagnostics_every_n_steps", 0) or 0)
        device = pl_module.device
        self.recall = ClassRecall(n).to(device)
        self.confusion = MulticlassConfusionMatrix(n).to(device)
        self.present, self.absent = MeanMetric().to(device), MeanMetric().to(device)
        self.stats = RoutingStats()
        self.samples: dict[str, list] = {"lengths": [], "misclassified": []}
        self.flops_per_image = train_flops_per_image(pl_module) if stage == "fit" else 0

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Tell ThroughputMonitor this batch's FLOPs (for MFU); record routing statistics on diagnostic steps."""
        pl_module.flops_per_batch = self.flops_per_image * batch["image"].shape[0]
        self.recording_train = self._due(trainer)
        if self.recording_train:
            self.stats.reset()
            attach_routing_stats(pl_module.model, self.stats)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Log the training batch's routing statistics (and CUDA peak memory) on the diagnostic steps."""
        if not getattr(self, "recording_train", False):
            return
        self.recording_train = False
        attach_routing_stats(pl_module.model, None)
        pl_module.log_dict(self.stats.as_metrics("train"), sync_dist=True)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("train/gpu_peak_memory_gib", peak, rank_zero_only=True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Log the total gradient 2-norm on the diagnostic steps (Lightning's grad_norm utility)."""
        if self._due(trainer):
            norms = grad_norm(pl_module, norm_type=2)
            pl_module.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def _due(self, trainer: pl.Trainer) -> bool:
        """Whether this training step is a diagnostic one."""
        return bool(self.every) and trainer.global_step % self.every == 0

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the epoch's state and record routing statistics for the whole pass."""
        for metric in (self.recall, self.confusion, self.present, self.absent):
            metric.reset()
        self.stats.reset()
        self.samples = {"lengths": [], "misclassified": []}
        if self.every:
            attach_routing_stats(pl_module.model, self.stats)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        """Accumulate per-class recall, confusions, capsule lengths and (rank 0) misclassified examples."""
        if not self.every or trainer.sanity_checking or not isinstance(outputs, dict):
            return
        lengths, labels = outputs["lengths"].float(), batch["labels"]
        self.recall.update(lengths, labels)
        self.confusion.update(*paired_predictions(lengths, labels))
        present = torch.zeros_like(lengths, dtype=torch.bool).scatter_(1, labels, True)
        self.present.update(lengths[present])
        self.absent.update(lengths[~present])
        if trainer.is_global_zero:
            self._keep_samples(lengths, labels, batch["image"], outputs.get("recon"))

    def _keep_samples(self, lengths: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, recon: Any) -> None:
        """Keep capsule lengths for the histogram and up to 32 misclassified images with their reconstructions."""
        if sum(t.numel() for t in self.samples["lengths"]) < MAX_HISTOGRAM:
            self.samples["lengths"].append(lengths.flatten().cpu())
        wrong = (~topk_hits(lengths, labels).all(dim=1)).nonzero().flatten()
        room = MAX_MISCLASSIFIED - len(self.samples["misclassified"])
        for i in wrong[:room].tolist():
            predicted = lengths[i].topk(labels.shape[1]).indices
            rebuilt = recon[i].sum(0).clamp(0, 1) if recon is not None else None
            self.samples["misclassified"].append((images[i], labels[i], predicted, lengths[i], rebuilt))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the reduced scalars to every logger and the W&B objects from rank 0."""
        attach_routing_stats(pl_module.model, None)
        if not self.every or trainer.sanity_checking:
            return
        scalars = {f"val/class_acc/{c}": v for c, v in enumerate(self.recall.compute().tolist())}
        lengths = {"val/capsule_length_present": self.present, "val/capsule_length_absent": self.absent}
        scalars |= {key: metric.compute() for key, metric in lengths.items()}
        pl_module.log_dict(scalars)  # already reduced across ranks by torchmetrics
        pl_module.log_dict(self.stats.as_metrics("val"), sync_dist=True)  # per-rank means: averaged over ranks
        matrix = self.confusion.compute().cpu()  # a collective: every rank computes it
        if trainer.is_global_zero and find_wandb(trainer) is not None:  # no W&B logger: wandb is never imported
            log_wandb(trainer, wandb_panels(matrix, self.samples))

    # ------------------------------------------------------------------ end of fit
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Send the paper's figures and the best/last checkpoints to W&B (rank 0), drawn by a plain CapsNet built
        from the gathered weights: under FSDP or capsule parallelism the module's own model is sharded, and its
        forward is a collective that rank 0 alone would wait in forever. Skipped when a stop was requested."""
        wandb_logger = find_wandb(trainer)  # every rank has the logger objects; only rank 0 writes
        if not self.every or wandb_logger is None:
            return
        if _stop_requested(trainer, pl_module):
            rank_zero_info("capsdist: stop requested during the end-of-fit work: the figures are skipped")
            return
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule else None
        draw = loader is not None and pl_module.model.decoder is not None  # the figures are decoder pictures
        model = plain_model(trainer, pl_module) if draw else None  # every rank takes part in the gather
        if not trainer.is_global_zero:
            return
        import wandb  # W&B is imported only where a W&B logger is in use (heavy, optional for --wandb_mode disabled)

        if model is not None:
            out_dir = Path(trainer.default_root_dir) / "figures"
            with torch.inference_mode():
                paths = write_figures(model, next(iter(loader)), out_dir)
            log_wandb(trainer, {f"figures/{p.stem}": wandb.Image(str(p)) for p in paths})
        log_checkpoints(trainer, wandb_logger.experiment)


def _stop_requested(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether any rank was asked to stop (capsdist.cluster.signals; one all-reduce, so every rank answers alike)."""
    local = torch.tensor(signals.request(), device=pl_module.device)
    return bool(trainer.strategy.reduce(local, reduce_op="max"))


def plain_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> CapsNet | None:
    """On rank 0, an unsharded CapsNet (CPU, eval mode) holding the module's full weights; None on the other ranks.
    A collective under sharded strategies: every rank must call it."""
    # full weights, gathered to rank 0 (FSDP) or to every rank (capsule parallel, whose checkpoints hold rows)
    state = getattr(trainer.strategy, "full_weights", trainer.strategy.lightning_module_state_dict)()
    if not trainer.is_global_zero:
        return None
    with torch.device("meta"):  # no second copy of the weights: the gathered tensors become the model's own
        model = CapsNet(**{k: v for k, v in pl_module.hparams.items() if k in MODEL_ARGS})
    prefix = "model."
    weights = {k[len(prefix) :]: v.detach().cpu() for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(weights, assign=True)
    return model.eval()


def batch_images(batch: dict[str, torch.Tensor]) -> int:
    """Images in a batch, for ThroughputMonitor."""
    return batch["image"].shape[0]


def train_flops_per_image(pl_module: pl.LightningModule) -> int:
    """FLOPs of one image's training step (forward, loss, backward), counted on the module's own model with a
    batch of one (its gradients are cleared again); runs once, in setup, before any strategy wraps the model."""
    model, hparams = pl_module.model, pl_module.hparams
    size, k = hparams.get("image_size", 28), hparams.get("num_targets", 1)
    device = next(model.parameters()).device
    x = torch.zeros(1, hparams.get("in_channels", 1), size, size, device=device)
    labels = torch.arange(k, device=device).unsqueeze(0)

    def step() -> torch.Tensor:
        """The training loss of one image (its backward is counted too)."""
        return capsnet_loss(model(x, labels), labels, x.unsqueeze(1).expand(-1, k, -1, -1, -1))[0]

    flops = measure_flops(model, step, loss_fn=lambda loss: loss)
    model.zero_grad(set_to_none=True)
    return flops


def find_wandb(trainer: pl.Trainer) -> Any:
    """The trainer's W&B logger, or None (W&B is never imported here unless it is in use)."""
    return next((lg for lg in trainer.loggers if is_wandb(lg)), None)


def log_wandb(trainer: pl.Trainer, items: dict[str, Any]) -> None:
    """Log W&B objects at the trainer's step, on the axis Lightning's WandbLogger uses."""
    logger = find_wandb(trainer)
    if logger is not None and items:
        logger.experiment.log({**items, "trainer/global_step": trainer.global_step})


def wandb_panels(matrix: torch.Tensor, samples: dict[str, list]) -> dict[str, Any]:
    """The W&B objects of one validation: capsule-length histogram, confusion matrix, misclassified table."""
    import wandb  # heavy and optional: only where a W&B logger is in use
    n = matrix.shape[0]
    cells = [[str(a), str(p), int(matrix[a, p])] for a in range(n) for p in range(n)]
    table = wandb.Table(columns=["actual", "predicted", "count"], data=cells)
    fields = {"Actual": "actual", "Predicted": "predicted", "nPredictions": "count"}
    # a custom chart: W&B stores its data as the table `val/confusion_matrix_table` and draws the matrix
    panels: dict[str, Any] = {
        "val/confusion_matrix": wandb.plot_table("wandb/confusion_matrix/v1", table, fields, {"title": "val"})
    }
    if samples["lengths"]:
        panels["val/capsule_length"] = wandb.Histogram(torch.cat(samples["lengths"]).numpy(), num_bins=50)
    rows = []
    for image, label, predicted, lengths, rebuilt in samples["misclassified"]:
        picture = wandb.Image(to_pil(image, scale=3))
        recon = wandb.Image(to_pil(rebuilt, scale=3)) if rebuilt is not None else None
        rows.append([picture, label.tolist(), predicted.tolist(), [round(v, 3) for v in lengths.tolist()], recon])
    columns = ["image", "label", "prediction", "capsule_lengths", "reconstruction"]
    panels["val/misclassified"] = wandb.Table(columns=columns, data=rows)
    return panels


def log_checkpoints(trainer: pl.Trainer, run: Any) -> None:
    """Best and last checkpoints as W&B model artifacts, with the run's metrics as metadata: uploaded online, and
    offline a reference to the file in the run folder (W&B would otherwise stage a full copy of each under ~)."""
    import wandb  # heavy and optional: only where a W&B logger is in use

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
    callbacks = trainer.checkpoint_callbacks
    best = next((c.best_model_path for c in callbacks if getattr(c, "monitor", None)), "")
    last = next((c.last_model_path for c in callbacks if getattr(c, "last_model_path", "")), "")
    paths = {"best": best, "last": last}
    for alias, path in paths.items():
        if path and Path(path).is_file():
            artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={**metrics, "checkpoint": alias})
            if run.offline:
                artifact.add_reference(Path(path).resolve().as_uri(), name=Path(path).name, checksum=True)
            else:
                artifact.add_file(path, skip_cache=True)  # uploaded, not copied into W&B's cache as well
            run.log_artifact(artifact, aliases=[alias])
