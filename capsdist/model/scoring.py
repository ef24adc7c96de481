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
    recon = out.recon
    if recon is not None and labels.shape[1] > 1:  # the K longest come longest first, the targets in label order
        perm = pair_with_labels(out.lengths.topk(labels.shape[1], dim=1).indices, labels)
        recon = recon.gather(1, perm.view(*perm.shape, 1, 1, 1).expand_as(recon))
    total, _, _ = capsnet_loss(out._replace(recon=recon), labels, batch["recon"], recon_weight)
    metrics.update(out.lengths, labels)
    return total, out


def pair_with_labels(selected: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, K] order of the ``selected`` capsules (the K longest, longest first) that pairs each with the target of
    the same class: ``selected.gather(1, perm)[:, i] == labels[:, i]`` wherever label i was selected; the selections
    left over take the unmatched places in order. Without it a MultiMNIST sample whose longer capsule is its second
    digit would be scored against the wrong digit's image."""
    batch, k = selected.shape
    rows = torch.arange(batch, device=selected.device)
    perm = torch.full_like(selected, -1)
    free = torch.ones_like(selected, dtype=torch.bool)
    for i in range(k):  # K is the digits per image (2): exact matches first
        hit = (selected == labels[:, i : i + 1]) & free
        j, found = hit.int().argmax(dim=1), hit.any(dim=1)
        perm[found, i] = j[found]
        free[rows[found], j[found]] = False
    for i in range(k):  # then the wrong predictions, in order
        j, missing = free.int().argmax(dim=1), perm[:, i] < 0
        perm[missing, i] = j[missing]
        free[rows[missing], j[missing]] = False
    return perm


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
