"""Writing what a scan produces: counted data in stempy's HDF5 layout, per-node parts and their
merge, a virtual bright-field image, a PNG of it and a JSON summary.

Every file is written under a temporary name in its destination directory and renamed into
place only once complete, flushed and closed, so a file under its final name is always whole;
on failure the temporary file is removed.

stempy layout (what ``stempy.io.load_electron_counts`` reads, format version 3):

* root attribute ``version`` = 3;
* ``electron_events/frames``: 1-D vlen uint32, one entry per scan position, each the flat
  pixel indices (``row * frame_cols + col``) of that frame's events; attributes
  ``Nx`` = frame **rows**, ``Ny`` = frame **cols** (stempy reads ``frame_shape = (Nx, Ny)``
  and reshapes frames with it, so for a non-square detector Nx is the height);
* ``electron_events/scan_positions``: int64 ``arange(width * height)``; attributes
  ``Nx`` = scan **width**, ``Ny`` = scan **height** (stempy reverses them into
  ``scan_shape = (height, width)``); position index = ``y * width + x``;
* ``metadata`` group: user attributes (nested dicts become subgroups), loaded by stempy into
  ``SparseArray.metadata``.
"""

from __future__ import annotations

import errno as errno_mod
import json
import math
import os
import re
import secrets
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
from .storage import fsync_dir, fsync_file

STEMPY_FORMAT_VERSION = 3
PART_FORMAT_VERSION = 1
_VLEN_U32 = h5py.vlen_dtype(np.uint32)
_WRITE_BLOCK = 4096  # scan positions per HDF5 write when writing a whole dataset

__all__ = [
    "STEMPY_FORMAT_VERSION",
    "BlockAccumulator",
    "DiskEstimate",
    "MergeReport",
    "Part",
    "PartWriter",
    "VirtualBrightField",
    "disk_mask",
    "estimate_disk",
    "merge_parts",
    "read_part",
    "summed_pattern",
    "to_uint8",
    "virtual_bright_field",
    "write_counts",
    "write_png",
    "write_summary",
]


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------


def _temp_path(path: Path) -> Path:
    """Create an empty, uniquely named hidden file next to ``path`` (umask-respecting mode)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno_mod.EEXIST, f"no free temporary name next to {path}")


def _io_error(exc: BaseException, path: Path, doing: str = "writing") -> OSError:
    """An OSError naming ``path`` for a failed I/O, keeping the errno (h5py reports some
    write failures, e.g. a full disk found at close, as RuntimeError with errno in the text)."""
    code = getattr(exc, "errno", None)
    if code is None:
        m = re.search(r"errno = (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    detail = " ".join(str(exc).split())
    msg = f"{doing} {path} failed: {detail}"
    return OSError(code, msg) if code else OSError(msg)


def _refuse(path: Path) -> FileExistsError:
    return FileExistsError(
        errno_mod.EEXIST, f"{path} already exists; pass overwrite=True to replace it"
    )


class _AtomicFile:
    """A temporary file that becomes ``path`` on ``commit`` and disappears on ``discard``."""

    def __init__(self, path: str | os.PathLike, overwrite: bool):
        self.path = Path(path)
        self.overwrite = overwrite
        if not overwrite and self.path.exists():
            raise _refuse(self.path)
        try:
            self.tmp = _temp_path(self.path)
        except OSError as e:
            raise _io_error(e, self.path, "creating") from e

    def commit(self) -> None:
        """Flush the temp file to disk and rename it into place (no-clobber unless overwrite)."""
        try:
            fsync_file(self.tmp)
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                self._link_into_place()
            fsync_dir(self.path.parent)
        except FileExistsError:
            self.discard()
            raise _refuse(self.path) from None
        except OSError as e:
            self.discard()
            raise _io_error(e, self.path, "renaming into") from e

    def _link_into_place(self) -> None:
        # link() fails if the target appeared meanwhile, which os.replace would clobber.
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # filesystem without hard links: check, then rename
            if self.path.exists():
                raise FileExistsError(errno_mod.EEXIST, str(self.path)) from None
            os.replace(self.tmp, self.path)
            return
        with suppress(OSError):  # the file is in place; a leftover temp name is harmless
            os.unlink(self.tmp)

    def discard(self) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _annotate(exc: BaseException, path: Path) -> None:
    if hasattr(exc, "add_note") and not isinstance(exc, OSError):
        exc.add_note(f"while writing {path}; it was not written")


@contextmanager
def _atomic_output(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp path to write; rename it to ``path`` when the block succeeds, else delete it."""
    target = _AtomicFile(path, overwrite)
    try:
        yield target.tmp
    except OSError as e:
        target.discard()
        if str(target.path) in str(e):
            raise
        raise _io_error(e, target.path) from e
    except BaseException as e:
        target.discard()
        _annotate(e, target.path)
        raise
    target.commit()


def _close_h5(f: h5py.File, path: Path) -> None:
    """Close an HDF5 file being written; HDF5 reports deferred write failures (full disk) here."""
    try:
        f.close()
    except (OSError, RuntimeError) as e:
        _force_close(f)
        raise _io_error(e, path) from e


def _force_close(f: h5py.File) -> None:
    # After a failed close h5py can leave the file id open; close it again so no fd leaks.
    with suppress(Exception):
        f.close()
    with suppress(Exception):
        if f.id.valid:
            f.id.close()


@contextmanager
def _h5_output(path: str | os.PathLike, *, overwrite: bool) -> Iterator[h5py.File]:
    """An HDF5 file open for writing that appears under ``path`` only if everything succeeded."""
    with _atomic_output(path, overwrite=overwrite) as tmp:
        try:
            f = h5py.File(tmp, "w")
        except (OSError, RuntimeError) as e:
            raise _io_error(e, Path(path), "creating") from e
        try:
            yield f
        except BaseException:
            _force_close(f)
            raise
        _close_h5(f, Path(path))


# --------------------------------------------------------------------------------------------
# Validation and HDF5 helpers
# --------------------------------------------------------------------------------------------


def _frame_shape(frame_shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in frame_shape)
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"frame_shape must be (rows, cols) of positive ints, got {frame_shape!r}")
    return shape  # type: ignore[return-value]


def _scan_size(scan_width: int, scan_height: int) -> int:
    if int(scan_width) <= 0 or int(scan_height) <= 0:
        raise ValueError(f"scan size must be positive, got {scan_width}x{scan_height}")
    return int(scan_width) * int(scan_height)


def _as_events(events: Any, n_pixels: int, where: str) -> np.ndarray:
    """One frame's events as a contiguous uint32 array, checked to be pixel indices of the frame."""
    arr = np.asarray(events)
    if arr.ndim != 1:
        raise ValueError(f"{where}: events must be 1-D flat pixel indices, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.uint32)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{where}: events must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_pixels:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: event index {bad} outside a frame of {n_pixels} pixels")
    return np.ascontiguousarray(arr, dtype=np.uint32)


def _vlen_block(arrays: Sequence[np.ndarray]) -> np.ndarray:
    # Built element by element: numpy would turn equal-length arrays into a 2-D array, which
    # h5py's __setitem__ then refuses to write into a 1-D vlen dataset.
    block = np.empty(len(arrays), dtype=_VLEN_U32)
    for i, a in enumerate(arrays):
        block[i] = a
    return block


def _write_vlen_slice(dset: h5py.Dataset, start: int, block: np.ndarray) -> None:
    dset.write_direct(block, dest_sel=np.s_[start : start + len(block)])


def _write_vlen_points(dset: h5py.Dataset, points: np.ndarray, block: np.ndarray) -> None:
    """Write ``block[i]`` to element ``points[i]`` in any order, in one HDF5 call."""
    fspace = dset.id.get_space()
    fspace.select_elements(np.asarray(points, dtype=np.uint64).reshape(-1, 1))
    mspace = h5py.h5s.create_simple((len(block),))
    dset.id.write(mspace, fspace, block, mtype=h5py.h5t.py_create(_VLEN_U32))


def _attr_value(value: Any) -> Any:
    """A value HDF5 attributes can hold; anything else is stored as its JSON text."""
    if isinstance(value, (str, bytes, bool, int, float, np.generic)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return np.asarray(value)
    return json.dumps(_jsonable(value))


def _save_attrs(group: h5py.Group, d: Mapping[str, Any]) -> None:
    """Store a dict as stempy does: attributes, with nested dicts as subgroups."""
    for k, v in d.items():
        if isinstance(v, Mapping):
            _save_attrs(group.require_group(str(k)), v)
        else:
            group.attrs[str(k)] = _attr_value(v)


def _create_counts_layout(
    f: h5py.File,
    scan_width: int,
    scan_height: int,
    frame_shape: tuple[int, int],
    attrs: Mapping[str, Any] | None,
) -> h5py.Dataset:
    """Create stempy's groups, datasets and attributes; return the (unwritten) frames dataset."""
    n = int(scan_width) * int(scan_height)
    f.attrs["version"] = np.int64(STEMPY_FORMAT_VERSION)
    group = f.create_group("electron_events")
    positions = group.create_dataset("scan_positions", data=np.arange(n, dtype=np.int64))
    positions.attrs["Nx"] = np.int64(scan_width)
    positions.attrs["Ny"] = np.int64(scan_height)
    frames = group.create_dataset("frames", (n,), dtype=_VLEN_U32)
    frames.attrs["Nx"] = np.int64(frame_shape[0])
    frames.attrs["Ny"] = np.int64(frame_shape[1])
    _save_attrs(f.create_group("metadata"), attrs or {})
    return frames


# --------------------------------------------------------------------------------------------
# Counted data, whole
# --------------------------------------------------------------------------------------------


def write_counts(
    path: str | os.PathLike,
    events_by_position: Sequence[np.ndarray],
    scan_width: int,
    scan_height: int,
    frame_shape: Sequence[int],
    attrs: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write counted data (one events array per position, index ``y * width + x``) as a stempy
    file; it appears under ``path`` only when complete. Returns the path."""
    frame_shape = _frame_shape(frame_shape)
    n = _scan_size(scan_width, scan_height)
    if len(events_by_position) != n:
        raise ValueError(
            f"{len(events_by_position)} event arrays for a {scan_width}x{scan_height} scan "
            f"({n} positions)"
        )
    n_pixels = frame_shape[0] * frame_shape[1]
    out = Path(path)
    with _h5_output(out, overwrite=overwrite) as f:
        frames = _create_counts_layout(f, scan_width, scan_height, frame_shape, attrs)
        for start in range(0, n, _WRITE_BLOCK):
            stop = min(start + _WRITE_BLOCK, n)
            block = _vlen_block(
                [
                    _as_events(events_by_position[i], n_pixels, f"scan position {i}")
                    for i in range(start, stop)
                ]
            )
            try:
                _write_vlen_slice(frames, start, block)
            except (OSError, RuntimeError) as e:
                raise _io_error(e, out) from e
    return out


# --------------------------------------------------------------------------------------------
# Parts: one per distributor
# --------------------------------------------------------------------------------------------


class PartWriter:
    """Incrementally writes one distributor's counted frames (any positions, any order) to a
    part file, buffering a bounded number of frames in memory between appends.

    Layout: ``positions`` (uint32), ``offsets`` (uint64, len n+1; events of the i-th stored
    frame are ``events[offsets[i]:offsets[i+1]]``), ``events`` (uint32, flat) and
    ``summed_pattern`` (uint64, frame shape) so a merge can locate the bright-field disk
    without a second pass. Not thread-safe: one writer per thread.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        frame_shape: Sequence[int],
        *,
        flush_every: int = 4096,
        max_buffered_events: int = 4 << 20,
        overwrite: bool = False,
    ):
        if flush_every <= 0 or max_buffered_events <= 0:
            raise ValueError("flush_every and max_buffered_events must be positive")
        self.path = Path(path)
        self.frame_shape = _frame_shape(frame_shape)
        self._n_pixels = self.frame_shape[0] * self.frame_shape[1]
        self.flush_every = int(flush_every)
        self.max_buffered_events = int(max_buffered_events)
        self.positions_written = 0
        self.events_written = 0
        self._seen = np.zeros(0, dtype=bool)  # grows to the highest position added
        self._buf_positions: list[int] = []
        self._buf_events: list[np.ndarray] = []
        self._buf_nevents = 0
        self._pattern = np.zeros(self._n_pixels, dtype=np.uint64)
        self._state = "open"
        self._target = _AtomicFile(self.path, overwrite)
        try:
            self._file = h5py.File(self._target.tmp, "w")
            self._file.attrs["detstream_part"] = np.int64(PART_FORMAT_VERSION)
            self._file.attrs["frame_rows"] = np.int64(self.frame_shape[0])
            self._file.attrs["frame_cols"] = np.int64(self.frame_shape[1])
            self._positions = self._file.create_dataset(
                "positions", (0,), maxshape=(None,), dtype=np.uint32, chunks=(1 << 14,)
            )
            self._offsets = self._file.create_dataset(
                "offsets", data=np.zeros(1, np.uint64), maxshape=(None,), chunks=(1 << 14,)
            )
            self._events = self._file.create_dataset(
                "events", (0,), maxshape=(None,), dtype=np.uint32, chunks=(1 << 18,)
            )
        except (OSError, RuntimeError) as e:
            self._fail()
            raise _io_error(e, self.path, "creating") from e

    def add(self, position: int, events: np.ndarray) -> None:
        """Queue one frame's events for ``position``; appends to the file every ``flush_every``
        frames. Adding the same position twice is an error."""
        if self._state != "open":
            raise RuntimeError(f"part writer for {self.path} is {self._state}")
        position = int(position)
        if position < 0 or position > np.iinfo(np.uint32).max:
            raise ValueError(f"{self.path}: scan position {position} out of range")
        arr = _as_events(events, self._n_pixels, f"{self.path}: scan position {position}")
        if position >= len(self._seen):
            grown = np.zeros(max(position + 1, 2 * len(self._seen)), dtype=bool)
            grown[: len(self._seen)] = self._seen
            self._seen = grown
        if self._seen[position]:
            raise ValueError(f"{self.path}: scan position {position} added twice")
        self._seen[position] = True
        self._buf_positions.append(position)
        if isinstance(events, np.ndarray) and np.may_share_memory(arr, events):
            arr = arr.copy()  # the caller may reuse its buffer before we flush
        self._buf_events.append(arr)
        self._buf_nevents += arr.size
        if (
            len(self._buf_positions) >= self.flush_every
            or self._buf_nevents >= self.max_buffered_events
        ):
            self.flush()

    def flush(self) -> None:
        """Append buffered frames to the part's datasets."""
        if self._state != "open":
            raise RuntimeError(f"part writer for {self.path} is {self._state}")
        if not self._buf_positions:
            return
        positions = np.asarray(self._buf_positions, dtype=np.uint32)
        lengths = np.fromiter((a.size for a in self._buf_events), np.uint64, len(self._buf_events))
        flat = np.concatenate(self._buf_events) if self._buf_nevents else np.zeros(0, np.uint32)
        offsets = np.uint64(self.events_written) + np.cumsum(lengths, dtype=np.uint64)
        p0, e0 = self.positions_written, self.events_written
        try:
            self._positions.resize((p0 + len(positions),))
            self._positions[p0:] = positions
            self._offsets.resize((p0 + len(positions) + 1,))
            self._offsets[p0 + 1 :] = offsets
            if flat.size:
                self._events.resize((e0 + flat.size,))
                self._events[e0:] = flat
        except (OSError, RuntimeError) as e:
            self._fail()
            raise _io_error(e, self.path) from e
        if flat.size:
            self._pattern += np.bincount(flat, minlength=self._n_pixels).astype(np.uint64)
        self.positions_written += len(positions)
        self.events_written += int(flat.size)
        self._buf_positions.clear()
        self._buf_events.clear()
        self._buf_nevents = 0

    def close(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Flush, record ``extra`` (JSON-able metadata, e.g. node and timing) and move the part
        into place under its final name. Returns the path."""
        if self._state == "closed":
            return self.path
        self.flush()
        try:
            f = self._file
            f.create_dataset(
                "summed_pattern", data=self._pattern.reshape(self.frame_shape), dtype=np.uint64
            )
            f.attrs["n_positions"] = np.int64(self.positions_written)
            f.attrs["n_events"] = np.int64(self.events_written)
            f.attrs["extra"] = json.dumps(_jsonable(dict(extra or {})))
        except (OSError, RuntimeError) as e:
            self._fail()
            raise _io_error(e, self.path) from e
        except BaseException:
            self._fail()
            raise
        try:
            _close_h5(self._file, self.path)
        except BaseException:
            self._fail()
            raise
        try:
            self._target.commit()  # discards the temp file itself if the rename fails
        except BaseException:
            self._state = "failed"
            raise
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Give up: close and delete the temporary file; nothing appears under ``path``."""
        if self._state == "open":
            self._fail()
            self._state = "aborted"

    def _fail(self) -> None:
        if hasattr(self, "_file"):
            _force_close(self._file)
        self._target.discard()
        self._state = "failed"

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # a writer dropped without close() must not leave its temp file
        with suppress(Exception):
            if self._state == "open":
                self.abort()


@dataclass(frozen=True)
class Part:
    """A finished part file: which positions it holds, and its events read on demand.
    Unpacks as ``positions, events`` (events: iterator of arrays, same order)."""

    path: Path
    frame_shape: tuple[int, int]
    positions: np.ndarray  # uint32, in the order they were added
    offsets: np.ndarray  # uint64, len(positions) + 1
    extra: dict = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    def summed_pattern(self) -> np.ndarray:
        """Sum of all the part's frames (uint64, frame shape), recorded when it was written."""
        with h5py.File(self.path, "r") as f:
            return f["summed_pattern"][()]

    def iter_blocks(
        self, block_positions: int = 8192
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(positions, flat_events, offsets)`` for consecutive blocks of stored frames;
        ``offsets`` start at 0 and index into ``flat_events``. Memory is one block at a time."""
        with h5py.File(self.path, "r") as f:
            events = f["events"]
            for start in range(0, len(self.positions), block_positions):
                stop = min(start + block_positions, len(self.positions))
                offs = self.offsets[start : stop + 1]
                flat = events[int(offs[0]) : int(offs[-1])]
                yield self.positions[start:stop], flat, (offs - offs[0]).astype(np.int64)

    def iter_events(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(position, events)`` for every stored frame, in stored order."""
        for positions, flat, offs in self.iter_blocks():
            for i, p in enumerate(positions):
                yield int(p), flat[offs[i] : offs[i + 1]]

    def iter_arrays(self) -> Iterator[np.ndarray]:
        """Yield each stored frame's events, in the order of ``positions``."""
        for _, events in self.iter_events():
            yield events

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``positions, events = read_part(path)``; events is a one-shot iterator."""
        return iter((self.positions, self.iter_arrays()))


def read_part(path: str | os.PathLike) -> Part:
    """Open a part written by PartWriter; positions and offsets are loaded, events are not."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "detstream_part" not in f.attrs:
                raise ValueError(f"{path} is not a detstream part file")
            version = int(f.attrs["detstream_part"])
            if version != PART_FORMAT_VERSION:
                raise ValueError(f"{path}: part format {version}, expected {PART_FORMAT_VERSION}")
            frame_shape = (int(f.attrs["frame_rows"]), int(f.attrs["frame_cols"]))
            positions = f["positions"][()]
            offsets = f["offsets"][()]
            extra = json.loads(f.attrs.get("extra", "{}"))
            n_events = f["events"].shape[0]
    except (OSError, RuntimeError) as e:
        raise _io_error(e, path, "reading") from e
    if len(offsets) != len(positions) + 1 or int(offsets[-1]) != n_events:
        raise ValueError(f"{path}: offsets do not match positions/events; the part is corrupt")
    return Part(path, frame_shape, positions, offsets, extra)


# --------------------------------------------------------------------------------------------
# Virtual bright field
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskEstimate:
    """The bright-field disk: centre ``(row, col)`` and radius, in frame pixels."""

    center: tuple[float, float]
    radius: float


def disk_mask(frame_shape: Sequence[int], center: Sequence[float], radius: float) -> np.ndarray:
    """Boolean frame-shaped mask of pixels within ``radius`` of ``center`` = (row, col)."""
    rows, cols = _frame_shape(frame_shape)
    r = np.arange(rows, dtype=np.float64)[:, None] - float(center[0])
    c = np.arange(cols, dtype=np.float64)[None, :] - float(center[1])
    return r * r + c * c <= float(radius) ** 2


def summed_pattern(
    events: Sequence[np.ndarray] | Iterable[tuple[int, np.ndarray]], frame_shape: Sequence[int]
) -> np.ndarray:
    """Sum of all frames (uint64, frame shape): the input to locating the bright-field disk."""
    frame_shape = _frame_shape(frame_shape)
    n_pixels = frame_shape[0] * frame_shape[1]
    total = np.zeros(n_pixels, np.uint64)
    for position, ev in _pairs(events):
        arr = _as_events(ev, n_pixels, f"scan position {position}")
        total += np.bincount(arr, minlength=n_pixels).astype(np.uint64)
    return total.reshape(frame_shape)


def _clip_hot_pixels(a: np.ndarray, max_passes: int = 5) -> np.ndarray:
    """Replace pixels far above their neighbours (hot/stuck pixels, which can outshine the whole
    disk in a sum) by their neighbours' mean; the brightest neighbour is left out of that mean
    so a hot pair is caught too. Sparse or noisy real signal is left alone."""
    a = a.copy()
    rows, cols = a.shape
    shifts = [(dr, dc) for dr in range(3) for dc in range(3) if (dr, dc) != (1, 1)]
    for _ in range(max_passes):
        p = np.pad(a, 1, mode="edge")
        nb = np.stack([p[dr : dr + rows, dc : dc + cols] for dr, dc in shifts])
        typical = (nb.sum(axis=0) - nb.max(axis=0)) / (len(shifts) - 1)
        hot = a > 4.0 * typical + 10.0 * np.sqrt(typical) + 10.0
        if not hot.any():
            break
        a[hot] = typical[hot]
    return a


def _box(a: np.ndarray, b: int) -> np.ndarray:
    """b x b mean (b odd, edge padded) through an integral image."""
    if b == 1:
        return a
    p = np.pad(a, b // 2, mode="edge")
    c = np.zeros((p.shape[0] + 1, p.shape[1] + 1))
    c[1:, 1:] = p.cumsum(axis=0).cumsum(axis=1)
    return (c[b:, b:] - c[:-b, b:] - c[b:, :-b] + c[:-b, :-b]) / (b * b)


def _component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected region of ``mask`` containing ``seed`` (grown by repeated dilation)."""
    region = np.zeros_like(mask)
    if not mask[seed]:
        return region
    region[seed] = True
    count = 1
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        new_count = int(grown.sum())
        if new_count == count:
            return grown
        region, count = grown, new_count


_MIN_DISK_AREA = 9  # pixels; a smaller bright region is a hot spot, not the bright-field disk
_MAX_INTERIOR_CV = 0.1  # the disk's level must be known well enough for "half of it" to mean much


def _disk_at_scale(clean: np.ndarray, smooth: np.ndarray) -> tuple[DiskEstimate, float, int]:
    """Disk from one smoothing of the pattern, with its interior's relative spread and area."""
    rows = np.arange(clean.shape[0], dtype=np.float64)[:, None]
    cols = np.arange(clean.shape[1], dtype=np.float64)[None, :]

    def centre_and_area(region: np.ndarray) -> tuple[float, float, int]:
        w = np.where(region, clean, 0.0)
        total = w.sum()
        if total <= 0:  # only the smoothing put signal here: use the region's geometric centre
            w, total = region.astype(np.float64), float(region.sum())
        return float((w * rows).sum() / total), float((w * cols).sum() / total), int(region.sum())

    def within(cr: float, cc: float, r: float) -> np.ndarray:
        return (rows - cr) ** 2 + (cols - cc) ** 2 <= max(1.0, r) ** 2

    peak = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    half_peak = 0.5 * float(smooth[peak])
    cr, cc, area = centre_and_area(_component(smooth >= half_peak, peak))
    level = float(smooth[within(cr, cc, math.sqrt(area / math.pi) / 2)].mean())
    seed = (int(round(cr)), int(round(cc)))
    above = smooth >= 0.5 * level
    if level >= half_peak and above[seed]:  # else (a ring, a noise blob) keep the first region
        cr, cc, area = centre_and_area(_component(above, seed))
    radius = math.sqrt(area / math.pi)
    interior = smooth[within(cr, cc, radius / 2)]
    mean = float(interior.mean())
    cv = float(interior.std()) / mean if mean > 0 else math.inf
    return DiskEstimate((cr, cc), radius), cv, area


def estimate_disk(pattern: np.ndarray) -> DiskEstimate:
    """Locate the bright-field disk in a summed diffraction pattern.

    Rule: after clipping hot pixels, smooth with the smallest box (1, 3, 5, 9, ...
    px) at which the disk's interior is even to within 10%, so sparse or noisy sums still work.
    Then: the connected region around the brightest pixel above half the peak gives a first
    centre (intensity-weighted centre of mass); the connected region above half the level near
    that centre gives the final centre and the radius of a disk of equal area, i.e. where the
    intensity falls to half. Separate bright spots (Bragg disks, hot spots) are ignored.
    """
    s = np.asarray(pattern, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"pattern must be 2-D, got shape {s.shape}")
    clean = _clip_hot_pixels(s)
    if not np.any(clean > 0):
        raise ValueError("the summed pattern is empty; cannot locate a bright-field disk")
    best: tuple[float, DiskEstimate] | None = None
    b = 1
    while True:
        disk, cv, area = _disk_at_scale(clean, _box(clean, b))
        if area >= max(_MIN_DISK_AREA, 4 * b * b):  # else the region is mostly the smoothing
            if cv <= _MAX_INTERIOR_CV:
                return disk
            if best is None or cv < best[0]:
                best = (cv, disk)
        b = 3 if b == 1 else 2 * b - 1  # 1, 3, 5, 9, 17, 33, ...
        if b > max(1, min(s.shape) // 8):
            return best[1] if best is not None else disk


class BlockAccumulator(Protocol):
    """Anything that consumes counted frames in blocks while a merge streams them."""

    def add_block(
        self, positions: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray
    ) -> None: ...


class VirtualBrightField:
    """Accumulates a virtual bright-field image (events inside a disk, per scan position) from
    frames given one at a time or in blocks, so it can ride along with a merge."""

    def __init__(
        self,
        scan_width: int,
        scan_height: int,
        frame_shape: Sequence[int],
        center: Sequence[float],
        radius: float,
    ):
        self.scan_width, self.scan_height = int(scan_width), int(scan_height)
        self._n = _scan_size(scan_width, scan_height)
        self.frame_shape = _frame_shape(frame_shape)
        self.center = (float(center[0]), float(center[1]))
        self.radius = float(radius)
        self._mask = disk_mask(self.frame_shape, self.center, self.radius).ravel()
        self._counts = np.zeros(self._n, dtype=np.int64)

    def add(self, position: int, events: np.ndarray) -> None:
        position = int(position)
        if not 0 <= position < self._n:
            raise ValueError(f"scan position {position} outside a {self._n}-position scan")
        arr = _as_events(events, self._mask.size, f"scan position {position}")
        self._counts[position] += int(np.count_nonzero(self._mask[arr]))

    def add_block(
        self, positions: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray
    ) -> None:
        """Frames ``i`` = ``flat_events[offsets[i]:offsets[i+1]]`` at ``positions[i]``."""
        inside = np.concatenate([[0], np.cumsum(self._mask[flat_events], dtype=np.int64)])
        offsets = np.asarray(offsets, dtype=np.int64)
        per_frame = inside[offsets[1:]] - inside[offsets[:-1]]
        np.add.at(self._counts, np.asarray(positions, np.int64), per_frame)

    @property
    def image(self) -> np.ndarray:
        """Counts inside the disk, shape (scan_height, scan_width)."""
        return self._counts.reshape(self.scan_height, self.scan_width).copy()


def _pairs(
    events: Sequence[np.ndarray] | Mapping[int, np.ndarray] | Iterable[tuple[int, np.ndarray]],
) -> Iterator[tuple[int, np.ndarray]]:
    """(position, events) pairs from a position-indexed sequence, a mapping or pairs."""
    if isinstance(events, Mapping):
        yield from events.items()
    elif isinstance(events, (Sequence, np.ndarray)):
        yield from enumerate(events)
    else:
        yield from events


def virtual_bright_field(
    events: Sequence[np.ndarray] | Mapping[int, np.ndarray] | Iterable[tuple[int, np.ndarray]],
    scan_width: int,
    scan_height: int,
    frame_shape: Sequence[int],
    center: Sequence[float] | None = None,
    radius: float | None = None,
) -> np.ndarray:
    """Image (scan_height, scan_width) of events inside the bright-field disk per position.

    ``events`` is a sequence indexed by position, a mapping position -> events, or an iterable
    of (position, events). Without ``center``/``radius`` the disk is estimated from the summed
    pattern (``estimate_disk``), which needs two passes, so a one-shot iterator is buffered.
    """
    pairs: Iterable[tuple[int, np.ndarray]] = _pairs(events)
    if center is None or radius is None:
        pairs = list(pairs)  # two passes: for a sequence this is a list of references only
        disk = estimate_disk(summed_pattern(iter(pairs), frame_shape))
        center = disk.center if center is None else center
        radius = disk.radius if radius is None else radius
    acc = VirtualBrightField(scan_width, scan_height, frame_shape, center, radius)
    for position, ev in pairs:
        acc.add(position, ev)
    return acc.image


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


@dataclass
class MergeReport:
    """What a merge wrote: counts, the positions no part covered, and the bright-field image."""

    path: Path
    scan_width: int
    scan_height: int
    parts: list[Path]
    positions_written: int  # positions filled from parts (the rest are empty, see missing)
    missing: list[int]  # sorted positions no part held
    total_events: int
    bright_field: np.ndarray | None = None  # (scan_height, scan_width)
    disk: DiskEstimate | None = None
    duplicates: int = 0  # later copies of a position dropped (on_duplicate="first")

    @property
    def n_positions(self) -> int:
        return self.scan_width * self.scan_height

    def summary(self, max_missing: int = 100) -> dict[str, Any]:
        """JSON-able digest (no image; at most ``max_missing`` missing positions listed)."""
        return {
            "path": str(self.path),
            "scan_width": self.scan_width,
            "scan_height": self.scan_height,
            "parts": [str(p) for p in self.parts],
            "positions_written": self.positions_written,
            "n_missing": len(self.missing),
            "missing": self.missing[:max_missing],
            "total_events": self.total_events,
            "duplicates": self.duplicates,
            "disk": None
            if self.disk is None
            else {"center": list(self.disk.center), "radius": self.disk.radius},
        }


def merge_parts(
    part_paths: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    scan_width: int,
    scan_height: int,
    frame_shape: Sequence[int],
    overwrite: bool = False,
    *,
    attrs: Mapping[str, Any] | None = None,
    bright_field: bool = True,
    center: Sequence[float] | None = None,
    radius: float | None = None,
    accumulators: Sequence[BlockAccumulator] = (),
    block_positions: int = 8192,
    on_duplicate: str = "error",
) -> MergeReport:
    """Merge part files into one stempy file (temp + rename), reading each part once, a block
    at a time. Positions in no part are written empty and listed in ``missing``; a position in
    two parts is an error naming both, or with ``on_duplicate="first"`` (parts of a session
    whose frames were re-routed after a node was lost) its first copy is kept and the others
    counted in ``duplicates``. With ``bright_field`` the virtual bright-field image is
    computed in the same pass; the disk, unless given, comes from the parts' summed patterns.
    """
    if on_duplicate not in ("error", "first"):
        raise ValueError(f"on_duplicate must be 'error' or 'first', not {on_duplicate!r}")
    frame_shape = _frame_shape(frame_shape)
    n = _scan_size(scan_width, scan_height)
    n_pixels = frame_shape[0] * frame_shape[1]
    out = Path(out_path)
    if not overwrite and out.exists():  # fail before reading anything
        raise _refuse(out)

    parts = [read_part(p) for p in part_paths]
    owner = np.full(n, -1, dtype=np.int64)
    keep: list[np.ndarray | None] = []  # per part, which stored frames to write (None: all)
    duplicates = 0
    for k, part in enumerate(parts):
        if part.frame_shape != frame_shape:
            raise ValueError(f"{part.path}: frame shape {part.frame_shape}, expected {frame_shape}")
        pos = part.positions.astype(np.int64)
        if pos.size and int(pos.max()) >= n:
            raise ValueError(
                f"{part.path}: scan position {int(pos.max())} outside a "
                f"{scan_width}x{scan_height} scan"
            )
        if on_duplicate == "first":
            once = np.zeros(pos.size, bool)
            once[np.unique(pos, return_index=True)[1]] = True
            mask = once & (owner[pos] < 0)
            duplicates += int(pos.size - mask.sum())
            keep.append(None if mask.all() else mask)
            owner[pos[mask]] = k
            continue
        keep.append(None)
        uniq, counts = np.unique(pos, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"{part.path}: scan position {int(uniq[counts > 1][0])} appears twice")
        clash = pos[owner[pos] >= 0]
        if clash.size:
            p = int(clash.min())
            raise ValueError(
                f"scan position {p} is in two parts: {parts[owner[p]].path} and {part.path}"
            )
        owner[pos] = k
    missing = np.flatnonzero(owner < 0)

    acc_list: list[BlockAccumulator] = list(accumulators)
    bf: VirtualBrightField | None = None
    disk: DiskEstimate | None = None
    if bright_field:
        if center is None or radius is None:
            pattern = np.zeros(frame_shape, np.uint64)
            for part in parts:
                pattern += part.summed_pattern()
            if np.any(pattern):
                est = estimate_disk(pattern)
                center = est.center if center is None else center
                radius = est.radius if radius is None else radius
            else:  # nothing counted at all: an all-zero image, disk unknown
                center = (frame_shape[0] / 2, frame_shape[1] / 2) if center is None else center
                radius = 0.0 if radius is None else radius
        disk = DiskEstimate((float(center[0]), float(center[1])), float(radius))
        bf = VirtualBrightField(scan_width, scan_height, frame_shape, disk.center, disk.radius)
        acc_list.append(bf)

    total_events = 0
    with _h5_output(out, overwrite=overwrite) as f:
        frames = _create_counts_layout(f, scan_width, scan_height, frame_shape, attrs)
        for part, mask in zip(parts, keep):
            start = 0
            for positions, flat, offs in part.iter_blocks(block_positions):
                stored = len(positions)
                if mask is not None:
                    positions, flat, offs = _select_frames(positions, flat, offs,
                                                           mask[start : start + stored])
                start += stored
                if flat.size and int(flat.max()) >= n_pixels:
                    raise ValueError(
                        f"{part.path}: event index {int(flat.max())} outside a frame of "
                        f"{n_pixels} pixels"
                    )
                block = _vlen_block([flat[offs[i] : offs[i + 1]] for i in range(len(positions))])
                try:
                    _write_vlen_points(frames, positions, block)
                except (OSError, RuntimeError) as e:
                    raise _io_error(e, out) from e
                for acc in acc_list:
                    acc.add_block(positions, flat, offs)
                total_events += int(flat.size)
        empty = np.zeros(0, np.uint32)
        for start in range(0, len(missing), _WRITE_BLOCK):
            chunk = missing[start : start + _WRITE_BLOCK]
            try:
                _write_vlen_points(frames, chunk, _vlen_block([empty] * len(chunk)))
            except (OSError, RuntimeError) as e:
                raise _io_error(e, out) from e

    return MergeReport(
        path=out,
        scan_width=int(scan_width),
        scan_height=int(scan_height),
        parts=[p.path for p in parts],
        positions_written=int(n - len(missing)),
        missing=[int(p) for p in missing],
        total_events=total_events,
        bright_field=None if bf is None else bf.image,
        disk=disk,
        duplicates=duplicates,
    )


def _select_frames(
    positions: np.ndarray, flat: np.ndarray, offs: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The frames of a block where ``mask`` is True, as ``(positions, flat_events, offsets)``."""
    pieces = [flat[offs[i] : offs[i + 1]] for i in np.flatnonzero(mask)]
    lengths = np.diff(offs)[mask]
    out = np.concatenate(pieces) if pieces else flat[:0]
    return positions[mask], out, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# PNG and JSON
# --------------------------------------------------------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale an image's finite min..max linearly to 0..255 (rounded); a constant image and
    non-finite pixels become 0."""
    a = np.asarray(image)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"image must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    out = np.zeros(a.shape, np.uint8)
    if not finite.any():
        return out
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi > lo:
        scaled = np.rint((a[finite] - lo) * (255.0 / (hi - lo)))
        out[finite] = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_png(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = True) -> np.ndarray:
    """Write ``image`` as an 8-bit greyscale PNG scaled by ``to_uint8`` (standard library only:
    zlib, one IDAT, filter type 0). Returns the pixels written."""
    pixels = to_uint8(image)
    height, width = pixels.shape
    raw = np.zeros((height, width + 1), np.uint8)  # leading 0 per row: filter type None
    raw[:, 1:] = pixels
    png = b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
            _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        ]
    )
    with _atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(png)
    return pixels


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, sets, dataclass-free containers;
    non-finite floats become None so the output is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(v) for v in items]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (str, int)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if isinstance(obj, (DiskEstimate,)):
        return {"center": list(obj.center), "radius": obj.radius}
    raise TypeError(f"cannot store {type(obj).__name__} in JSON: {obj!r}")


def write_summary(
    path: str | os.PathLike, summary: Mapping[str, Any], *, overwrite: bool = True
) -> Path:
    """Write a run summary as indented JSON (numpy values converted), atomically."""
    text = json.dumps(_jsonable(summary), indent=2, sort_keys=False, allow_nan=False) + "\n"
    with _atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return Path(path)
