"""MultiMNIST generated on a device (index gather + shifted add), for when CPU workers would starve a GPU."""

from __future__ import annotations

import torch

from capsdist.data import recipe
from capsdist.data.batch import ONTHEFLY, Batch, multimnist_from_draw


def multimnist_batch(images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator) -> Batch:
    """A fresh MultiMNIST batch, drawn and composed entirely on the generator's device (CPU or GPU)."""
    first = torch.randint(len(labels), (batch_size,), generator=gen, device=labels.device)
    indices, offsets = recipe.draw(labels, first, gen)
    return multimnist_from_draw(images, labels, indices, offsets)


class DeviceMultiMnist:
    """MultiMNIST generated on a device (index gather + shifted add), for when CPU workers would starve a GPU."""

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

