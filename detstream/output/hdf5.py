"""HDF5 files written atomically: an h5py file on a temporary name that appears under its
final name only if everything succeeded, with h5py's failures raised as OSErrors naming it.

A full disk must never reach HDF5. When HDF5 meets ENOSPC while it flushes a file (at close,
or when its caches evict), the close fails half-way: HDF5 has already freed part of the file's
internal state (``H5F__dest``: "Disable slist on flush dest failure failed") but keeps the file
id registered. Anything that touches that id again (closing it a second time, h5py's
``ObjectID.__dealloc__`` when the Python object is collected, or HDF5's own clean-up at
interpreter exit) reads freed memory: SIGSEGV. There is no safe way to close such a file.

So every writer here reserves the disk space its file can grow to *before* HDF5 writes a byte:
the file is allocated up to a computed upper bound (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``:
blocks owned by the file, beyond its end, so HDF5's own idea of the file's size is untouched)
and HDF5's writes land in blocks the file already owns. A reservation that does not fit is a
plain :class:`DiskFull` (naming the file, the bytes needed and the bytes free) raised before
HDF5 was asked to write anything, and the file is closed cleanly. What the file did not use is
given back (a hole punched past its end) before it is renamed into place.

Should HDF5 still fail to close a file (a bound was wrong, or the file system cannot
reserve), the file is *quarantined*: never touched again, and the process ends at exit with
``os._exit(1)`` instead of letting HDF5's teardown crash it (see :func:`quarantined`).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import io
import logging
import os
import resource
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..atomic import AtomicFile, atomic_output, io_error
from ..errors import DetstreamError

log = logging.getLogger("detstream.output.hdf5")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
#: Reservations grow in steps of this many bytes, so a writer makes one call per MiB written.
RESERVE_STEP = 1 << 20


class DiskFull(DetstreamError, OSError):
    """A file's disk has less room than the write needs; nothing was written to it (its parts,
    for a merge, are kept)."""


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to an unprivileged writer on the file system holding ``path`` (or its folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n:,} bytes)"


def disk_full(path: str | os.PathLike, needed: int, free: Optional[int] = None, *,
              what: str = "the write", note: str = "") -> DiskFull:
    """The DiskFull error for ``path``: the bytes ``what`` needs, the bytes free."""
    free = free_bytes(path) if free is None else free
    err = DiskFull(errno.ENOSPC, f"not enough space to write {path}: {what} needs about {_mib(needed)} "
                                 f"and {_mib(free)} are free{note}")
    err.path, err.needed, err.free = str(path), int(needed), int(free)
    return err


def _libc_fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate() if sys.platform.startswith("linux") else None


class Reservation:
    """Disk blocks held for a file being written, past its end, so that its writer cannot meet a
    full disk: ``ensure(n)`` makes the file own its first ``n`` bytes (DiskFull if they do not
    fit), ``release()`` gives back what it did not use. Where the file system cannot reserve
    (no ``fallocate``), ``ensure`` checks the free space instead: a guard, not a guarantee."""

    def __init__(self, tmp: Path, path: Path, what: str):
        self.tmp, self.path, self.what = Path(tmp), Path(path), what
        self.reserved = 0
        self._native = _fallocate is not None
        try:
            self._fd: Optional[int] = os.open(self.tmp, os.O_WRONLY)
        except OSError as e:
            raise io_error(e, self.path, "creating") from e

    def ensure(self, nbytes: int) -> None:
        """Hold at least ``nbytes`` for the file (rounded up to RESERVE_STEP when it grows)."""
        if nbytes <= self.reserved:
            return
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and nbytes > limit:
            raise OSError(errno.EFBIG, f"writing {self.path} failed: {self.what} needs about {_mib(int(nbytes))} "
                                       f"and this process may write files of at most {_mib(int(limit))}")
        want = -(-int(nbytes) // RESERVE_STEP) * RESERVE_STEP
        if self._native:
            if _fallocate(self._fd, _FALLOC_FL_KEEP_SIZE, 0, want) == 0:
                self.reserved = want
                return
            code = ctypes.get_errno()
            if code in (errno.ENOSPC, errno.EDQUOT):
                # Not the rounded step: the exact need may still fit.
                if want > nbytes and _fallocate(self._fd, _FALLOC_FL_KEEP_SIZE, 0, int(nbytes)) == 0:
                    self.reserved = int(nbytes)
                    return
                raise disk_full(self.path, int(nbytes) - self._allocated(), what=self.what)
            if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise io_error(OSError(code, os.strerror(code)), self.path, "reserving space for")
            self._native = False  # e.g. a file system without fallocate: check instead
        more, free = int(nbytes) - self._allocated(), free_bytes(self.tmp)
        if more > free:
            raise disk_full(self.path, more, free, what=self.what)
        self.reserved = int(nbytes)

    def _allocated(self) -> int:
        with suppress(OSError):
            return os.fstat(self._fd).st_blocks * 512
        return 0

    def release(self) -> None:
        """Give back the reserved blocks past the file's end; close the reservation."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._native and self.reserved:
                size = os.fstat(fd).st_size
                if size > self.reserved:  # a bound that is wrong: on a full disk HDF5 would have failed
                    log.warning("%s outgrew the room reserved for it: %d bytes, %d reserved", self.path,
                                size, self.reserved)
                if self.reserved > size:
                    # tmpfs and xfs give blocks past the end back to a punched hole; ext4 ignores a
                    # hole past the end but frees them on any truncate, even to the same size.
                    _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, size, self.reserved - size)
                    os.ftruncate(fd, size)
        except OSError:
            pass
        finally:
            os.close(fd)


# The global heap HDF5 keeps variable-length data in: collections of at least 4 KiB, each
# object a 16-byte header and its bytes padded to 8; a dataset element is a 16-byte reference.
_HEAP_COLLECTION = 4096
_HEAP_OBJECT_HEADER = 16
_VLEN_REFERENCE = 16
#: HDF5's own bytes in counted.h5 beyond its data: superblock, groups, object headers, attributes.
COUNTS_METADATA = 1 << 20


def counts_bound(n_positions: int, frame_shape: Sequence[int], event_counts: np.ndarray,
                 attrs_bytes: int = 0) -> int:
    """An upper bound on the bytes of a counted.h5 of ``n_positions`` positions whose written
    frames hold ``event_counts`` events each (empty ones are stored as nothing): what the
    merge reserves before it writes.

    A heap collection is filled until the next object does not fit, so each one wastes less than
    the largest object that shares collections (those up to half a collection); larger objects
    are counted as a collection each."""
    counts = np.asarray(event_counts, np.int64)
    need = _HEAP_OBJECT_HEADER + ((counts[counts > 0] * 4 + 7) // 8) * 8
    half = _HEAP_COLLECTION // 2 - 2 * _HEAP_OBJECT_HEADER
    small, big = need[need <= half], need[need > half]
    heap = int(np.maximum(big + 2 * _HEAP_OBJECT_HEADER, _HEAP_COLLECTION).sum())
    if small.size:
        room = _HEAP_COLLECTION - 2 * _HEAP_OBJECT_HEADER - int(small.max())
        heap += -(-int(small.sum()) // room) * _HEAP_COLLECTION + _HEAP_COLLECTION
    pixels = int(frame_shape[0]) * int(frame_shape[1])
    n = int(n_positions)
    from .virtual import IMAGE_NAMES

    # frames (references), scan_positions (int64), stem/images (one float64 image per name: BF,
    # ADF, centre of mass x and y), summed pattern (uint64)
    return (heap + n * _VLEN_REFERENCE + n * 8 + len(IMAGE_NAMES) * n * 8 + pixels * 8
            + COUNTS_METADATA + 2 * int(attrs_bytes))


_EMPTY_IMAGE: Optional[bytes] = None


def _empty_image() -> bytes:
    """The bytes of a new, empty HDF5 file (what ``h5py.File(path, "w")`` would write)."""
    global _EMPTY_IMAGE
    if _EMPTY_IMAGE is None:
        buf = io.BytesIO()
        with h5py.File(buf, "w"):
            pass
        _EMPTY_IMAGE = buf.getvalue()
    return _EMPTY_IMAGE


def open_reserved(tmp: Path, path: Path, nbytes: int, what: str) -> tuple[h5py.File, Reservation]:
    """``tmp`` (an existing empty file) as a new HDF5 file open for writing, ``nbytes`` reserved
    for it first. HDF5 creating the file itself would truncate it (and, on ext4, the
    reservation with it): the empty file is written here, then opened read-write."""
    image = _empty_image()
    try:
        with open(tmp, "r+b") as fh:
            fh.write(image)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, max(int(nbytes), len(image)), what=what) from e
        raise io_error(e, path, "creating") from e
    reservation = Reservation(tmp, path, what)
    try:
        reservation.ensure(max(int(nbytes), len(image)))
        f = h5py.File(tmp, "r+")
    except (OSError, RuntimeError) as e:
        reservation.release()
        if isinstance(e, DiskFull):
            raise
        raise io_error(e, path, "creating") from e
    return f, reservation


# --- files HDF5 could not close ------------------------------------------------------------

_QUARANTINE: list = []


def quarantined() -> bool:
    """True once an HDF5 file of this process failed to close: touching it again, or letting the
    interpreter tear it down, would crash the process, so it ends with ``os._exit(1)`` at exit."""
    return bool(_QUARANTINE)


def _quarantine(f: h5py.File, path: Path) -> None:
    # Strong references, never released: h5py's __dealloc__ would close the id again.
    with suppress(Exception):
        _QUARANTINE.append((f, f.id))
    log.error("HDF5 could not close %s; its file id is left alone and this process will end "
              "with os._exit(1) rather than let HDF5 tear it down", path)


@atexit.register  # registered at import: runs after the handlers registered later
def _exit_without_hdf5_teardown() -> None:
    if not _QUARANTINE:
        return
    with suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(1)


def close_h5(f: h5py.File, path: Path) -> None:
    """Close an HDF5 file being written; HDF5 reports deferred write failures (full disk) here.
    A file whose close failed is quarantined, never closed again (that is what crashes)."""
    try:
        f.close()
    except (OSError, RuntimeError) as e:
        _quarantine(f, path)
        raise io_error(e, path) from e


def force_close(f: h5py.File, path: Optional[Path] = None) -> None:
    """Close ``f`` on a failure path, once: if HDF5 cannot close it, it is quarantined."""
    try:
        f.close()
    except Exception:
        _quarantine(f, path or Path(getattr(f, "filename", "?")))


@contextmanager
def h5_output(path: str | os.PathLike, *, overwrite: bool, reserve: Optional[int] = None,
              what: str = "the write") -> Iterator[h5py.File]:
    """An HDF5 file open for writing that appears under ``path`` only if everything succeeded.
    With ``reserve``, that many bytes are held for it before HDF5 writes (DiskFull if they do
    not fit), and what it did not use is given back before it is renamed into place."""
    if reserve is None:
        with atomic_output(path, overwrite=overwrite) as tmp:
            try:
                f = h5py.File(tmp, "w")
            except (OSError, RuntimeError) as e:
                raise io_error(e, Path(path), "creating") from e
            try:
                yield f
            except BaseException:
                force_close(f, Path(path))
                raise
            close_h5(f, Path(path))
        return
    target = AtomicFile(path, overwrite)
    try:
        f, reservation = open_reserved(target.tmp, target.path, reserve, what)
    except BaseException:
        target.discard()
        raise
    try:
        try:
            yield f
        except BaseException:
            force_close(f, target.path)
            raise
        close_h5(f, target.path)
    except OSError as e:
        reservation.release()
        target.discard()
        if str(target.path) in str(e):
            raise
        raise io_error(e, target.path) from e
    except BaseException:
        reservation.release()
        target.discard()
        raise
    reservation.release()
    target.commit()
