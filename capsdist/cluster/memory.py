"""How much memory this process may still allocate, and what bounds it: the host's free memory (MemAvailable), the
memory limit of the control group it runs in (a SLURM job's or a container's: cgroup v2 ``memory.max``, v1
``memory.limit_in_bytes``, each level up to the root), and its address-space limit (``ulimit -v``). Read from
/proc and /sys (Linux); a bound that cannot be read is left out."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import NamedTuple

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


class Room(NamedTuple):
    """``bytes`` this process may still allocate under one bound; ``bound``: what it is, for messages; ``shared``:
    the processes of the host or job draw on it together (an address-space limit is each process's own)."""

    bytes: int
    bound: str
    shared: bool


def _fields(path: Path) -> dict[str, int]:
    """``name value`` lines (memory.stat) or ``Name: value kB`` lines (/proc/meminfo, /proc/self/status) as bytes
    (kB scaled), or {} when unreadable."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, *value = line.replace(":", " ").split()
        if value and value[0].isdigit():
            out[name] = int(value[0]) * (1024 if value[1:] == ["kB"] else 1)
    return out


def _number(path: Path) -> int | None:
    """A cgroup file's one number; None for "max", no limit, or an unreadable file."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < UNLIMITED else None


def _cgroup_levels() -> list[tuple[Path, str, str, str]]:
    """(folder, limit file, usage file, page-cache field) of this process's memory cgroup and each level above it."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount, files = CGROUP_ROOT, ("memory.max", "memory.current", "file")
        elif "memory" in controllers.split(","):
            mount, files = CGROUP_ROOT / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
        else:
            continue
        own = mount / path.lstrip("/")
        if not own.is_dir():  # a container sees its own cgroup as the mount's root
            own = mount
        if (own / files[0]).exists():
            return [(level, *files) for level in (own, *own.parents) if level == mount or mount in level.parents]
    return []


def memory_room() -> list[Room]:
    """Every readable bound on what this process may still allocate (module docstring)."""
    rooms = []
    if "MemAvailable" in (meminfo := _fields(Path("/proc/meminfo"))):
        rooms.append(Room(meminfo["MemAvailable"], "the host's free memory (MemAvailable)", True))
    for folder, limit_file, usage_file, cache in _cgroup_levels():
        limit, usage = _number(folder / limit_file), _number(folder / usage_file)
        if limit is not None and usage is not None:
            reclaimable = _fields(folder / "memory.stat").get(cache, 0)  # page cache gives way under the limit
            bound = f"the memory limit of its cgroup ({folder / limit_file}: {limit / 2**30:.1f} GiB)"
            rooms.append(Room(max(0, limit - usage + reclaimable), bound, True))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = _fields(Path("/proc/self/status")).get("VmSize", 0)
        rooms.append(Room(max(0, soft - mapped), f"its address-space limit (ulimit -v {soft // 1024})", False))
    return rooms
