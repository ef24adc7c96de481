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

capsdist's own training program goes one step further (``fork_server``): at its start, while it still has one
Python thread and before Lightning is imported, it forks itself into that server, which then holds torch as the
program imported it (and imports the data modules itself), instead of a fresh interpreter importing them all
again (~1.5 CPU-s per run and rank).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext
from pathlib import Path
from types import ModuleType

from capsdist.cluster.signals import JOB_SIGNALS
from capsdist.compat import forkserver as forkserver_seam

SERVER_MODULE = "capsdist.data.worker_server"
SERVER_IMPORTS = ("torch", "capsdist.data.shards", "capsdist.data.streams")  # what SERVER_MODULE imports
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def fork_server() -> bool:
    """Start the workers' fork server as a fork of this program (capsdist.compat.forkserver), holding torch as
    this process imported it. Only while the program has one Python thread (a thread entering Python
    from C may hold the interpreter's locks at the fork, as above). False, nothing started, where it cannot be
    done (another thread, a program read from standard input, a Python whose server differs): ``start_server``
    then starts the standard server when workers are first needed."""
    if threading.active_count() > 1 or not forkserver_seam.usable():
        return False
    if worker_context().get_start_method() != "forkserver":
        return False
    importlib.import_module("torch")  # the program's own first import: shared with the server, not repeated
    parent = os.getpid()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)  # the server inherits the mask
    try:
        forkserver_seam.start_forked(lambda: become_server(parent))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return True


def become_server(parent: int) -> None:
    """In the forked server: the state a fresh server would start in (the job's signals, blocked by the program
    around the fork, at their default handlers; no wakeup descriptor; the collector on), tied to the program's
    life, with what a worker imports."""
    signal.set_wakeup_fd(-1)
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    gc.freeze()  # the program's imports, as capsdist.core.startup freezes them in the program itself
    gc.enable()
    die_with_parent(parent)
    for module in SERVER_IMPORTS:  # here, not in the program: an MNIST run reads no shards (webdataset is optional)
        with contextlib.suppress(ImportError):  # a worker that needs a missing one fails as the program itself would
            importlib.import_module(module)


def die_with_parent(parent: int | None = None) -> None:
    """Be killed when the process that started this one ends (the server: its workers' watchdogs then end them);
    ``parent``: that process's pid, checked after the request, in case it ended before."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(0)
