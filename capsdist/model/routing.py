"""Squash and routing-by-agreement (Sabour et al. 2017, Procedure 1), fast and numerically safe under autocast.

Routing always runs in float32 with autocast disabled: the softmax over output capsules, the squash norm and
the agreement dot products are where half precision overflows or loses the small logit updates.

Speed: the priors arrive input-major ([n_in, B, n_out, d] in memory, as `CapsLayer.priors` writes them), so
every contraction over the input capsules is one batched GEMV over the B*n_out (batch, output) pairs on a
strided view, with no copy of the priors in forward or backward; the gradient w.r.t. the priors is written
straight into that input-major layout, which the prior matmul's backward reads without a transpose copy.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

SQUASH_EPS = 1e-8  # inside the square root: keeps squash and its gradient finite at s = 0


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s| along `dim`, computed in (at least) float32 and finite at s = 0."""
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    sq = s.pow(2).sum(dim=dim, keepdim=True)
    return s * (sq / (1.0 + sq) * torch.rsqrt(sq + eps))


def _input_major(u: torch.Tensor) -> bool:
    """Whether u [N, I, D] is the transposed view of a contiguous [I, N, D] tensor."""
    n, _, d = u.shape
    return u.stride() == (d, n * d, 1)


def _outer_factors(coef: torch.Tensor, vec: torch.Tensor, input_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """coef [N, I] and vec [N, D] broadcast so their product is [I, N, D] when input-major, else [N, I, D]."""
    if input_major:
        # contiguous coef: otherwise the product inherits coef's N-major strides and a copy follows
        return coef.t().contiguous().unsqueeze(2), vec.unsqueeze(0)
    return coef.unsqueeze(2), vec.unsqueeze(1)


def _outer(coef: torch.Tensor, vec: torch.Tensor, input_major: bool) -> torch.Tensor:
    """coef [N, I] x vec [N, D] -> [N, I, D], written input-major when the priors are (so no copy follows)."""
    a, b = _outer_factors(coef, vec, input_major)
    return (a * b).transpose(0, 1) if input_major else a * b


def _weighted_sum(coef: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """s[n] = sum_i coef[n, i] u[n, i]: [N, I] x [N, I, D] -> [N, D] as one batched GEMV."""
    return torch.bmm(coef.unsqueeze(1), u).squeeze(1)


def _dot(u: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """a[n, i] = u[n, i] . vec[n]: [N, I, D] x [N, D] -> [N, I] as one batched GEMV."""
    return torch.bmm(u, vec.unsqueeze(2)).squeeze(2)


class _InputContraction(torch.autograd.Function):
    """A contraction over the input capsules of u [N, I, D] with a small operand. Backward writes d u in u's own
    layout and saves only what the needed gradients use (with detached inner rounds, the last round's u is not
    kept). Subclasses name the operation: `contract(small, u)`, `grad_small(u, grad)`, `grad_u(small, grad, im)`."""

    contract = grad_small = grad_u = None  # set by each subclass

    @classmethod
    def forward(cls, ctx, small: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        need_small, need_u = ctx.needs_input_grad
        ctx.save_for_backward(small if need_u else None, u if need_small else None)
        ctx.input_major = _input_major(u)
        return cls.contract(small, u)

    @classmethod
    def backward(cls, ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        small, u = ctx.saved_tensors
        grad_small = None if u is None else cls.grad_small(u, grad)
        grad_u = None if small is None else cls.grad_u(small, grad, ctx.input_major)
        return grad_small, grad_u


class _Agreement(_InputContraction):
    """a[n, i] = u[n, i] . vec[n] (small = vec [N, D]): d vec = sum_i grad_i u_i, d u = grad (x) vec."""

    contract = staticmethod(lambda vec, u: _dot(u, vec))
    grad_small = staticmethod(lambda u, grad: _weighted_sum(grad, u))
    grad_u = staticmethod(lambda vec, grad, input_major: _outer(grad, vec, input_major))


class _WeightedSum(_InputContraction):
    """s[n] = sum_i coef[n, i] u[n, i] (small = coef [N, I]): d coef = u . grad, d u = coef (x) grad."""

    contract = staticmethod(_weighted_sum)
    grad_small = staticmethod(_dot)
    grad_u = staticmethod(_outer)


def _squash_grad(s: torch.Tensor, grad_v: torch.Tensor) -> torch.Tensor:
    """d loss / d s for v = squash(s), by autograd on these small [N, D] tensors."""
    with torch.enable_grad():
        s = s.detach().requires_grad_()
        return torch.autograd.grad(squash(s), s, grad_v)[0]


class _FullRouting(torch.autograd.Function):
    """Routing with gradients through every round (the paper's), as one autograd node over u [N, I, D] (N = batch x
    outputs). Backward runs the rounds in reverse on small [N, I] and [N, D] tensors, then writes d u, a sum of
    outer products that never needs u itself, in one prior-sized buffer in u's layout. With ``reuse`` (u belongs
    to this call alone, as `CapsLayer`'s priors do) that buffer is u's own memory: peak one prior-sized tensor
    where autograd's per-op backward held u, its gradient and one temporary per contribution."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, u: torch.Tensor, batch: int, iterations: int, stats: RoutingStats | None, reuse: bool
    ) -> torch.Tensor:
        n_out = u.shape[0] // batch
        sums = [u.sum(dim=1) / n_out]  # round 1: uniform coupling
        vs, couplings, logits = [squash(sums[0])], [], None
        if stats is not None:
            stats.record(1, None, n_out, u.device)
        for it in range(1, iterations):
            agreement = _dot(u, vs[-1])
            logits = agreement if logits is None else logits + agreement
            coupling = torch.softmax(logits.view(batch, n_out, -1), dim=1)
            if stats is not None:
                stats.record(it + 1, coupling, n_out, u.device)
            couplings.append(coupling.view_as(agreement))
            sums.append(_weighted_sum(couplings[-1], u))
            vs.append(squash(sums[-1]))
        ctx.save_for_backward(u, *sums, *vs[:-1], *couplings)
        ctx.batch, ctx.input_major, ctx.reuse = batch, _input_major(u), reuse
        return vs[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_v: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        u, *saved = ctx.saved_tensors
        rounds = (len(saved) + 2) // 3  # T sums, T-1 inputs v_1..v_{T-1} of the agreements, T-1 couplings
        sums, vs, couplings = saved[:rounds], saved[rounds : 2 * rounds - 1], saved[2 * rounds - 1 :]
        n, n_in, _ = u.shape
        terms = []  # d u = sum of coef [N, I] (x) vec [N, D] over these, plus the round-1 mean's share
        grad_logits = torch.zeros(n, n_in, dtype=u.dtype, device=u.device)
        for t in range(len(couplings), 0, -1):  # s_{t+1} = sum_i c_t u, c_t = softmax(b_t), b_t = sum_k<=t u . v_k
            grad_s = _squash_grad(sums[t], grad_v)
            coupling = couplings[t - 1]
            terms.append((coupling, grad_s))
            c = coupling.view(ctx.batch, -1, n_in)
            grad_c = _dot(u, grad_s).view_as(c)
            grad_logits = grad_logits + (c * (grad_c - (c * grad_c).sum(dim=1, keepdim=True))).view(n, n_in)
            terms.append((grad_logits, vs[t - 1]))  # b_t .. b_{T-1} all hold u . v_t
            grad_v = _weighted_sum(grad_logits, u)
        grad_mean = _squash_grad(sums[0], grad_v) / (n // ctx.batch)
        # u is read for the last time above: from here on its memory may hold the gradient
        grad_u = u if ctx.reuse else torch.empty_like(u)
        out = grad_u.transpose(0, 1) if ctx.input_major else grad_u  # [I, N, D] contiguous when input-major
        for k, (coef, vec) in enumerate(terms):
            a, b = _outer_factors(coef, vec, ctx.input_major)
            if k == 0:
                torch.mul(a, b, out=out)
            else:
                out.addcmul_(a, b)
        out.add_(grad_mean.unsqueeze(0 if ctx.input_major else 1))
        return grad_u, None, None, None, None


class RoutingStats:
    """Per-round summaries of the coupling coefficients c_i. (softmax over outputs), for the dashboard: mean
    entropy (it falls as routing sharpens) and mean largest coupling. Filled only while a layer records."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def reset(self) -> None:
        """Forget what was recorded."""
        self.sums, self.counts = {}, {}

    @torch.no_grad()
    def record(self, round_: int, coupling: torch.Tensor | None, n_out: int, device: torch.device) -> None:
        """Add round `round_`'s coupling [..., n_out (dim 1), n_in]; None means uniform (round 1)."""
        if coupling is None:
            entropy_max = torch.tensor([math.log(n_out), 1.0 / n_out], device=device)
        else:
            c = coupling.float()
            entropy = -(c * c.clamp_min(1e-12).log()).sum(dim=1).mean()
            entropy_max = torch.stack([entropy, c.amax(dim=1).mean()])
        self.sums[round_] = self.sums.get(round_, 0) + entropy_max
        self.counts[round_] = self.counts.get(round_, 0) + 1

    def as_metrics(self, prefix: str) -> dict[str, torch.Tensor]:
        """{prefix/routing_entropy/iterK, prefix/routing_max_coupling/iterK} averaged over the recorded calls."""
        out = {}
        for k in sorted(self.sums):
            mean = self.sums[k] / self.counts[k]
            out[f"{prefix}/routing_entropy/iter{k}"] = mean[0]
            out[f"{prefix}/routing_max_coupling/iter{k}"] = mean[1]
        return out


def dynamic_routing(
    u_hat: torch.Tensor,
    iterations: int = 3,
    detach: bool = False,
    stats: RoutingStats | None = None,
    owned: bool = False,
) -> torch.Tensor:
    """Route prediction vectors u_hat [B, n_in, n_out, d] to output capsules v [B, n_out, d].

    Logits b start at 0; each round c_i = softmax_j(b_i) over the n_out output capsules,
    s_j = sum_i c_ij u_hat_j|i, v_j = squash(s_j), then b_ij += u_hat_j|i . v_j (skipped after the last round).
    With `detach`, every round but the last sees u_hat detached (values identical, cheaper backward).
    Any memory layout is accepted; the input-major one of `CapsLayer.priors` avoids every copy. With `stats`, each
    round's coupling entropy and largest coupling are added to it (no coupling tensor is kept). ``owned``: u_hat
    is a temporary no one else reads (`CapsLayer`'s priors), so backward may write its gradient over it.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least 1 iteration, got {iterations}")
    with torch.autocast(device_type=u_hat.device.type, enabled=False):
        u = u_hat.float() if u_hat.dtype in (torch.float16, torch.bfloat16) else u_hat
        batch, n_in, n_out, d = u.shape
        # [B*n_out, n_in, d]: a view of input-major memory (a copy only for other layouts)
        flat = u.transpose(0, 1).reshape(n_in, batch * n_out, d).transpose(0, 1)
        if iterations > 1 and not detach:
            # a compiled or exported graph owns its buffers (writing over a saved input there only forces a copy),
            # and its fake tensors have no storage to compare: decided before any storage is read
            traced = torch.compiler.is_compiling() or torch.compiler.is_exporting()
            reuse = not traced and (owned or flat.untyped_storage().data_ptr() != u_hat.untyped_storage().data_ptr())
            return _FullRouting.apply(flat, batch, iterations, stats, reuse).view(batch, n_out, d)
        inner = flat.detach() if detach else flat
        # round 1: the softmax of all-zero logits is uniform, so s_j is the plain mean over inputs
        v = squash((flat if iterations == 1 else inner).sum(dim=1) / n_out)
        if stats is not None:
            stats.record(1, None, n_out, u.device)
        logits = None
        for it in range(1, iterations):
            agreement = _Agreement.apply(v, inner)
            logits = agreement if logits is None else logits + agreement
            coupling = torch.softmax(logits.view(batch, n_out, n_in), dim=1)
            if stats is not None:
                stats.record(it + 1, coupling, n_out, u.device)
            v = squash(_WeightedSum.apply(coupling.view(batch * n_out, n_in), flat if it == iterations - 1 else inner))
    return v.view(batch, n_out, d)


def attach_routing_stats(model: nn.Module, stats: RoutingStats | None) -> None:
    """Make every routed layer of `model` (anything with a `routing_stats` attribute) add its per-round coupling
    statistics to `stats`; None detaches them, and the fast path then computes none."""
    for layer in model.modules():
        if hasattr(layer, "routing_stats"):
            layer.routing_stats = stats
