"""Evaluation, one code path: the test-time forward, loss and metrics of a batch, for training and for evaluate."""

from __future__ import annotations

import torch

from capsdist.model.capsnet import CapsNet, CapsOutput
from capsdist.model.losses import capsnet_loss
from capsdist.model.metrics import CapsMetrics


def eval_batch(
    model: CapsNet, batch: dict[str, torch.Tensor], recon_weight: float, metrics: CapsMetrics
) -> tuple[torch.Tensor, CapsOutput]:
    """Test-time forward (decoder masked by the longest capsules); update ``metrics``; (the batch's loss, outputs)."""
    labels = batch["labels"]
    out = model(batch["image"], k=labels.shape[1])
    total, _, _ = capsnet_loss(out, labels, batch["recon"], recon_weight)
    metrics.update(out.lengths, labels)
    return total, out
