"""Squash and routing-by-agreement (Sabour et al. 2017, Procedure 1), numerically safe under autocast.

Routing always runs in float32 with autocast disabled: the softmax over output capsules, the squash norm and
the agreement dot products are where half precision overflows or loses the small logit updates.
"""

from __future__ import annotations

import torch

SQUASH_EPS = 1e-8  # inside the square root: keeps squash and its gradient finite at s = 0


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s| along `dim`, computed in (at least) float32 and finite at s = 0."""
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    sq = s.pow(2).sum(dim=dim, keepdim=True)
    return s * (sq / (1.0 + sq) * torch.rsqrt(sq + eps))


def dynamic_routing(u_hat: torch.Tensor, iterations: int = 3, detach: bool = False) -> torch.Tensor:
    """Route prediction vectors u_hat [B, n_in, n_out, d] to output capsules v [B, n_out, d].

    Logits b start at 0; each round c_i = softmax_j(b_i) over the n_out output capsules,
    s_j = sum_i c_ij u_hat_j|i, v_j = squash(s_j), then b_ij += u_hat_j|i . v_j (skipped after the last round).
    With `detach`, every round but the last sees u_hat detached (values identical, cheaper backward).
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least 1 iteration, got {iterations}")
    with torch.autocast(device_type=u_hat.device.type, enabled=False):
        u = u_hat.float() if u_hat.dtype in (torch.float16, torch.bfloat16) else u_hat
        u_inner = u.detach() if detach else u
        batch, n_in, n_out, _ = u.shape
        b = u.new_zeros(batch, n_in, n_out)
        for it in range(iterations):
            last = it == iterations - 1
            u_it = u if last else u_inner
            if it == 0:  # softmax of all-zero logits: uniform coupling, no need to build it
                s = u_it.sum(dim=1) / n_out
            else:
                c = torch.softmax(b, dim=2)
                s = torch.einsum("bij,bijd->bjd", c, u_it)
            v = squash(s)
            if not last:
                b = b + torch.einsum("bijd,bjd->bij", u_it, v)
    return v
