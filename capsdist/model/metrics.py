"""Classification metrics for capsule outputs: the k longest capsules against the k labels of each image."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric


def topk_hits(lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: whether each of the K labels is among the K longest capsules (K = labels.shape[1])."""
    top = lengths.topk(labels.shape[1], dim=1).indices
    return (labels.unsqueeze(2) == top.unsqueeze(1)).any(dim=2)


class CapsMetrics(torch.nn.Module):
    """Exact match (all K labels are the K longest capsules, as a set; plain accuracy when K = 1) and per-digit
    accuracy, as torchmetrics MeanMetrics so they reduce correctly across ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.exact = MeanMetric()
        self.digit = MeanMetric()

    def update(self, lengths: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate one batch."""
        hits = topk_hits(lengths, labels).float()
        self.exact.update(hits.min(dim=1).values)
        self.digit.update(hits)

    def compute(self) -> dict[str, torch.Tensor]:
        """{'acc', 'error', 'digit_acc'} over everything accumulated since the last reset."""
        acc = self.exact.compute()
        return {"acc": acc, "error": 1.0 - acc, "digit_acc": self.digit.compute()}

    def reset(self) -> None:
        """Start a new epoch."""
        self.exact.reset()
        self.digit.reset()
