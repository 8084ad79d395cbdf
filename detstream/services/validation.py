"""Checks a message against the session's geometry, and counts what was rejected and why."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Optional

import numpy as np

from ..profile import DetectorProfile
from ..wire import Header, Kind, MalformedMessage


class MessageValidator:
    """Turns ``[header, payload]`` frames into a Header, or raises MalformedMessage with a reason."""

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int):
        self.profile = profile
        self.scan_width = scan_width
        self.scan_height = scan_height
        self.positions = scan_width * scan_height
        self.scan_number: Optional[int] = None
        self.session_token = 0

    def expect_session(self, scan_number: int, token: int) -> None:
        """Reject from now on every message that names another scan or session (token)."""
        self.scan_number, self.session_token = scan_number, token

    def check(self, parts) -> Header:
        if len(parts) != 2:
            raise MalformedMessage("wrong_part_count", f"{len(parts)} parts, expected 2 (header, payload)")
        header = Header.unpack(parts[0].buffer if hasattr(parts[0], "buffer") else parts[0])
        if header.sector >= self.profile.sectors:
            raise MalformedMessage(
                "sector_out_of_range", f"sector {header.sector}, detector has {self.profile.sectors}")
        if (header.scan_width, header.scan_height) != (self.scan_width, self.scan_height):
            raise MalformedMessage(
                "frame_outside_scan",
                f"header scan {header.scan_width}x{header.scan_height}, session scan "
                f"{self.scan_width}x{self.scan_height}")
        if self.scan_number is not None:
            if header.session != self.session_token:
                raise MalformedMessage("wrong_session", f"session token {header.session:#010x}, this session's is "
                                       f"{self.session_token:#010x}")
            if header.scan_number != self.scan_number:
                raise MalformedMessage("wrong_scan", f"scan {header.scan_number}, this session's is {self.scan_number}")
        size = len(parts[1].buffer) if hasattr(parts[1], "buffer") else len(parts[1])
        if header.kind is not Kind.DATA:
            if size:
                raise MalformedMessage("payload_size", f"{header.kind.name} marker with a {size}-byte payload")
            return header
        if header.x >= self.scan_width or header.y >= self.scan_height:
            raise MalformedMessage(
                "frame_outside_scan",
                f"position ({header.x}, {header.y}) outside scan {self.scan_width}x{self.scan_height}")
        if size != self.profile.sector_nbytes:
            raise MalformedMessage(
                "payload_size", f"payload {size} bytes, profile {self.profile.name} sector is "
                f"{self.profile.sector_nbytes}")
        return header


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

    def first(self, pos: int, sector: int, payload) -> None:
        self.prints[pos, sector] = self.fingerprint(payload)

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
