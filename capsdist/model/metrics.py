"""Classification metrics for capsule outputs: the k longest capsules against the k labels of each image."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric


def topk_hits(lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: whether each of the K labels is found, i.e. its capsule is among the K longest (K =
    labels.shape[1]); a sample is right (the paper's MultiMNIST metric) when all K are found.

    Found means strictly among the K longest: at most K capsules, its own included, are at least as long. A tie at
    the K-th place is a miss for every tied label (``topk`` would pick by index, so an untrained model with equal
    lengths would score on labels 0 and 1; the official TensorFlow code's ``top_k`` does that), and a NaN length
    is never found. A label repeated within a sample is found once, at its first position: K distinct capsules
    cannot hold the same digit twice, so such a sample is never right (every data source refuses them anyway:
    ``capsdist.data.recipe`` draws different classes, the shard reader skips repeated labels as corrupt).
    """
    own = lengths.gather(1, labels)
    at_least_as_long = (lengths.unsqueeze(1) >= own.unsqueeze(2)).sum(dim=2)  # [B, K], 0 for a NaN length
    repeated = (labels.unsqueeze(2) == labels.unsqueeze(1)).tril(diagonal=-1).any(dim=2)
    return (at_least_as_long >= 1) & (at_least_as_long <= labels.shape[1]) & ~repeated


class CapsMetrics(torch.nn.Module):
    """Exact match (all K labels are the K longest capsules, as a set; plain accuracy when K = 1) and per-digit
    accuracy (each label found, ``topk_hits``), as torchmetrics MeanMetrics so they reduce correctly across ranks."""

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
