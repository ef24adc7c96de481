"""Loader workers start from a fork server, never by forking the training process.

The training process has threads by the time an epoch starts (gloo's, W&B's), and CPython 3.11 forks while a
thread entering Python from C (gloo's, dropping a collective's tensor) may hold the interpreter's thread-list
lock: the child then waits for it forever (seen in CI: a worker stuck in ``PyOS_AfterFork_Child ->
_PyThreadState_DeleteExcept``). Workers are forked again at every epoch, so a long run rolls that dice
thousands of times. Python's ``forkserver`` context forks them from a single-threaded server instead, started
by fork+exec; the server first imports torch, the data streams (``capsdist.data.worker_server``) and what a
worker runs again of the program (``main_imports``), so that a worker starts in milliseconds, as a forked one
did, instead of importing torch (or a user script's Lightning) again at every epoch. ``start_server`` starts it
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
from pathlib import Path
from types import ModuleType

from capsdist.cluster.signals import JOB_SIGNALS

SERVER_MODULE = "capsdist.data.worker_server"


def worker_context() -> BaseContext:
    """The multiprocessing context DataLoader workers start from (forkserver, preloading what a worker runs)."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is None and path and not os.path.isfile(path):
        return multiprocessing.get_context("fork")  # a program read from stdin: a worker could not run it again
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([SERVER_MODULE, *main_imports(main, path)])
    return context


def main_imports(main: ModuleType, path: str | None) -> list[str]:
    """What a worker runs before its first batch besides the data streams: multiprocessing runs the program's main
    module again in each worker, so the server imports it once. capsdist's own programs (``python -m capsdist.train``,
    the ``capsdist-*`` console scripts) are thin shims that import Lightning only when run as the main program, so
    nothing more is preloaded for them: the server skips seconds of Lightning imports at every run's start."""
    spec = getattr(main, "__spec__", None)
    name = (spec.name or "") if spec is not None else ""
    if name:  # `python -m NAME`; a package's __main__ is never run again by multiprocessing (its code is unguarded)
        return [] if name.endswith("__main__") or name.split(".")[0] == "capsdist" else [name]
    if not path or (Path(path).name.startswith("capsdist-") and main_from_capsdist(main)):
        return []  # no program file (`python -c`, an interpreter embedding it) or a capsdist console script
    # a user's script: a worker runs it again, so the capsdist modules it imported are made ready
    return sorted(module for module in sys.modules if module.split(".")[0] == "capsdist")


def main_from_capsdist(main: ModuleType) -> bool:
    """Whether the program's ``main`` comes from capsdist (pip's console-script shim imports exactly that)."""
    return str(getattr(getattr(main, "main", None), "__module__", "")).startswith("capsdist.")


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
