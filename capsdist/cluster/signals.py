"""The job's stop signals as a flag: SIGUSR1 (time limit), SIGTERM (preemption, requeue, scancel), Ctrl-C.

Lightweight on purpose (no torch): the training CLI (capsdist.train) installs the handlers first thing, before the
slow imports and setup, so a signal that lands during startup does not kill the task with the default action
(SLURM may send ``--signal=USR1@N`` up to a minute early; USR1's default action would fail the job instead of
requeueing it). Until the fit begins (``defer``) nothing can be lost and no rank is in a collective, so the
handler stops at once by raising :class:`StartupStop` (the CLI leaves through capsdist.cluster.requeue); from then
on it only records the request, and capsdist.training.stop reads the flag at the step boundaries, during
validation and before the first step; a wait for data that may never come (a stalled shard read) reads it too and
raises :class:`StopRequested`, which capsdist.training.stop turns into the same stop. DataLoader workers and W&B's
service ignore the job's signals (``ignore_job_signals``, capsdist.cluster.wandb_shield): slurmstepd signals every
process of the step, and only the main process may decide how the run stops.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # registers multiprocessing's exit hook now, so that the reaper (later) runs before it
import os
import select
import signal
import threading
import time
from types import FrameType
from typing import Any

# request kinds in rising priority (ranks agree on the max): requeue (USR1 or the time-limit check), Ctrl-C, SIGTERM
REQUEUE, INTERRUPT, TERMINATE = 1, 2, 3
JOB_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
_KINDS = {signal.SIGUSR1: REQUEUE, signal.SIGINT: INTERRUPT, signal.SIGTERM: TERMINATE}
# exit code per request: 75 (EX_TEMPFAIL) = saved, requeue me; 130/143 = the shell's codes for SIGINT/SIGTERM
EXIT_CODES = {REQUEUE: 75, INTERRUPT: 130, TERMINATE: 143}
_state: dict[str, Any] = {"request": 0, "previous": {}, "for_process": False, "reaper": False, "at_once": False}


def _record(signum: int, frame: FrameType | None) -> None:
    """Record the request; during startup also leave at once. No collective or I/O may run inside a handler
    (module docstring)."""
    _state["request"] = max(_state["request"], _KINDS[signal.Signals(signum)])
    if signum == signal.SIGINT:  # a second Ctrl-C stops at once
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _state["at_once"]:
        _state["at_once"] = False  # once: the way out must not be interrupted by a second signal
        raise StartupStop(_state["request"])


def install(for_process: bool = False, at_once: bool = False) -> None:
    """Own the job's signals with the flag-only handler (idempotent; a no-op outside the main thread).
    ``for_process``: for the rest of the process (the training CLI), so ``restore`` keeps them: the end-of-fit
    work after the trainer's teardown must not die of a late USR1 either. ``at_once``: until :func:`defer`, a
    signal raises :class:`StartupStop` (a pending request does so now)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state["for_process"] = _state["for_process"] or for_process
    _state["at_once"] = _state["at_once"] or at_once
    if _state["at_once"] and _state["request"]:
        _state["at_once"] = False
        raise StartupStop(_state["request"])
    for sig in JOB_SIGNALS:
        if signal.getsignal(sig) is not _record and not (sig == signal.SIGINT and _state["request"]):
            _state["previous"].setdefault(sig, signal.signal(sig, _record))


def defer() -> None:
    """From now on only record the job's signals (the fit has begun: capsdist.training.stop honours them); a request
    recorded while a library held the startup's :class:`StartupStop` back is honoured there too."""
    _state["at_once"] = False


def restore() -> None:
    """Put back the handlers that were there before ``install`` and forget any request (in-process callers such
    as tests fit again; not in the training CLI's own process)."""
    if _state["for_process"]:
        return
    for sig, previous in _state["previous"].items():
        signal.signal(sig, previous)
    _state["previous"].clear()
    _state["request"], _state["at_once"] = 0, False


def request() -> int:
    """The strongest stop requested so far in this process (0: none)."""
    return _state["request"]


class StopRequested(SystemExit):
    """A stop request honoured while the process waited for data (a blocked read), not at a step boundary: it
    exits with the request's code; in a fit, capsdist.training.stop first saves what a step boundary would."""

    def __init__(self, request: int) -> None:
        """``request``: the kind recorded (REQUEUE, INTERRUPT or TERMINATE)."""
        super().__init__(EXIT_CODES[request])
        self.request = request


class StartupStop(StopRequested):
    """A job signal during startup (``install(at_once=True)`` until ``defer``), raised by the handler itself: leave
    now, nothing to save (capsdist.train leaves through capsdist.cluster.requeue.leave_at_startup)."""


def raise_request(kind: int) -> None:
    """Record a stop that no signal sent (the time-limit check)."""
    _state["request"] = max(_state["request"], kind)


def ignore_job_signals(worker_id: int = 0, owner: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores the job's signals (PyTorch's SIGTERM handler would kill
    it, and the main process would then fail with "DataLoader worker ... killed by signal"); the main process
    stops at a step boundary and shuts its workers down itself. With ``owner`` (the training process's PID; bind
    it with functools.partial) the worker also ends the moment that process does (:func:`leave_with`)."""
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if owner is not None:
        leave_with(owner)


def leave_with(owner: int) -> None:
    """End this process (``os._exit``) as soon as process ``owner`` has exited, from a daemon thread. PyTorch's own
    worker watchdog looks at the worker's parent, which for a fork-server worker is the server, and a worker that
    notices it may then hang forever joining its queue's feeder thread: seen after a SIGKILL of the training
    process, an orphaned worker still waiting in a futex 14 minutes later."""
    try:
        handle = os.pidfd_open(owner)  # readable once the process has exited (Linux 5.3)
    except ProcessLookupError:
        os._exit(0)
    except OSError:  # no pidfd here: poll the PID instead
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _exists(owner):
                time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="capsdist-owner-watch", daemon=True).start()


def _exists(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap_workers_at_exit() -> None:
    """Kill this process's daemonic children at interpreter exit (once registered, runs before multiprocessing's own
    exit hook). That hook stops them with SIGTERM, which workers under :func:`ignore_job_signals` ignore, then
    joins them: after a crash whose traceback keeps the loader's iterator alive, the process would hang forever."""
    if not _state["reaper"]:
        _state["reaper"] = True
        atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
