"""Checks a message against the session's geometry, and counts what was rejected and why."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Optional

import numpy as np

from ..profile import DetectorProfile
from ..wire import WIRE_VERSION, Kind, MalformedMessage, pack_headers, parse_headers


def _buf(frame):
    return frame.buffer if hasattr(frame, "buffer") else frame


class Batch:
    """The good blocks of one message: their headers (HEADER_DTYPE) and payloads, in order.

    ``whole`` says every block was good, so the message may be forwarded exactly as received.
    ``payloads`` (a memoryview per block, into the received frames) is made on first use only:
    an aggregator that forwards the message whole never needs it.
    """

    __slots__ = ("parts", "headers", "whole", "_frames", "_good", "_nbytes", "_payloads", "_all_headers",
                 "_positions")

    def __init__(self, parts, headers: np.ndarray, whole: bool, frames=(), good=None, nbytes: int = 0,
                 payloads: Optional[list] = None, all_headers: Optional[np.ndarray] = None,
                 positions: Optional[np.ndarray] = None):
        self.parts = parts
        self.headers = headers
        self.whole = whole
        self._frames, self._good, self._nbytes, self._payloads = frames, good, nbytes, payloads
        self._all_headers = all_headers
        self._positions = positions

    @property
    def positions(self) -> np.ndarray:
        """Each block's scan position (y * scan_width + x), int64."""
        if self._positions is None:
            h = self.headers
            self._positions = h["y"].astype(np.int64) * h["scan_width"] + h["x"]
        return self._positions

    @property
    def payloads(self) -> list:
        if self._payloads is None:
            self._payloads = self._views()
        return self._payloads

    def _views(self) -> list:
        bufs = [_buf(f) for f in self._frames]
        ends = np.cumsum([len(b) for b in bufs])
        heads = self.headers if self._good is None else self._all_headers
        sizes = np.where(heads["kind"] == Kind.DATA, self._nbytes, 0)
        starts = np.cumsum(sizes) - sizes
        which = np.searchsorted(ends, starts, side="right")
        views = []
        for f, start, size in zip(which.tolist(), starts.tolist(), sizes.tolist()):
            if size == 0:
                views.append(b"")
            else:
                off = start - (int(ends[f - 1]) if f else 0)
                views.append(bufs[f][off:off + size])
        return views if self._good is None else [views[i] for i in self._good.tolist()]

    def block_rows(self) -> tuple[list, np.ndarray, np.ndarray]:
        """The payload frames as arrays of whole blocks (uint8, one row per block, no copy), and
        for each good block its frame and row there: a receiver's numpy work per batch."""
        nb = self._nbytes
        if self._payloads is not None or not nb:
            raise ValueError("block rows need a batch as received (check_batch), not a subset")
        bufs = [_buf(f) for f in self._frames]
        arrays = [np.frombuffer(b, np.uint8).reshape(-1, nb) for b in bufs]
        heads = self.headers if self._good is None else self._all_headers
        ordinal = np.cumsum(heads["kind"] == Kind.DATA) - 1     # each block's index among the data blocks
        if self._good is not None:
            ordinal = ordinal[self._good]
        firsts = np.cumsum([0, *(len(a) for a in arrays)])     # first block of each frame
        frame = np.searchsorted(firsts, ordinal, side="right") - 1
        return arrays, frame, ordinal - firsts[frame]

    def subset(self, idx) -> "Batch":
        """The blocks at ``idx`` (indices into this batch's good blocks), as a batch of their own."""
        idx = np.asarray(idx, dtype=np.int64)
        payloads = self.payloads
        return Batch(None, self.headers[idx], False, payloads=[payloads[i] for i in idx.tolist()])

    def message(self) -> list:
        """The frames to forward: as received if whole, else rebuilt (the payloads not copied)."""
        if self.whole and self.parts is not None:
            return self.parts
        return [pack_headers(self.headers), *self.payloads]


class MessageValidator:
    """Turns a message's frames into a Batch of its good blocks; names what is wrong with the rest."""

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int):
        self.profile = profile
        self.scan_width = scan_width
        self.scan_height = scan_height
        self.positions = scan_width * scan_height
        self._scan_word = scan_width | scan_height << 16
        self.scan_number: Optional[int] = None
        self.session_token = 0

    def expect_session(self, scan_number: int, token: int) -> None:
        """Reject from now on every block that names another scan or session (token)."""
        self.scan_number, self.session_token = scan_number, token

    def check_batch(self, parts, reject: Callable[[MalformedMessage], None]) -> Batch:
        """Validate every block of a (version 2) batch; each bad one goes to ``reject`` alone.

        Raises MalformedMessage when the message as a whole cannot be read: its headers frame,
        no payload frame, or payload bytes that do not pair with its headers (the data blocks,
        back to back, each frame holding whole blocks).
        """
        if len(parts) < 2:
            raise MalformedMessage("wrong_part_count", f"{len(parts)} parts, expected a headers frame and payload")
        heads = parse_headers(_buf(parts[0]))
        n = len(heads)
        frames = parts[1:]
        kind = heads["kind"]
        data = kind == Kind.DATA
        nb = self.profile.sector_nbytes
        sizes = [len(_buf(f)) for f in frames]
        n_data = int(np.count_nonzero(data))
        if sum(sizes) != n_data * nb or any(size % nb for size in sizes):
            what = (f"payload {sizes[0]} bytes, profile {self.profile.name} sector is {nb}" if n == 1 and n_data
                    else f"{Kind(int(kind[0])).name} marker with a {sizes[0]}-byte payload" if n == 1
                    else f"payload frames of {sizes} bytes for {n_data} blocks of {nb}")
            raise MalformedMessage("payload_size", what)
        # The header as 8 little-endian u4 words: [0] version | kind << 8 | sector << 16,
        # [1] scan number, [3] scan_width | scan_height << 16, [4] x | y << 16, [7] session
        # token -- a few numpy operations per batch.
        words = np.frombuffer(_buf(parts[0]), dtype="<u4").reshape(n, 8)
        head, xy = words[:, 0], words[:, 4]
        x, y = xy & 0xFFFF, xy >> 16
        bad = (((head & 0xFF) != WIRE_VERSION) | ((head & 0xFF00) > (Kind.FIN << 8))
               | ((head >> 16) >= self.profile.sectors) | (words[:, 3] != self._scan_word)
               | (data & ((x >= self.scan_width) | (y >= self.scan_height))))
        if self.scan_number is not None:
            bad |= (words[:, 7] != self.session_token) | (words[:, 1] != self.scan_number)
        if not bad.any():
            return Batch(parts, heads, True, frames, None, nb, positions=y.astype(np.int64) * self.scan_width + x)
        for i in np.flatnonzero(bad).tolist():
            reject(self._reason(heads[i]))
        good = np.flatnonzero(~bad)
        return Batch(parts, heads[good], False, frames, good, nb, all_headers=heads)

    def _reason(self, head) -> MalformedMessage:
        """Why one block's header is bad (the first rule it breaks)."""
        w, h = self.scan_width, self.scan_height
        if head["version"] != WIRE_VERSION:
            return MalformedMessage("unknown_version", f"header version {head['version']}, expected {WIRE_VERSION}")
        if head["kind"] > Kind.FIN:
            return MalformedMessage("unknown_kind", f"message kind {head['kind']}")
        if head["sector"] >= self.profile.sectors:
            return MalformedMessage("sector_out_of_range",
                                    f"sector {head['sector']}, detector has {self.profile.sectors}")
        if self.scan_number is not None and head["session"] != self.session_token:
            return MalformedMessage("wrong_session", f"session token {int(head['session']):#010x}, this session's "
                                    f"is {self.session_token:#010x}")
        if self.scan_number is not None and head["scan_number"] != self.scan_number:
            return MalformedMessage("wrong_scan", f"scan {int(head['scan_number'])}, this session's is "
                                    f"{self.scan_number}")
        if (head["scan_width"], head["scan_height"]) != (w, h):
            return MalformedMessage("frame_outside_scan", f"header scan {head['scan_width']}x{head['scan_height']}, "
                                    f"session scan {w}x{h}")
        return MalformedMessage("frame_outside_scan", f"position ({head['x']}, {head['y']}) outside scan {w}x{h}")


class SectorCopies:
    """Tells a second copy of a sector that differs from the first (a conflict) from a mere repeat.

    While the first copy is still held the two are compared byte for byte; once its frame is
    assembled, against a fingerprint of the first: a weighted sum of every 61st 64-bit word (a
    few microseconds a sector, 4 bytes per sector of the scan). A copy that differs only in
    words the fingerprint skips passes as a repeat: this catches re-sent data that changed, not
    a forger (CURVE and the session token keep those out).
    """

    _STRIDE = 61
    _WEIGHTS = np.arange(1, 2 * 65536, 2, dtype=np.uint64)

    def __init__(self, positions: int, sectors: int):
        self.prints = np.zeros((positions, sectors), np.uint32)
        self.conflicted: set[int] = set()

    @classmethod
    def fingerprint(cls, payload) -> int:
        buf = memoryview(payload.buffer if hasattr(payload, "buffer") else payload).cast("B")
        words = np.frombuffer(buf, np.uint64, len(buf) // 8) if len(buf) >= 8 else np.frombuffer(buf, np.uint8)
        sample = words[:: cls._STRIDE].astype(np.uint64)
        return int((sample * cls._WEIGHTS[: sample.size]).sum(dtype=np.uint64)) & 0xFFFFFFFF

    @classmethod
    def fingerprints(cls, blocks: np.ndarray, rows=slice(None)) -> np.ndarray:
        """``fingerprint`` of the ``rows`` of ``blocks`` (uint8, one block per row) in a few
        numpy operations: one strided view (only the sampled words are read), one weighted sum."""
        nbytes = blocks.shape[1]
        if nbytes < 8:
            sample = blocks[rows, :: cls._STRIDE].astype(np.uint64)
        else:
            sample = blocks[:, : nbytes // 8 * 8].view(np.uint64)[rows, :: cls._STRIDE]
        return ((sample * cls._WEIGHTS[: sample.shape[1]]).sum(axis=1, dtype=np.uint64)
                & np.uint64(0xFFFFFFFF)).astype(np.uint32)

    def first(self, pos: int, sector: int, payload) -> None:
        self.prints[pos, sector] = self.fingerprint(payload)

    def firsts(self, pos: np.ndarray, sectors: np.ndarray, blocks: np.ndarray, rows=slice(None)) -> None:
        """``first`` for a batch at once: the blocks at ``rows`` of ``blocks``."""
        self.prints[pos, sectors] = self.fingerprints(blocks, rows)

    def second(self, pos: int, sector: int, payload, first=None) -> MalformedMessage:
        """The rejection for a second copy: ``duplicate_sector``, or ``conflicting_sector`` (the
        position is then conflicted: left out of the output)."""
        if first is not None:
            as_bytes = lambda p: memoryview(p.buffer if hasattr(p, "buffer") else p).cast("B")  # noqa: E731
            same = as_bytes(first) == as_bytes(payload)
        else:
            same = int(self.prints[pos, sector]) == self.fingerprint(payload)
        if same:
            return MalformedMessage("duplicate_sector", f"sector {sector} of position {pos} twice")
        self.conflicted.add(pos)
        return MalformedMessage("conflicting_sector", f"sector {sector} of position {pos} twice, the copies "
                                "differ: the position is left out of the output")


class RejectLog:
    """Counts rejected messages per reason and logs each reason once, with its first example."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.counts: Counter[str] = Counter()

    def reject(self, err: MalformedMessage) -> None:
        first = err.reason not in self.counts
        self.counts[err.reason] += 1
        if first:
            self.logger.warning("rejected message (%s): %s; further ones are counted, not logged",
                                err.reason, err.detail)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
