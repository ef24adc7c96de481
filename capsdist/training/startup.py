"""Checks of a run's inputs at startup, before any work and before anything is written: the run folder's
writability (its links are capsdist.training.run's), and for ``fit`` the batch size against the memory one
training step needs (the batch size against the data is the data module's ``train_batches``). Each refusal is
one paragraph naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from capsdist.cluster.memory import memory_room
from capsdist.core.errors import CapsdistError
from capsdist.core.files import unwritable
from capsdist.model.capsnet import CapsNet
from capsdist.model.footprint import Footprint, training_footprint


class StartupError(CapsdistError):
    """An input that cannot work (an unwritable run folder, a batch that cannot fit), refused before any work."""


def check_writable(root: Path) -> None:
    """Refuse a run folder that cannot be created or written (a file on the way, no permission, a read-only or
    kernel filesystem), without writing anything."""
    why = unwritable(root)
    if why:
        raise StartupError(
            f"cannot write the run folder {root}: {why}. Nothing was written. Fix: choose a folder this user can "
            "write (--trainer.default_root_dir runs/NAME)."
        )


def _gib(size: int) -> str:
    """Bytes as GiB for messages."""
    return f"{size / 2**30:.1f} GiB"


def _largest_batch(need: Footprint, room: int) -> int:
    """The batch to suggest: a power of two whose estimate leaves a quarter of ``room`` free (the estimate runs up
    to 14% under the true need, and the process has a baseline of its own); 0 if not even one sample."""
    fits = int(0.75 * room - need.fixed) // need.per_sample
    return 1 << (fits.bit_length() - 1) if fits > 0 else 0


def check_memory(net: CapsNet, batch: int, trainer: pl.Trainer) -> None:
    """Refuse a batch whose training step cannot fit in the memory this process may still allocate
    (capsdist.cluster.memory), by the estimate from the model's shapes (capsdist.model.footprint: below the true
    need, so a run refused would not have fit). CPU runs only: a GPU's memory is not known before its processes
    start, and starting CUDA here would break the forking launchers."""
    if trainer.strategy.root_device.type != "cpu":
        return
    precision = str(trainer.precision)
    width = 2 if precision.startswith(("16", "bf16")) else 8 if precision.startswith("64") else 4
    streamed = hasattr(trainer.strategy, "data_parallel_size")  # capsule parallelism streams every routed layer
    need = training_footprint(net, width, streamed)
    processes = trainer.num_devices  # this host's ranks, each with a batch of its own
    rooms = [(room.bytes // processes if room.shared else room.bytes, room) for room in memory_room()]
    if not rooms or need.total(batch) <= min(rooms)[0]:
        return
    share, room = min(rooms)
    fits = _largest_batch(need, share)
    fix = f"--data.batch_size {fits} or less" if fits else "a smaller model"
    lean = training_footprint(net, width, streamed=True)
    if not streamed and lean.per_sample < need.per_sample and net.config["routing_chunk_size"] is None:
        fix += (
            f", or streamed routing (--model.routing_chunk_size 0: the same values with u_hat never whole, "
            f"{lean.per_sample / 2**20:.2f} MiB per sample, a batch of {_largest_batch(lean, share)} or less)"
        )
    each = f" on each of {processes} processes" if processes > 1 else ""
    raise StartupError(
        f"--data.batch_size {batch} needs about {_gib(need.total(batch))} for one training step of this model{each}, "
        f"and {room.bound} leaves {_gib(share)}{' per process' if processes > 1 and room.shared else ''}: the step "
        "would fail allocating (\"can't allocate memory\", or the OOM killer) after the setup. The estimate, from "
        f"the model's shapes: {need.per_sample / 2**20:.2f} MiB per sample ({need.priors / 2**20:.2f} MiB of it the "
        f"routing priors u_hat = batch x inputs x outputs x dim x 4 bytes) plus {_gib(need.fixed)} of weights, "
        f"gradients and Adam state. Nothing was written. Fix: {fix}, or run where more memory is free."
    )
