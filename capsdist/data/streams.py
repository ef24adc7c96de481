"""In-memory batch streams: MNIST (with the paper's shift augmentation) and MultiMNIST drawn on the fly.

Batch ``j`` of epoch ``e`` on rank ``r`` is a pure function of (seed, e, r, j): worker ``w`` of ``W`` produces
batches ``start + w, start + w + W, ...``, which torch's in-order loader interleaves back into ``start, start + 1,
...``. The stream does not depend on the number of workers (so a resume is exact for any ``num_workers``), and no
two workers or ranks share a seed. The fixed MultiMNIST test overlays (``FixedMultiMnist``) go further: overlay
``i`` is a pure function of (seed, i), so the batch size and the number of ranks do not change what is scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset

from capsdist.data import recipe
from capsdist.data.batch import (
    ONTHEFLY,
    ONTHEFLY_VAL,
    PERM,
    SHIFT,
    Batch,
    DataError,
    multimnist_from_draw,
    to_batch,
    worker,
)


class BatchStream(IterableDataset):
    """Base of the in-memory streams: batch ``j`` of an epoch is ``make_batch(epoch, j)``, a pure function."""

    resume_needs_same_workers = False  # batch j does not depend on which worker makes it
    batch_size: int  # set by each stream

    def __init__(self, num_batches: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        """Stream of ``num_batches`` batches per epoch for ``rank`` of ``world_size``."""
        if num_batches <= 0:
            raise DataError(f"{type(self).__name__}: 0 batches per epoch. Fix: lower batch_size or add samples.")
        self.num_batches, self.seed, self.rank, self.world_size = num_batches, seed, rank, world_size
        self.epoch, self.start = 0, 0  # set by ResumableLoader before each iter()

    def __len__(self) -> int:
        """Batches per epoch (full epoch, also when resuming mid-epoch)."""
        return self.num_batches

    def samples(self) -> int:
        """Samples one epoch of this rank yields (for progress): full batches."""
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        """This worker's share of batches ``start..num_batches-1``, round-robin from worker 0."""
        w, n = worker()
        for j in range(self.start + w, self.num_batches, n):
            yield self.make_batch(self.epoch, j)

    def make_batch(self, epoch: int, j: int) -> Batch:
        """Batch ``j`` of ``epoch`` (subclasses)."""
        raise NotImplementedError


class MnistStream(BatchStream):
    """MNIST from memory; training shuffles per epoch and shifts by up to ``max_shift`` px, validation does neither."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_shift: int = 2,
        num_batches: int | None = None,
        draw_only: bool = False,
    ) -> None:
        """Train: equal per-rank shares, full batches only; val: every sample once, split across ranks.
        ``draw_only``: yield {"indices", "offsets"} and leave gathering and shifting to ``DeviceMnist.compose``."""
        self.images, self.labels, self.batch_size = images, labels.long(), batch_size
        self.train, self.max_shift, self.draw_only = train, max_shift, draw_only
        share = len(labels) // world_size if train else len(range(rank, len(labels), world_size))
        full = share // batch_size if train else math.ceil(share / batch_size)
        if num_batches is not None and num_batches > full:
            raise DataError(f"train_batches_per_epoch={num_batches} > {full} available on MNIST for this rank.")
        self.share = share
        self._order: tuple[int, torch.Tensor] | None = None
        super().__init__(num_batches or full, seed, rank, world_size)

    def samples(self) -> int:
        """Samples one epoch of this rank yields: validation's last batch may be short."""
        return min(self.share, super().samples())

    def _rank_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample order for an epoch (cached per worker)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.labels)
            perm = torch.randperm(n, generator=recipe.generator("cpu", self.seed, PERM, epoch)) if self.train else None
            order = (perm if perm is not None else torch.arange(n))[self.rank :: self.world_size][: self.share]
            self._order = (epoch, order)
        return self._order[1]

    def make_batch(self, epoch: int, j: int) -> Batch:
        """Batch ``j``: the ``j``-th slice of this rank's order, shifted when training."""
        idx = self._rank_order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        offsets = torch.zeros(len(idx), 2, dtype=torch.long)
        if self.train and self.max_shift:
            gen = recipe.generator("cpu", self.seed, SHIFT, epoch, self.rank, j)
            offsets = torch.randint(2 * self.max_shift + 1, (len(idx), 2), generator=gen)
        if self.draw_only:
            return {"indices": idx, "offsets": offsets}
        images = self.images[idx]
        if self.train and self.max_shift:
            images = recipe.shift(images, offsets, self.max_shift)
        return to_batch(images, self.labels[idx, None], images[:, None])


class OnTheFlyMultiMnist(BatchStream):
    """MultiMNIST training overlays drawn from MNIST arrays in memory, the same recipe as the shards; fresh ones
    each epoch; optionally draws only."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        draw_only: bool = False,
    ) -> None:
        """``draw_only``: yield {"indices", "offsets"} and leave composing to ``DeviceMultiMnist.compose``."""
        self.images, self.labels, self.batch_size, self.draw_only = images, labels.long(), batch_size, draw_only
        super().__init__(num_batches, seed, rank, world_size)

    def make_batch(self, epoch: int, j: int) -> Batch:
        """Batch ``j`` of ``epoch``: pairs of different classes at offsets 0..8."""
        gen = recipe.generator("cpu", self.seed, ONTHEFLY, epoch, self.rank, j)
        first = torch.randint(len(self.labels), (self.batch_size,), generator=gen)
        indices, offsets = recipe.draw(self.labels, first, gen)
        if self.draw_only:
            return {"indices": indices, "offsets": offsets}
        return multimnist_from_draw(self.images, self.labels, indices, offsets)


FIXED_BLOCK = 1000  # fixed overlays are drawn this many at a time, each block from its own seed


class FixedMultiMnist(BatchStream):
    """The fixed MultiMNIST test overlays: the first ``samples`` of one endless sequence in which overlay ``i`` is a
    pure function of (seed, i), drawn from the MNIST split in memory by the training recipe. The same overlays for
    every batch size, rank count and worker count, every epoch, and a shorter stream is the start of a longer
    one; like MNIST's validation, every overlay once, split across ranks, the last batch possibly short."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        samples: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
    ) -> None:
        """Draw the pairs and placements of all ``samples`` overlays (a few bytes each; batches compose them);
        ``num_batches`` caps this rank's batches."""
        self.images, self.labels, self.batch_size = images, labels.long(), batch_size
        blocks = [self._block(seed, b) for b in range(math.ceil(samples / FIXED_BLOCK))]
        indices, offsets = (torch.cat(parts)[:samples][rank::world_size] for parts in zip(*blocks, strict=True))
        self.indices, self.offsets = indices, offsets
        full = math.ceil(len(indices) / batch_size)
        super().__init__(min(num_batches or full, full), seed, rank, world_size)

    def _block(self, seed: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs and placements of overlays ``block * FIXED_BLOCK`` onwards."""
        gen = recipe.generator("cpu", seed, ONTHEFLY_VAL, block)
        return recipe.draw(self.labels, torch.randint(len(self.labels), (FIXED_BLOCK,), generator=gen), gen)

    def samples(self) -> int:
        """Overlays one pass of this rank yields: the last batch may be short."""
        return min(len(self.indices), super().samples())

    def make_batch(self, epoch: int, j: int) -> Batch:
        """Batch ``j`` (every epoch the same)."""
        rows = slice(j * self.batch_size, (j + 1) * self.batch_size)
        return multimnist_from_draw(self.images, self.labels, self.indices[rows], self.offsets[rows])
