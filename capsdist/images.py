"""Tensor-to-picture helpers shared by training-time image logging and the figures command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, pad: int = 2, value: float = 1.0) -> torch.Tensor:
    """Tile images [rows, cols, C, H, W] in [0, 1] into one [C, rows*(H+pad)+pad, cols*(W+pad)+pad] picture."""
    rows, cols, channels, h, w = images.shape
    grid = torch.full((channels, rows * (h + pad) + pad, cols * (w + pad) + pad), value, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[:, top : top + h, left : left + w] = images[r, c].float()
    return grid


def to_pil(picture: torch.Tensor, scale: int = 1) -> Image.Image:
    """[C, H, W] in [0, 1] (C = 1 or 3) -> 8-bit PIL image, optionally enlarged with nearest neighbours."""
    array = (picture.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def save_png(picture: torch.Tensor, path: str | Path, scale: int = 3) -> Path:
    """Write [C, H, W] in [0, 1] as a PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(picture, scale).save(path)
    return path


def colour_overlay(image: torch.Tensor, parts: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Grey input [1, H, W] with each part [K, 1, H, W] painted in its colour [K, 3] on top -> RGB [3, H, W]."""
    rgb = image.float().expand(3, -1, -1) * 0.35
    for part, colour in zip(parts, colours, strict=True):
        rgb = rgb + part.float() * colour.view(3, 1, 1)
    return rgb.clamp(0, 1)
