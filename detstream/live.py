"""Live virtual images while a scan streams.

Each node keeps a :class:`LiveImages`: per scan position, the events its counting found in the
bright-field disk and in the dark-field ring (never a second look at the raw frame). Its etcd
side thread publishes the chunks that changed every ``publish_s``, compressed (a few bytes per
frame). The disk comes from the session's parameters, or each node proposes the one it finds in
the summed pattern of its first frames and the first proposal in etcd is the session's.
The orchestrator's :class:`LiveView` reads the chunks and redraws ``live.png``.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np

from .output.disk import DiskEstimate, estimate_disk
from .output.virtual import VirtualDetectors, frame_sums, session_detectors

log = logging.getLogger("detstream.live")

CHUNK_POSITIONS = 4096  # scan positions per published chunk (one etcd key per node and chunk)
_FORMAT = 1
_HEADER = struct.Struct("<BII")  # format, first position, positions in the chunk
_FLUSH_FRAMES = 64  # frames gathered before their sums are taken (one numpy pass per batch)
_MAX_HELD = 8  # times find_frames a node waits for the session's disk before using its own
_FIND_SIDE = 144  # the disk is found on the summed pattern binned to about this many pixels a side


def encode_chunk(start: int, counted: np.ndarray, bf: np.ndarray, adf: np.ndarray) -> bytes:
    """One chunk of a node's live images: which positions it counted, and their BF and ADF sums."""
    body = np.packbits(counted).tobytes() + bf.astype("<u4").tobytes() + adf.astype("<u4").tobytes()
    return _HEADER.pack(_FORMAT, int(start), len(counted)) + zlib.compress(body, 1)


def decode_chunk(raw: bytes) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(start, counted, bf, adf)`` of a chunk; ValueError names what is wrong with it."""
    if len(raw) < _HEADER.size:
        raise ValueError(f"live chunk of {len(raw)} bytes is shorter than its header")
    fmt, start, n = _HEADER.unpack_from(raw)
    if fmt != _FORMAT:
        raise ValueError(f"live chunk format {fmt}, expected {_FORMAT}")
    try:
        body = zlib.decompress(raw[_HEADER.size:])
    except zlib.error as err:
        raise ValueError(f"live chunk body does not decompress: {err}") from None
    bits = (n + 7) // 8
    if len(body) != bits + 8 * n:
        raise ValueError(f"live chunk body of {len(body)} bytes for {n} positions")
    counted = np.unpackbits(np.frombuffer(body, np.uint8, bits), count=n).astype(bool)
    bf = np.frombuffer(body, "<u4", n, bits)
    adf = np.frombuffer(body, "<u4", n, bits + 4 * n)
    return start, counted, bf, adf


def assemble(chunks: Iterable[bytes], n_positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every node's chunks as ``(counted, bf, adf)`` over the scan; a malformed chunk is skipped
    (ValueError messages are logged once per reason)."""
    counted = np.zeros(n_positions, bool)
    bf = np.zeros(n_positions, np.uint32)
    adf = np.zeros(n_positions, np.uint32)
    for raw in chunks:
        try:
            start, c, b, a = decode_chunk(raw)
            if start + len(c) > n_positions:
                raise ValueError(f"live chunk of positions {start}..{start + len(c)} outside the scan")
        except ValueError as err:
            _warn_once(str(err))
            continue
        sl = slice(start, start + len(c))
        # A position two nodes counted (re-routed) has the same sums from both.
        bf[sl] = np.where(c, b, bf[sl])
        adf[sl] = np.where(c, a, adf[sl])
        counted[sl] |= c
    return counted, bf, adf


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

    def __init__(self, n_positions: int, frame_shape: Sequence[int], imaging, chunk_positions: int = CHUNK_POSITIONS):
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
                out[c] = encode_chunk(sl.start, self.counted[sl], self.bf[sl], self.adf[sl])
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
    and redraws ``live.png`` (atomically) when more frames were counted."""

    def __init__(self, coord, spec, interval_s: float = 2.0):
        self.coord, self.spec, self.interval_s = coord, spec, interval_s
        self.path = spec.paths.live_image
        self.version = 0  # drawings made so far
        self.png: Optional[bytes] = None
        self.frames_shown = 0
        self._last = -float("inf")
        self._figure = None  # an output.images.FigureDrawing, once drawn

    def refresh(self, force: bool = False) -> bool:
        """Redraw if due (or ``force``) and anything new was counted; True if it drew."""
        from .etcd import CoordinationError

        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return False
        self._last = now
        try:
            chunks = self.coord.live_chunks(self.spec.session_id)
        except CoordinationError as err:
            _warn_once(f"cannot read the live images from etcd: {err}")
            return False
        counted, bf, adf = assemble(chunks, self.spec.frames_expected)
        n = int(counted.sum())
        if n == 0 or n == self.frames_shown:
            return False
        self.frames_shown = n
        self.png = self.draw(counted, bf, adf)
        self.version += 1
        return True

    def draw(self, counted: np.ndarray, bf: np.ndarray, adf: np.ndarray) -> bytes:
        """live.png (written atomically) and its bytes; the figure is built once, then redrawn."""
        from .output.images import FigureDrawing, scan_panel, write_png_bytes

        shape = (self.spec.scan_height, self.spec.scan_width)
        images = [np.where(counted, v, np.nan).reshape(shape) for v in (bf, adf)]
        title = (f"session {self.spec.session_id}: {self.frames_shown}/{self.spec.frames_expected} "
                 "frames counted (not yet counted: blue-grey)")
        if self._figure is None:
            self._figure = FigureDrawing([scan_panel(images[0], "Bright field (live)"),
                                          scan_panel(images[1], "Annular dark field (live)")])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return write_png_bytes(self.path, self._figure.redraw(images, title))
