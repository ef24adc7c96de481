"""``ResumableLoader``: a DataLoader over a batch stream whose position in the epoch is checkpointed.

State (``state_dict``) = ``{"version": 1, "epoch", "batches", "world_size", "num_workers"}``: the batches handed
out this epoch, and the placement they were counted under. Lightning 2.6 stores it in checkpoints
(``fit_loop.on_save_checkpoint`` -> ``CombinedLoader._state_dicts``) and on restart calls ``load_state_dict`` in
``FitLoop.setup_data`` *before* ``iter()``; the next ``iter()`` then starts at batch ``batches`` if the epoch
matches, else at 0. The epoch is read at ``iter()`` time (``epoch_fn``, e.g. the trainer's restored
``current_epoch``); workers are not persistent, so each epoch's seeds reach fresh workers. The train loader has a
length, so Lightning does not prefetch past the batch it trains on: ``batches`` is exactly the number of batches
trained on when the checkpoint was written.

When a resume is exact (anything else is refused with a ``DataError``: by
``capsdist.training.resume.check_loader`` before
the fit writes anything, and again by ``load_state_dict``):
  - the world size must be the one the state was taken with (each rank's share of the data depends on it);
  - in-memory streams (MNIST, MultiMNIST on the fly) are exact for any ``num_workers``: batch ``j`` is a pure
    function of (seed, epoch, rank, j), whichever worker makes it;
  - shard streams need the same ``num_workers``: each worker's shard draws and shuffle are seeded per worker.
  A state without ``version`` (written before the check existed) is accepted unchecked.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import IterableDataset

from capsdist.cluster.signals import ignore_job_signals, reap_workers_at_exit, request
from capsdist.compat.dataloader import PollingLoader
from capsdist.data.batch import Batch, DataError, check_stop
from capsdist.data.workers import start_server

STATE_VERSION = 1


class ResumableLoader(PollingLoader):
    """DataLoader over a stream: batching in the stream, epoch from a callback, mid-epoch resumable state."""

    def __init__(
        self,
        dataset: IterableDataset,
        num_workers: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        pin_memory: bool = False,
    ) -> None:
        """``epoch_fn`` (e.g. the trainer's current_epoch) is read at every ``iter()``; default ``set_epoch`` value."""
        # a stream may bound the wait for one batch (a worker stuck past its shards' deadlines); only worker
        # processes can time out (without workers, the shard stream bounds its own waits)
        timeout = getattr(dataset, "loader_timeout", 0) if num_workers > 0 else 0
        # workers ignore the job's signals: slurmstepd sends them to every process, the main process owns the stop;
        # they start from a fork server (capsdist.data.workers: forking this threaded process can deadlock)
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            timeout=timeout,
            worker_init_fn=functools.partial(ignore_job_signals, owner=os.getpid()) if num_workers > 0 else None,
            multiprocessing_context=start_server() if num_workers > 0 else None,
        )
        if num_workers > 0:
            reap_workers_at_exit()  # they ignore SIGTERM, so multiprocessing's exit hook alone could wait forever
        self.epoch_fn, self.epoch, self.batches = epoch_fn, 0, 0
        self._pending: dict[str, int] | None = None
        self._failed = False  # the current pass ended in an error

    def check_wait(self) -> None:
        """While the loader waits for a worker's batch: honour a stop recorded meanwhile (``check_stop``), so a
        stalled read in a worker does not hold the training process past its job's kill deadline."""
        check_stop()

    def workers_expendable(self) -> bool:
        """Once a stop is recorded or the pass failed, the workers' batches are not needed (a resume makes them
        again): they are killed, not waited for, when the loader shuts them down. A worker may sit in a stalled
        read; and after a worker's DataError, shut down by a garbage collection, the workers were seen never to
        get torch's shutdown message: 10 s per worker either way."""
        return self._failed or bool(request())

    def set_epoch(self, epoch: int) -> None:
        """Epoch to use when no ``epoch_fn`` is given."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        """Iterate the epoch, starting after the batches recorded by ``load_state_dict`` if it is the same epoch."""
        epoch = self.epoch_fn() if self.epoch_fn else self.epoch
        pending, self._pending = self._pending, None
        start = pending["batches"] if pending and pending["epoch"] == epoch else 0
        self.dataset.epoch, self.dataset.start = epoch, start
        self.epoch, self.batches = epoch, start
        total = getattr(self.dataset, "num_batches", None)
        self._failed = False
        try:
            for batch in islice(super().__iter__(), None if total is None else max(0, total - start)):
                self.batches += 1
                yield batch
        except (DataError, RuntimeError) as err:
            self._failed = True
            if isinstance(err, DataError):  # raised in a worker: keep the one-paragraph message, not its traceback
                raise DataError(str(err).rsplit("DataError: ", 1)[-1].strip()) from None
            if "timed out" not in str(err):
                raise
            raise DataError(
                f"the data loader waited {self.timeout} s for one batch ({self._what()}). Fix: check that the "
                "shards are reachable and readable (a dead host, a stalled pipe: command)."
            ) from None
        if self.batches == 0 and total != 0 and getattr(self.dataset, "expects_samples", lambda: False)():
            raise DataError(
                f"no valid sample in one pass over {self._what()} (skipped: {self.dataset.skipped.count}; last "
                f"reason: {self.dataset.skipped.last or 'no samples in them'}). Fix: {self.dataset.fix()}, or point "
                "the shard setting elsewhere."
            )

    def _what(self) -> str:
        """What the stream reads, for error messages."""
        describe = getattr(self.dataset, "describe", None)
        return describe() if describe else type(self.dataset).__name__

    def _world_size(self) -> int:
        """The world size the stream splits the data for."""
        return int(getattr(self.dataset, "world_size", 1))

    def state_dict(self) -> dict[str, int]:
        """Where the current epoch stands (a loaded state not yet iterated from included), and the placement
        (world size, workers) it was counted under."""
        position = self._pending or {"epoch": self.epoch, "batches": self.batches}
        return {
            "version": STATE_VERSION,
            **position,
            "world_size": self._world_size(),
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next ``iter()``; refuse a state this loader cannot resume exactly."""
        if state.get("version") is not None:
            needs = getattr(self.dataset, "resume_needs_same_workers", True)
            check_state(state, self._world_size(), self.num_workers, needs, type(self.dataset).__name__)
        self._pending = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def rewind(self, batches: int) -> None:
        """Un-count the last ``batches`` handed out: they were fetched but never trained on (a failed step)."""
        self.batches = max(0, self.batches - batches)


def check_state(state: dict[str, Any], world_size: int, num_workers: int, needs_same_workers: bool, kind: str) -> None:
    """Raise DataError unless resuming ``state`` with this placement reproduces the interrupted run batch for
    batch (``kind`` names the data in the message)."""
    version = int(state["version"])
    if version != STATE_VERSION:
        raise DataError(
            f"the checkpoint's data-loader state has version {version}; this capsdist reads version "
            f"{STATE_VERSION}. Fix: resume with the capsdist version that wrote the checkpoint, or start a "
            "fresh run (load only the weights) instead of --ckpt_path."
        )
    if state["world_size"] != world_size:
        raise DataError(
            f"the checkpoint was taken at world size {state['world_size']} and this run has {world_size}: each "
            f"rank's share of the {kind} data depends on it, so the resumed epoch would not continue where it "
            f"stopped. Fix: resume with {state['world_size']} processes in all (trainer.devices x "
            "trainer.num_nodes), or start a fresh run instead of --ckpt_path."
        )
    if needs_same_workers and state["num_workers"] != num_workers:
        raise DataError(
            f"the checkpoint was taken with num_workers={state['num_workers']} and this run has "
            f"num_workers={num_workers}: the {kind} data seeds its shard draws and shuffle per worker, so the "
            f"resumed epoch would not continue where it stopped. Fix: resume with "
            f"--data.num_workers {state['num_workers']}, or start a fresh run instead of --ckpt_path."
        )


class PlainIterable:
    """A loader behind a plain iterable (with its length): Lightning rebuilds any DataLoader given to predict."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
