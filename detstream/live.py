"""Live virtual images while a scan streams.

Each node keeps a :class:`LiveImages`: per scan position, the events its counting found in the
bright-field disk and in the dark-field ring, and the sums of their rows and columns with their
count, which give the centre of mass (never a second look at the raw frame). Its etcd
side thread publishes the chunks that changed every ``publish_s``, compressed (a few bytes per
frame). The disk comes from the session's parameters, or each node proposes the one it finds in
the summed pattern of its first frames and the first proposal in etcd is the session's.
The orchestrator's :class:`LiveView` reads the chunks and redraws ``live.png``: bright field, dark
field, and the centre of mass (x and y) relative to the session's disk centre.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Optional

import numpy as np

from .output.disk import DiskEstimate, estimate_disk
from .output.virtual import (VirtualDetectors, centre_of_mass, frame_moments, frame_sums, row_lookup,
                             session_detectors)

log = logging.getLogger("detstream.live")

CHUNK_POSITIONS = 4096  # scan positions per published chunk (one etcd key per node and chunk)
_FORMATS = {2: "<u4", 3: "<u8"}  # chunk format -> width of the event count and row/column sums
_HEADER = struct.Struct("<BII")  # format, first position, positions in the chunk
_FLUSH_FRAMES = 64  # frames gathered before their sums are taken (one numpy pass per batch)
_MAX_HELD = 8  # times find_frames a node waits for the session's disk before using its own
_FIND_SIDE = 144  # the disk is found on the summed pattern binned to about this many pixels a side


class LiveSums(NamedTuple):
    """Live images over scan positions: which were counted, events in the disk and in the ring,
    and every event's count with the sums of their columns and rows (the centre of mass)."""

    counted: np.ndarray
    bf: np.ndarray
    adf: np.ndarray
    events: np.ndarray
    col_sum: np.ndarray
    row_sum: np.ndarray

    def com(self, center) -> tuple[np.ndarray, np.ndarray]:
        """``(com_x, com_y)`` relative to ``center`` (row, col), as in ``stem/images``."""
        return centre_of_mass(self.events, self.col_sum, self.row_sum, center)


def chunk_format(frame_shape) -> int:
    """The chunk format whose sums cannot overflow for frames of this shape: at most one event in
    each 2x2 block of pixels (an event is a strict local maximum), each at most the larger side."""
    rows, cols = (int(s) for s in frame_shape)
    most = ((rows + 1) // 2) * ((cols + 1) // 2) * max(rows, cols)
    return 2 if most < 2 ** 32 else 3


def encode_chunk(start: int, counted: np.ndarray, bf: np.ndarray, adf: np.ndarray,
                 events: Optional[np.ndarray] = None, col_sum: Optional[np.ndarray] = None,
                 row_sum: Optional[np.ndarray] = None, fmt: int = 2) -> bytes:
    """One chunk of a node's live images: which positions it counted, their BF and ADF sums, and
    their event counts and column and row sums (zeros when not given)."""
    n = len(counted)
    wide = _FORMATS[fmt]
    zeros = np.zeros(n, np.int64)
    body = b"".join([np.packbits(counted).tobytes(), np.asarray(bf).astype("<u4").tobytes(),
                     np.asarray(adf).astype("<u4").tobytes()]
                    + [np.asarray(zeros if a is None else a).astype(wide).tobytes()
                       for a in (events, col_sum, row_sum)])
    return _HEADER.pack(fmt, int(start), n) + zlib.compress(body, 1)


def decode_chunk(raw: bytes) -> tuple[int, LiveSums]:
    """``(start, sums)`` of a chunk; ValueError names what is wrong with it."""
    if len(raw) < _HEADER.size:
        raise ValueError(f"live chunk of {len(raw)} bytes is shorter than its header")
    fmt, start, n = _HEADER.unpack_from(raw)
    if fmt not in _FORMATS:
        raise ValueError(f"live chunk format {fmt}, expected one of {sorted(_FORMATS)}")
    try:
        body = zlib.decompress(raw[_HEADER.size:])
    except zlib.error as err:
        raise ValueError(f"live chunk body does not decompress: {err}") from None
    bits = (n + 7) // 8
    wide = np.dtype(_FORMATS[fmt])
    if len(body) != bits + 8 * n + 3 * wide.itemsize * n:
        raise ValueError(f"live chunk body of {len(body)} bytes for {n} positions")
    counted = np.unpackbits(np.frombuffer(body, np.uint8, bits), count=n).astype(bool)
    bf = np.frombuffer(body, "<u4", n, bits)
    adf = np.frombuffer(body, "<u4", n, bits + 4 * n)
    at = bits + 8 * n
    events, col_sum, row_sum = (np.frombuffer(body, wide, n, at + k * wide.itemsize * n) for k in range(3))
    return start, LiveSums(counted, bf, adf, events, col_sum, row_sum)


def assemble(chunks: Iterable[bytes], n_positions: int) -> LiveSums:
    """Every node's chunks as one ``LiveSums`` over the scan; a malformed chunk is skipped
    (ValueError messages are logged once per reason)."""
    out = LiveSums(np.zeros(n_positions, bool), *(np.zeros(n_positions, np.uint32) for _ in range(2)),
                   *(np.zeros(n_positions, np.int64) for _ in range(3)))
    for raw in chunks:
        try:
            start, c = decode_chunk(raw)
            if start + len(c.counted) > n_positions:
                raise ValueError(f"live chunk of positions {start}..{start + len(c.counted)} outside the scan")
        except ValueError as err:
            _warn_once(str(err))
            continue
        sl = slice(start, start + len(c.counted))
        # A position two nodes counted (re-routed) has the same sums from both.
        for mine, theirs in zip(out[1:], c[1:]):
            mine[sl] = np.where(c.counted, theirs, mine[sl])
        out.counted[sl] |= c.counted
    return out


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("live images: %s (skipped)", reason)


class LiveImages:
    """A node's running bright and dark field per scan position, fed with counted frames.

    ``add`` runs on the node's data loop (a list append under a lock, the sums every 64 frames);
    ``changes``, ``agree`` and ``finish`` on its etcd side thread.
    """

    def __init__(self, n_positions: int, frame_shape: Sequence[int], imaging, chunk_positions: int = CHUNK_POSITIONS,
                 com: bool = True):
        """``com=False`` leaves out the centre of mass (its sums stay 0): only to measure what it costs."""
        self.n = int(n_positions)
        self.frame_shape = tuple(int(s) for s in frame_shape)
        self.imaging = imaging
        self.publish_s = float(imaging.publish_s)
        self.chunk = int(chunk_positions)
        self._lock = threading.Lock()
        self._pos: list[int] = []
        self._ev: list[np.ndarray] = []
        self._held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # counted before the disk was known
        self._held_frames = 0
        self._pattern: Optional[np.ndarray] = np.zeros(self.frame_shape[0] * self.frame_shape[1], np.int64)
        self._pattern_frames = 0
        self.proposal: Optional[VirtualDetectors] = None
        self.detectors: Optional[VirtualDetectors] = None
        self._labels: Optional[np.ndarray] = None
        self.counted = np.zeros(self.n, bool)
        self.bf = np.zeros(self.n, np.uint32)
        self.adf = np.zeros(self.n, np.uint32)
        self.com = bool(com)
        self._rows_of = row_lookup(self.frame_shape)
        self._format = chunk_format(self.frame_shape)
        self.events = np.zeros(self.n, np.int64)
        self.col_sum = np.zeros(self.n, np.int64)
        self.row_sum = np.zeros(self.n, np.int64)
        self._dirty: set[int] = set()
        given = session_detectors(imaging, self.frame_shape)
        if given is not None:
            self._use(given)

    @property
    def needs_disk(self) -> bool:
        return self._labels is None

    def add(self, position: int, events: np.ndarray) -> None:
        """A frame counted by this node."""
        with self._lock:
            self._pos.append(position)
            self._ev.append(events)
            if len(self._pos) >= _FLUSH_FRAMES:
                self._flush()

    def add_block(self, positions: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray) -> None:
        """Frames counted by this node as a block: frame ``i`` at ``positions[i]`` is
        ``flat_events[offsets[i]:offsets[i+1]]`` (for a data loop that collects in batches)."""
        offsets = np.asarray(offsets, np.int64)
        flat = np.asarray(flat_events[offsets[0]:offsets[-1]], np.intp)
        with self._lock:
            self._flush()
            self._take(np.asarray(positions, np.int64), flat, offsets - offsets[0])

    def agree(self, detectors: VirtualDetectors) -> None:
        """The session's detectors (from its parameters or the first proposal in etcd)."""
        with self._lock:
            if self._labels is None:
                self._use(detectors)

    def finish(self, own_disk: bool = False) -> None:
        """Take the sums of what was added; propose a disk from what was seen if none was yet, and
        with ``own_disk`` use it when the session's never came."""
        with self._lock:
            self._flush()
            if self._labels is None and self.proposal is None and self._pattern_frames:
                self._propose()
            if own_disk and self._labels is None and self.proposal is not None:
                self._use(self.proposal)

    def changes(self) -> dict[int, bytes]:
        """The chunks changed since the last call, encoded: {chunk index: bytes}."""
        with self._lock:
            self._flush()
            dirty, self._dirty = sorted(self._dirty), set()
            out = {}
            for c in dirty:
                sl = slice(c * self.chunk, min(self.n, (c + 1) * self.chunk))
                out[c] = encode_chunk(sl.start, self.counted[sl], self.bf[sl], self.adf[sl], self.events[sl],
                                      self.col_sum[sl], self.row_sum[sl], self._format)
            return out

    def unpublished(self, chunks: Iterable[int]) -> None:
        """Chunks ``changes`` gave that could not be published: they go out next time."""
        with self._lock:
            self._dirty.update(chunks)

    # -- with the lock held ---------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pos:
            return
        positions = np.asarray(self._pos, np.int64)
        lengths = np.fromiter((len(e) for e in self._ev), np.int64, len(self._ev))
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(self._ev).astype(np.intp, copy=False) if offsets[-1] else np.zeros(0, np.intp)
        self._pos, self._ev = [], []
        self._take(positions, flat, offsets)

    def _take(self, positions: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> None:
        if self._labels is not None:
            self._apply(positions, flat, offsets)
            return
        self._held.append((positions, flat, offsets))
        self._held_frames += len(positions)
        if self.proposal is None:
            self._pattern += np.bincount(flat, minlength=self._pattern.size)
            self._pattern_frames += len(positions)
            if self._pattern_frames >= self.imaging.find_frames:
                self._propose()
        elif self._held_frames > _MAX_HELD * self.imaging.find_frames:
            log.warning("no session disk for the live images after %d frames: using this node's own",
                        self._held_frames)
            self._use(self.proposal)

    def _propose(self) -> None:
        # Found on the pattern binned to about 144 pixels a side: 50x less CPU on the node than
        # the full 576x576, and a live image needs the disk to a pixel or two, not better.
        b = max(1, min(self.frame_shape) // _FIND_SIDE)
        rows, cols = self.frame_shape[0] // b, self.frame_shape[1] // b
        pattern = self._pattern.reshape(self.frame_shape)[: rows * b, : cols * b]
        try:
            found = estimate_disk(pattern.reshape(rows, b, cols, b).sum(axis=(1, 3)))
        except ValueError:  # nothing counted yet: wait for more frames
            return
        disk = DiskEstimate(tuple(c * b + (b - 1) / 2 for c in found.center), found.radius * b)
        self.proposal = VirtualDetectors.around(disk, self.frame_shape, self.imaging.adf_inner,
                                                self.imaging.adf_outer)
        self._pattern = None

    def _use(self, detectors: VirtualDetectors) -> None:
        self.detectors = detectors
        self._labels = detectors.labels(self.frame_shape)
        self._pattern = None
        held, self._held, self._held_frames = self._held, [], 0
        for block in held:
            self._apply(*block)

    def _apply(self, positions: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> None:
        bf, adf = frame_sums(self._labels, flat, offsets)
        self.bf[positions] = bf
        self.adf[positions] = adf
        if self.com:
            col_sum, row_sum = frame_moments(self._rows_of, self.frame_shape[1], flat, offsets)
            self.events[positions] = np.diff(offsets)
            self.col_sum[positions] = col_sum
            self.row_sum[positions] = row_sum
        self.counted[positions] = True
        self._dirty.update(np.unique(positions // self.chunk).tolist())


def publish(coord, sid: str, node: str, live: LiveImages, final: bool = False) -> None:
    """One round of a node's live images through etcd: settle the disk, publish what changed.
    ``final``: the node's share is done; without the session's disk it uses its own."""
    if final:
        live.finish()
    if live.needs_disk:
        record = coord.live_detectors(sid)
        if record is None and live.proposal is not None:
            record = coord.offer_live_detectors(sid, live.proposal.as_dict())
        if record is not None:
            try:
                live.agree(VirtualDetectors.from_dict(record))
            except ValueError as err:
                _warn_once(f"the session's disk in etcd is unusable: {err}")
    if final:
        live.finish(own_disk=True)
    changes = live.changes()
    if changes:
        try:
            coord.put_live_chunks(sid, node, changes)
        except BaseException:
            live.unpublished(changes)
            raise


class LiveView:
    """The orchestrator's side: reads every node's chunks from etcd at most every ``interval_s``
    and redraws ``live.png`` (atomically) when more frames were counted: bright field, annular
    dark field, and the centre of mass x and y relative to the session's disk centre (the one the
    nodes agreed in etcd, or the session's own).

    With ``background`` the drawing runs in a thread of lowest CPU priority (nice 19, Linux): the
    live image is a view, and where the orchestrator shares cores with the data plane (a laptop,
    the embedded default) its drawing must not slow the scan; it may lag instead.
    """

    def __init__(self, coord, spec, interval_s: float = 2.0, background: bool = False):
        self.coord, self.spec, self.interval_s = coord, spec, interval_s
        self.path = spec.paths.live_image
        self.version = 0  # drawings made so far
        self.png: Optional[bytes] = None
        self.frames_shown = 0  # counted frames last read from etcd
        self.drawn_frames = 0  # counted frames in live.png
        self._last = -float("inf")
        self._figure = None  # an output.images.FigureDrawing, once drawn
        self.sums: Optional[LiveSums] = None  # what was last read from etcd
        self.detectors: Optional[VirtualDetectors] = session_detectors(spec.virtual, spec.profile.frame_shape)
        self._todo: Optional[tuple] = None  # the latest sums waiting for the drawing thread
        self._wake = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        if background:
            self._thread = threading.Thread(target=self._draw_loop, name="live-view", daemon=True)
            self._thread.start()

    def refresh(self, force: bool = False) -> bool:
        """Redraw if due (or ``force``) and anything new was counted; True if it drew (in the
        background: if it asked for a drawing)."""
        from .etcd import CoordinationError

        now = time.monotonic()
        if self._closed or (not force and now - self._last < self.interval_s):
            return False
        self._last = now
        try:
            chunks = self.coord.live_chunks(self.spec.session_id)
        except CoordinationError as err:
            _warn_once(f"cannot read the live images from etcd: {err}")
            return False
        sums = assemble(chunks, self.spec.frames_expected)
        n = int(sums.counted.sum())
        if n == 0 or n == self.frames_shown:
            return False
        if self.detectors is None:  # the disk the nodes agreed on: the centre of mass is relative to it
            try:
                record = self.coord.live_detectors(self.spec.session_id)
                self.detectors = None if record is None else VirtualDetectors.from_dict(record)
            except (CoordinationError, ValueError) as err:
                _warn_once(f"cannot read the live images' disk from etcd: {err}")
        self.frames_shown = n
        self.sums = sums
        center = self.detectors.center if self.detectors is not None else None
        if self._thread is None:
            self._draw(n, sums, center)
            return True
        with self._wake:
            self._todo = (n, sums, center)
            self._wake.notify()
        return True

    def com(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The centre of mass last read, ``(com_x, com_y)`` over the scan as ``(height, width)``
        (0 where not counted), or None before the disk is known."""
        if self.sums is None or self.detectors is None:
            return None
        shape = (self.spec.scan_height, self.spec.scan_width)
        cx, cy = self.sums.com(self.detectors.center)
        return cx.reshape(shape), cy.reshape(shape)

    def wait_drawn(self, timeout_s: float = 30.0) -> bool:
        """Wait until what was asked for is drawn; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            while (self._todo is not None or self._busy) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def close(self) -> None:
        """Stop the drawing thread (what it has drawn stays)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _draw_loop(self) -> None:
        import os

        try:  # this thread only (Linux: a thread is a task with its own nice value)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while True:
            with self._wake:
                while self._todo is None and not self._closed:
                    self._wake.wait()
                if self._todo is None:
                    return
                todo, self._todo, self._busy = self._todo, None, True
            try:
                self._draw(*todo)
            except Exception:  # a view: a failure (a full disk, say) ends it, never the session
                log.exception("live images stopped")
                with self._wake:
                    self._closed = True
            finally:
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()

    def _draw(self, n: int, sums: LiveSums, center) -> None:
        """live.png (written atomically) and its bytes; the figure is built once, then redrawn."""
        from .output.images import FigureDrawing, com_panel, scan_panel, write_png_bytes

        shape = (self.spec.scan_height, self.spec.scan_width)
        counted = sums.counted
        if center is None:  # no disk yet: the centre of mass about the frame's centre
            center = [(s - 1) / 2 for s in self.spec.profile.frame_shape]
        com_x, com_y = sums.com(center)
        images = [np.where(counted, v, np.nan).reshape(shape) for v in (sums.bf, sums.adf, com_x, com_y)]
        title = (f"session {self.spec.session_id}: {n}/{self.spec.frames_expected} "
                 "frames counted (not yet counted: blue-grey)")
        if self._figure is None:
            self._figure = FigureDrawing([scan_panel(images[0], "Bright field (live)"),
                                          scan_panel(images[1], "Annular dark field (live)"),
                                          com_panel(images[2], "Centre of mass x (live)"),
                                          com_panel(images[3], "Centre of mass y (live)")])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.png = write_png_bytes(self.path, self._figure.redraw(images, title))
        self.drawn_frames = n
        self.version += 1
