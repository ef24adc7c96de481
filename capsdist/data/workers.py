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
its workers). The main process alone decides how the run stops. A program read from standard input cannot be run
again by a worker (multiprocessing re-runs the main script in its children): its workers are forked as before.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext

from capsdist.cluster.signals import JOB_SIGNALS

SERVER_MODULE = "capsdist.data.worker_server"


def worker_context() -> BaseContext:
    """The multiprocessing context DataLoader workers start from (forkserver, preloading as the docstring says)."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is None and path and not os.path.isfile(path):
        return multiprocessing.get_context("fork")  # a program read from stdin: a worker could not run it again
    context = multiprocessing.get_context("forkserver")
    name = getattr(main.__spec__, "name", "") or ""  # `python -m NAME`: a worker runs NAME again
    # multiprocessing never runs a package's __main__ again (its code is not guarded), so neither may the server;
    # a capsdist entry point (`python -m capsdist.train`, a thin shim) is not preloaded by name either: its imports
    # are among ours below, and a worker running a preloaded module again warns "found in sys.modules" (runpy)
    named = [name] if name and not name.endswith("__main__") and name.split(".")[0] != "capsdist" else []
    # a worker of a script (`capsdist-train`, a user's file) runs the script again: its capsdist imports are ready
    ours = sorted(module for module in sys.modules if module.split(".")[0] == "capsdist")
    context.set_forkserver_preload([SERVER_MODULE, *named, *ours])
    return context


def start_server() -> BaseContext:
    """Start the fork server now (a no-op when it runs), so its imports overlap what the process does next; the
    context workers start from."""
    context = worker_context()
    if context.get_start_method() != "forkserver":
        return context
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)  # held, not lost, for this thread
    try:
        resource_tracker.ensure_running()  # the server's own call would; this one unblocks SIGINT/SIGTERM on return
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return context
