"""Aggregator: receives every sector from the producers and routes each frame to one node.

Routing rule: all sectors of scan position ``p`` go to node ``p % nodes``, so a node can
assemble whole frames. Payloads are forwarded as the received ZeroMQ frames (``copy=False``
both ways): the aggregator never copies pixel data.

With acknowledgements on (``ack_endpoints``), delivery is at-least-once:

* every position stays in a bounded window (the received frames, by reference) from its first
  sector until a node acknowledges it durable; a full window stops the reads from producers
  (backpressure), except from a sector that lags behind, whose blocks complete what the window
  already holds;
* a node is lost when its connection drops, when ``node_check`` no longer lists it (its leased
  etcd key), or when it holds complete unacknowledged frames and shows no progress for
  ``node_timeout_s``; its window entries and its future positions go to the next alive node,
  each position to exactly one node;
* after every sector's END, the aggregator waits until the window is empty, then sends FIN to
  each surviving node; positions no node acknowledged are reported as lost.

Sends never block: a node's socket that is full queues the message in that node's backlog
(references again), flushed when the socket can take more; a backlog at the HWM stops all
reads until it is down to half, the backpressure a blocking send used to give.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import wire
from ..profile import DetectorProfile
from ..wire import Control, Kind, MalformedMessage
from . import security
from .validation import MessageValidator, RejectLog

log = logging.getLogger("detstream.aggregator")


def route(position: int, nodes: int) -> int:
    """The node that receives every sector of scan position ``position``."""
    return position % nodes


def next_alive(position: int, alive: Sequence[bool]) -> Optional[int]:
    """The node for ``position`` given which nodes are alive: its own, else the next alive one."""
    n = len(alive)
    home = route(position, n)
    for i in range(n):
        if alive[(home + i) % n]:
            return (home + i) % n
    return None


@contextmanager
def fewer_collections(gen0: int = 100_000):
    """Run the cyclic garbage collector less often: the window keeps thousands of containers
    alive (no cycles among them), which the default threshold would walk ~500 times a scan."""
    old = gc.get_threshold()
    gc.set_threshold(gen0, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


@dataclass
class AggregatorStats:
    frames_routed: list[int]
    bytes_routed: int = 0
    ends_seen: int = 0
    rejected: dict = field(default_factory=dict)
    first_recv: Optional[float] = None
    last_recv: Optional[float] = None
    acks: bool = False
    window_frames: int = 0
    window_peak: int = 0
    window_full_s: float = 0.0
    positions_routed: list[int] = field(default_factory=list)
    positions_acked: list[int] = field(default_factory=list)
    rerouted: list[int] = field(default_factory=list)
    nodes_lost: list[dict] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    lost_reasons: dict = field(default_factory=dict)
    fin_sent: list[int] = field(default_factory=list)
    finish_reason: str = ""

    def as_dict(self) -> dict:
        d = {
            "sector_blocks_routed_per_node": self.frames_routed, "bytes_routed": self.bytes_routed,
            "end_markers": self.ends_seen, "rejected": self.rejected,
            "seconds": (self.last_recv - self.first_recv) if self.first_recv and self.last_recv else 0.0,
            "acks": self.acks, "finish_reason": self.finish_reason,
        }
        if self.acks:
            d.update({
                "window_frames": self.window_frames, "window_peak": self.window_peak,
                "window_full_seconds": self.window_full_s,
                "positions_routed_per_node": self.positions_routed,
                "positions_acked_per_node": self.positions_acked,
                "rerouted_positions": sorted(self.rerouted), "nodes_lost": self.nodes_lost,
                "lost_positions": self.lost, "lost_reasons": self.lost_reasons,
                "fin_sent_to": self.fin_sent,
            })
        return d


class _Entry:
    """One position in the window: the node it is routed to and the sectors received so far."""

    __slots__ = ("node", "parts", "have")

    def __init__(self, node: int, sectors: int):
        self.node = node
        self.parts: list = [None] * sectors
        self.have = 0


class _Node:
    """What the aggregator knows of one node's liveness."""

    __slots__ = ("alive", "finished", "complete_unacked", "busy_since", "last_progress",
                 "received", "counted")

    def __init__(self, now: float):
        self.alive = True
        self.finished = False          # FIN sent and the node has hung up
        self.complete_unacked = 0      # positions with every sector sent to it, not yet acknowledged
        self.busy_since = now          # when complete_unacked last went from 0 to 1
        self.last_progress = now       # last ACK, or heartbeat with new counts
        self.received = self.counted = -1


class Aggregator:
    """PULL sockets in (one shared, one per sector), one PUSH out per node (in node order),
    and with acks one PULL per node for its ACKs and heartbeats."""

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int,
                 node_endpoints: Sequence[str], bind: str = "tcp://127.0.0.1:*", hwm: int = 64,
                 ctx: Optional[zmq.Context] = None, ack_endpoints: Optional[Sequence[str]] = None,
                 window_frames: int = 1024, node_timeout_s: float = 10.0, linger_s: float = 10.0,
                 curve: Optional[security.Curve] = None):
        self.profile = profile
        self.sectors = profile.sectors
        self.positions = scan_width * scan_height
        self.validator = MessageValidator(profile, scan_width, scan_height)
        self.rejects = RejectLog(log)
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.guard = curve.start(self.ctx, self.rejects) if curve else None
        self.hwm = hwm
        self.linger_ms = int(linger_s * 1000)
        self.acks = ack_endpoints is not None
        if self.acks and len(ack_endpoints) != len(node_endpoints):
            raise ValueError(f"{len(ack_endpoints)} ack endpoints for {len(node_endpoints)} nodes")
        self.window_frames = window_frames
        self.node_timeout_s = node_timeout_s
        self.inbound = self._pull(bind)
        self.endpoint = self.inbound.getsockopt_string(zmq.LAST_ENDPOINT)
        # One socket per sector as well: with the window full, the aggregator can go on reading a
        # sector that lags behind, whose blocks complete frames it holds, and no other.
        self.sector_inbound = [self._pull(bind) for _ in range(self.sectors)]
        self.sector_endpoints = [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in self.sector_inbound]
        self._sector_of = {sock: k for k, sock in enumerate(self.sector_inbound)}
        self.nodes = len(node_endpoints)
        self.outbound = []
        self.monitors: list[Optional[zmq.Socket]] = []
        self.ack_in: list[Optional[zmq.Socket]] = []
        for i, ep in enumerate(node_endpoints):
            s = security.client(curve, self.ctx.socket(zmq.PUSH), "distributor")
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.LINGER, self.linger_ms)
            self.monitors.append(
                s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED) if self.acks else None)
            s.connect(ep)
            self.outbound.append(s)
            if self.acks:
                a = security.client(curve, self.ctx.socket(zmq.PULL), "distributor")
                a.setsockopt(zmq.LINGER, 0)
                a.connect(ack_endpoints[i])
                self.ack_in.append(a)
        self._backlog: list[deque] = [deque() for _ in range(self.nodes)]
        now = time.monotonic()
        self._node = [_Node(now) for _ in range(self.nodes)]
        self._window: dict[int, _Entry] = {}
        # Entries lacking sector s = len(window) - (have[s] - complete entries removed): O(1).
        self._have = [0] * self.sectors
        self._removed_complete = 0
        # A node whose backlog reached the HWM holds all reads back until it is down to half:
        # resuming at once would cost a loop turn per message while the node is the bottleneck.
        self._held = [False] * self.nodes
        self._full_backlogs = 0
        self._alive = [True] * self.nodes
        self._acked = np.zeros(self.positions if self.acks else 0, dtype=bool)
        self._lost_why: dict[str, set] = {}
        # per_sector_node[s][n]: data blocks of sector s sent to node n (the END marker's count).
        self.per_sector_node = [[0] * self.nodes for _ in range(self.sectors)]
        self.ended: set[int] = set()
        self.stats = AggregatorStats(frames_routed=[0] * self.nodes, acks=self.acks,
                                     window_frames=window_frames if self.acks else 0,
                                     positions_routed=[0] * self.nodes, positions_acked=[0] * self.nodes)
        self._scan_number = 0
        self._poller = zmq.Poller()
        self._polled: dict = {}
        self._closed = False

    def _pull(self, bind: str) -> zmq.Socket:
        s = security.server(self.guard, self.ctx.socket(zmq.PULL))
        s.setsockopt(zmq.RCVHWM, self.hwm)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(bind)
        return s

    @property
    def alive(self) -> list[bool]:
        return list(self._alive)

    # -- main loop -------------------------------------------------------------------------
    def run(self, should_stop: Optional[Callable[[], bool]] = None, poll_ms: int = 100,
            on_progress: Optional[Callable[[AggregatorStats], None]] = None,
            stall_timeout_s: Optional[float] = None,
            node_check: Optional[Callable[[], Optional[set]]] = None, node_check_s: float = 1.0,
            fin_wait_s: float = 5.0) -> AggregatorStats:
        """Route until every sector has ended (and, with acks, every frame is acknowledged and
        FIN sent), the stream stalls, or ``should_stop``.

        ``node_check`` returns the node indices still registered (None if unknown); it is called
        every ``node_check_s``, never per message. The stall clock starts with the first
        message and runs only while the aggregator is willing to read.
        """
        with fewer_collections():
            return self._run(should_stop, poll_ms, on_progress, stall_timeout_s, node_check,
                             node_check_s, fin_wait_s)

    def _run(self, should_stop, poll_ms, on_progress, stall_timeout_s, node_check, node_check_s,
             fin_wait_s) -> AggregatorStats:
        last_tick = last_check = 0.0
        last_data = time.monotonic()
        inputs_done = stopped = False
        reason = ""
        while True:
            if not inputs_done and len(self.ended) == self.sectors:
                inputs_done = True
                self._end_of_input("incomplete")
            if inputs_done and (not self.acks or not self._window):
                break
            readable = [] if inputs_done else self._readable()
            for s in (self.inbound, *self.sector_inbound):
                self._watch(s, zmq.POLLIN if s in readable else 0)
            for n in range(self.nodes):
                alive = self._node[n].alive
                self._watch(self.outbound[n], zmq.POLLOUT if self._backlog[n] and alive else 0)
                if self.acks and alive:
                    self._watch(self.ack_in[n], zmq.POLLIN)
                    self._watch(self.monitors[n], zmq.POLLIN)
            t_poll = time.monotonic()
            ready = dict(self._poller.poll(poll_ms))
            if self.acks and len(self._window) >= self.window_frames:
                self.stats.window_full_s += time.monotonic() - t_poll
            for n in range(self.nodes):
                if self.acks and self._node[n].alive and self.ack_in[n] in ready:
                    self._read_acks(n)
                if self.acks and self._node[n].alive and self.monitors[n] in ready:
                    self._read_monitor(n)
                if self._node[n].alive and self.outbound[n] in ready:
                    self._flush(n)
            got = self._read_inbound([s for s in readable if s in ready])
            now = time.monotonic()
            if got or not readable:   # paused by the window or done reading: not a stall
                last_data = now
            if now - last_tick >= 0.5:
                last_tick = now
                if on_progress is not None:
                    on_progress(self.stats)
                if should_stop is not None and should_stop():
                    reason, stopped = "stop requested", True
                    log.warning("stop requested; %d of %d sectors ended", len(self.ended), self.sectors)
                    break
                if self.acks:
                    self._check_progress(now)
            if self.acks and node_check is not None and now - last_check >= node_check_s:
                last_check = now
                self._check_registered(node_check)
            # Only a stream that has started can stall; before that the flow watches startup.
            if (not inputs_done and stall_timeout_s is not None and self.stats.first_recv is not None
                    and now - last_data > stall_timeout_s):
                log.warning("stalled: no message for %g s; %d of %d sectors ended",
                            stall_timeout_s, len(self.ended), self.sectors)
                reason = f"stalled: no message for {stall_timeout_s:g} s"
                inputs_done = True
                self._end_of_input("stalled")
            if self.acks and not any(n.alive for n in self._node):
                reason, stopped = "every node lost", True
                break
        if self.acks and not stopped:
            self._finish_nodes(fin_wait_s)
        elif not stopped:
            self._drain_backlogs(self.linger_ms / 1000)
        self.stats.finish_reason = reason or "complete"
        self._account()
        self.stats.rejected = self.rejects.as_dict()
        return self.stats

    def _watch(self, sock, flags: int) -> None:
        """Poll ``sock`` for ``flags`` (0: not at all), touching the poller only on a change."""
        if self._polled.get(sock, 0) != flags:
            if flags:
                self._poller.register(sock, flags)
            else:
                self._poller.unregister(sock)
            self._polled[sock] = flags

    def _readable(self) -> list:
        """The inbound sockets to read now (see _may_read)."""
        return [s for s in (self.inbound, *self.sector_inbound) if self._may_read(s)]

    def _lagging(self, sector: int) -> int:
        """How many window entries still lack a block of ``sector``."""
        return len(self._window) - self._have[sector] + self._removed_complete

    def _read_inbound(self, socks: list, batch: int = 1024) -> bool:
        """Read up to ``batch`` messages, one socket after the other as the producers' pipes are
        fair-queued, so that no sector runs ahead of the others by a batch."""
        got = False
        for _ in range(batch):
            if not socks:
                break
            for sock in list(socks):
                if not self._may_read(sock):
                    socks.remove(sock)
                    continue
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    socks.remove(sock)
                    continue
                got = True
                self._handle(parts)
        return got

    def _may_read(self, sock) -> bool:
        """No reads while a node's backlog holds them back (backpressure); with acks and the
        window full, only from a sector some window entry still lacks (up to twice the window)."""
        if self._full_backlogs:
            return False
        if not self.acks or len(self._window) < self.window_frames:
            return True
        sector = self._sector_of.get(sock)
        return sector is not None and self._lagging(sector) > 0 and len(self._window) < 2 * self.window_frames

    # -- producers' messages ---------------------------------------------------------------
    def _handle(self, parts) -> None:
        try:
            header = self.validator.check(parts)
        except MalformedMessage as err:
            self.rejects.reject(err)
            return
        now = time.time()
        if self.stats.first_recv is None:
            self.stats.first_recv = now
            self._scan_number = header.scan_number
        self.stats.last_recv = now
        if header.kind is Kind.END:
            if header.sector in self.ended:
                self.rejects.reject(MalformedMessage("duplicate_end", f"second END from sector {header.sector}"))
                return
            self.ended.add(header.sector)
            self.stats.ends_seen += 1
            for node in range(self.nodes):
                if self._node[node].alive:
                    self._send(node, [
                        wire.end_header(header.sector, header.scan_number, header.scan_width,
                                        header.scan_height, self.per_sector_node[header.sector][node],
                                        header.session),
                        b""])
            return
        if header.kind is not Kind.DATA:
            self.rejects.reject(MalformedMessage("unexpected_kind", f"{header.kind.name} from a producer"))
            return
        if self.acks:
            node = self._admit(header, parts)
            if node is None:
                return
        else:
            node = route(header.position, self.nodes)
        self._send(node, parts)
        self.per_sector_node[header.sector][node] += 1
        self.stats.frames_routed[node] += 1
        self.stats.bytes_routed += len(parts[1].buffer)

    def _admit(self, header: wire.Header, parts) -> Optional[int]:
        """Put a sector block into the window; return the node it goes to (None: not sent)."""
        pos, s = header.position, header.sector
        entry = self._window.get(pos)
        if entry is None:
            if self._acked[pos]:
                self.rejects.reject(MalformedMessage("duplicate_sector", f"sector {s} of acknowledged position {pos}"))
                return None
            node = pos % self.nodes
            if not self._alive[node]:
                node = next_alive(pos, self._alive)
                if node is None:
                    self._lost_why.setdefault("no_node", set()).add(pos)
                    return None
            entry = self._window[pos] = _Entry(node, self.sectors)
            self.stats.positions_routed[node] += 1
            if len(self._window) > self.stats.window_peak:
                self.stats.window_peak = len(self._window)
        elif entry.parts[s] is not None:
            self.rejects.reject(MalformedMessage("duplicate_sector", f"sector {s} of position {pos} twice"))
            return None
        entry.parts[s] = parts
        entry.have += 1
        self._have[s] += 1
        if entry.have == self.sectors:
            self._gave_work(entry.node)
        return entry.node

    def _end_of_input(self, why: str) -> None:
        """No more sector blocks will come: positions still incomplete never will be."""
        if not self.acks:
            return
        incomplete = [p for p, e in self._window.items() if e.have < self.sectors]
        for p in incomplete:
            self._drop(p, why)
        if incomplete:
            log.warning("%d positions never received every sector (%s)", len(incomplete), why)

    def _drop(self, pos: int, why: str) -> None:
        """Take a position out of the window unacknowledged, as lost for ``why``."""
        entry = self._window.pop(pos)
        self._removed(entry)
        self._lost_why.setdefault(why, set()).add(pos)

    # -- sending ---------------------------------------------------------------------------
    def _send(self, node: int, parts) -> None:
        """Queue a message for a node without blocking: behind its backlog if it has one."""
        backlog = self._backlog[node]
        if not backlog:
            try:
                self.outbound[node].send_multipart(parts, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
        backlog.append(parts)
        if len(backlog) >= self.hwm and not self._held[node]:
            self._held[node] = True
            self._full_backlogs += 1

    def _flush(self, node: int) -> None:
        """Hand a node's backlog to its socket, as far as the socket takes it."""
        backlog, sock = self._backlog[node], self.outbound[node]
        while backlog:
            try:
                sock.send_multipart(backlog[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            backlog.popleft()
            if self._held[node] and len(backlog) <= self.hwm // 2:
                self._held[node] = False
                self._full_backlogs -= 1

    def _drain_backlogs(self, timeout_s: float) -> None:
        """At the end without acks: wait (bounded) until every backlog is in the sockets."""
        deadline = time.monotonic() + timeout_s
        while any(self._backlog[n] and self._node[n].alive for n in range(self.nodes)):
            for n in range(self.nodes):
                if self._node[n].alive:
                    self._flush(n)
            if time.monotonic() >= deadline:
                left = sum(len(b) for b in self._backlog)
                log.error("%d messages for the nodes could not be sent within %g s", left, timeout_s)
                return
            time.sleep(0.01)

    # -- acknowledgements and node loss ----------------------------------------------------
    def _gave_work(self, node: int) -> None:
        """A whole position is now the node's to acknowledge; its no-progress clock may start."""
        state = self._node[node]
        if state.complete_unacked == 0:
            state.busy_since = time.monotonic()
        state.complete_unacked += 1

    def _read_acks(self, node: int) -> None:
        """Take a node's ACKs and heartbeats; new counts or an ACK are progress."""
        state = self._node[node]
        for _ in range(256):
            try:
                parts = self.ack_in[node].recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = wire.parse_control(parts)
            except MalformedMessage as err:
                self.rejects.reject(err)
                continue
            if (msg.received, msg.counted) != (state.received, state.counted):
                state.received, state.counted = msg.received, msg.counted
                state.last_progress = time.monotonic()
            if msg.kind is Control.ACK:
                state.last_progress = time.monotonic()
                self._acknowledge(node, msg.positions)

    def _acknowledge(self, node: int, positions: np.ndarray) -> None:
        """Release acknowledged positions from the window (stale or repeated ones are ignored)."""
        window, acked = self._window, self._acked
        for pos in positions.tolist():
            entry = window.pop(pos, None)
            if entry is None:  # acknowledged before, or never sent: nothing to do
                continue
            acked[pos] = True
            self.stats.positions_acked[node] += 1
            self._removed(entry)

    def _removed(self, entry: _Entry) -> None:
        """Keep the counts straight for an entry taken out of the window."""
        if entry.have == self.sectors:
            self._node[entry.node].complete_unacked -= 1
            self._removed_complete += 1
        else:
            for k, part in enumerate(entry.parts):
                if part is not None:
                    self._have[k] -= 1

    def _read_monitor(self, node: int) -> None:
        """A dropped connection to a node means the node is lost."""
        while True:
            try:
                event = recv_monitor_message(self.monitors[node], zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self._node[node].alive:
                self._lose(node, "disconnected")
                return

    def _check_progress(self, now: float) -> None:
        """Lose a node that holds whole unacknowledged positions and has shown no progress."""
        for n, state in enumerate(self._node):
            if (state.alive and state.complete_unacked
                    and now - max(state.last_progress, state.busy_since) > self.node_timeout_s):
                self._lose(n, f"no progress for {self.node_timeout_s:g} s with "
                              f"{state.complete_unacked} frames unacknowledged")

    def _check_registered(self, node_check: Callable[[], Optional[set]]) -> None:
        """Lose a node whose leased service key has gone."""
        try:
            registered = node_check()
        except Exception as err:  # etcd unreachable for a moment: decide nothing on it
            log.warning("could not read the registered nodes: %s", err)
            return
        if registered is None:
            return
        for n, state in enumerate(self._node):
            if state.alive and n not in registered:
                self._lose(n, "service key gone")

    def _lose(self, node: int, why: str) -> None:
        """Fence a lost node (close its sockets) and send its unacknowledged frames elsewhere."""
        state = self._node[node]
        state.alive = self._alive[node] = False
        for sock in (self.outbound[node], self.ack_in[node], self.monitors[node]):
            self._watch(sock, 0)
        self.outbound[node].disable_monitor()
        self.monitors[node].close(0)
        self.outbound[node].close(0)
        self.ack_in[node].close(0)
        if self._held[node]:
            self._held[node] = False
            self._full_backlogs -= 1
        self._backlog[node].clear()
        mine = [p for p, e in self._window.items() if e.node == node]
        self.stats.nodes_lost.append({"node": node, "reason": why, "detected_at": time.time(),
                                      "unacknowledged": len(mine)})
        log.error("node %d lost (%s): re-routing its %d unacknowledged positions", node, why, len(mine))
        for pos in mine:
            entry = self._window[pos]
            if entry.have == self.sectors:
                state.complete_unacked -= 1
            target = next_alive(pos, self._alive)
            if target is None:
                self._drop(pos, "no_node")
                continue
            entry.node = target
            self.stats.positions_routed[target] += 1
            self.stats.rerouted.append(pos)
            if entry.have == self.sectors:
                self._gave_work(target)
            for parts in entry.parts:
                if parts is not None:
                    self._send(target, parts)
                    self.stats.frames_routed[target] += 1

    # -- the end ---------------------------------------------------------------------------
    def _finish_nodes(self, wait_s: float) -> None:
        """Everything is acknowledged: FIN to every surviving node, then wait (bounded) until
        each has taken it and hung up, so that none sees the aggregator go before its FIN."""
        for n, state in enumerate(self._node):
            if state.alive:
                self._send(n, [wire.fin_header(self._scan_number, self.validator.scan_width,
                                                 self.validator.scan_height, self.stats.positions_acked[n],
                                                 self.validator.session_token), b""])
                self.stats.fin_sent.append(n)
        deadline = time.monotonic() + wait_s
        waiting = set(self.stats.fin_sent)
        while waiting and time.monotonic() < deadline:
            for n in list(waiting):
                self._flush(n)
                while True:
                    try:
                        event = recv_monitor_message(self.monitors[n], zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if event["event"] == zmq.EVENT_DISCONNECTED and not self._backlog[n]:
                        self._node[n].finished = True
                        waiting.discard(n)
                        break
            if waiting:
                time.sleep(0.02)
        if waiting:
            log.warning("nodes %s had not hung up %g s after FIN", sorted(waiting), wait_s)

    def _account(self) -> None:
        """Every position no node acknowledged, with why."""
        if not self.acks:
            return
        for pos in list(self._window):
            self._drop(pos, "unacknowledged")
        lost = np.flatnonzero(~self._acked)
        explained = set().union(*self._lost_why.values()) if self._lost_why else set()
        never = [int(p) for p in lost if int(p) not in explained]
        if never:
            self._lost_why["never_received"] = set(never)
        self.stats.lost = lost.tolist()
        self.stats.lost_reasons = {k: len(v) for k, v in self._lost_why.items() if v}
        if self.stats.lost:
            log.error("%d positions lost: %s", len(self.stats.lost), self.stats.lost_reasons)

    def close(self) -> None:
        """Close every socket (with a bounded linger) and end an owned context; idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in (self.inbound, *self.sector_inbound, *self.ack_in):
            s.close(0)
        for n, s in enumerate(self.outbound):
            if not s.closed:
                if self.monitors[n] is not None:
                    s.disable_monitor()
                    self.monitors[n].close(0)
                s.close(self.linger_ms)
        if self.guard is not None:
            self.guard.stop()
        if self._own_ctx:
            self.ctx.term()  # returns once queued messages are delivered or the linger expires
