"""A serving process keeps the memory it frees for the next batch instead of handing it back to the kernel.

By default glibc's malloc returns large freed blocks to the kernel: a block above its mmap threshold (which it
moves between 128 KiB and 32 MiB) is unmapped when freed, and the heap is cut back whenever its free top
exceeds twice that threshold.  A server's forward allocates and frees the same activation sizes every batch,
so each batch takes that memory back from the kernel page by page, every 4 KiB page a fault that the kernel
zeroes: on the reference model a 32-row prefill took about 187,000 faults (730 MB), and ran 9-14% faster
without them (bench/bench_serve.py).  `keep_freed_memory` fixes both thresholds high (mallopt): freed
activations stay in the process and the next batch reuses them without a fault.  The price is that the
resident size stays at the largest batch's working set instead of shrinking between batches, which is what a
server wants anyway.

Only glibc (Linux) has these settings; elsewhere nothing changes.  `loralab serve --release-memory` keeps
the defaults.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 1 << 28     # 256 MiB: blocks below it come from the heap and are reused
TRIM_THRESHOLD = 1 << 30     # 1 GiB of free heap top before any of it is returned
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # malloc.h


def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed memory (module docstring).  True when it did (glibc), False
    where the process's C library has no such settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl and others have no mallopt thresholds
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)      # both set, whatever the first answers
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)
