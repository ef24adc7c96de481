"""CapsNet losses: margin loss on capsule lengths and the scaled sum-squared reconstruction error, in fp32."""

from __future__ import annotations

import torch

from capsdist.model.capsnet import CapsOutput


def margin_loss(
    lengths: torch.Tensor, labels: torch.Tensor, m_pos: float = 0.9, m_neg: float = 0.1, lam: float = 0.5
) -> torch.Tensor:
    """Sum over classes of T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2, mean over the batch.

    `labels` [B, K] may hold several present classes per image (K=2 for MultiMNIST); T_k = 1 for each.
    """
    lengths = lengths.float()
    present = torch.zeros_like(lengths).scatter_(1, labels.view(labels.shape[0], -1), 1.0)
    pos = present * torch.relu(m_pos - lengths).pow(2)
    neg = lam * (1.0 - present) * torch.relu(lengths - m_neg).pow(2)
    return (pos + neg).sum(dim=1).mean()


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image (over every reconstructed digit), mean over the batch."""
    diff = recon.float() - target.float()
    return diff.pow(2).flatten(1).sum(dim=1).mean()


def capsnet_loss(
    out: CapsOutput, labels: torch.Tensor, target: torch.Tensor | None, recon_weight: float = 0.0005
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, margin, reconstruction) with total = margin + recon_weight * reconstruction (paper: 0.0005)."""
    margin = margin_loss(out.lengths, labels)
    if out.recon is None or target is None or recon_weight == 0:
        recon = margin.new_zeros(())
    else:
        recon = reconstruction_loss(out.recon, target)
    return margin + recon_weight * recon, margin, recon
