"""Every use of torch's private DataLoader API, in one place: with loader workers, (1) the wait for a batch calls a
check every ``POLL_S`` (which may raise: a recorded stop request) instead of blocking for the whole timeout, so a
stop is honoured in seconds while a worker's read is stalled; (2) when the loader says its workers are expendable
(capsdist: a stop recorded, a failed pass), shutting them down ends them at once instead of waiting for them: torch
joins a busy worker for 5 s, sends it SIGTERM, which capsdist's workers ignore, and joins it for 5 s more, worker
after worker.

Written for torch 2.13.0: ``DataLoader._get_iterator`` (which iterator a loader makes);
``_MultiProcessingDataLoaderIter._try_get_data(timeout)`` (one wait for a batch; ``_get_data`` calls it with the
loader's timeout, or repeatedly with 5 s where there is none), its ``_shutdown_workers`` (also run by ``__del__``),
``_shutdown``, ``_workers`` and ``_worker_pids_set``; ``_utils.signal_handling._remove_worker_pids`` (torch's
SIGCHLD watch of the workers). tests/unit/test_compat.py has the canary.
"""

from __future__ import annotations

import time
from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

WRITTEN_FOR = "2.13.0"
POLL_S = 1.0


class PollingLoader(DataLoader):
    """A DataLoader whose waits for a batch from its workers call ``check_wait`` every ``POLL_S``, and whose workers
    are ended at once when ``workers_expendable`` says so."""

    def check_wait(self) -> None:
        """Called while a wait for a batch goes on; may raise to abandon it (subclasses)."""

    def workers_expendable(self) -> bool:
        """Whether the workers may be killed rather than waited for when they are shut down (subclasses)."""
        return False

    def _get_iterator(self) -> Any:
        """torch's iterator; with workers, ``_PollingIter``."""
        return _PollingIter(self) if self.num_workers > 0 else super()._get_iterator()


class _PollingIter(_MultiProcessingDataLoaderIter):
    """The multi-process iterator with the loader's checked waits and expendable workers (module docstring)."""

    def __init__(self, loader: PollingLoader) -> None:
        self._loader = loader
        super().__init__(loader)

    def _try_get_data(self, timeout: float = 5.0) -> tuple[bool, Any]:
        """(True, batch) within ``timeout`` seconds, else (False, None); the loader's check runs after each empty
        slice of ``POLL_S``."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            success, data = super()._try_get_data(min(POLL_S, left))
            if success:
                return success, data
            self._loader.check_wait()
        return False, None

    def _shutdown_workers(self) -> None:
        """torch's shutdown; when the workers are expendable, SIGKILLed first (one may sit in a stalled read), their
        PIDs out of torch's SIGCHLD watch, which would report the kills as a worker failure."""
        if not self._shutdown and self._loader.workers_expendable():
            if self._worker_pids_set:
                signal_handling._remove_worker_pids(id(self))
                self._worker_pids_set = False
            for worker in self._workers:
                worker.kill()
        super()._shutdown_workers()
