"""Aggregator: receives every sector from the producers and routes each frame to one node.

Routing rule: all sectors of scan position ``p`` go to node ``p % nodes``, so a node can
assemble whole frames and knows which positions are its own. Payloads are forwarded as the
received ZeroMQ frames (``copy=False`` both ways): the aggregator never copies pixel data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import zmq

from .. import wire
from ..profile import DetectorProfile
from ..wire import Kind, MalformedMessage
from .validation import MessageValidator, RejectLog

log = logging.getLogger("detstream.aggregator")


def route(position: int, nodes: int) -> int:
    """The node that receives every sector of scan position ``position``."""
    return position % nodes


@dataclass
class AggregatorStats:
    frames_routed: list[int]
    bytes_routed: int = 0
    ends_seen: int = 0
    rejected: dict = field(default_factory=dict)
    first_recv: Optional[float] = None
    last_recv: Optional[float] = None

    def as_dict(self) -> dict:
        return {
            "sector_blocks_routed_per_node": self.frames_routed, "bytes_routed": self.bytes_routed,
            "end_markers": self.ends_seen, "rejected": self.rejected,
            "seconds": (self.last_recv - self.first_recv) if self.first_recv and self.last_recv else 0.0,
        }


class Aggregator:
    """One PULL socket in from all producers, one PUSH socket out per node (in node order)."""

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int,
                 node_endpoints: Sequence[str], bind: str = "tcp://127.0.0.1:*", hwm: int = 64,
                 ctx: Optional[zmq.Context] = None):
        self.profile = profile
        self.validator = MessageValidator(profile, scan_width, scan_height)
        self.rejects = RejectLog(log)
        self.ctx = ctx or zmq.Context.instance()
        self.inbound = self.ctx.socket(zmq.PULL)
        self.inbound.setsockopt(zmq.RCVHWM, hwm)
        self.inbound.setsockopt(zmq.LINGER, 0)
        self.inbound.bind(bind)
        self.endpoint = self.inbound.getsockopt_string(zmq.LAST_ENDPOINT)
        self.outbound = []
        for ep in node_endpoints:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.LINGER, 600_000)
            s.connect(ep)
            self.outbound.append(s)
        self.nodes = len(self.outbound)
        # per_sector_node[s][n]: data blocks of sector s sent to node n (the END marker's count).
        self.per_sector_node = [[0] * self.nodes for _ in range(profile.sectors)]
        self.ended: set[int] = set()
        self.stats = AggregatorStats(frames_routed=[0] * self.nodes)

    def run(self, should_stop: Optional[Callable[[], bool]] = None, poll_ms: int = 200,
            on_progress: Optional[Callable[[AggregatorStats], None]] = None,
            stall_timeout_s: Optional[float] = None) -> AggregatorStats:
        """Route until every sector has sent its END marker, the stream stalls, or ``should_stop``.

        The stall clock starts with the first message: waiting for producers to start is the
        session's business (it fails the session, and ``should_stop`` then ends this loop).
        """
        poller = zmq.Poller()
        poller.register(self.inbound, zmq.POLLIN)
        last_progress = last_data = time.monotonic()
        while len(self.ended) < self.profile.sectors:
            if not poller.poll(poll_ms):
                if should_stop is not None and should_stop():
                    log.warning("stop requested; %d of %d sectors ended", len(self.ended),
                                self.profile.sectors)
                    break
                # Only a stream that has started can stall; before that the flow watches startup.
                if (stall_timeout_s is not None and self.stats.first_recv is not None
                        and time.monotonic() - last_data > stall_timeout_s):
                    log.warning("stalled: no message for %g s; %d of %d sectors ended",
                                stall_timeout_s, len(self.ended), self.profile.sectors)
                    break
                continue
            last_data = time.monotonic()
            # Drain what is queued without going back to the poller for every message.
            for _ in range(1024):
                try:
                    parts = self.inbound.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(parts)
            now = time.monotonic()
            if on_progress is not None and now - last_progress > 0.5:
                last_progress = now
                on_progress(self.stats)
        self.stats.rejected = self.rejects.as_dict()
        return self.stats

    def _handle(self, parts) -> None:
        try:
            header = self.validator.check(parts)
        except MalformedMessage as err:
            self.rejects.reject(err)
            return
        now = time.time()
        if self.stats.first_recv is None:
            self.stats.first_recv = now
        self.stats.last_recv = now
        if header.kind is Kind.END:
            if header.sector in self.ended:
                self.rejects.reject(MalformedMessage("duplicate_end", f"second END from sector {header.sector}"))
                return
            self.ended.add(header.sector)
            self.stats.ends_seen += 1
            for node, sock in enumerate(self.outbound):
                sock.send_multipart([
                    wire.end_header(header.sector, header.scan_number, header.scan_width,
                                    header.scan_height, self.per_sector_node[header.sector][node]),
                    b""])
            return
        node = route(header.position, self.nodes)
        self.outbound[node].send_multipart(parts, copy=False)
        self.per_sector_node[header.sector][node] += 1
        self.stats.frames_routed[node] += 1
        self.stats.bytes_routed += len(parts[1].buffer)

    def close(self) -> None:
        self.inbound.close()
        for s in self.outbound:
            s.close()  # LINGER drains what is queued for the nodes
