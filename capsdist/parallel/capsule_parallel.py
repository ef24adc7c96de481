"""Capsule parallelism: the capsule stage of a CapsNet split across the ranks of a process group (a capsule group).

PrimaryCaps is split by capsule maps (the convolution's output channels): each rank computes only its own maps,
hence a contiguous, rank-major slice of the input capsules (they are ordered map-major), and holds the matching
rows of the first routed layer's W_ij. That layer routes its slice (streamed in chunks, `capsdist.model.streaming`) with
one all-reduce of s_j [B, n_out, d] per routing round in forward (and, with full gradients, one per routed round in
backward); the coupling softmax is over outputs, so logits and couplings of an input capsule stay on its rank.
u's gradient never leaves the rank: it reaches only this rank's maps. What the maps read, Conv1's output, is
replicated; each rank's backward gives Conv1's parameters only its own maps' share of their gradient, so those
(small: Conv1's weights, not its activations) are summed over the group. Later routed layers take a full input
(the replicated v of the layer before) and are split by input capsules too, with u's gradient all-reduced
(small: n_in of them is the previous layer's n_out). The routed output v is identical on every rank, and so is
everything after it (the decoder).

Every split tensor is a block of rows of the unsplit one (`RowSplit`): `full_state_dict` gathers them into the
layout of a plain `CapsNet`, `load_full_state_dict` takes each rank's rows, and `capsdist.checkpoint.sharded`
writes and reads them in place, each rank its own rows.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from capsdist.checkpoint.rows import RowSplit, split_rows
from capsdist.model.capsnet import CapsLayer, PrimaryCaps
from capsdist.model.streaming import streaming_routing


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
    """This rank's slice of a routed `CapsLayer`: input capsules in (all, or only its own after a split PrimaryCaps),
    full routed output out (see module doc)."""

    def __init__(
        self,
        dims: tuple[int, int, int, int],
        routing: tuple[int, bool, int | None],
        group: dist.ProcessGroup | None,
        bounds: list[tuple[int, int]] | None = None,
    ) -> None:
        """dims: (n_in, d_in, n_out, d_out) of the whole layer; routing: (iterations, detach, chunk_size);
        bounds: every rank's input rows when the input holds only this rank's rows (None: full input, even split)."""
        super().__init__()
        self.n_in, self.d_in, self.n_out, self.d_out = n_in, d_in, n_out, d_out = dims
        (self.iterations, self.detach, self.chunk_size), self.group = routing, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.local_input = bounds is not None
        self.bounds = bounds or split_rows(n_in, self.world)
        self.lo, self.hi = self.bounds[self.rank]
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, n_out, d_out, d_in))
        self.comm = CommCounter()

    @classmethod
    def from_layer(
        cls, layer: CapsLayer, group: dist.ProcessGroup | None = None, bounds: list[tuple[int, int]] | None = None
    ) -> ShardedCapsLayer:
        """This rank's slice of `layer` (built with the same initialisation on every rank)."""
        dims = (layer.n_in, layer.d_in, layer.n_out, layer.d_out)
        sharded = cls(dims, (layer.iterations, layer.detach, layer.chunk_size), group, bounds)
        with torch.no_grad():
            sharded.weight.copy_(layer.weight[sharded.lo : sharded.hi])
        return sharded.to(layer.weight.device)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Input capsules [B, n_in, d_in] (the same on every rank), or this rank's rows of them -> routed output
        capsules [B, n_out, d_out]."""
        if not self.local_input:
            if self.world > 1:
                u = _FullInputGrad.apply(u, self.group, self.comm)
            u = u[:, self.lo : self.hi]
        reduce = functools.partial(self.comm.all_reduce, group=self.group) if self.world > 1 else None
        chunk = self.chunk_size or max(self.hi - self.lo, 1)
        return streaming_routing(u, self.weight, self.iterations, self.detach, chunk, reduce)

    def row_splits(self) -> dict[str, RowSplit]:
        """Its split parameters by name."""
        return {"weight": RowSplit(self.weight, self.bounds, self.rank, self.group)}


class ShardedPrimaryCaps(PrimaryCaps):
    """This rank's capsule maps of a `PrimaryCaps`: the convolution's output channels of maps [lo, hi) only, so its
    capsules are rows [lo * H'W', hi * H'W') of the unsplit layer's."""

    def __init__(self, primary: PrimaryCaps, group: dist.ProcessGroup | None = None) -> None:
        """Take this rank's maps of `primary` (built with the same initialisation on every rank)."""
        conv, dim, rank, world = primary.conv, primary.dim, dist.get_rank(group), dist.get_world_size(group)
        if primary.channels < world:
            raise ValueError(f"{primary.channels} capsule maps cannot be split over {world} ranks")
        maps = split_rows(primary.channels, world)
        lo, hi = maps[rank]
        super().__init__(conv.in_channels, hi - lo, dim, conv.kernel_size[0], conv.stride[0])
        self.maps, self.rank, self.group, self.fast_weight_grad = maps, rank, group, primary.fast_weight_grad
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight[lo * dim : hi * dim])
            self.conv.bias.copy_(conv.bias[lo * dim : hi * dim])
        self.to(conv.weight.device)

    def capsule_bounds(self, grid: int) -> list[tuple[int, int]]:
        """Every rank's rows of the input capsules on a grid of `grid` positions."""
        return [(lo * grid, hi * grid) for lo, hi in self.maps]

    def row_splits(self) -> dict[str, RowSplit]:
        """Its split parameters (the convolution's weight and bias, by output channel) by name."""
        rows = [(lo * self.dim, hi * self.dim) for lo, hi in self.maps]
        return {f"conv.{n}": RowSplit(p, rows, self.rank, self.group) for n, p in self.conv.named_parameters()}


def _sum_over_group(group: dist.ProcessGroup | None, counter: CommCounter, grad: torch.Tensor) -> torch.Tensor:
    return counter.all_reduce(grad, group)


def shard_capsnet(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Split `model`'s PrimaryCaps by maps and every routed `CapsLayer` by input capsules, in place; returns model.

    The gradients of what feeds PrimaryCaps (Conv1) are summed over the group, as each rank's maps see only part.
    """
    primary = ShardedPrimaryCaps(model.primary, group)
    grid = model.num_primary // model.primary.channels
    first, *rest = model.caps
    model.primary = primary
    model.caps = nn.ModuleList([
        ShardedCapsLayer.from_layer(first, group, primary.capsule_bounds(grid)),
        *(ShardedCapsLayer.from_layer(layer, group) for layer in rest),
    ])
    if dist.get_world_size(group) > 1:
        for param in model.conv1.parameters():
            param.register_hook(functools.partial(_sum_over_group, group, model.caps[0].comm))
    return model


def row_splits(model: nn.Module) -> dict[str, RowSplit]:
    """Every split parameter of `model` by its state-dict name."""
    return {
        f"{name}.{key}" if name else key: split
        for name, module in model.named_modules()
        if isinstance(module, ShardedCapsLayer | ShardedPrimaryCaps)
        for key, split in module.row_splits().items()
    }


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of a split model in the layout of the unsplit model (a collective: every rank calls it, every
    rank gets the full state)."""
    state = model.state_dict()
    for key, split in row_splits(model).items():
        state[key] = split.gather(split.param.detach())
    return state


def optimizer_splits(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, RowSplit]:
    """Optimizer state index (torch's numbering over param_groups) -> the split of that parameter."""
    owner = {id(split.param): split for split in row_splits(model).values()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: owner[id(p)] for i, p in enumerate(params) if id(p) in owner}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with the whole moments of every split parameter, like a one-process run's (a
    collective)."""
    state = optimizer.state_dict()
    for index, split in optimizer_splits(model, optimizer).items():
        if index in state["state"]:  # new dicts: the packed state shares its entries with the live optimizer
            state["state"][index] = {
                k: split.gather(v) if torch.is_tensor(v) and v.shape == split.param.shape else v
                for k, v in state["state"][index].items()
            }
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsplit state (e.g. from `full_state_dict` or a one-process run) into a split model."""
    splits = row_splits(model)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in splits}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(splits):
        raise KeyError(f"state does not fit the model: {result}")
    with torch.no_grad():
        for key, split in splits.items():
            split.param.copy_(state[key][split.lo : split.hi])
