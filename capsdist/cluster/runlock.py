"""One fit per run folder: an exclusive ``flock`` on ``<run folder>/.fit.lock``, held for the whole fit.

The kernel drops the lock when the holding process dies, kill -9 included, so a crash never blocks the resume;
forked children (DataLoader workers) close their copy at once, so an orphaned worker cannot hold it either. Only
global rank 0 takes it (it writes checkpoints and logs; the other ranks of the same fit write only inside it). On
a shared filesystem (NFS) Linux turns ``flock`` into a POSIX lock that other nodes see, hence a file opened for
writing rather than the folder itself.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from capsdist.core.errors import CapsdistError
from capsdist.core.files import no_follow_opener

LOCK_FILE = ".fit.lock"
_HELD: list[RunLock] = []  # the locks this process holds (their descriptors are closed in forked children)


class RunFolderLocked(CapsdistError):
    """Another fit is running in the same run folder."""


def _forget_in_child() -> None:
    for lock in _HELD:
        os.close(lock.fd)  # the parent keeps its lock: flock belongs to the open file, not to this descriptor
        lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """The run folder's lock, held from :meth:`acquire` until :meth:`release` (or this process's end)."""

    def __init__(self, root: str | Path) -> None:
        """``root``: the run folder (trainer.default_root_dir)."""
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []  # what acquire created, for discard()

    def acquire(self) -> RunLock:
        """Take the lock or raise RunFolderLocked naming the PID that holds it; never waits. A link (or FIFO) at the
        lock's name is refused, never opened: the PID would truncate its target."""
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]  # deepest first
        self.root.mkdir(parents=True, exist_ok=True)
        self.created = ([] if os.path.lexists(self.path) else [self.path]) + missing
        fd = no_follow_opener(str(self.path), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderLocked(
                f"another fit is running in the run folder {self.root} (process {holder} holds {self.path}); two "
                "fits into one folder would overwrite each other's checkpoints. Fix: wait for it to end (or stop "
                "it), or start this run in another folder (--trainer.default_root_dir runs/NEW_NAME)."
            ) from None
        self.fd = fd
        _HELD.append(self)
        return self

    def record_pid(self) -> None:
        """Write this process's PID into the lock file, for the message a second fit prints."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self, discard: bool = False) -> None:
        """Drop the lock; ``discard``: also remove the lock file and folders that acquire created (a refusal)."""
        if self.fd is None:
            return
        if discard:
            for path in self.created:  # the lock file, then the folders it made, deepest first
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                elif path.is_file():
                    path.unlink()
        _HELD.remove(self)
        os.close(self.fd)
        self.fd = None


def release_all() -> None:
    """Drop every run-folder lock this process holds (the end of an in-process CLI call, whatever its outcome)."""
    for lock in list(_HELD):
        lock.release()
