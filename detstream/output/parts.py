"""The per-node part format: each distributor writes its counted frames, any positions in any
order, to one part file (``PartWriter``); the merge reads them back (``read_part``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from ..atomic import AtomicFile, io_error
from .frames import as_events, check_frame_shape
from .hdf5 import close_h5, force_close, open_reserved
from .summary import jsonable

PART_FORMAT_VERSION = 1
#: Events a reader takes from a part at a time (1 MiB of uint32): what a merge holds, whatever
#: the scan's size.
BLOCK_EVENTS = 1 << 18
_CHUNKS = {"positions": (1 << 14, 4), "offsets": (1 << 14, 8), "events": (1 << 18, 4)}
#: HDF5's own bytes in a part beyond its chunks: superblock, object headers, attributes, and the
#: chunk indexes (a v1 B-tree node of ~2 KiB per 32 chunks; 2 KiB per chunk is the bound).
_PART_METADATA = 256 << 10
_PER_CHUNK_METADATA = 2 << 10


def part_bound(positions: int, events: int, frame_shape: Sequence[int], extra_bytes: int = 0) -> int:
    """An upper bound on the bytes of a part holding ``positions`` frames and ``events`` events
    once closed (whole chunks, the summed pattern, metadata): what a writer reserves."""
    chunks = (-(-max(positions, 1) // _CHUNKS["positions"][0]), -(-(positions + 1) // _CHUNKS["offsets"][0]),
              -(-max(events, 1) // _CHUNKS["events"][0]))
    data = sum(n * c * size for n, (c, size) in zip(chunks, _CHUNKS.values()))
    pattern = int(frame_shape[0]) * int(frame_shape[1]) * 8
    return data + pattern + _PART_METADATA + _PER_CHUNK_METADATA * sum(chunks) + 2 * int(extra_bytes)


class PartWriter:
    """Incrementally writes one distributor's counted frames (any positions, any order) to a
    part file, buffering at most ``flush_every`` frames and about ``max_buffered_events`` events
    (1 MiB by default) in memory between appends.

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
        max_buffered_events: int = BLOCK_EVENTS,
        overwrite: bool = False,
    ):
        if flush_every <= 0 or max_buffered_events <= 0:
            raise ValueError("flush_every and max_buffered_events must be positive")
        self.path = Path(path)
        self.frame_shape = check_frame_shape(frame_shape)
        self._n_pixels = self.frame_shape[0] * self.frame_shape[1]
        self.flush_every = int(flush_every)
        self.max_buffered_events = int(max_buffered_events)
        self.positions_written = 0
        self.events_written = 0
        self._seen = np.zeros(0, dtype=bool)  # grows to the highest position added
        # Frames wait in preallocated buffers (filled up to max_buffered_events, with room for one
        # more whole frame past it), so that what a writer holds is bounded in bytes, the same
        # whatever the frames and however long it runs: no per-frame arrays, no joining copy.
        self._buf_positions = np.empty(self.flush_every, np.uint32)
        self._buf_lengths = np.empty(self.flush_every, np.uint64)
        self._buf_events = np.empty(self.max_buffered_events + self._n_pixels, np.uint32)
        self._buf_frames = 0
        self._buf_nevents = 0
        self._pattern = np.zeros(self._n_pixels, dtype=np.int64)
        self._state = "open"
        self._target = AtomicFile(self.path, overwrite)
        try:
            # The room the part can grow to is held before HDF5 writes (see output/hdf5.py).
            self._file, self._reservation = open_reserved(
                self._target.tmp, self.path, part_bound(0, 0, self.frame_shape), "this part")
        except BaseException:
            self._target.discard()
            self._state = "failed"
            raise
        try:
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
            raise io_error(e, self.path, "creating") from e

    def add(self, position: int, events: np.ndarray) -> None:
        """Queue one frame's events for ``position`` (copied: the caller may reuse its array);
        appends to the file every ``flush_every`` frames or ``max_buffered_events`` events.
        Adding the same position twice is an error."""
        if self._state != "open":
            raise RuntimeError(f"part writer for {self.path} is {self._state}")
        position = int(position)
        if position < 0 or position > np.iinfo(np.uint32).max:
            raise ValueError(f"{self.path}: scan position {position} out of range")
        arr = as_events(events, self._n_pixels, f"{self.path}: scan position {position}")
        if position >= len(self._seen):
            grown = np.zeros(max(position + 1, 2 * len(self._seen)), dtype=bool)
            grown[: len(self._seen)] = self._seen
            self._seen = grown
        if self._seen[position]:
            raise ValueError(f"{self.path}: scan position {position} added twice")
        self._seen[position] = True
        if self._buf_nevents + arr.size > self._buf_events.size:  # a frame with repeated pixels
            self.flush()
        if arr.size > self._buf_events.size:  # larger than the buffer: straight to the file
            self._append(np.array([position], np.uint32), np.array([arr.size], np.uint64), arr)
            return
        self._buf_positions[self._buf_frames] = position
        self._buf_lengths[self._buf_frames] = arr.size
        self._buf_events[self._buf_nevents : self._buf_nevents + arr.size] = arr
        self._buf_frames += 1
        self._buf_nevents += arr.size
        if self._buf_frames >= self.flush_every or self._buf_nevents >= self.max_buffered_events:
            self.flush()

    def flush(self) -> None:
        """Append buffered frames to the part's datasets."""
        if self._state != "open":
            raise RuntimeError(f"part writer for {self.path} is {self._state}")
        if not self._buf_frames:
            return
        n = self._buf_frames
        self._append(self._buf_positions[:n], self._buf_lengths[:n],
                     self._buf_events[: self._buf_nevents])
        self._buf_frames = 0
        self._buf_nevents = 0

    def _append(self, positions: np.ndarray, lengths: np.ndarray, flat: np.ndarray) -> None:
        offsets = np.uint64(self.events_written) + np.cumsum(lengths, dtype=np.uint64)
        p0, e0 = self.positions_written, self.events_written
        try:
            self._reservation.ensure(part_bound(p0 + len(positions), e0 + flat.size, self.frame_shape))
        except BaseException:
            self._fail()
            raise
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
            raise io_error(e, self.path) from e
        if flat.size:
            self._pattern += np.bincount(flat, minlength=self._n_pixels)
        self.positions_written += len(positions)
        self.events_written += int(flat.size)

    def close(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Flush, record ``extra`` (JSON-able metadata, e.g. node and timing) and move the part
        into place under its final name. Returns the path."""
        if self._state == "closed":
            return self.path
        self.flush()
        extra_json = json.dumps(jsonable(dict(extra or {})))
        try:
            self._reservation.ensure(part_bound(self.positions_written, self.events_written,
                                                self.frame_shape, len(extra_json)))
        except BaseException:
            self._fail()
            raise
        try:
            f = self._file
            f.create_dataset(
                "summed_pattern", data=self._pattern.astype(np.uint64).reshape(self.frame_shape)
            )
            f.attrs["n_positions"] = np.int64(self.positions_written)
            f.attrs["n_events"] = np.int64(self.events_written)
            f.attrs["extra"] = extra_json
        except (OSError, RuntimeError) as e:
            self._fail()
            raise io_error(e, self.path) from e
        except BaseException:
            self._fail()
            raise
        try:
            close_h5(self._file, self.path)
        except BaseException:
            self._fail(closed=True)
            raise
        self._reservation.release()  # what the part did not use goes back before it is renamed
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

    def _fail(self, closed: bool = False) -> None:
        if hasattr(self, "_file") and not closed:  # a file whose close failed is never touched again
            force_close(self._file, self.path)
        if hasattr(self, "_reservation"):
            self._reservation.release()
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
        self, block_positions: int = 8192, block_events: int = BLOCK_EVENTS, *, reuse: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(positions, flat_events, offsets)`` for consecutive blocks of stored frames;
        ``offsets`` start at 0 and index into ``flat_events``. A block holds at most
        ``block_positions`` frames and ``block_events`` events (or one frame, if it has more), so
        memory is one block's worth whatever the part's size. With ``reuse`` every block's events
        are read into one buffer, overwritten by the next block: a caller that keeps them copies."""
        if block_positions <= 0 or block_events <= 0:
            raise ValueError("block_positions and block_events must be positive")
        buf = np.empty(0, np.uint32)
        n = len(self.positions)
        with _EventReader(self.path) as events:
            start = 0
            while start < n:
                first = int(self.offsets[start])
                # The last frame whose events end within the budget, at least one frame.
                within = int(np.searchsorted(self.offsets, first + block_events, side="right")) - 1
                stop = min(max(within, start + 1), start + block_positions, n)
                offs = self.offsets[start : stop + 1]
                count = int(offs[-1]) - first
                if reuse and buf.size < count:
                    buf = np.empty(max(count, block_events), np.uint32)
                flat = buf[:count] if reuse else np.empty(count, np.uint32)
                events.read(first, flat)
                yield self.positions[start:stop], flat, (offs - offs[0]).astype(np.int64)
                start = stop

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


class _EventReader:
    """Reads ranges of a part's ``events``. A segmented node's index part holds them as a virtual
    dataset over its segment files; HDF5 would keep every segment it has read from open, each
    with its chunk and metadata caches (~1.7 MiB a segment, so O(scan)): its sources are read
    here directly instead, one file open at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._file = h5py.File(path, "r")
        events = self._file["events"]
        #: (start, stop, file, dataset) per source; a plain dataset is its own single source.
        self._sources: list[tuple[int, int, Path, str]] = []
        self._direct = events
        if events.is_virtual:
            sources = [_source_range(path, m) for m in events.virtual_sources()]
            if all(src is not None for src in sources):
                self._sources = sorted(sources)
                self._starts = np.array([src[0] for src in self._sources], np.int64)
                self._direct = None
        self._open: tuple[Optional[Path], Any] = (None, None)

    def read(self, first: int, out: np.ndarray) -> None:
        """``out[:] = events[first : first + out.size]``."""
        if not out.size:
            return
        if self._direct is not None:
            self._direct.read_direct(out, np.s_[first : first + out.size])
            return
        pos, end = first, first + out.size
        k = max(0, int(np.searchsorted(self._starts, pos, side="right")) - 1)
        while pos < end:
            if k >= len(self._sources) or self._sources[k][0] > pos:
                raise ValueError(f"{self.path}: events from {pos} are in none of its segments")
            start, stop, file, name = self._sources[k]
            take = min(end, stop) - pos
            if take > 0:
                self._dataset(file, name).read_direct(out[pos - first : pos - first + take],
                                                      np.s_[pos - start : pos - start + take])
                pos += take
            k += 1

    def _dataset(self, file: Path, name: str):
        if self._open[0] != file:
            self._close_source()
            try:  # a segment gone is an error naming it (HDF5 would read its events as zeros)
                f = h5py.File(file, "r")
            except (OSError, RuntimeError) as e:
                raise io_error(e, file, "reading") from e
            self._open = (file, f)
        return self._open[1][name]

    def _close_source(self) -> None:
        if self._open[1] is not None:
            self._open[1].close()
        self._open = (None, None)

    def __enter__(self) -> "_EventReader":
        return self

    def __exit__(self, *exc) -> None:
        self._close_source()
        self._file.close()


def _source_range(path: Path, source) -> Optional[tuple[int, int, Path, str]]:
    """``(start, stop, file, dataset)`` of one virtual source taken whole into a 1-D range of
    the virtual dataset; None for any other mapping (read through HDF5's own virtual dataset)."""
    if source.src_space.get_select_type() != h5py.h5s.SEL_ALL:
        return None
    (a,), (b,) = source.vspace.get_select_bounds()
    file = path if source.file_name == "." else path.parent / source.file_name
    return int(a), int(b) + 1, file, source.dset_name


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
        raise io_error(e, path, "reading") from e
    if len(offsets) != len(positions) + 1 or int(offsets[-1]) != n_events:
        raise ValueError(f"{path}: offsets do not match positions/events; the part is corrupt")
    return Part(path, frame_shape, positions, offsets, extra)

