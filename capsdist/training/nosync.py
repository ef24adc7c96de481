"""Per-step bookkeeping that never makes the host wait for the device: the stop request agreed over ranks on the
host, and Lightning's throughput meter timed (with its CUDA synchronise) on logging steps only.

A GPU step of a few milliseconds cannot hide a device->host read: the host stops queueing work until the device
is idle. capsdist's ordinary step reads the device not at all; these two helpers keep the stop flag and the
images/s meter from adding reads (tests/integration/test_sync_count.py counts them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from capsdist.compat.lightning import LoggingStepThroughput

_HOST_GROUP: list[Any] = []  # the gloo group host-side flags are reduced over, made on first use


def agree_max(value: int) -> int:
    """The max of a host-side integer over all ranks, with a CPU (gloo) all-reduce: no device sync. Every rank must
    call it at the same point (the end of each training batch); one process returns ``value``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    flag = torch.tensor([value])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_HOST_GROUP[0])
    return int(flag[0])


class LoggedThroughput(LoggingStepThroughput):
    """Lightning's ThroughputMonitor (images/s, MFU) measured between logging steps: its update synchronises CUDA
    so that the clock covers the queued work, which on every step would stall the GPU's queue; on the other steps
    only the image, batch and FLOP counts move on (capsdist.compat.lightning.LoggingStepThroughput)."""

    def __init__(self, batch_size_fn: Callable[[Any], int]) -> None:
        """``batch_size_fn``: images in a batch. The rate is over the last logging interval (a window of two)."""
        super().__init__(batch_size_fn=batch_size_fn, window_size=2)
