"""Per-step bookkeeping that never makes the host wait for the device: the stop request agreed over ranks on the
host, and Lightning's throughput meter timed (with its CUDA synchronise) on logging steps only.

A GPU step of a few milliseconds cannot hide a device->host read: the host stops queueing work until the device
is idle. capsdist's ordinary step reads the device not at all; these two helpers keep the stop flag and the
images/s meter from adding reads (tests/integration/test_sync_count.py counts them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ThroughputMonitor

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


class LoggedThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor (images/s, MFU) measured between logging steps: its update synchronises CUDA
    so that the clock covers the queued work, which on every step would stall the GPU's queue; on the other steps
    only the image, batch and FLOP counts move on."""

    def __init__(self, batch_size_fn: Callable[[Any], int]) -> None:
        """``batch_size_fn``: images in a batch. The rate is over the last logging interval (a window of two)."""
        super().__init__(batch_size_fn=batch_size_fn, window_size=2)
        self._flops_since: dict[Any, int] = defaultdict(int)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        flops = getattr(pl_module, "flops_per_batch", None)
        self._flops_since[stage] += flops or 0
        if not trainer._logger_connector.should_update_logs:
            self._samples[stage] += self.batch_size_fn(batch)
            self._batches[stage] += 1
            return
        if flops is not None:  # Lightning's Throughput takes the FLOPs since its last update
            pl_module.flops_per_batch = self._flops_since[stage]
        super()._update(trainer, pl_module, batch, iter_num)
        if flops is not None:
            pl_module.flops_per_batch = flops
        self._flops_since[stage] = 0
