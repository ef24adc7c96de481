"""How a tensor is split into per-rank blocks of rows: what capsule parallelism computes with and what a sharded
checkpoint stores (each rank its own rows, re-sliced by DCP for any other number of ranks)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank-major contiguous slice [lo, hi) of n items; the first n % world ranks hold one item more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def split_rows(n: int, world: int, unit: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) rows of every rank when n blocks of `unit` rows are split by `shard_bounds`."""
    return [(lo * unit, hi * unit) for lo, hi in (shard_bounds(n, world, r) for r in range(world))]


class RowSplit(NamedTuple):
    """A parameter that holds rows [lo, hi) of the unsplit tensor; `bounds` lists every rank's rows."""

    param: nn.Parameter
    bounds: list[tuple[int, int]]
    rank: int
    group: dist.ProcessGroup | None

    @property
    def lo(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def hi(self) -> int:
        return self.bounds[self.rank][1]

    @property
    def rows(self) -> int:
        """Rows of the unsplit tensor."""
        return self.bounds[-1][1]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The unsplit tensor of a per-rank block shaped like `param` (it or its optimizer moments; a collective)."""
        sizes = [hi - lo for lo, hi in self.bounds]
        padded = local.new_zeros(max(sizes), *local.shape[1:])  # all_gather needs equal shapes (uneven splits)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
