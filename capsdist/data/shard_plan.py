"""Which samples a MultiMNIST shard holds: the deterministic plan of a shard set, and one shard generated in memory.

Shard ``s`` is a pure function of (seed, split, s). With ``per_digit=K`` the sample stream is K rounds, each a
seeded permutation of the split, so every digit is the first digit of exactly K samples, spread over all shards.
Writing shards to disk (atomic, resumable) is ``python -m data_prep.multimnist``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capsdist.data import recipe
from capsdist.data.shard_format import Shard

SPLIT_CODE = {"train": 0, "test": 1}
_ROUND_TAG = 1  # seed-key namespace of the per-round permutations (shards use tag 0)


@dataclass(frozen=True)
class Plan:
    """What to generate: everything the bytes depend on, and nothing else (not the worker count)."""

    split: str
    split_size: int
    per_digit: int | None
    num_samples: int | None
    shard_size: int
    seed: int

    @property
    def total(self) -> int:
        """Total number of samples."""
        return self.split_size * self.per_digit if self.per_digit else int(self.num_samples or 0)

    @property
    def num_shards(self) -> int:
        """Number of shards (the last may be short)."""
        return -(-self.total // self.shard_size)

    def shard_name(self, shard: int) -> str:
        """File name of a shard."""
        return f"{self.split}-{shard:06d}.tar"

    def bounds(self, shard: int) -> tuple[int, int]:
        """Global sample range [start, end) of a shard."""
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.total)

    def first_digits(self, start: int, end: int, gen: torch.Generator) -> torch.Tensor:
        """Split indices of the first digit of samples start..end-1."""
        if not self.per_digit:
            return torch.randint(self.split_size, (end - start,), generator=gen)
        t = torch.arange(start, end)
        rounds = t // self.split_size
        first = torch.empty_like(t)
        for r in rounds.unique().tolist():
            perm = torch.randperm(
                self.split_size, generator=recipe.generator("cpu", self.seed, SPLIT_CODE[self.split], _ROUND_TAG, r)
            )
            sel = rounds == r
            first[sel] = perm[t[sel] % self.split_size]
        return first


def make_shard(images: torch.Tensor, labels: torch.Tensor, plan: Plan, shard: int) -> Shard:
    """Generate shard ``shard`` of ``plan`` from the split's uint8 images [N,28,28] and long labels [N]."""
    start, end = plan.bounds(shard)
    gen = recipe.generator("cpu", plan.seed, SPLIT_CODE[plan.split], 0, shard)
    indices, offsets = recipe.draw(labels, plan.first_digits(start, end, gen), gen)
    overlay, placed = recipe.compose(images, indices, offsets)
    return Shard(start, overlay, placed, indices, labels[indices], offsets)
