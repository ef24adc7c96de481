"""Batches composed on a device from MNIST held there (index gather + shift), for when CPU workers would starve a
GPU: MultiMNIST overlays (``DeviceMultiMnist``) and the paper's shifted MNIST digits (``DeviceMnist``). Workers (or
the main process: there is nothing left for workers to do) ship only indices and offsets."""

from __future__ import annotations

import torch

from capsdist.data import recipe
from capsdist.data.batch import ONTHEFLY, Batch, multimnist_from_draw, to_batch


def multimnist_batch(images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator) -> Batch:
    """A fresh MultiMNIST batch, drawn and composed entirely on the generator's device (CPU or GPU)."""
    first = torch.randint(len(labels), (batch_size,), generator=gen, device=labels.device)
    indices, offsets = recipe.draw(labels, first, gen)
    return multimnist_from_draw(images, labels, indices, offsets)


class DeviceMultiMnist:
    """The MNIST split on a device, MultiMNIST pairs composed there: the same batches as ``OnTheFlyMultiMnist``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str, seed: int = 0) -> None:
        """Copy the MNIST split (uint8 [N,28,28], labels [N]) to ``device`` once."""
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels).long().to(device)
        self.seed = seed

    def batch(self, batch_size: int, epoch: int = 0, step: int = 0, rank: int = 0) -> Batch:
        """A batch drawn with a device generator seeded by (seed, epoch, rank, step)."""
        gen = recipe.generator(self.images.device, self.seed, ONTHEFLY, epoch, rank, step)
        return multimnist_batch(self.images, self.labels, batch_size, gen)

    def compose(self, draws: Batch) -> Batch:
        """Compose a ``draw_only`` batch ({"indices", "offsets"} on this device) into a contract batch."""
        return multimnist_from_draw(self.images, self.labels, draws["indices"], draws["offsets"])



class DeviceMnist:
    """The MNIST train split on a device, shifted there: the same batches as ``MnistStream`` composes on the CPU."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str, max_shift: int) -> None:
        """Copy the split (uint8 [N,28,28], labels [N]) to ``device`` once (47 MB for the 60k digits)."""
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels).long().to(device)
        self.max_shift = max_shift

    def compose(self, draws: Batch) -> Batch:
        """A contract batch from ``MnistStream``'s draws ({"indices" [B], "offsets" [B,2]} on this device)."""
        images = self.images[draws["indices"]]
        if self.max_shift:
            images = recipe.shift(images, draws["offsets"], self.max_shift)
        return to_batch(images, self.labels[draws["indices"], None], images[:, None])
