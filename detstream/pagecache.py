"""Page-cache control and probes: drop a file's pages, count its cached pages, count storage reads.

The file workflow evicts what it writes so the next stage reads storage, not memory, and proves it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Optional, Union

import numpy as np

__all__ = ["cached_pages", "evict", "storage_read_bytes"]


def evict(fd: int) -> None:
    """Drop a file's clean pages from the page cache, so the next read comes from storage.

    Dirty pages are not dropped: fsync first.
    """
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def storage_read_bytes() -> Optional[int]:
    """Bytes this process has caused to be read from storage (``read_bytes`` in /proc/self/io),
    or None where the kernel does not report it. Page-cache hits do not count."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


_libc = None


def cached_pages(path: Union[str, os.PathLike]) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in the file), from mincore(2).

    Lets a test or benchmark check that a file was evicted, i.e. that the next stage will read
    it from storage.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        _libc.mincore.restype = ctypes.c_int
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 0, 0
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        view = np.frombuffer(mm, dtype=np.uint8)  # only to learn the mapping's address
        try:
            if _libc.mincore(ctypes.c_void_p(view.ctypes.data), size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore on {path}: {os.strerror(err)}")
        finally:
            del view
        resident = int(np.count_nonzero(np.frombuffer(vec.raw, dtype=np.uint8) & 1))
        return resident, pages
    finally:
        mm.close()
