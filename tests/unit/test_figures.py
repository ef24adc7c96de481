"""Figures are labelled: margins with dark text naming rows and columns, the picture cells themselves unchanged."""

import numpy as np
import torch

from capsdist.model import CapsNet
from capsdist.training import figures
from capsdist.training.images import PAD, image_grid, to_pil
from tests.conftest import TINY_NET


def split_margins(labelled, raw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left margin, top margin, grid) pixels of a labelled picture whose grid is `raw`, pasted bottom-right."""
    a = np.asarray(labelled.convert("L"))
    left, top = labelled.width - raw.width, labelled.height - raw.height
    assert left > 20 and top > 10  # the margins are there and hold readable text
    return a[top:, :left], a[:top, left:], np.asarray(labelled)[top:, left:]


def bands_have_text(margin: np.ndarray, count: int, axis: int) -> bool:
    """Every one of `count` equal bands (rows: axis 0, columns: axis 1) of a margin holds dark text pixels."""
    return all((band < 100).sum() > 5 for band in np.array_split(margin, count, axis=axis))


def test_perturbation_grid_names_dimensions_and_tweaks(test_split):
    torch.manual_seed(0)
    model = CapsNet(**TINY_NET).eval()
    image = test_split[0][:1, None].float() / 255
    with torch.inference_mode():
        grid, _ = figures.perturbation(model, image[0])
        raw = to_pil(grid, figures.SCALE)
        labelled = figures.perturbation_sheet(model, image)
    dims, tweaks = TINY_NET["caps_layers"][0][1], len(figures.TWEAKS)
    left, top, cells = split_margins(labelled, raw)
    assert np.array_equal(cells, np.asarray(raw))  # the decoded pictures are untouched
    assert bands_have_text(left[PAD * figures.SCALE :], dims, axis=0)  # "dim i" on every row
    assert bands_have_text(top[:, PAD * figures.SCALE :], tweaks, axis=1)  # the tweak value on every column


def test_reconstructions_name_label_and_prediction(test_split):
    torch.manual_seed(0)
    model = CapsNet(**TINY_NET).eval()
    images, labels = test_split[0][:4, None].float() / 255, test_split[1][:4, None]
    with torch.inference_mode():
        out = model(images, k=1)
        raw = to_pil(image_grid(torch.cat([images.unsqueeze(1), out.recon], dim=1)), figures.SCALE)
        labelled = figures.reconstructions(model, images, labels)
    left, top, cells = split_margins(labelled, raw)
    assert np.array_equal(cells, np.asarray(raw))
    assert bands_have_text(left, 4, axis=0) and bands_have_text(top, 2, axis=1)


def test_separation_shows_correct_and_wrong_images_apart(test_split):
    """Fig. 5: correctly classified overlays in the left panel, wrong ones in the right, each digit painted from its
    own capsule in its own colour (red for the first capsule, green for the second)."""
    torch.manual_seed(0)
    model = CapsNet(**{**TINY_NET, "image_size": 36}).eval()
    digits = test_split[0][:8].float() / 255
    images = torch.zeros(4, 1, 36, 36)
    for i in range(4):  # two digits overlaid, shifted apart
        images[i, 0, :28, :28] = digits[2 * i]
        images[i, 0, 8:, 8:] = torch.maximum(images[i, 0, 8:, 8:], digits[2 * i + 1])
    with torch.inference_mode():
        out = model(images, k=2)
        top2 = out.lengths.topk(2, dim=1).indices
        others = out.lengths.topk(4, dim=1).indices[:, 2:]
        labels = torch.cat([top2[:2], others[2:]])  # images 0, 1 right by construction; 2, 3 wrong
        picture = figures.separation(model, images, labels, count=4)
        right = figures._separation_panel(images[:2], out.recon[:2], labels[:2], out.lengths[:2], "correct")
        wrong = figures._separation_panel(images[2:], out.recon[2:], labels[2:], out.lengths[2:], "wrong")
    a = np.asarray(picture)
    assert picture.width > right.width + wrong.width  # two panels, a gap between
    assert np.array_equal(a[: right.height, : right.width], np.asarray(right))
    assert np.array_equal(a[: wrong.height, -wrong.width :], np.asarray(wrong))
    with torch.inference_mode():  # the first capsule's digit alone, as its column shows it
        first = to_pil(figures.colour_overlay(torch.zeros(1, 36, 36), out.recon[0, :1], figures.COLOURS[:1]))
    red, green, blue = np.asarray(first).astype(float).transpose(2, 0, 1)
    lit = red > 40
    assert lit.any()
    assert np.allclose(green[lit], red[lit] / 4, atol=1.5) and np.allclose(blue[lit], red[lit] / 4, atol=1.5)
