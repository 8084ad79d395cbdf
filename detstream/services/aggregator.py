"""Aggregator: receives every sector from the producers and routes each frame to one node.

Routing rule: all sectors of scan position ``p`` go to node ``p % nodes``, so a node can
assemble whole frames. Producers send batches of blocks of one node's positions (wire version
2); a batch whose blocks are all good is forwarded whole, as the received ZeroMQ frames
(``copy=False`` both ways): the aggregator never copies pixel data, and its Python work is per
batch (numpy over the batch's headers), not per block. A bad block is left out alone: the
batch is then re-sent without it (a new headers frame, the same payload frames).

With acknowledgements on (``ack_endpoints``), delivery is at-least-once:

* every position stays in a bounded window (the received batches, by reference) from its first
  sector until a node acknowledges it durable; a batch is released once none of its positions
  is in the window; a full window stops the reads from producers
  (backpressure), except from a sector that lags behind, whose blocks complete what the window
  already holds;
* a node is lost only on evidence that holds under load (the failure detector, ``_check_nodes``):
  its connection drops; it holds complete unacknowledged frames and has sent nothing at all
  (no heartbeat, no ACK) for ``node_timeout_s`` ("unreachable"); or ``node_check`` no longer
  lists it (its leased etcd key) *and* it has been silent for a moment, since a lease can lapse
  under load or a cut to etcd alone while the node still acknowledges. A node that heartbeats
  but acknowledges nothing with work pending for the longer stall timeout is fenced as
  "stalled". The last live node is never fenced for being slow (unreachable or stalled): with
  nowhere to re-route, fencing it would only lose its frames. A fenced node's window entries
  and its future positions go to the next alive node, each position to exactly one node;
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
from . import heap, security
from .endpoints import bind_address
from .validation import Batch, MessageValidator, RejectLog

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


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values: np.unique without its numpy.ma check, whose first use
    imports numpy.ma inside the stream (10-30 ms of CPU, paid again by every shard)."""
    v = np.sort(values)
    return v[np.concatenate(([True], v[1:] != v[:-1]))] if len(v) else v


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


# A position's state in the window arrays.
_UNSEEN, _WINDOW, _ACKED, _DROPPED = 0, 1, 2, 3


class _Held:
    """A received batch the window still refers to: the batch, which of its good blocks are held
    (None: all), and how many of them belong to positions still in the window."""

    __slots__ = ("batch", "keep", "live")

    def __init__(self, batch: Batch, keep: Optional[np.ndarray], live: int):
        self.batch = batch
        self.keep = keep
        self.live = live

    def blocks(self, idx: np.ndarray) -> Batch:
        """The held blocks at ``idx`` as a batch of their own (payloads not copied)."""
        return self.batch.subset(idx if self.keep is None else self.keep[idx])


class _Node:
    """What the aggregator knows of one node's liveness."""

    __slots__ = ("alive", "finished", "complete_unacked", "busy_since", "last_heard", "last_ack",
                 "received", "counted", "stall_noted")

    def __init__(self, now: float):
        self.alive = True
        self.finished = False          # FIN sent and the node has hung up
        self.complete_unacked = 0      # positions with every sector sent to it, not yet acknowledged
        self.busy_since = now          # when complete_unacked last went from 0 to 1
        self.last_heard = now          # last message of any kind (heartbeat or ACK)
        self.last_ack = now            # last ACK
        self.received = self.counted = -1
        self.stall_noted = False       # the last live node's stall has been logged


class Aggregator:
    """PULL sockets in (one shared, one per sector), one PUSH out per node (in node order),
    and with acks one PULL per node for its ACKs and heartbeats."""

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int,
                 node_endpoints: Sequence[str], bind: str = "tcp://127.0.0.1:*", hwm: int = 64,
                 ctx: Optional[zmq.Context] = None, ack_endpoints: Optional[Sequence[str]] = None,
                 window_frames: int = 1024, node_timeout_s: float = 10.0, linger_s: float = 10.0,
                 sectors: Optional[Sequence[int]] = None, shard: int = 0,
                 curve: Optional[security.Curve] = None, lease_grace_s: float = 2.0):
        """``sectors``: the sectors this aggregator routes (a shard of them; default all), ``shard``
        its index among the shards (carried by its FIN, so that a node can tell the shards apart).
        ``lease_grace_s``: how long a node whose etcd key has gone must also have been silent
        before it is fenced for it."""
        heap.keep_freed_buffers()  # received batches reuse freed ones warm
        self.profile = profile
        self.own_sectors = sorted(range(profile.sectors) if sectors is None else set(sectors))
        if not self.own_sectors or self.own_sectors[-1] >= profile.sectors or self.own_sectors[0] < 0:
            raise ValueError(f"sectors {sectors} must be a non-empty subset of 0..{profile.sectors - 1}")
        self.shard = shard
        # Sectors per position here: a position is whole at this shard with every sector it owns.
        self.sectors = len(self.own_sectors)
        nsec = profile.sectors
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
        self.lease_grace_s = lease_grace_s
        self.stall_s = float("inf")  # set by run(): a node that heartbeats but never acknowledges
        self.inbound = self._pull(bind_address(bind, f"aggregator-{shard}-in"))
        self.endpoint = self.inbound.getsockopt_string(zmq.LAST_ENDPOINT)
        # One socket per sector as well: with the window full, the aggregator can go on reading a
        # sector that lags behind, whose blocks complete frames it holds, and no other.
        self.sector_inbound = [self._pull(bind_address(bind, f"aggregator-sector-{k}")) for k in self.own_sectors]
        #: Per sector of the detector, its socket here (None: another shard's sector).
        self.sector_endpoints: list[Optional[str]] = [None] * nsec
        for k, sock in zip(self.own_sectors, self.sector_inbound):
            self.sector_endpoints[k] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sector_of = dict(zip(self.sector_inbound, self.own_sectors))
        self._inputs = [self.inbound, *self.sector_inbound]   # those still open
        self._owned = set(self.own_sectors)
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
        # The window, as arrays over positions (numpy work per batch, not Python per block):
        # state, owning node, which sectors arrived, and where each block is held.
        npos = self.positions if self.acks else 0
        self._state = np.zeros(npos, dtype=np.uint8)
        self._node_of = np.full(npos, -1, dtype=np.int16)
        self._got = np.zeros((npos, nsec), dtype=bool)
        self._have_n = np.zeros(npos, dtype=np.uint8)
        self._held_in = np.full((npos, nsec), -1, dtype=np.int32)   # batch id
        self._held_at = np.zeros((npos, nsec), dtype=np.int32)      # index in the batch
        self._batches: dict[int, _Held] = {}
        self._next_batch = 0
        self._in_window = 0
        self._target_cache: Optional[np.ndarray] = None
        self._have_in_window = np.zeros(nsec, dtype=np.int64)  # window positions having sector s
        # A node whose backlog reached the HWM holds all reads back until it is down to half:
        # resuming at once would cost a loop turn per message while the node is the bottleneck.
        self._held = [False] * self.nodes
        self._full_backlogs = 0
        self._alive = [True] * self.nodes
        self._lost_why: dict[str, set] = {}
        # per_sector_node[s][n]: data blocks of sector s sent to node n (the END marker's count).
        self.per_sector_node = [[0] * self.nodes for _ in range(nsec)]
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
            fin_wait_s: float = 5.0, node_stall_s: Optional[float] = None) -> AggregatorStats:
        """Route until every sector has ended (and, with acks, every frame is acknowledged and
        FIN sent), the stream stalls, or ``should_stop``.

        ``node_check`` returns the node indices still registered (None if unknown); it is called
        every ``node_check_s``, never per message. The stall clock starts with the first
        message and runs only while the aggregator is willing to read. ``node_stall_s`` (default
        ``stall_timeout_s``): how long a node may heartbeat without acknowledging work it holds.
        """
        node_stall_s = stall_timeout_s if node_stall_s is None else node_stall_s
        if node_stall_s is not None:
            self.stall_s = max(node_stall_s, self.node_timeout_s)
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
                for sock in list(self._inputs):
                    self._close_input(sock)
                self._end_of_input("incomplete")
            if inputs_done and (not self.acks or not self._in_window):
                break
            readable = [] if inputs_done else self._readable()
            for s in self._inputs:
                self._watch(s, zmq.POLLIN if s in readable else 0)
            for n in range(self.nodes):
                alive = self._node[n].alive
                self._watch(self.outbound[n], zmq.POLLOUT if self._backlog[n] and alive else 0)
                if self.acks and alive:
                    self._watch(self.ack_in[n], zmq.POLLIN)
                    self._watch(self.monitors[n], zmq.POLLIN)
            t_poll = time.monotonic()
            ready = dict(self._poller.poll(poll_ms))
            if self.acks and self._in_window >= self.window_frames:
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
                    self._check_nodes(now, inputs_done)
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
        return [s for s in self._inputs if self._may_read(s)]

    def _lagging(self, sector: int) -> int:
        """How many window positions still lack a block of ``sector``."""
        return self._in_window - int(self._have_in_window[sector])

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
                if self._sector_of.get(sock, -1) in self.ended:
                    self._close_input(sock)
                    socks.remove(sock)
        return got

    def _close_input(self, sock) -> None:
        """Close a sector's socket once its END is read: its producer sees the disconnect and
        only then closes its own socket (libzmq can drop what a closing peer still had queued,
        over ipc: zeromq/libzmq#4660)."""
        self._watch(sock, 0)
        sock.close(0)
        self._inputs.remove(sock)

    def _may_read(self, sock) -> bool:
        """No reads while a node's backlog holds them back (backpressure); with acks and the
        window full, only from a sector some window entry still lacks (up to twice the window)."""
        if self._full_backlogs:
            return False
        if not self.acks or self._in_window < self.window_frames:
            return True
        sector = self._sector_of.get(sock)
        return sector is not None and self._lagging(sector) > 0 and self._in_window < 2 * self.window_frames

    # -- producers' messages ---------------------------------------------------------------
    def _handle(self, parts) -> None:
        try:
            batch = self.validator.check_batch(parts, self.rejects.reject)
        except MalformedMessage as err:
            self.rejects.reject(err)
            return
        heads = batch.headers
        if not len(heads):
            return
        now = time.time()
        if self.stats.first_recv is None:
            self.stats.first_recv = now
            self._scan_number = int(heads["scan_number"][0])
        self.stats.last_recv = now
        kinds = heads["kind"]
        if (kinds != Kind.DATA).any():
            self._markers(batch)
            return
        sectors = heads["sector"]
        if len(heads) > 1 and (sectors != sectors[0]).any():
            self._split_by_sector(batch)
            return
        sector = int(sectors[0])
        if sector not in self._owned:
            for _ in range(len(heads)):
                self.rejects.reject(MalformedMessage("sector_elsewhere", f"sector {sector} is not routed by shard {self.shard}"))
            return
        positions = batch.positions
        if self.acks:
            nodes, keep = self._admit(sector, positions, batch)
            if keep is not None:  # some blocks refused (duplicates, no node): send the rest
                if not len(keep):
                    return
                batch = batch.subset(keep)
        else:
            nodes = positions % self.nodes
        first = int(nodes[0])
        if len(nodes) == 1 or not (nodes != first).any():
            self._send_batch(first, sector, batch.message(), len(nodes))
            return
        for node in distinct(nodes).tolist():  # a batch that spans nodes: one message per node
            idx = np.flatnonzero(nodes == node)
            self._send_batch(node, sector, batch.subset(idx).message(), len(idx))

    def _send_batch(self, node: int, sector: int, parts: list, blocks: int) -> None:
        self._send(node, parts)
        self.per_sector_node[sector][node] += blocks
        self.stats.frames_routed[node] += blocks
        self.stats.bytes_routed += blocks * self.profile.sector_nbytes

    def _split_by_sector(self, batch) -> None:
        """A batch mixing sectors (producers never send one): handle each sector's blocks alone."""
        sectors = batch.headers["sector"]
        for sector in distinct(sectors).tolist():
            self._handle(batch.subset(np.flatnonzero(sectors == sector)).message())

    def _markers(self, batch) -> None:
        """END markers (a marker travels alone; any in a batch are taken one by one)."""
        for i, head in enumerate(batch.headers):
            kind = Kind(int(head["kind"]))
            if kind is Kind.DATA:
                self._handle(batch.subset([i]).message())
                continue
            if kind is not Kind.END:
                self.rejects.reject(MalformedMessage("unexpected_kind", f"{kind.name} from a producer"))
                continue
            sector = int(head["sector"])
            if sector not in self._owned:
                self.rejects.reject(MalformedMessage("sector_elsewhere", f"END of sector {sector} at shard {self.shard}"))
                continue
            if sector in self.ended:
                self.rejects.reject(MalformedMessage("duplicate_end", f"second END from sector {sector}"))
                continue
            self.ended.add(sector)
            self.stats.ends_seen += 1
            for node in range(self.nodes):
                if self._node[node].alive:
                    self._send(node, [
                        wire.end_header(sector, int(head["scan_number"]), int(head["scan_width"]),
                                        int(head["scan_height"]), self.per_sector_node[sector][node],
                                        int(head["session"])),
                        b""])

    def _admit(self, sector: int, positions: np.ndarray, batch) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Put a batch of one sector's blocks into the window. Returns the node of each block
        sent, and the indices of the blocks to send if not all of them (else None)."""
        state = self._state[positions]
        refused = (state >= _ACKED) | self._got[positions, sector]
        if len(positions) > 1:  # a position twice in the batch: the later write of its index wins
            order = np.arange(len(positions), dtype=np.int32)
            marks = self._held_at[:, sector]
            before = marks[positions]
            marks[positions] = order
            refused |= marks[positions] != order
            marks[positions] = before
        keep = None
        if refused.any():
            for i in np.flatnonzero(refused).tolist():
                self.rejects.reject(MalformedMessage(
                    "duplicate_sector", f"sector {sector} of position {positions[i]} twice or after it was acknowledged"))
            keep = np.flatnonzero(~refused)
            positions, state = positions[keep], state[keep]
        new = positions[state == _UNSEEN]
        if len(new):
            target = self._targets()[new % self.nodes]
            orphan = target < 0
            if orphan.any():
                lost = new[orphan]
                self._state[lost] = _DROPPED
                self._lost_why.setdefault("no_node", set()).update(lost.tolist())
                new, target = new[~orphan], target[~orphan]
                sendable = self._state[positions] != _DROPPED
                keep = (np.arange(len(refused)) if keep is None else keep)[sendable]
                positions = positions[sendable]
            self._state[new] = _WINDOW
            self._node_of[new] = target
            self._in_window += len(new)
            routed = np.bincount(target, minlength=self.nodes)
            for n in np.flatnonzero(routed).tolist():
                self.stats.positions_routed[n] += int(routed[n])
            if self._in_window > self.stats.window_peak:
                self.stats.window_peak = self._in_window
        if not len(positions):
            return positions, keep
        bid = self._next_batch
        self._next_batch += 1
        self._batches[bid] = _Held(batch, keep, len(positions))
        self._got[positions, sector] = True
        self._held_in[positions, sector] = bid
        self._held_at[positions, sector] = np.arange(len(positions), dtype=np.int32)
        self._have_n[positions] += 1
        self._have_in_window[sector] += len(positions)
        nodes = self._node_of[positions].astype(np.int64)
        complete = nodes[self._have_n[positions] == self.sectors]
        if len(complete):
            counts = np.bincount(complete, minlength=self.nodes)
            for n in np.flatnonzero(counts).tolist():
                self._gave_work(n, int(counts[n]))
        return nodes, keep

    def _targets(self) -> np.ndarray:
        """For each home node, where its positions go now (-1: no node alive)."""
        if self._target_cache is None:
            self._target_cache = np.array([-1 if (t := next_alive(h, self._alive)) is None else t
                                           for h in range(self.nodes)], dtype=np.int64)
        return self._target_cache

    def _end_of_input(self, why: str) -> None:
        """No more sector blocks will come: positions still incomplete never will be."""
        if not self.acks:
            return
        incomplete = np.flatnonzero((self._state == _WINDOW) & (self._have_n < self.sectors))
        if len(incomplete):
            self._drop(incomplete, why)
            log.warning("%d positions never received every sector (%s)", len(incomplete), why)

    def _drop(self, positions: np.ndarray, why: str) -> None:
        """Take positions out of the window unacknowledged, as lost for ``why``."""
        self._leave(positions, _DROPPED)
        self._lost_why.setdefault(why, set()).update(positions.tolist())

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
    def _gave_work(self, node: int, n: int = 1) -> None:
        """Whole positions are now the node's to acknowledge; its no-progress clock may start."""
        state = self._node[node]
        if state.complete_unacked == 0:
            state.busy_since = time.monotonic()
        state.complete_unacked += n

    def _read_acks(self, node: int) -> None:
        """Take a node's ACKs and heartbeats: any message says it is reachable, an ACK that it moves."""
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
            now = time.monotonic()
            state.last_heard = now
            state.received, state.counted = msg.received, msg.counted
            if msg.kind is Control.ACK:
                state.last_ack = now
                state.stall_noted = False
                self._acknowledge(node, msg.positions)

    def _acknowledge(self, node: int, positions: np.ndarray) -> None:
        """Release acknowledged positions from the window (stale, repeated or unknown ones are ignored)."""
        positions = positions[positions < self.positions].astype(np.int64)
        positions = distinct(positions[self._state[positions] == _WINDOW])
        if len(positions):
            self.stats.positions_acked[node] += len(positions)
            self._leave(positions, _ACKED)

    def _leave(self, positions: np.ndarray, new_state: int) -> None:
        """Positions leave the window: keep the counts straight, release batches no longer held."""
        have_n = self._have_n[positions]
        complete = self._node_of[positions][have_n == self.sectors].astype(np.int64)
        if len(complete):
            counts = np.bincount(complete, minlength=self.nodes)
            for n in np.flatnonzero(counts).tolist():
                self._node[n].complete_unacked -= int(counts[n])
        got = self._got[positions]
        self._have_in_window -= got.sum(axis=0)
        self._in_window -= len(positions)
        self._state[positions] = new_state
        bids, counts = np.unique(self._held_in[positions][got], return_counts=True)
        batches = self._batches
        for bid, n in zip(bids.tolist(), counts.tolist()):
            held = batches[bid]
            held.live -= n
            if not held.live:
                del batches[bid]

    def _resend(self, positions: np.ndarray, targets: np.ndarray) -> None:
        """Send the held blocks of ``positions`` to ``targets`` (one message per batch and target)."""
        got = self._got[positions]
        rows, sectors = np.nonzero(got)
        bids = self._held_in[positions[rows], sectors]
        at = self._held_at[positions[rows], sectors]
        dest = targets[rows]
        order = np.lexsort((at, dest, bids))
        bids, at, dest, sectors = bids[order], at[order], dest[order], sectors[order]
        cuts = np.flatnonzero((np.diff(bids) != 0) | (np.diff(dest) != 0)) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(bids)]):
            node = int(dest[lo])
            self._send(node, self._batches[int(bids[lo])].blocks(at[lo:hi]).message())
            self.stats.frames_routed[node] += hi - lo

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

    def _check_nodes(self, now: float, inputs_done: bool) -> None:
        """The failure detector's clocks: fence a node unreachable past ``node_timeout_s``, or
        stalled (heard from, acknowledging nothing) past ``stall_s``; never the last live node
        for either. That one, once nothing more will come, has its unacknowledged positions
        dropped as ``stalled`` after ``stall_s``, so a stuck node never hangs the session."""
        live = sum(n.alive for n in self._node)
        for n, state in enumerate(self._node):
            if not (state.alive and state.complete_unacked):
                continue
            silent = now - max(state.last_heard, state.busy_since)
            idle = now - max(state.last_ack, state.busy_since)
            if live > 1 and silent > self.node_timeout_s:
                self._lose(n, f"unreachable: no message for {self.node_timeout_s:g} s with "
                              f"{state.complete_unacked} frames unacknowledged")
                live -= 1
            elif live > 1 and idle > self.stall_s:
                self._lose(n, f"stalled: heartbeats but no acknowledgement for {self.stall_s:g} s with "
                              f"{state.complete_unacked} frames unacknowledged")
                live -= 1
            elif live == 1 and max(silent, idle) > self.stall_s:
                if not state.stall_noted:
                    state.stall_noted = True
                    log.warning("node %d, the last one alive, has acknowledged nothing for %g s "
                                "(%d frames pending); it is not fenced for being slow", n,
                                self.stall_s, state.complete_unacked)
                if inputs_done:
                    mine = np.flatnonzero((self._state == _WINDOW) & (self._node_of == n))
                    log.error("node %d stalled with nothing more to come: %d positions given up as lost",
                              n, len(mine))
                    self._drop(mine, "stalled")
                    state.complete_unacked = 0

    def _check_registered(self, node_check: Callable[[], Optional[set]]) -> None:
        """Lose a node whose leased service key has gone and that has been silent meanwhile:
        a node still heard from is alive whatever etcd says (a lapsed lease, a cut to etcd)."""
        try:
            registered = node_check()
        except Exception as err:  # etcd unreachable for a moment: decide nothing on it
            log.warning("could not read the registered nodes: %s", err)
            return
        if registered is None:
            return
        now = time.monotonic()
        for n, state in enumerate(self._node):
            if state.alive and n not in registered and now - state.last_heard > self.lease_grace_s:
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
        mine = np.flatnonzero((self._state == _WINDOW) & (self._node_of == node))
        self.stats.nodes_lost.append({"node": node, "reason": why, "detected_at": time.time(),
                                      "unacknowledged": len(mine)})
        log.error("node %d lost (%s): re-routing its %d unacknowledged positions", node, why, len(mine))
        self._target_cache = None
        targets = self._targets()[mine % self.nodes]
        orphan = targets < 0
        if orphan.any():
            self._drop(mine[orphan], "no_node")
            mine, targets = mine[~orphan], targets[~orphan]
        state.complete_unacked = 0
        if not len(mine):
            return
        self._node_of[mine] = targets
        self.stats.rerouted.extend(mine.tolist())
        routed = np.bincount(targets, minlength=self.nodes)
        complete = np.bincount(targets[self._have_n[mine] == self.sectors], minlength=self.nodes)
        for n in np.flatnonzero(routed).tolist():
            self.stats.positions_routed[n] += int(routed[n])
            if complete[n]:
                self._gave_work(n, int(complete[n]))
        self._resend(mine, targets)

    # -- the end ---------------------------------------------------------------------------
    def _finish_nodes(self, wait_s: float) -> None:
        """Everything is acknowledged: FIN to every surviving node, then wait (bounded) until
        each has taken it and hung up, so that none sees the aggregator go before its FIN."""
        for n, state in enumerate(self._node):
            if state.alive:
                self._send(n, [wire.fin_header(self._scan_number, self.validator.scan_width,
                                                 self.validator.scan_height, self.stats.positions_acked[n],
                                                 shard=self.shard, session=self.validator.session_token), b""])
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
        left = np.flatnonzero(self._state == _WINDOW)
        if len(left):
            self._drop(left, "unacknowledged")
        lost = np.flatnonzero(self._state != _ACKED)
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
