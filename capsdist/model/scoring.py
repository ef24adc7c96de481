"""Evaluation, one code path: the test-time forward, loss and metrics of a batch, for training and for evaluate."""

from __future__ import annotations

from collections.abc import Callable

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


def own_capsule_errors(
    decoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    caps: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """[B, K] sum of squared pixel errors of each digit reconstructed from its own capsule: ``decoder`` (CapsNet's,
    caps [B, n, d] and a selection [B, K] -> [B, K, C, H, W]) masked by that digit's label, as in the paper's
    Figure 5, whatever was predicted; ``target`` [B, K, C, H, W] holds each digit alone."""
    recon = decoder(caps, labels)
    return (recon.float() - target.float()).pow(2).flatten(2).sum(dim=2)
