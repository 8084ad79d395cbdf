"""Producer: one per sector. Sends each sector block as ``[header, payload]`` to the aggregator.

The payload goes zero-copy (pyzmq ``copy=False``); a PUSH socket with a send high-water mark
blocks when the aggregator falls behind, which is the backpressure that bounds memory.
At end of scan it sends an END marker carrying how many blocks it sent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import zmq

from .. import wire

log = logging.getLogger("detstream.producer")


@dataclass
class ProducerStats:
    sector: int
    frames_sent: int = 0
    bytes_sent: int = 0
    first_send: Optional[float] = None
    last_send: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "sector": self.sector, "frames_sent": self.frames_sent, "bytes_sent": self.bytes_sent,
            "first_send": self.first_send, "last_send": self.last_send,
            "seconds": (self.last_send - self.first_send) if self.first_send and self.last_send else 0.0,
            **self.extra,
        }


def run_producer(source, sector: int, endpoint: str, hwm: int = 64,
                 ctx: Optional[zmq.Context] = None, tee=None,
                 on_progress: Optional[Callable[[int], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 linger_s: float = 600.0, stop_check_s: float = 0.5) -> ProducerStats:
    """Stream ``source``'s sector ``sector`` to the aggregator at ``endpoint``.

    ``tee``, if given, receives ``write(meta, block)`` for every block (the file path's writer).
    ``should_stop`` is checked between blocks, at most every ``stop_check_s``; when it returns
    True the END marker still goes out.
    """
    own_ctx = ctx is None
    ctx = ctx or zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
    sock.connect(endpoint)
    stats = ProducerStats(sector=sector)
    next_check = 0.0
    try:
        for seq, (meta, block) in enumerate(source.iter_sector(sector)):
            if should_stop is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + stop_check_s  # an etcd read: not for every block
                if should_stop():
                    log.warning("stop requested after %d blocks of sector %d", seq, sector)
                    break
            header = wire.data_header(sector, meta.scan_number, meta.frame_number, meta.scan_width,
                                      meta.scan_height, meta.x, meta.y, seq)
            if stats.first_send is None:
                stats.first_send = time.time()
            sock.send_multipart([header, block], copy=False)
            if tee is not None:
                tee.write(meta, block)
            stats.frames_sent += 1
            stats.bytes_sent += block.nbytes if hasattr(block, "nbytes") else len(block)
            if on_progress is not None and stats.frames_sent % 256 == 0:
                on_progress(stats.frames_sent)
        sock.send_multipart([wire.end_header(sector, source.scan_number, source.scan_width,
                                             source.scan_height, stats.frames_sent), b""])
        stats.last_send = time.time()
    finally:
        sock.close()
        if own_ctx:
            # Blocks until queued blocks are delivered (LINGER): zero-copy payloads point into
            # the source's memory, which must outlive them.
            ctx.term()
    if on_progress is not None:
        on_progress(stats.frames_sent)
    return stats
