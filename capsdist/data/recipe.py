"""The MultiMNIST recipe (Sabour et al. 2017), as device-agnostic batched torch ops.

One implementation of the geometry, shared by the shard writer (``capsdist.data.shard_plan``), the on-the-fly
dataset and the on-device generator (``capsdist.data.device``): two digits of different classes from the same split,
each placed with its 28x28 top-left corner at a row/column offset in 0..8 of a 36x36 canvas (a shift of up to
4 px each way, never cropped), summed pixel-wise and clipped to 255. The MNIST augmentation (shift of up to
2 px with zero padding) is the same placement on a 32x32 canvas, cropped back to 28x28.
"""

from __future__ import annotations

import numpy as np
import torch

DIGIT = 28
CANVAS = 36
MAX_OFFSET = CANVAS - DIGIT  # 8: top-left offsets are 0..8 inclusive
TEST_OVERLAYS = 10_000  # the fixed test overlays scored by default (the official code scores 10,000 test images)


def mix_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer keys (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A torch Generator on ``device`` seeded by ``mix_seed(*keys)``."""
    return torch.Generator(device=device).manual_seed(mix_seed(*keys))


def place(digits: torch.Tensor, offsets: torch.Tensor, canvas: int) -> torch.Tensor:
    """Put each [..., h, w] image on a zero [..., canvas, canvas] canvas at top-left ``offsets`` [..., 2].

    Vectorised as zero-pad then a per-sample cyclic shift by gather; offsets must lie in 0..canvas-h (0..canvas-w)
    so the shift never wraps a source pixel. Works for any dtype and device.
    """
    h, w = digits.shape[-2:]
    padded = torch.nn.functional.pad(digits, (0, canvas - w, 0, canvas - h))
    grid = torch.arange(canvas, device=digits.device)
    rows = (grid - offsets[..., 0, None]) % canvas  # [..., canvas]: source row of each canvas row
    cols = (grid - offsets[..., 1, None]) % canvas
    lead = padded.shape[:-2]
    padded = padded.gather(-2, rows[..., :, None].expand(*lead, canvas, canvas))
    return padded.gather(-1, cols[..., None, :].expand(*lead, canvas, canvas))


def shift(images: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate [..., 28, 28] images by ``offsets - max_shift`` px (offsets in 0..2*max_shift), zero-filled."""
    size = images.shape[-1]
    return place(images, offsets, size + 2 * max_shift)[..., max_shift : max_shift + size, max_shift : max_shift + size]


def draw_partners(labels: torch.Tensor, first: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each index in ``first``, a uniformly drawn index whose label differs (vectorised rejection)."""
    second = torch.randint(len(labels), first.shape, generator=gen, device=labels.device)
    clash = labels[second] == labels[first]
    while bool(clash.any()):
        redraw = torch.randint(len(labels), first.shape, generator=gen, device=labels.device)
        second = torch.where(clash, redraw, second)
        clash = labels[second] == labels[first]
    return second


def draw(labels: torch.Tensor, first: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs and placements for the given first digits: (indices [n,2] long, offsets [n,2,2] long in 0..8)."""
    second = draw_partners(labels, first, gen)
    offsets = torch.randint(MAX_OFFSET + 1, (len(first), 2, 2), generator=gen, device=labels.device)
    return torch.stack([first, second], 1), offsets


def compose(images: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(overlay uint8 [n,36,36], each digit alone uint8 [n,2,36,36]) from MNIST ``images`` uint8 [N,28,28]."""
    placed = place(images[indices], offsets, CANVAS)
    overlay = placed.sum(1, dtype=torch.int16).clamp_(max=255).to(torch.uint8)
    return overlay, placed
