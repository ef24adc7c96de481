"""The one atomic writer: every file capsdist creates (checkpoints, shards, downloads, weights) is either absent or
complete, gets the mode a plain ``open()`` would give it, and survives a crash of the node once written. And no file
is written or read through a symbolic link planted where capsdist keeps its own files (a shared run folder, a
sharded checkpoint directory): :func:`no_follow_opener` for files opened in place, :func:`refuse_links` for a folder
before a run writes into it (the atomic writer's rename replaces a link at the final name, never its target).

``tempfile.mkstemp`` creates 0600 files and a rename keeps that mode, so shards and downloads were unreadable to
teammates on a shared filesystem whatever their umask; files here get ``0666 & ~umask``, like ``open()``'s. The
temp file lives beside the target, so the rename never crosses filesystems (a mounted runs/ stays atomic).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from capsdist.core.errors import CapsdistError


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
        if full is not None and (full is not err or not full.filename):  # the error names the file it hit
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


class LinkedPathError(CapsdistError):
    """A symbolic link or special file (FIFO, device, socket) where capsdist writes or reads a file of its own."""


def describe(path: Path) -> str:
    """What a non-regular ``path`` is, from lstat: "a symbolic link to TARGET", "a FIFO", ..."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link to {os.readlink(path)}"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def not_regular(path: Path) -> LinkedPathError:
    """The refusal of a link or special file found where capsdist opens one of its own files."""
    return LinkedPathError(
        f"{path} is {describe(path)}, and capsdist opens its own files only as regular files, never through a link "
        "(a link planted in a shared folder would make it overwrite or read a file elsewhere) or a FIFO/device "
        f"(it would block or read without end); nothing was written through it. Fix: remove it (`rm {path}`; a "
        "link's target is untouched) and rerun."
    )


def no_follow_opener(path: str, flags: int) -> int:
    """For ``open(path, mode, opener=no_follow_opener)``: opens ``path`` only if it is a regular file (or creates
    one), never following a symbolic link at it (O_NOFOLLOW) nor blocking on a FIFO; else LinkedPathError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as err:  # ELOOP: a link; ENXIO: a FIFO without a reader (opened to write); EISDIR: a folder
        if err.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        raise not_regular(Path(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO opened to read, a device
        os.close(fd)
        raise not_regular(Path(path))
    os.set_blocking(fd, True)
    return fd


def refuse_links(root: Path, owned: tuple[str, ...], allowed: tuple[str, ...] = ()) -> None:
    """Refuse a run folder (before a run writes into it) whose entries of capsdist's own (``owned``: names or
    ``*`` patterns at its top level, folders walked to any depth) hold a symbolic link or special file, but those
    matching an ``allowed`` pattern: capsdist would write through a link to a file or folder outside (``mkdir``,
    ``open``) and block on a FIFO. Other entries are not capsdist's and not looked at (a run folder of ``.`` may
    hold a venv's links)."""
    tops = [p for p in (root.iterdir() if root.is_dir() else ()) if any(p.match(name) for name in owned)]
    for top in tops:
        walked = os.walk(top) if top.is_dir() and not top.is_symlink() else ()
        entries = [top, *(Path(folder, name) for folder, dirs, files in walked for name in [*dirs, *files])]
        for path in entries:  # links to folders are listed by os.walk, never entered
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:  # removed while walking
                continue
            relative = path.relative_to(root)
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                continue
            if stat.S_ISLNK(mode) and any(len(relative.parts) == p.count("/") + 1 and relative.match(p)
                                          for p in allowed):  # fmt: skip
                continue
            raise LinkedPathError(
                f"the run folder {root} holds {relative}, {describe(path)}; capsdist writes its files there (the "
                "lock, config.yaml, logs, checkpoints, predictions, figures, the W&B run id) and never through a link "
                "or into a FIFO or device, as a link planted in a shared run folder would make the run overwrite a "
                f"file outside it. Nothing was written. Fix: remove it (`rm {path}`; a link's target is untouched) "
                "and rerun."
            )


# filesystems of the kernel's own objects: their folders accept no new folder or file (mkdir: ENOENT or EPERM)
KERNEL_FILESYSTEMS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "tracefs", "securityfs",
                                "configfs", "pstore", "bpf", "efivarfs"})  # fmt: skip


def _filesystem(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount that holds ``path`` (/proc/self/mountinfo; ("", "") elsewhere)."""
    found = ("", "")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(" ")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # "\040" is a space
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(found[0]):
            found = (point, fields[fields.index("-") + 1])  # the last mount on a point is the one seen
    return found


def unwritable(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be created or written into (None: it can), found without writing anything: the nearest
    part of it that exists must be a folder this user may write, on a writable filesystem that holds files."""
    folder = Path(os.path.abspath(folder))
    base = next(p for p in (folder, *folder.parents) if p.exists()).resolve()
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable by this user"
    if os.statvfs(base).f_flag & os.ST_RDONLY:
        return f"{base} is on a read-only filesystem"
    point, kind = _filesystem(base)
    if kind in KERNEL_FILESYSTEMS:
        return f"{point} is the kernel's {kind} filesystem, where no folder can be created"
    return None
