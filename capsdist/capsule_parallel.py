"""Capsule parallelism: one routed capsule layer split across the ranks of a process group by input capsules.

Each rank keeps a contiguous, rank-major slice of the input capsules and their W_ij, computes the priors of its
slice only (streamed in chunks, `capsdist.streaming`), and takes part in one all-reduce of s_j [B, n_out, d] per
routing round in forward (and, with full gradients, one per routed round in backward). The coupling softmax is
over outputs, so logits and couplings of an input capsule stay on its rank: communication per layer and round is
independent of n_in. The input u [B, n_in, d_in] comes in full (the upstream convolution is replicated), the output
v is identical on every rank, u's gradient is all-reduced so every rank sees the full gradient, and W's gradient is
the rank's slice.

Checkpoints: `full_state_dict` gathers the slices into the layout of a plain `CapsNet` (loadable in one process),
and `load_full_state_dict` loads such a state into a sharded model (each rank takes its slice).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from capsdist.model import CapsLayer
from capsdist.streaming import streaming_routing


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank-major contiguous slice [lo, hi) of n items; the first n % world ranks hold one item more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class CommCounter:
    """Payload bytes and calls of the collectives a sharded layer issues (per rank, not algorithmic ring traffic)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def all_reduce(self, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Sum of x over the group (a new contiguous tensor)."""
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        self.bytes += x.numel() * x.element_size()
        self.calls += 1
        return x


class _FullInputGrad(torch.autograd.Function):
    """Identity in forward; in backward the all-reduce of u's gradient, each rank contributing its slice's part."""

    @staticmethod
    def forward(ctx, u, group, counter):  # type: ignore[override]
        ctx.group, ctx.counter = group, counter
        return u.view_as(u)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.counter.all_reduce(grad, ctx.group), None, None


class ShardedCapsLayer(nn.Module):
    """This rank's slice of a routed `CapsLayer`: full input capsules in, full routed output out (see module doc)."""

    def __init__(
        self, dims: tuple[int, int, int, int], routing: tuple[int, bool, int | None], group: dist.ProcessGroup | None
    ) -> None:
        """dims: (n_in, d_in, n_out, d_out) of the whole layer; routing: (iterations, detach, chunk_size)."""
        super().__init__()
        self.n_in, self.d_in, self.n_out, self.d_out = n_in, d_in, n_out, d_out = dims
        (self.iterations, self.detach, self.chunk_size), self.group = routing, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.lo, self.hi = shard_bounds(n_in, self.world, self.rank)
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, n_out, d_out, d_in))
        self.comm = CommCounter()

    @classmethod
    def from_layer(cls, layer: CapsLayer, group: dist.ProcessGroup | None = None) -> ShardedCapsLayer:
        """This rank's slice of `layer` (built with the same initialisation on every rank)."""
        dims = (layer.n_in, layer.d_in, layer.n_out, layer.d_out)
        sharded = cls(dims, (layer.iterations, layer.detach, layer.chunk_size), group)
        with torch.no_grad():
            sharded.weight.copy_(layer.weight[sharded.lo : sharded.hi])
        return sharded.to(layer.weight.device)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Input capsules [B, n_in, d_in] (the same on every rank) -> routed output capsules [B, n_out, d_out]."""
        if self.world > 1:
            u = _FullInputGrad.apply(u, self.group, self.comm)
        local = u[:, self.lo : self.hi]
        reduce = functools.partial(self.comm.all_reduce, group=self.group) if self.world > 1 else None
        chunk = self.chunk_size or max(self.hi - self.lo, 1)
        return streaming_routing(local, self.weight, self.iterations, self.detach, chunk, reduce)

    def full_weight(self) -> torch.Tensor:
        """W of the whole layer [n_in, n_out, d_out, d_in], gathered from every rank (a collective)."""
        return self.gather_rows(self.weight.detach())

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor of a per-rank slice shaped like `weight` (W or its optimizer moments; a collective)."""
        sizes = [hi - lo for lo, hi in (shard_bounds(self.n_in, self.world, r) for r in range(self.world))]
        padded = local.new_zeros(max(sizes), *local.shape[1:])  # all_gather needs equal shapes (uneven n_in)
        padded[: self.hi - self.lo] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Take this rank's slice of a full W [n_in, n_out, d_out, d_in]."""
        with torch.no_grad():
            self.weight.copy_(weight[self.lo : self.hi])


def shard_capsnet(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every routed `CapsLayer` in `model.caps` by its `ShardedCapsLayer` slice, in place; returns model."""
    model.caps = nn.ModuleList(ShardedCapsLayer.from_layer(layer, group) for layer in model.caps)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of a model with sharded layers in the layout of the unsharded model (a collective: every rank
    calls it, every rank gets the full state)."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, ShardedCapsLayer):
            state[f"{name}.weight" if name else "weight"] = module.full_weight()
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state (e.g. from `full_state_dict` or a one-process run) into a sharded model."""
    sharded = {f"{n}.weight" if n else "weight": m for n, m in model.named_modules() if isinstance(m, ShardedCapsLayer)}
    result = model.load_state_dict({k: v for k, v in state.items() if k not in sharded}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(sharded):
        raise KeyError(f"state does not fit the model: {result}")
    for key, module in sharded.items():
        module.load_full_weight(state[key])
