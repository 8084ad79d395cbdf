"""Keep freed message buffers in the process's heap, so that the next message reuses them warm.

A batch of full sector blocks is ~10 MB. glibc serves an allocation that large with a fresh
mmap, trims it off the heap's top once freed, and unmaps a thread arena's heap (libzmq's I/O
thread allocates what it receives in one) once all of it is free -- as an ACK that releases many
batches at once makes it. So received batches kept faulting in fresh pages: in the aggregator
twice the faults per GB of the same bytes through a raw hop. Raised mmap and trim thresholds and
one arena for every thread keep freed batches in the heap for the next receive. Peak memory is
unchanged (the window or the partial frames still bound what is held at once); only freed
memory stays mapped instead of going back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("detstream.heap")

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): larger messages still map.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the heap's top up to this stays mapped.
TRIM_THRESHOLD = 1 << 30

_done = False


def keep_freed_buffers() -> bool:
    """Set the thresholds once per process; False where the C library is not glibc (no-op).

    Call it before the process starts threads: one that already took an arena of its own keeps
    it, and a later thread (libzmq's) may be handed that arena instead of the main one."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version  # glibc only: mallopt's parameters are glibc's
    except (OSError, AttributeError):
        return False
    del gnu
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            and mallopt(_M_ARENA_MAX, 1)):
        log.warning("mallopt refused the heap thresholds; large messages will be mapped afresh")
        return False
    _done = True
    return True
