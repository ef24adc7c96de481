"""`python -m capsdist.figures --ckpt PATH --out DIR`: the paper's pictures from a checkpoint, as PNGs.

- reconstructions.png: inputs beside their reconstructions (decoder masked by the longest capsules; Fig. 3).
- perturbation.png: each of the digit capsule's dimensions tweaked from -0.25 to 0.25 in steps of 0.05 (Fig. 4).
- separation.png (two-digit models): each digit reconstructed from its own capsule, in its own colour (Fig. 5).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from capsdist import user_errors
from capsdist.evaluate import inference_parser, parse_for_inference
from capsdist.images import colour_overlay, image_grid, save_png
from capsdist.model import CapsNet

TWEAKS = torch.linspace(-0.25, 0.25, 11)  # -0.25, -0.20, ..., 0.25
COLOURS = torch.tensor([[1.0, 0.25, 0.25], [0.25, 1.0, 0.25], [0.3, 0.5, 1.0]])


def reconstructions(model: CapsNet, images: torch.Tensor, k: int) -> torch.Tensor:
    """Grid with one row per image: the input, then its k reconstructions."""
    out = model(images, k=k)
    return image_grid(torch.cat([images.unsqueeze(1), out.recon], dim=1))


def perturbation(model: CapsNet, image: torch.Tensor) -> torch.Tensor:
    """Grid [dims x 11]: the predicted digit capsule with one dimension at a time shifted by each tweak."""
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
    return image_grid(pictures.view(dims, len(TWEAKS), *pictures.shape[2:]))


def separation(model: CapsNet, images: torch.Tensor, k: int) -> torch.Tensor:
    """Per image: the input, each digit's reconstruction, and all of them coloured over the input."""
    out = model(images, k=k)
    colours = COLOURS[:k]
    columns = []
    for image, recon in zip(images, out.recon, strict=True):
        painted = [
            colour_overlay(torch.zeros_like(image), part.unsqueeze(0), c[None])
            for part, c in zip(recon, colours, strict=True)
        ]
        columns.append(torch.stack([image.expand(3, -1, -1), *painted, colour_overlay(image, recon, colours)]))
    return image_grid(torch.stack(columns))


@torch.inference_mode()
def write_figures(model: CapsNet, batch: dict[str, torch.Tensor], out_dir: Path, count: int = 8) -> list[Path]:
    """Write the figures for the first `count` images of a batch; returns the written paths."""
    images = batch["image"][:count].to(next(model.parameters()).device)
    k = batch["labels"].shape[1]
    paths = [save_png(reconstructions(model, images, k), out_dir / "reconstructions.png")]
    grids = [perturbation(model, image) for image in images[:3]]
    paths.append(save_png(torch.cat(grids, dim=2), out_dir / "perturbation.png"))
    if k > 1:
        paths.append(save_png(separation(model, images, k), out_dir / "separation.png"))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Draw the figures from the first validation batch and print the written paths as JSON."""
    parser = inference_parser("Draw the paper's figures from a capsdist checkpoint.")
    parser.add_argument("--out", type=str, default="figures", help="folder for the PNGs")
    parser.add_argument("--count", type=int, default=8, help="images per figure")
    with user_errors():
        args, trained, loader = parse_for_inference(parser, argv)
        paths = write_figures(trained.to(args.device).model, next(iter(loader)), Path(args.out), args.count)
    print(json.dumps({"checkpoint": args.ckpt or args.weights, "figures": [str(p) for p in paths]}))


if __name__ == "__main__":
    main()
