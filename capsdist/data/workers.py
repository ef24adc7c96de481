"""Loader workers start from a fork server, never by forking the training process.

The training process has threads by the time an epoch starts (gloo's, W&B's), and CPython 3.11 forks while a
thread entering Python from C (gloo's, dropping a collective's tensor) may hold the interpreter's thread-list
lock: the child then waits for it forever (seen in CI: a worker stuck in ``PyOS_AfterFork_Child ->
_PyThreadState_DeleteExcept``). Workers are forked again at every epoch, so a long run rolls that dice
thousands of times. Python's ``forkserver`` context forks them from a single-threaded server instead, started
by fork+exec; the server first imports torch, the data streams (``capsdist.data.worker_server``), the program's
main module and the capsdist modules it has imported, so that a worker starts in milliseconds, as a forked one
did, instead of importing Lightning again for the main module at every epoch (2 s). ``start_server`` starts it
early, so that those imports overlap the run's setup, and with the job's signals blocked: the server and
multiprocessing's resource tracker (started with it) inherit the mask, so the SIGUSR1 and SIGTERM that slurmstepd
sends every process of a step leave them running (SIGUSR1 would kill the tracker; a killed server would orphan
its workers). The main process alone decides how the run stops.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext

from capsdist.signals import JOB_SIGNALS

SERVER_MODULE = "capsdist.data.worker_server"


def worker_context() -> BaseContext:
    """The multiprocessing context DataLoader workers start from (forkserver, preloading as the docstring says)."""
    context = multiprocessing.get_context("forkserver")
    main = getattr(sys.modules["__main__"].__spec__, "name", None)  # `python -m NAME`; a worker runs NAME again
    # a worker of a script (`capsdist-train`, a user's file) runs the script again: its capsdist imports are ready
    ours = sorted(name for name in sys.modules if name.split(".")[0] == "capsdist")
    context.set_forkserver_preload([SERVER_MODULE, *([main] if main else []), *ours])
    return context


def start_server() -> None:
    """Start the fork server now (a no-op when it runs), so its imports overlap what the process does next."""
    worker_context()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)  # held, not lost, for this thread
    try:
        resource_tracker.ensure_running()  # the server's own call would; this one unblocks SIGINT/SIGTERM on return
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
