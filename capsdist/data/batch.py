"""The batch contract every loader yields, the data error type, seed namespaces, the worker placement helper and the
stop check of a wait for data.

Batch = ``{"image": f32 [B,C,H,W], "labels": i64 [B,K], "recon": f32 [B,K,C,H,W]}``, values in [0, 1] (C = 1 but
for labelled image shards, whose images keep their channels).
"""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

from capsdist.cluster import signals
from capsdist.core.errors import CapsdistError
from capsdist.data import recipe

Batch = dict[str, torch.Tensor]

# seed-key namespaces, so no two random streams share a seed
PERM, SHIFT, ONTHEFLY, ONTHEFLY_VAL, SHARDS, SHUFFLE = range(11, 17)


class DataError(CapsdistError, ValueError):
    """Bad data configuration (no shards, missing files, impossible epoch length); the message names the fix."""


def to_batch(image: torch.Tensor, labels: torch.Tensor, recon: torch.Tensor) -> Batch:
    """Contract batch dict from uint8 images [B,H,W], long labels [B,K] and uint8 recon targets [B,K,H,W]."""
    return {
        "image": image.unsqueeze(1).float().div_(255),
        "labels": labels.long(),
        "recon": recon.unsqueeze(2).float().div_(255),
    }


def multimnist_from_draw(
    images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor
) -> Batch:
    """Compose drawn pairs into a MultiMNIST batch on the device ``images`` live on."""
    overlay, placed = recipe.compose(images, indices, offsets)
    return to_batch(overlay, labels[indices], placed)


def worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader process, (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def check_stop() -> None:
    """Raise ``StopRequested`` if a stop (SIGTERM, SIGUSR1, Ctrl-C) was recorded in this process and it is the main
    process of a run of one rank. Called while waiting for data that may not come (a stalled read), so that the stop
    is honoured in seconds, not at a step boundary the wait delays. Loader workers never stop on their own (they
    ignore the job's signals), and the ranks of a larger run stop at the step boundary, where they agree together."""
    request = signals.request()
    if request and get_worker_info() is None and not _several_ranks():
        raise signals.StopRequested(request)


def _several_ranks() -> bool:
    """Whether this process is one rank of several (an initialised process group of more than one)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
