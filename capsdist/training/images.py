"""Tensor-to-picture helpers shared by training-time image logging and the figures command: grids, 8-bit PIL
images (W&B casts float arrays to uint8 without scaling, so only 8-bit pictures survive logging) and labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from capsdist.core.files import atomic_write

FONT_PX = 14  # label text height: legible beside the 84-px cells of a figure drawn at scale 3
PAD = 2  # grid padding in source pixels


def image_grid(images: torch.Tensor, pad: int = PAD, value: float = 1.0) -> torch.Tensor:
    """Tile images [rows, cols, C, H, W] in [0, 1] into one [C, rows*(H+pad)+pad, cols*(W+pad)+pad] picture."""
    rows, cols, channels, h, w = images.shape
    grid = torch.full((channels, rows * (h + pad) + pad, cols * (w + pad) + pad), value, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[:, top : top + h, left : left + w] = images[r, c].float()
    return grid


def to_pil(picture: torch.Tensor, scale: int = 1) -> Image.Image:
    """[C, H, W] in [0, 1] -> 8-bit PIL image, optionally enlarged with nearest neighbours: C = 1 grey, 3 RGB; two
    channels (two views, or grey + alpha) in false colour (the first magenta, the second green), RGBA as its RGB."""
    array = (picture.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    array = array[[0, 1, 0]] if array.shape[0] == 2 else array[:3]
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def label_grid(
    grid: Image.Image, rows: Sequence[str], cols: Sequence[str], pad: int = PAD, corner: str = ""
) -> Image.Image:
    """Add a white left margin naming each grid row and a top margin naming each column (dark text); the grid is
    pasted unchanged at (left margin, top margin). ``pad`` is the grid's padding in ``grid`` pixels."""
    font = ImageFont.load_default(size=FONT_PX)  # Pillow's scalable default font: no font files needed
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left = max(measure.textlength(text, font=font) for text in [*rows, corner]) + 2 * FONT_PX // 2
    top = 2 * FONT_PX
    out = Image.new(grid.mode, (grid.width + int(left), grid.height + top), "white")
    out.paste(grid, (int(left), top))
    draw = ImageDraw.Draw(out)
    row_pitch, col_pitch = (grid.height - pad) / len(rows), (grid.width - pad) / len(cols)
    for i, text in enumerate(rows):
        draw.text((left - FONT_PX // 2, top + pad + (i + 0.5) * row_pitch), text, fill="black", font=font, anchor="rm")
    for j, text in enumerate(cols):
        draw.text((left + pad + (j + 0.5) * col_pitch, top // 2), text, fill="black", font=font, anchor="mm")
    if corner:
        draw.text((FONT_PX // 2, top // 2), corner, fill="black", font=font, anchor="lm")
    return out


def side_by_side(pictures: Sequence[Image.Image], gap: int = FONT_PX) -> Image.Image:
    """Place pictures left to right on white, top-aligned, ``gap`` pixels apart."""
    mode = "RGB" if any(p.mode == "RGB" for p in pictures) else "L"
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    out = Image.new(mode, (width, max(p.height for p in pictures)), "white")
    x = 0
    for picture in pictures:
        out.paste(picture.convert(mode), (x, 0))
        x += picture.width + gap
    return out


def classes(values: torch.Tensor) -> str:
    """Class indices as text, ascending ("7", or "3,8" for two digits)."""
    return ",".join(str(v) for v in sorted(values.tolist()))


def prediction_texts(labels: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Per image: "label L, predicted P", P being the K longest capsules for the K labels [B, K]."""
    predicted = lengths.topk(labels.shape[1], dim=1).indices
    return [f"label {classes(t)}, predicted {classes(p)}" for t, p in zip(labels, predicted, strict=True)]


def reconstruction_sheet(
    images: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, scale: int = 3
) -> tuple[Image.Image, list[str]]:
    """Inputs [B, C, H, W] beside their reconstructions [B, K, C, H, W], each row named by its label(s) and the
    K longest capsules; returns the labelled 8-bit picture and the per-row "label L, predicted P" texts."""
    rows = prediction_texts(labels, lengths)
    k = recon.shape[1]
    cols = ["input", *(["recon"] if k == 1 else [f"recon {j + 1}" for j in range(k)])]
    grid = image_grid(torch.cat([images.unsqueeze(1), recon], dim=1).detach().float().cpu())
    return label_grid(to_pil(grid, scale), rows, cols, PAD * scale), rows


def save_picture(picture: Image.Image, path: str | Path, pdf: bool = False) -> list[Path]:
    """Write an 8-bit picture as PNG (and as a PDF beside it when asked), atomically (a link at the name is
    replaced, never written through); return the written paths."""
    path = Path(path)
    atomic_write(path, lambda f: picture.save(f, format="PNG"))
    if not pdf:
        return [path]
    atomic_write(path.with_suffix(".pdf"), lambda f: picture.convert("RGB").save(f, format="PDF", resolution=150.0))
    return [path, path.with_suffix(".pdf")]


def colour_overlay(image: torch.Tensor, parts: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Grey input [1, H, W] with each part [K, 1, H, W] painted in its colour [K, 3] on top -> RGB [3, H, W]."""
    rgb = image.float().expand(3, -1, -1) * 0.35
    for part, colour in zip(parts, colours, strict=True):
        rgb = rgb + part.float() * colour.view(3, 1, 1)
    return rgb.clamp(0, 1)
