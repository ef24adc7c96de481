"""The paper's figures drawn from a plain CapsNet and a batch, labelled (used by the figures command and by the
end-of-fit W&B upload):

- reconstructions.png: inputs beside their reconstructions (decoder masked by the longest capsules; Fig. 3),
  each row named by its label and prediction.
- perturbation.png: each of the digit capsule's dimensions (rows, "dim i") tweaked from -0.25 to 0.25 in steps
  of 0.05 (columns, the tweak value) (Fig. 4).
- separation.png (two-digit models): each digit reconstructed from its own capsule, in its own colour, for
  correctly and wrongly classified images side by side (Fig. 5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from capsdist.model.capsnet import CapsNet
from capsdist.model.metrics import topk_hits
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


def separation(model: CapsNet, images: torch.Tensor, labels: torch.Tensor, count: int = 8) -> Image.Image:
    """The paper's Figure 5: per image the input, each predicted digit reconstructed from its own capsule in its own
    colour, and all of them over the input; up to ``count // 2`` correctly classified images (the K longest
    capsules are exactly the K labels) in a left panel and as many wrong ones in a right panel, drawn from the
    whole batch so both kinds appear whenever it holds them."""
    k = labels.shape[1]
    out = model(images, k=k)
    right = topk_hits(out.lengths, labels).all(dim=1)
    panels = []
    for title, chosen in (("correct", right), ("wrong", ~right)):
        idx = chosen.nonzero().flatten()[: max(1, count // 2)]
        if len(idx):
            panels.append(_separation_panel(images[idx], out.recon[idx], labels[idx], out.lengths[idx], title))
    return side_by_side(panels)


def _separation_panel(
    images: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, title: str
) -> Image.Image:
    """One panel of ``separation``: a row per image (named "label L, predicted P"), ``title`` in its corner."""
    colours = COLOURS[: labels.shape[1]]
    rows = []
    for image, parts in zip(images, recon, strict=True):
        blank = torch.zeros_like(image)
        painted = [colour_overlay(blank, p.unsqueeze(0), c[None]) for p, c in zip(parts, colours, strict=True)]
        rows.append(torch.stack([image.expand(3, -1, -1), *painted, colour_overlay(image, parts, colours)]))
    names = ["input", *(f"capsule {j + 1}" for j in range(labels.shape[1])), "overlay"]
    picture = to_pil(image_grid(torch.stack(rows)), SCALE)
    return label_grid(picture, prediction_texts(labels, lengths), names, PAD * SCALE, corner=title)


@torch.inference_mode()
def write_figures(
    model: CapsNet, batch: dict[str, torch.Tensor], out_dir: Path, count: int = 8, pdf: bool = False
) -> list[Path]:
    """Write the labelled figures (PNG; also PDF if asked) for the first `count` images of a batch; returns the
    written paths."""
    device = next(model.parameters()).device
    every, labels_all = batch["image"].to(device), batch["labels"].to(device)
    images, labels = every[:count], labels_all[:count]
    paths = save_picture(reconstructions(model, images, labels), out_dir / "reconstructions.png", pdf)
    paths += save_picture(perturbation_sheet(model, images[:3]), out_dir / "perturbation.png", pdf)
    if labels.shape[1] > 1:
        paths += save_picture(separation(model, every, labels_all, count), out_dir / "separation.png", pdf)
    return paths
