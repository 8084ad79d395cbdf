"""The wire format between services: a versioned fixed-size header, then the sector payload.

A message is two ZeroMQ frames ``[header, payload]``. Version 1 header, little endian:

| field          | type | note                                            |
|----------------|------|-------------------------------------------------|
| version        | u8   | 1                                               |
| kind           | u8   | 0 = sector data, 1 = end of scan                |
| sector         | u16  | sector (module) index                           |
| scan_number    | u32  | camera's scan number                            |
| frame_number   | u32  | camera's frame counter                          |
| scan_width     | u16  | scan size x                                     |
| scan_height    | u16  | scan size y                                     |
| x, y           | u16  | scan position; position index = y * width + x   |
| count          | u64  | data: per-sector sequence number; end: frames sent |

The first seven fields are the camera's raw v5 header; version, kind and count are ours.
An end-of-scan message has an empty payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

WIRE_VERSION = 1
_HEADER = struct.Struct("<BBHIIHHHHQ")
HEADER_SIZE = _HEADER.size


class Kind(IntEnum):
    DATA = 0
    END = 1


class MalformedMessage(ValueError):
    """A message that cannot be used; ``reason`` is a short stable key for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    sector: int
    scan_number: int
    frame_number: int
    scan_width: int
    scan_height: int
    x: int
    y: int
    count: int = 0
    version: int = WIRE_VERSION

    @property
    def position(self) -> int:
        return self.y * self.scan_width + self.x

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.version, int(self.kind), self.sector, self.scan_number, self.frame_number,
            self.scan_width, self.scan_height, self.x, self.y, self.count,
        )

    @classmethod
    def unpack(cls, buf) -> "Header":
        """Parse a header; raise MalformedMessage naming what is wrong."""
        n = len(buf)
        if n < 1:
            raise MalformedMessage("short_header", "empty header")
        version = bytes(buf[:1])[0]
        if version != WIRE_VERSION:
            raise MalformedMessage("unknown_version", f"header version {version}, expected {WIRE_VERSION}")
        if n != HEADER_SIZE:
            raise MalformedMessage("short_header", f"header is {n} bytes, expected {HEADER_SIZE}")
        version, kind, sector, scan, frame, w, h, x, y, count = _HEADER.unpack(buf)
        try:
            kind = Kind(kind)
        except ValueError:
            raise MalformedMessage("unknown_kind", f"message kind {kind}") from None
        return cls(kind, sector, scan, frame, w, h, x, y, count, version)


def data_header(sector: int, scan_number: int, frame_number: int, scan_width: int,
                scan_height: int, x: int, y: int, seq: int) -> bytes:
    return _HEADER.pack(WIRE_VERSION, Kind.DATA, sector, scan_number, frame_number,
                        scan_width, scan_height, x, y, seq)


def end_header(sector: int, scan_number: int, scan_width: int, scan_height: int, frames_sent: int) -> bytes:
    return _HEADER.pack(WIRE_VERSION, Kind.END, sector, scan_number, 0, scan_width, scan_height, 0, 0, frames_sent)
