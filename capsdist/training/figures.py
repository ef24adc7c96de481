"""The paper's figures drawn from a plain CapsNet and a batch, labelled (used by the figures command and by the
end-of-fit W&B upload):

- reconstructions.png: inputs beside their reconstructions (decoder masked by the longest capsules; Fig. 3),
  each row named by its label and prediction.
- perturbation.png: each of the digit capsule's dimensions (rows, "dim i") tweaked from -0.25 to 0.25 in steps
  of 0.05 (columns, the tweak value) (Fig. 4).
- separation.png (two-digit models): each digit reconstructed from its own capsule, in its own colour (Fig. 5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from capsdist.model.capsnet import CapsNet
from capsdist.training.images import (
    PAD,
    colour_overlay,
    image_grid,
    label_grid,
    prediction_texts,
    reconstruction_sheet,
    save_picture,
    side_by_side,
    to_pil,
)

TWEAKS = torch.linspace(-0.25, 0.25, 11)  # -0.25, -0.20, ..., 0.25
COLOURS = torch.tensor([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.3, 0.5, 1.0]])
SCALE = 3  # figure pixels per image pixel


def reconstructions(model: CapsNet, images: torch.Tensor, labels: torch.Tensor) -> Image.Image:
    """One row per image, named by its label and prediction: the input, then its k reconstructions."""
    out = model(images, k=labels.shape[1])
    return reconstruction_sheet(images, out.recon, labels, out.lengths, SCALE)[0]


def perturbation(model: CapsNet, image: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Grid [dims x 11]: the predicted digit capsule with one dimension at a time shifted by each tweak; and the
    predicted class."""
    out = model(image.unsqueeze(0), k=1)
    winner = out.lengths.argmax(dim=1)
    capsule = out.caps[0, winner[0]]
    dims = capsule.shape[0]
    tweaked = capsule.repeat(dims, len(TWEAKS), 1)  # [dims, tweaks, d]
    rows = torch.arange(dims)
    tweaked[rows, :, rows] += TWEAKS.to(capsule.device)
    caps = torch.zeros(dims * len(TWEAKS), *out.caps.shape[1:], device=capsule.device)
    caps[:, winner[0]] = tweaked.view(-1, capsule.shape[0])
    select = winner.expand(caps.shape[0]).unsqueeze(1)
    pictures = model.decoder(caps, select)  # [dims*tweaks, 1, C, H, W]
    return image_grid(pictures.view(dims, len(TWEAKS), *pictures.shape[2:])), int(winner[0])


def perturbation_sheet(model: CapsNet, images: torch.Tensor) -> Image.Image:
    """Perturbation grids of several images side by side, rows named by dimension, columns by tweak."""
    sheets = []
    for image in images:
        grid, digit = perturbation(model, image)
        dims = [f"dim {d}" for d in range((grid.shape[1] - PAD) // (image.shape[1] + PAD))]
        tweaks = [f"{round(t, 2) + 0.0:+.2f}" for t in TWEAKS.tolist()]  # + 0.0: no "-0.00"
        sheets.append(label_grid(to_pil(grid, SCALE), dims, tweaks, PAD * SCALE, corner=f"digit {digit}"))
    return side_by_side(sheets)


def separation(model: CapsNet, images: torch.Tensor, labels: torch.Tensor) -> Image.Image:
    """Per image: the input, each digit's reconstruction, and all of them coloured over the input."""
    k = labels.shape[1]
    out = model(images, k=k)
    colours = COLOURS[:k]
    columns = []
    for image, recon in zip(images, out.recon, strict=True):
        painted = [
            colour_overlay(torch.zeros_like(image), part.unsqueeze(0), c[None])
            for part, c in zip(recon, colours, strict=True)
        ]
        columns.append(torch.stack([image.expand(3, -1, -1), *painted, colour_overlay(image, recon, colours)]))
    names = ["input", *(f"capsule {j + 1}" for j in range(k)), "overlay"]
    picture = to_pil(image_grid(torch.stack(columns)), SCALE)
    return label_grid(picture, prediction_texts(labels, out.lengths), names, PAD * SCALE)


@torch.inference_mode()
def write_figures(
    model: CapsNet, batch: dict[str, torch.Tensor], out_dir: Path, count: int = 8, pdf: bool = False
) -> list[Path]:
    """Write the labelled figures (PNG; also PDF if asked) for the first `count` images of a batch; returns the
    written paths."""
    device = next(model.parameters()).device
    images, labels = batch["image"][:count].to(device), batch["labels"][:count].to(device)
    paths = save_picture(reconstructions(model, images, labels), out_dir / "reconstructions.png", pdf)
    paths += save_picture(perturbation_sheet(model, images[:3]), out_dir / "perturbation.png", pdf)
    if labels.shape[1] > 1:
        paths += save_picture(separation(model, images, labels), out_dir / "separation.png", pdf)
    return paths
