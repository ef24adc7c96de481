"""The one atomic writer: every file capsdist creates (checkpoints, shards, downloads, weights) is either absent or
complete, gets the mode a plain ``open()`` would give it, and survives a crash of the node once written.

``tempfile.mkstemp`` creates 0600 files and a rename keeps that mode, so shards and downloads were unreadable to
teammates on a shared filesystem whatever their umask; files here get ``0666 & ~umask``, like ``open()``'s. The
temp file lives beside the target, so the rename never crosses filesystems (a mounted runs/ stays atomic).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (os.umask would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(dest: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write ``dest`` via ``fill(fileobj)`` into a hidden temporary sibling (``.NAME.XXXX.tmp``), fsync, rename,
    fsync the folder. A kill mid-write leaves the old file intact plus the temp file; a full disk or a file-size
    limit leaves the old file intact and raises the OSError that ``capsdist.core.errors.user_errors`` reports (also
    when a writer such as ``torch.save`` wraps it in a RuntimeError)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full(err)
        if full is not None and full is not err:
            raise OSError(full.errno, full.strerror, full.filename or str(dest)) from err
        raise
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash of the node
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def _disk_full(err: BaseException | None) -> OSError | None:
    """The out-of-space error (disk full, quota, file-size limit) behind ``err``, if any; the earliest one that
    names a file when a save on the way out (interrupted.ckpt) failed like the first (cause/context chain)."""
    found = None
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            found = err if found is None or err.filename else found
        err = err.__cause__ or err.__context__
    return found
