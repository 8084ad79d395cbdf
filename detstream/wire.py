"""The wire format between services: versioned fixed-size headers, then the sector payloads.

Version 3 (batches, each header naming its session): a message is ``[headers, payload frame(s)]``:
the first ZeroMQ frame holds N sector headers back to back (N x 32 bytes); the data blocks' payloads follow back to back in
one or more frames, each frame holding whole blocks (markers have no payload). A producer sends
one payload frame per batch, so that every hop handles two frames whatever the batch size; an
aggregator forwards the message as received. N = 1 is version 1's two-frame message. A producer
puts in one batch only blocks of positions owned by one node. Each block's header is validated
on its own: a bad block is rejected alone. Payload bytes that do not pair with the headers
leave no block to trust: that message is rejected whole.
Sector header, little endian (every header of a batch carries the version):

| field          | type | note                                            |
|----------------|------|-------------------------------------------------|
| version        | u8   | 3                                               |
| kind           | u8   | 0 = sector data, 1 = end of scan, 2 = FIN       |
| sector         | u16  | sector (module) index; FIN: the aggregator shard |
| scan_number    | u32  | camera's scan number                            |
| frame_number   | u32  | camera's frame counter                          |
| scan_width     | u16  | scan size x                                     |
| scan_height    | u16  | scan size y                                     |
| x, y           | u16  | scan position; position index = y * width + x   |
| count          | u64  | data: per-sector sequence number; end: frames sent; FIN: positions acked |
| session        | u32  | the session's token (SessionSpec.session_token)  |

The first seven fields are the camera's raw v5 header; version, kind, count and session are
ours. The session token, with the scan number, names the session a block belongs to, so
another session's block is rejected (``wrong_session``, ``wrong_scan``).
End-of-scan and FIN messages have an empty payload. FIN goes from the aggregator to a node
once every position it sent anywhere is acknowledged: the node may then exit.

Acknowledgements travel the other way, node to aggregator, on a socket of their own, as
``[control header, payload]``; control header, little endian:

| field    | type | note                                                         |
|----------|------|--------------------------------------------------------------|
| version  | u8   | 1                                                            |
| kind     | u8   | 1 = ACK (payload: uint32 positions now durable), 2 = HEARTBEAT |
| node     | u16  | the sender's node index                                      |
| received | u64  | frames the node has assembled so far                         |
| counted  | u64  | frames the node has counted so far                           |

Version 2 made a message a batch; version 3 added the session token to every header. The
control header's layout and version (1) are unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import numpy as np

from .errors import DetstreamError

WIRE_VERSION = 3
CONTROL_VERSION = 1
_HEADER = struct.Struct("<BBHIIHHHHQI")
HEADER_SIZE = _HEADER.size
#: The sector header as a numpy record, to read every header of a batch at once.
HEADER_DTYPE = np.dtype({
    "names": ["version", "kind", "sector", "scan_number", "frame_number", "scan_width",
              "scan_height", "x", "y", "count", "session"],
    "formats": ["u1", "u1", "<u2", "<u4", "<u4", "<u2", "<u2", "<u2", "<u2", "<u8", "<u4"],
    "offsets": [0, 1, 2, 4, 8, 12, 14, 16, 18, 20, 28], "itemsize": HEADER_SIZE})


class Kind(IntEnum):
    DATA = 0
    END = 1
    FIN = 2


class Control(IntEnum):
    """Kinds of node-to-aggregator control message."""
    ACK = 1
    HEARTBEAT = 2


_CONTROL = struct.Struct("<BBHQQ")


class MalformedMessage(DetstreamError, ValueError):
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
    session: int = 0
    version: int = WIRE_VERSION

    @property
    def position(self) -> int:
        return self.y * self.scan_width + self.x

    def pack(self) -> bytes:
        return _HEADER.pack(
            self.version, int(self.kind), self.sector, self.scan_number, self.frame_number,
            self.scan_width, self.scan_height, self.x, self.y, self.count, self.session,
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
        version, kind, sector, scan, frame, w, h, x, y, count, session = _HEADER.unpack(buf)
        try:
            kind = Kind(kind)
        except ValueError:
            raise MalformedMessage("unknown_kind", f"message kind {kind}") from None
        return cls(kind, sector, scan, frame, w, h, x, y, count, session, version)


def data_header(sector: int, scan_number: int, frame_number: int, scan_width: int,
                scan_height: int, x: int, y: int, seq: int, session: int = 0) -> bytes:
    return _HEADER.pack(WIRE_VERSION, Kind.DATA, sector, scan_number, frame_number,
                        scan_width, scan_height, x, y, seq, session)


def batch_message(headers, payloads) -> list:
    """The frames of one batch: the headers joined into one frame, then the payloads. One block
    goes as it is (zero-copy); several are joined into one frame, so that every hop handles two
    frames per batch whatever its size (per-frame costs dominate a Python service's time)."""
    if len(payloads) == 1:
        return [headers[0], payloads[0]]
    return [b"".join(headers), b"".join(payloads)]


def parse_headers(buf) -> np.ndarray:
    """Every header of a batch's first frame (a view); raise MalformedMessage if it cannot be."""
    n = len(buf)
    if n == 0 or n % HEADER_SIZE:
        raise MalformedMessage("short_header", f"headers frame is {n} bytes, not a multiple of {HEADER_SIZE}")
    return np.frombuffer(buf, dtype=HEADER_DTYPE)


def pack_headers(headers: np.ndarray) -> bytes:
    """Headers (HEADER_DTYPE) as a batch's first frame."""
    return np.ascontiguousarray(headers, dtype=HEADER_DTYPE).tobytes()


def end_header(sector: int, scan_number: int, scan_width: int, scan_height: int, frames_sent: int,
               session: int = 0) -> bytes:
    return _HEADER.pack(WIRE_VERSION, Kind.END, sector, scan_number, 0, scan_width, scan_height, 0, 0, frames_sent,
                        session)


def fin_header(scan_number: int, scan_width: int, scan_height: int, acked: int, *, shard: int = 0,
               session: int = 0) -> bytes:
    """FIN: every position is acknowledged, the node may exit; ``acked`` is how many it acknowledged.
    Its sector field carries the aggregator shard's index (a node waits for every shard's FIN)."""
    return _HEADER.pack(WIRE_VERSION, Kind.FIN, shard, scan_number, 0, scan_width, scan_height, 0, 0, acked,
                        session)


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """A node's ACK (positions now durable) or HEARTBEAT, with its progress counters."""

    kind: Control
    node: int
    received: int
    counted: int
    positions: np.ndarray  # uint32; empty for a heartbeat


def control_message(kind: Control, node: int, received: int, counted: int,
                    positions: Optional[np.ndarray] = None) -> list:
    """The two frames of an ACK or HEARTBEAT."""
    payload = b"" if positions is None else np.ascontiguousarray(positions, dtype="<u4").tobytes()
    return [_CONTROL.pack(CONTROL_VERSION, int(kind), node, received, counted), payload]


def parse_control(parts) -> ControlMessage:
    """Parse an ACK or HEARTBEAT; raise MalformedMessage naming what is wrong."""
    if len(parts) != 2:
        raise MalformedMessage("wrong_part_count", f"{len(parts)} parts, expected 2 (header, payload)")
    head, payload = (p.buffer if hasattr(p, "buffer") else p for p in parts)
    if len(head) < 1 or bytes(head[:1])[0] != CONTROL_VERSION:
        raise MalformedMessage("unknown_version", f"control header version "
                               f"{bytes(head[:1])[0] if len(head) else None}, expected {CONTROL_VERSION}")
    if len(head) != _CONTROL.size:
        raise MalformedMessage("short_header", f"control header is {len(head)} bytes, expected {_CONTROL.size}")
    _, kind, node, received, counted = _CONTROL.unpack(head)
    try:
        kind = Control(kind)
    except ValueError:
        raise MalformedMessage("unknown_kind", f"control kind {kind}") from None
    if len(payload) % 4 or (kind is Control.HEARTBEAT and len(payload)):
        raise MalformedMessage("payload_size", f"{kind.name} with a {len(payload)}-byte payload")
    return ControlMessage(kind, node, received, counted, np.frombuffer(payload, dtype="<u4"))
