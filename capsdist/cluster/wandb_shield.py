"""Keep W&B's service process (wandb-core) alive through the job's stop signals, so the run's history survives.

slurmstepd sends SIGTERM (requeue, preemption, scancel) to every process of the step. wandb-core is a Go program
that exits at once on SIGTERM/SIGINT (``signal.Notify``; Go re-installs its handler over an inherited SIG_IGN and
unblocks SIGTERM on every thread), without writing what it buffered: a killed offline run keeps only the
``.wandb`` header, and the trainer's next W&B call fails. So ``install()`` points wandb's service launcher at this
file run as a shim: the shim ignores the job's signals, starts the real wandb-core as its traced child, and
drops SIGTERM/SIGINT/SIGHUP/SIGUSR1 at their delivery (ptrace signal-delivery stops); every other signal goes
through. wandb-core still exits when the training process does (it watches its parent) or on SIGKILL. Where
ptrace is not allowed the shim runs wandb-core unshielded and says so. Standard library only: it runs as a script.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

PTRACE_TRACEME, PTRACE_CONT, PTRACE_SETOPTIONS = 0, 7, 0x4200
PTRACE_O_TRACE_CHILDREN = 0x2 | 0x4 | 0x8  # fork, vfork, clone: its helpers (wandb-symon) and threads too
WALL = 0x40000000  # waitpid: threads (clone children) too
DROPPED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
# a new traced thread starts stopped with SIGSTOP, exec stops with SIGTRAP: neither is meant for the program
NOT_DELIVERED = DROPPED | {signal.SIGSTOP, signal.SIGTRAP}


def install() -> bool:
    """Make wandb start its service through the shim (before the run starts); False where wandb has no
    wandb-core launcher to redirect (then nothing changes)."""
    # wandb is heavy and optional, and this file also runs as a standard-library-only script (the shim)
    from capsdist.compat import wandb as wandb_private

    real = wandb_private.core_path_getter()
    if getattr(real, "capsdist_shield", False):
        return True
    shim = _shim_script(real())

    def get_core_path() -> str:
        """The shim, which runs the real wandb-core (see capsdist.cluster.wandb_shield)."""
        _ = real()  # keeps wandb's own "not available on this platform" error
        return str(shim)

    get_core_path.capsdist_shield = True  # type: ignore[attr-defined]
    return wandb_private.redirect_core_path(get_core_path)


def _shim_script(core: str) -> Path:
    """An executable that runs this file with this Python and the real wandb-core path (written once per user)."""
    text = f"#!/bin/sh\nexec '{sys.executable}' '{Path(__file__).resolve()}' '{core}' \"$@\"\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    path = Path(tempfile.gettempdir()) / f"capsdist-wandb-core-{os.getuid()}-{digest}.sh"
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return path


def _ptrace(libc: ctypes.CDLL, request: int, pid: int, data: int) -> int:
    return libc.ptrace(ctypes.c_long(request), ctypes.c_long(pid), None, ctypes.c_void_p(data))


def _leave_with(parent: int) -> None:
    """Exit the shim once ``parent`` (the training process) has gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def run(argv: list[str]) -> int:
    """The shim: run ``argv`` (wandb-core and its flags) traced, dropping the job's signals; its exit status."""
    for sig in DROPPED:
        signal.signal(sig, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    # wandb-core exits when its parent is not the --pid it was given: that is now this shim, which leaves (and so
    # detaches and ends wandb-core) once the training process is gone
    if "--pid" in argv[:-1]:
        argv[argv.index("--pid") + 1] = str(os.getpid())
    threading.Thread(target=_leave_with, args=(os.getppid(),), daemon=True).start()
    child = os.fork()
    if child == 0:
        traced = _ptrace(libc, PTRACE_TRACEME, 0, 0) == 0
        if not traced:
            print(f"capsdist: cannot shield wandb-core from the job's signals (ptrace: "
                  f"{os.strerror(ctypes.get_errno())})", file=sys.stderr)  # fmt: skip
        for sig in DROPPED:  # wandb-core installs its own handlers; restore the defaults it expects
            signal.signal(sig, signal.SIG_DFL)
        os.environ["GODEBUG"] = ",".join(filter(None, [os.environ.get("GODEBUG"), "asyncpreemptoff=1"]))
        try:  # (asyncpreemptoff: Go's preemption signal would stop the tracee thousands of times a second)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    options_set = False
    while True:
        try:
            pid, status = os.waitpid(-1, WALL)
        except ChildProcessError:
            return 1
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            if pid == child:
                return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            continue
        if not os.WIFSTOPPED(status):
            continue
        if not options_set and pid == child:
            _ptrace(libc, PTRACE_SETOPTIONS, child, PTRACE_O_TRACE_CHILDREN)
            options_set = True
        sig, event = os.WSTOPSIG(status), status >> 16
        deliver = sig if event == 0 and sig not in NOT_DELIVERED else 0
        _ptrace(libc, PTRACE_CONT, pid, deliver)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
