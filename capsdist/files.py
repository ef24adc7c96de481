"""Atomic file writes that respect the umask, for everything data_prep and downloads create.

``tempfile.mkstemp`` creates 0600 files and a rename keeps that mode, so shards and downloads were unreadable to
teammates on a shared filesystem whatever their umask; files here get ``0666 & ~umask``, like ``open()``'s.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
    """Write ``dest`` via ``fill(fileobj)`` into a hidden temporary sibling, fsync, then rename: ``dest`` is
    either absent or complete, and gets the mode a plain ``open()`` would give it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
