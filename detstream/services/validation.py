"""Checks a message against the session's geometry, and counts what was rejected and why."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..profile import DetectorProfile
from ..wire import WIRE_VERSION, Header, Kind, MalformedMessage, parse_headers


def _buf(frame):
    return frame.buffer if hasattr(frame, "buffer") else frame


@dataclass(slots=True)
class Batch:
    """The good blocks of one message: their headers (HEADER_DTYPE) and payload frames, in order.

    ``whole`` says every block was good, so the message may be forwarded exactly as received.
    """

    parts: list
    headers: np.ndarray
    payloads: list
    whole: bool

    @property
    def positions(self) -> np.ndarray:
        h = self.headers
        return h["y"].astype(np.int64) * h["scan_width"] + h["x"]


class MessageValidator:
    """Turns ``[header, payload]`` frames into a Header, or raises MalformedMessage with a reason."""

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int):
        self.profile = profile
        self.scan_width = scan_width
        self.scan_height = scan_height
        self.positions = scan_width * scan_height

    def check_batch(self, parts, reject: Callable[[MalformedMessage], None]) -> Batch:
        """Validate every block of a (version 2) batch; each bad one goes to ``reject`` alone.

        Raises MalformedMessage when the message as a whole cannot be read (its headers frame,
        or a frame count that does not pair headers with payloads).
        """
        heads = parse_headers(_buf(parts[0]))
        n = len(heads)
        if len(parts) != n + 1:
            raise MalformedMessage("wrong_part_count", f"{len(parts)} parts for {n} headers, expected {n + 1}")
        payloads = parts[1:]
        sizes = np.fromiter((len(_buf(p)) for p in payloads), dtype=np.int64, count=n)
        kind = heads["kind"]
        data = kind == Kind.DATA
        checks = (
            (heads["version"] != WIRE_VERSION, "unknown_version",
             lambda i: f"header version {heads['version'][i]}, expected {WIRE_VERSION}"),
            (kind > Kind.FIN, "unknown_kind", lambda i: f"message kind {kind[i]}"),
            (heads["sector"] >= self.profile.sectors, "sector_out_of_range",
             lambda i: f"sector {heads['sector'][i]}, detector has {self.profile.sectors}"),
            ((heads["scan_width"] != self.scan_width) | (heads["scan_height"] != self.scan_height),
             "frame_outside_scan", lambda i: f"header scan {heads['scan_width'][i]}x{heads['scan_height'][i]}, "
             f"session scan {self.scan_width}x{self.scan_height}"),
            (~data & (sizes != 0), "payload_size",
             lambda i: f"{Kind(kind[i]).name} marker with a {sizes[i]}-byte payload"),
            (data & ((heads["x"] >= self.scan_width) | (heads["y"] >= self.scan_height)), "frame_outside_scan",
             lambda i: f"position ({heads['x'][i]}, {heads['y'][i]}) outside scan {self.scan_width}x{self.scan_height}"),
            (data & (sizes != self.profile.sector_nbytes), "payload_size",
             lambda i: f"payload {sizes[i]} bytes, profile {self.profile.name} sector is {self.profile.sector_nbytes}"),
        )
        bad = np.zeros(n, dtype=bool)
        for mask, reason, detail in checks:
            new = mask & ~bad
            if new.any():
                for i in np.flatnonzero(new).tolist():
                    reject(MalformedMessage(reason, detail(i)))
                bad |= new
        if not bad.any():
            return Batch(parts, heads, payloads, True)
        good = np.flatnonzero(~bad)
        return Batch(parts, heads[good], [payloads[i] for i in good.tolist()], False)

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
