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
(`capsdist.capsule_parallel`): the s^t in forward and the g_V^{t-1} in backward, so the same Function routes one
slice of a sharded layer. Routing math runs in float32 (float64 for float64 inputs) with autocast off; under
bf16 autocast the prior matmuls run in bf16 as the default path's do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from capsdist.routing import squash

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _uniform_round(u_t: torch.Tensor, weight: torch.Tensor, n_out: int, chunk: int, mm: torch.dtype) -> torch.Tensor:
    """s^1 = (1/n_out) sum_i W_i u_i as one GEMM per chunk (in `mm`, float32 or float64: s^1 is never rounded to
    bf16): u_t [n_in, B, d_in] -> [B, n_out*d_out]."""
    n_in, batch, d_in = u_t.shape
    out = None
    for lo, hi in _chunks(n_in, chunk):
        w = weight[lo:hi].reshape(hi - lo, -1, d_in).transpose(1, 2).reshape((hi - lo) * d_in, -1)
        part = u_t[lo:hi].transpose(0, 1).reshape(batch, -1).to(mm) @ w.to(mm)
        out = part if out is None else out + part
    return out / n_out


class _StreamingRouting(torch.autograd.Function):
    """(u [B, n_in, d_in], weight [n_in, n_out, d_out, d_in]) -> v [B, n_out, d_out], priors recomputed per chunk."""

    @staticmethod
    def forward(ctx, u, weight, iterations, detach, chunk, reduce):  # type: ignore[override]
        acc = torch.float64 if torch.float64 in (u.dtype, weight.dtype) else torch.float32
        dev = u.device.type
        bf16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
        mm = torch.bfloat16 if bf16 else acc  # fp16 autocast: float32 priors (fp16 would overflow)
        n_in, n_out, d_out, _ = weight.shape
        batch = u.shape[0]
        u_t = u.detach().transpose(0, 1)
        w = weight.detach()
        with torch.autocast(dev, enabled=False):
            s_list, v_list = [], []
            big_v = None
            for t in range(iterations):
                if t == 0:
                    s = _uniform_round(u_t, w, n_out, chunk, acc).view(batch, n_out, d_out)
                else:
                    s = torch.zeros(batch, n_out, d_out, dtype=acc, device=u.device)
                    for lo, hi in _chunks(n_in, chunk):
                        u_hat = _priors(u_t, w, lo, hi, mm, acc)
                        coupling = torch.softmax((u_hat * big_v).sum(-1), dim=-1)
                        s += (coupling.unsqueeze(-1) * u_hat).sum(0)
                if reduce is not None:
                    s = reduce(s)
                v = squash(s)
                s_list.append(s)
                v_list.append(v)
                big_v = v if big_v is None else big_v + v
        ctx.save_for_backward(u, weight, *s_list, *v_list)
        ctx.conf = (iterations, detach, chunk, reduce, mm, acc)
        return v

    @staticmethod
    def backward(ctx, grad_v):  # type: ignore[override]
        iterations, detach, chunk, reduce, mm, acc = ctx.conf
        u, weight, *saved = ctx.saved_tensors
        s_list, v_list = saved[:iterations], saved[iterations:]
        big_vs = list(torch.cumsum(torch.stack(v_list), dim=0))  # V^1 .. V^T
        n_in, n_out, d_out, d_in = weight.shape
        u_t = u.detach().transpose(0, 1)
        w = weight.detach()
        grad_v = grad_v.to(acc)
        with torch.autocast(u.device.type, enabled=False):
            rounds = [iterations - 1] if detach else list(range(iterations))
            grad_s: dict[int, torch.Tensor] = {}
            carried = torch.zeros_like(grad_v)  # sum of g_V^{t'} for t' >= t
            for t in reversed(rounds):  # phase 1: the small gradients, one chunk sweep per routed round
                grad_s[t] = _squash_vjp(s_list[t], (grad_v if t == iterations - 1 else 0) + carried)
                if t == 0 or detach:
                    continue
                grad_big_v = torch.zeros_like(grad_v)
                for lo, hi in _chunks(n_in, chunk):
                    u_hat = _priors(u_t, w, lo, hi, mm, acc)
                    coupling = torch.softmax((u_hat * big_vs[t - 1]).sum(-1), dim=-1)
                    grad_logits = _softmax_vjp(coupling, (u_hat * grad_s[t]).sum(-1))
                    grad_big_v += (grad_logits.unsqueeze(-1) * u_hat).sum(0)
                carried = carried + (reduce(grad_big_v) if reduce is not None else grad_big_v)
            grad_u_t = torch.empty(n_in, u.shape[0], d_in, dtype=acc, device=u.device)
            grad_w = torch.empty(n_in, n_out * d_out, d_in, dtype=acc, device=u.device)
            for lo, hi in _chunks(n_in, chunk):  # phase 2: d u_hat per chunk -> dW, du of that chunk
                u_hat = _priors(u_t, w, lo, hi, mm, acc)
                grad_hat = torch.zeros_like(u_hat)
                for t in rounds:
                    if t == 0:
                        grad_hat += grad_s[0] / n_out
                        continue
                    coupling = torch.softmax((u_hat * big_vs[t - 1]).sum(-1), dim=-1)
                    grad_hat += coupling.unsqueeze(-1) * grad_s[t]
                    if not detach:
                        grad_logits = _softmax_vjp(coupling, (u_hat * grad_s[t]).sum(-1))
                        grad_hat += grad_logits.unsqueeze(-1) * big_vs[t - 1]
                flat = grad_hat.view(hi - lo, -1, n_out * d_out)  # [C, B, n_out*d_out]
                grad_w[lo:hi] = torch.bmm(flat.transpose(1, 2), u_t[lo:hi].to(acc))
                grad_u_t[lo:hi] = torch.bmm(flat, w[lo:hi].reshape(hi - lo, -1, d_in).to(acc))
        grad_u = grad_u_t.transpose(0, 1).to(u.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_w.view(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_u, grad_weight, None, None, None, None


def _priors(u_t: torch.Tensor, w: torch.Tensor, lo: int, hi: int, mm: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """u_hat for input capsules lo..hi: u_t [n_in, B, d_in], w [n_in, n_out, d_out, d_in] -> [C, B, n_out, d_out]."""
    n_out, d_out, d_in = w.shape[1:]
    wc = w[lo:hi].reshape(hi - lo, n_out * d_out, d_in).transpose(1, 2).to(mm)
    return torch.bmm(u_t[lo:hi].to(mm), wc).to(acc).view(hi - lo, -1, n_out, d_out)


def _softmax_vjp(prob: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d logits of prob = softmax(logits, -1) given d prob."""
    return prob * (grad - (prob * grad).sum(-1, keepdim=True))


def _squash_vjp(s: torch.Tensor, grad_v: torch.Tensor) -> torch.Tensor:
    """d s of v = squash(s) given d v (autograd on the small [B, n_out, d] tensor)."""
    with torch.enable_grad():
        s = s.detach().requires_grad_()
        return torch.autograd.grad(squash(s), s, grad_v)[0]


def streaming_routing(
    u: torch.Tensor,
    weight: torch.Tensor,
    iterations: int = 3,
    detach: bool = False,
    chunk_size: int = 1024,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Route input capsules u [B, n_in, d_in] through W [n_in, n_out, d_out, d_in] to v [B, n_out, d_out],
    holding the priors of at most `chunk_size` input capsules at a time in forward and backward.

    Same values and gradients as `dynamic_routing(CapsLayer.priors(u), iterations, detach)`.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least 1 iteration, got {iterations}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _StreamingRouting.apply(u, weight, iterations, detach, chunk_size, reduce)
