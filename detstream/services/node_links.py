"""The aggregator's sockets to its nodes: one PUSH per node for the data, and with acks one
PULL per node for its ACKs and heartbeats and a monitor of the PUSH's connection.

Sends never block: a node's socket that is full queues the message in that node's backlog
(references, never copies), flushed when the socket can take more; a backlog at the HWM holds
every read back (``full_backlogs``) until it is down to half, the backpressure a blocking send
used to give.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Optional, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import wire
from ..wire import Control, MalformedMessage
from . import security
from .delivery_types import Acked, Heartbeat

log = logging.getLogger("detstream.aggregator")


class NodeLinks:
    def __init__(self, ctx: zmq.Context, curve: Optional[security.Curve], node_endpoints: Sequence[str],
                 ack_endpoints: Optional[Sequence[str]], hwm: int, linger_ms: int):
        if ack_endpoints is not None and len(ack_endpoints) != len(node_endpoints):
            raise ValueError(f"{len(ack_endpoints)} ack endpoints for {len(node_endpoints)} nodes")
        self.nodes = len(node_endpoints)
        self.hwm = hwm
        self.linger_ms = linger_ms
        self.outbound: list[zmq.Socket] = []
        #: With acks, per node: its ACK socket, and the monitor of its data socket's connection.
        self.ack_in: dict[int, zmq.Socket] = {}
        self.monitors: dict[int, zmq.Socket] = {}
        for i, ep in enumerate(node_endpoints):
            s = security.client(curve, ctx.socket(zmq.PUSH), "distributor")
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.LINGER, linger_ms)
            if ack_endpoints is not None:
                self.monitors[i] = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            s.connect(ep)
            self.outbound.append(s)
            if ack_endpoints is not None:
                a = security.client(curve, ctx.socket(zmq.PULL), "distributor")
                a.setsockopt(zmq.LINGER, 0)
                a.connect(ack_endpoints[i])
                self.ack_in[i] = a
        self.backlog: list[deque] = [deque() for _ in range(self.nodes)]
        # A node whose backlog reached the HWM holds all reads back until it is down to half:
        # resuming at once would cost a loop turn per message while the node is the bottleneck.
        self._held = [False] * self.nodes
        self.full_backlogs = 0

    def receivers(self, node: int) -> tuple:
        """The sockets to poll for what ``node`` tells (its ACKs, its connection's events)."""
        return (self.ack_in[node], self.monitors[node]) if node in self.ack_in else ()

    # -- sending ---------------------------------------------------------------------------
    def send(self, node: int, parts) -> None:
        """Queue a message for a node without blocking: behind its backlog if it has one."""
        backlog = self.backlog[node]
        if not backlog:
            try:
                self.outbound[node].send_multipart(parts, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
        backlog.append(parts)
        if len(backlog) >= self.hwm and not self._held[node]:
            self._held[node] = True
            self.full_backlogs += 1

    def flush(self, node: int) -> None:
        """Hand a node's backlog to its socket, as far as the socket takes it."""
        backlog, sock = self.backlog[node], self.outbound[node]
        while backlog:
            try:
                sock.send_multipart(backlog[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            backlog.popleft()
            if self._held[node] and len(backlog) <= self.hwm // 2:
                self._held[node] = False
                self.full_backlogs -= 1

    # -- what the nodes tell ---------------------------------------------------------------
    def read_control(self, node: int, reject: Callable[[MalformedMessage], None]) -> list:
        """A node's ACKs and heartbeats (up to 256) as stimuli, each with when it was read."""
        out: list = []
        sock = self.ack_in[node]
        for _ in range(256):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                msg = wire.parse_control(parts)
            except MalformedMessage as err:
                reject(err)
                continue
            now = time.monotonic()
            if msg.kind is Control.ACK:
                out.append(Acked(node, msg.positions, msg.received, msg.counted, now))
            else:
                out.append(Heartbeat(node, msg.received, msg.counted, now))
        return out

    def disconnected(self, node: int) -> bool:
        """Whether the connection to ``node`` has dropped (reads its monitor's events)."""
        while True:
            try:
                event = recv_monitor_message(self.monitors[node], zmq.NOBLOCK)
            except zmq.Again:
                return False
            if event["event"] == zmq.EVENT_DISCONNECTED:
                return True

    # -- fencing and the end ---------------------------------------------------------------
    def fence(self, node: int) -> None:
        """Close a lost node's sockets and drop what is queued for it."""
        out = self.outbound[node]
        out.disable_monitor()
        self.monitors[node].close(0)
        out.close(0)
        self.ack_in[node].close(0)
        if self._held[node]:
            self._held[node] = False
            self.full_backlogs -= 1
        self.backlog[node].clear()

    def settle(self, alive: Sequence[bool], hang_up: Sequence[int], timeout_s: float) -> None:
        """At the end: wait (bounded) until every live node's backlog is in its socket and each
        node in ``hang_up`` (sent FIN) has hung up, so that none sees the aggregator go first."""
        deadline = time.monotonic() + timeout_s
        waiting = set(hang_up)
        while True:
            for n in range(self.nodes):
                if alive[n]:
                    self.flush(n)
            for n in list(waiting):
                if self.disconnected(n) and not self.backlog[n]:
                    waiting.discard(n)
            unsent = sum(len(self.backlog[n]) for n in range(self.nodes) if alive[n])
            if not (waiting or unsent):
                return
            if time.monotonic() >= deadline:
                if waiting:
                    log.warning("nodes %s had not hung up %g s after FIN", sorted(waiting), timeout_s)
                else:
                    log.error("%d messages for the nodes could not be sent within %g s", unsent, timeout_s)
                return
            time.sleep(0.01)

    def close(self) -> None:
        for s in self.ack_in.values():
            s.close(0)
        for n, s in enumerate(self.outbound):
            if not s.closed:
                if n in self.monitors:
                    s.disable_monitor()
                    self.monitors[n].close(0)
                s.close(self.linger_ms)
