"""The prior/routing formulation popular CapsNet ports use, kept as the honest baseline for bench and tests.

Priors by broadcasting W [1, n_out, n_in, d_out, d_in] over the batch with `torch.matmul`, then routing on
[B, n_out, n_in, d] with the priors detached in every round but the last (as in XifengGuo/CapsNet-Pytorch).
Same parameters and, up to float rounding, the same values as capsdist's `CapsLayer` with detach=True.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from capsdist.model import CapsLayer, CapsNet


def plain_squash(s: torch.Tensor) -> torch.Tensor:
    """The ports' squash over the last dim, with the epsilon inside the root that keeps it finite at 0."""
    norm2 = (s**2).sum(dim=-1, keepdim=True)
    return norm2 / (1 + norm2) * s / torch.sqrt(norm2 + 1e-8)


class ReferenceCapsLayer(nn.Module):
    """A routed capsule layer in the ports' formulation: W broadcast over the batch, detached inner rounds."""

    def __init__(self, weight: torch.Tensor, iterations: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # [1, n_out, n_in, d_out, d_in]
        self.iterations = iterations

    @classmethod
    def from_layer(cls, layer: CapsLayer) -> ReferenceCapsLayer:
        """The reference twin of a capsdist layer, holding a copy of its W (permuted to the ports' layout)."""
        return cls(layer.weight.detach().permute(1, 0, 2, 3).unsqueeze(0).clone(), layer.iterations)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Input capsules [B, n_in, d_in] -> routed output capsules [B, n_out, d_out]."""
        u_hat = torch.matmul(self.weight, u[:, None, :, :, None]).squeeze(-1)  # [B, n_out, n_in, d_out]
        detached = u_hat.detach()
        b = torch.zeros(u_hat.shape[:3], device=u.device)
        for it in range(self.iterations):
            c = torch.softmax(b, dim=1)
            if it == self.iterations - 1:
                v = plain_squash((c.unsqueeze(-1) * u_hat).sum(dim=2))
            else:
                v = plain_squash((c.unsqueeze(-1) * detached).sum(dim=2))
                b = b + (detached * v.unsqueeze(2)).sum(dim=-1)
        return v


def reference_twin(model: CapsNet) -> CapsNet:
    """An independent copy of `model` in the ports' formulation: plain convs and reference routed layers."""
    twin = copy.deepcopy(model)
    twin.primary.fast_weight_grad = False
    twin.caps = nn.ModuleList(ReferenceCapsLayer.from_layer(layer) for layer in model.caps)
    return twin
