"""Streaming routing: a routed capsule layer whose memory does not grow with n_in x n_out.

Routing is attention with the softmax over the outputs. After t rounds the logits are
b_ij = u_hat_j|i . (v_j^1 + ... + v_j^t), and s_j = sum_i c_ij u_hat_j|i is a sum over input capsules, so the
priors u_hat = W u never need to exist for all inputs at once: `streaming_routing` recomputes them for C input
capsules at a time, in forward and in backward, and saves only u, W and the per-round s^t, v^t [B, n_out, d].

Backward (derived in full, gradients through every round when `detach` is off). With V^t = v^1 + ... + v^t,
round t (t >= 2) uses c^t = softmax_j(u_hat . V^{t-1}), s^t = sum_i c^t u_hat, v^t = squash(s^t). Reverse sweep:
    g_v^t = dL/dv^T [t = T] + sum_{t' >= t} g_V^{t'},   g_s^t = squash'(s^t)^T g_v^t,
    g_c^t_ij = u_hat_ij . g_s^t_j,   g_b^{t-1}_ij = c^t_ij (g_c^t_ij - sum_k c^t_ik g_c^t_ik),
    g_V^{t-1}_j = sum_i g_b^{t-1}_ij u_hat_ij,
    g_u_hat_ij = sum_t c^t_ij g_s^t_j + g_b^{t-1}_ij V^{t-1}_j.
g_V^{t-1} is a sum over ALL input capsules and g_s^{t-1} needs it, so phase 1 runs one chunk sweep per round
t = T..2 (recomputing u_hat, accumulating only the small g_V), and phase 2 one more sweep that forms g_u_hat per
chunk from the now-known g_s^t and turns it straight into that chunk's dW and du. Cost: forward T-1 prior
recomputations (round 1 is a single GEMM: uniform coupling), backward T (detach: 1), against 1 + 2 matmuls of
the default path. With `detach`, c^T is a constant and backward is phase 2 for the last round only.

`reduce` (default: none) sums a partial [B, n_out, d] over the ranks that hold the other input capsules
(`capsdist.parallel.capsule_parallel`):
the s^t in forward and the g_V^{t-1} in backward, so the same Function routes one
slice of a sharded layer. Routing math runs in float32 (float64 for float64 inputs) with autocast off; under
bf16 autocast the prior matmuls run in bf16 as the default path's do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from capsdist.model.routing import _dot, _weighted_sum, squash

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _priors(u_t: torch.Tensor, w: torch.Tensor, lo: int, hi: int, mm: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """u_hat of input capsules lo..hi as [B*n_out, C, d_out]: the GEMV view of contiguous [C, B*n_out, d_out]
    memory (u_t [n_in, B, d_in], w [n_in, n_out, d_out, d_in]), so `capsdist.model.routing`'s contractions read it
    without a copy."""
    n_out, d_out, d_in = w.shape[1:]
    wc = w[lo:hi].reshape(hi - lo, n_out * d_out, d_in).transpose(1, 2).to(mm)
    return torch.bmm(u_t[lo:hi].to(mm), wc).to(acc).view(hi - lo, -1, d_out).transpose(0, 1)


def _coupling(u_hat: torch.Tensor, big_v: torch.Tensor, n_out: int) -> torch.Tensor:
    """c = softmax over outputs of the logits u_hat . V: [B*n_out, C, d] x [B*n_out, d] -> [B*n_out, C]."""
    logits = _dot(u_hat, big_v)
    return torch.softmax(logits.view(-1, n_out, logits.shape[1]), dim=1).view_as(logits)


def _coupling_vjp(coupling: torch.Tensor, grad: torch.Tensor, n_out: int) -> torch.Tensor:
    """d logits of c = softmax over outputs, given d c (both [B*n_out, C])."""
    c, g = coupling.view(-1, n_out, coupling.shape[1]), grad.view(-1, n_out, grad.shape[1])
    return (c * (g - (c * g).sum(1, keepdim=True))).view_as(grad)


def _squash_vjp(s: torch.Tensor, grad_v: torch.Tensor) -> torch.Tensor:
    """d s of v = squash(s) given d v (autograd on the small [B*n_out, d] tensor)."""
    with torch.enable_grad():
        s = s.detach().requires_grad_()
        return torch.autograd.grad(squash(s), s, grad_v)[0]


def _uniform_round(u_t: torch.Tensor, w: torch.Tensor, chunk: int, acc: torch.dtype) -> torch.Tensor:
    """s^1 = (1/n_out) sum_i W_i u_i, per chunk the priors summed over its inputs, in float32/64 (never rounded to
    bf16): u_t [n_in, B, d_in] -> [B*n_out, d_out]. The same batched matmul as every other round: W is read in
    place (a single GEMM would need a transposed copy of W) and the chunk's priors are no larger than later rounds'."""
    n_in, n_out = u_t.shape[0], w.shape[1]
    out = sum(_priors(u_t, w, lo, hi, acc, acc).sum(dim=1) for lo, hi in _chunks(n_in, chunk))
    return out / n_out


def auto_chunk(batch: int, n_in: int, n_out: int, d_out: int, budget: int = 64 * 2**20) -> int:
    """Input capsules per chunk when none is given: as many as keep one chunk's float32 priors within ``budget``
    bytes (64 MiB: big enough that the per-chunk overhead is small, small against the full prior tensor of a
    layer worth streaming), at least 16."""
    return max(16, min(n_in, budget // max(1, batch * n_out * d_out * 4)))


class _StreamingRouting(torch.autograd.Function):
    """(u [B, n_in, d_in], weight [n_in, n_out, d_out, d_in]) -> v [B, n_out, d_out], priors recomputed per chunk."""

    @staticmethod
    def forward(ctx, u, weight, iterations, detach, chunk, reduce):  # type: ignore[override]
        acc = torch.float64 if torch.float64 in (u.dtype, weight.dtype) else torch.float32
        dev = u.device.type
        bf16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
        mm = torch.bfloat16 if bf16 else acc  # fp16 autocast: float32 priors (fp16 would overflow)
        n_in, n_out, d_out, _ = weight.shape
        u_t, w = u.detach().transpose(0, 1), weight.detach()
        w_mm = w.to(mm)  # once per pass, not per chunk and round (a no-op in float32)
        with torch.autocast(dev, enabled=False):
            s_list, v_list = [], []
            big_v = None
            for t in range(iterations):
                if t == 0:
                    s = _uniform_round(u_t, w, chunk, acc)
                else:
                    s = torch.zeros_like(big_v)
                    for lo, hi in _chunks(n_in, chunk):
                        u_hat = _priors(u_t, w_mm, lo, hi, mm, acc)
                        s += _weighted_sum(_coupling(u_hat, big_v, n_out), u_hat)
                if reduce is not None:
                    s = _reduce(reduce, s, n_out)
                v = squash(s)
                s_list.append(s)
                v_list.append(v)
                big_v = v if big_v is None else big_v + v
        ctx.save_for_backward(u, weight, *s_list, *v_list)
        ctx.conf = (iterations, detach, chunk, reduce, mm, acc)
        return v.view(-1, n_out, d_out)

    @staticmethod
    def backward(ctx, grad_v):  # type: ignore[override]
        iterations, detach, chunk, reduce, mm, acc = ctx.conf
        u, weight, *saved = ctx.saved_tensors
        s_list, v_list = saved[:iterations], saved[iterations:]
        big_vs = list(torch.cumsum(torch.stack(v_list), dim=0))  # V^1 .. V^T
        n_in, n_out, d_out, d_in = weight.shape
        u_t, w = u.detach().transpose(0, 1), weight.detach()
        w_mm = w.to(mm)
        grad_u_t = torch.zeros(n_in, u.shape[0], d_in, dtype=acc, device=u.device)
        grad_w = torch.zeros(n_in, n_out * d_out, d_in, dtype=acc, device=u.device)
        last = iterations - 1
        with torch.autocast(u.device.type, enabled=False):
            grad_s = {last: _squash_vjp(s_list[last], grad_v.to(acc).reshape(-1, d_out))}
            carried = torch.zeros_like(grad_s[last])  # sum of g_V^{t'} for t' >= t
            sweeps = ([last] if detach else list(range(last, 0, -1))) if iterations > 1 else []
            for t in sweeps:  # one chunk sweep per routed round; the final sweep also forms d u_hat
                final = t == sweeps[-1]
                grad_big_v = torch.zeros_like(carried)
                for lo, hi in _chunks(n_in, chunk):
                    u_hat = _priors(u_t, w_mm, lo, hi, mm, acc)
                    grad_hat = torch.zeros_like(u_hat.transpose(0, 1)) if final else None  # [C, B*n_out, d]
                    for r in range(t, iterations) if final else [t]:
                        coupling = _coupling(u_hat, big_vs[r - 1], n_out)
                        if final:
                            grad_hat.addcmul_(coupling.t().unsqueeze(2), grad_s[r].unsqueeze(0))
                        if detach:
                            continue
                        grad_logits = _coupling_vjp(coupling, _dot(u_hat, grad_s[r]), n_out)
                        if r == t:
                            grad_big_v += _weighted_sum(grad_logits, u_hat)
                        if final:
                            grad_hat.addcmul_(grad_logits.t().unsqueeze(2), big_vs[r - 1].unsqueeze(0))
                    if final:
                        flat = grad_hat.view(hi - lo, -1, n_out * d_out)  # [C, B, n_out*d_out]
                        grad_w[lo:hi] += torch.bmm(flat.transpose(1, 2), u_t[lo:hi].to(acc))
                        grad_u_t[lo:hi] += torch.bmm(flat, w[lo:hi].reshape(hi - lo, -1, d_in).to(acc))
                if not detach:
                    carried = carried + (grad_big_v if reduce is None else _reduce(reduce, grad_big_v, n_out))
                    grad_s[t - 1] = _squash_vjp(s_list[t - 1], carried)
            if 0 in grad_s:  # round 1's uniform coupling: d u_hat = g_s^1 / n_out for every input, two GEMMs
                g0 = (grad_s[0] / n_out).view(u.shape[0], -1)  # [B, n_out*d_out]
                for lo, hi in _chunks(n_in, chunk):
                    grad_w[lo:hi] += torch.bmm(g0.t().expand(hi - lo, -1, -1), u_t[lo:hi].to(acc))
                    wc = w[lo:hi].reshape(hi - lo, -1, d_in).to(acc)
                    grad_u_t[lo:hi] += torch.bmm(g0.expand(hi - lo, -1, -1), wc)
        grad_u = grad_u_t.transpose(0, 1).to(u.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_w.view(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_u, grad_weight, None, None, None, None


def _reduce(reduce: Reduce, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """`reduce` on the [B, n_out, d] view of a [B*n_out, d] partial sum."""
    return reduce(x.view(-1, n_out, x.shape[-1])).view_as(x)


def streaming_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int = 3,
    detach: bool = False,
    chunk_size: int | None = None,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Route input capsules u [B, n_in, d_in] through W [n_in, n_out, d_out, d_in] to v [B, n_out, d_out],
    holding the priors of at most `chunk_size` input capsules at a time in forward and backward (None:
    `auto_chunk` picks it from the tensor sizes).

    Same values and gradients as `dynamic_routing(CapsLayer.priors(u), iterations, detach)`.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least 1 iteration, got {iterations}")
    if chunk_size is None:
        chunk_size = auto_chunk(u.shape[0], *weight.shape[:3])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _StreamingRouting.apply(u, weight, iterations, detach, chunk_size, reduce)
