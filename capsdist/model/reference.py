"""The plain formulations of routing and of a routed layer, kept as the honest baseline for bench and tests.

`plain_routing` is Procedure 1 of the paper written the straightforward way (broadcast products and sums on
[B, n_in, n_out, d], any memory layout, no copies): the one reference the fast (`capsdist.model.routing`) and
streaming (`capsdist.model.streaming`) paths are tested against. `ReferenceCapsLayer` is the formulation popular
CapsNet ports use: priors by broadcasting W [1, n_out, n_in, d_out, d_in] over the batch with `torch.matmul`,
routed (by `plain_routing`, on their layout) with the priors detached in every round but the last (as in
XifengGuo/CapsNet-Pytorch). Same parameters and, up to float rounding, the same values as capsdist's
`CapsLayer` with detach=True.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from capsdist.model.capsnet import CapsLayer, CapsNet


def plain_squash(s: torch.Tensor) -> torch.Tensor:
    """The ports' squash over the last dim, with the epsilon inside the root that keeps it finite at 0."""
    norm2 = (s**2).sum(dim=-1, keepdim=True)
    return norm2 / (1 + norm2) * s / torch.sqrt(norm2 + 1e-8)


def plain_routing(u_hat: torch.Tensor, iterations: int = 3, detach: bool = False) -> torch.Tensor:
    """Procedure 1 on priors u_hat [B, n_in, n_out, d] -> v [B, n_out, d]: c = softmax over OUTPUT capsules,
    s_j = sum_i c_ij u_hat_j|i, v = squash(s), b_ij += u_hat_j|i . v_j; with `detach`, every round but the last
    sees u_hat detached."""
    inner = u_hat.detach() if detach else u_hat
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype, device=u_hat.device)
    for it in range(iterations):
        u_it = u_hat if it == iterations - 1 else inner
        v = plain_squash((torch.softmax(b, dim=2).unsqueeze(-1) * u_it).sum(dim=1))
        if it < iterations - 1:
            b = b + (u_it * v.unsqueeze(1)).sum(dim=-1)
    return v


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
        return plain_routing(u_hat.transpose(1, 2), self.iterations, detach=True)


def reference_twin(model: CapsNet) -> CapsNet:
    """An independent copy of `model` in the ports' formulation: plain convs and reference routed layers."""
    twin = copy.deepcopy(model)
    twin.primary.fast_weight_grad = False
    twin.caps = nn.ModuleList(ReferenceCapsLayer.from_layer(layer) for layer in model.caps)
    return twin
