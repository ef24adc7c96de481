"""Loader workers start from a fork server, never by forking the training process.

The training process has threads by the time its first epoch starts (W&B's, Lightning's): CPython 3.11 forks
while another thread may hold the interpreter's thread-list lock, and the child then waits for it forever (seen
in CI: a worker stuck in ``PyOS_AfterFork_Child -> _PyThreadState_DeleteExcept``). Workers are forked again at
every epoch, so a long run rolls that dice thousands of times. Python's ``forkserver`` context forks them from a
single-threaded server instead, started once per process by fork+exec; the server imports torch and the data
streams first (``capsdist.data.worker_server``), so a worker still starts in milliseconds.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext

SERVER_MODULE = "capsdist.data.worker_server"


def worker_context() -> BaseContext:
    """The multiprocessing context DataLoader workers start from (forkserver, preloading the data streams)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([SERVER_MODULE])
    return context
