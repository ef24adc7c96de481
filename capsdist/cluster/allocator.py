"""Keep freed memory in the training process instead of handing it back to the OS after every step.

glibc returns the top of its heap to the OS whenever more than M_TRIM_THRESHOLD is free there (a dynamic value
that follows the largest block freed, up to 64 MB), and serves blocks above M_MMAP_THRESHOLD with a fresh mmap.
A training step frees tens of MB of activations and priors at its end and asks for them again at the next
start, so every step paid thousands of page faults re-zeroing the same memory: 900 to 5,300 minor faults per
quickstart step on CPU, up to a fifth of its time, varying run to run (docs/benchmarks.md). Fixed thresholds keep
blocks up to 1 GiB on the heap and the freed memory there for the next step, as a caching allocator does; the
process's peak memory is unchanged, it just no longer drops between steps. Only glibc has these knobs.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
KEEP = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds to 1 GiB for this process (and the workers it forks); False where
    the C library is not glibc (then nothing changes)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP))
