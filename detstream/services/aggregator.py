"""Aggregator: receives every sector from the producers and routes each frame to one node.

Routing rule: all sectors of scan position ``p`` go to node ``p % nodes``, so a node can
assemble whole frames. Producers send batches of blocks of one node's positions (wire version
2); a batch whose blocks are all good is forwarded whole, as the received ZeroMQ frames
(``copy=False`` both ways): the aggregator never copies pixel data, and its Python work is per
batch (numpy over the batch's headers), not per block. A bad block is left out alone: the
batch is then re-sent without it (a new headers frame, the same payload frames).

This module is the I/O shell: sockets, polling, clocks, etcd's node list and the report. What
to send where is decided by the delivery core (``delivery.py``), a state machine that does no
I/O: the shell hands it each stimulus (a batch admitted, an ACK, a heartbeat, a dropped
connection, the registered nodes, the clock, the end of input, the finish) and carries out the
instructions it returns (forward, END, FIN, fence, reject). With acknowledgements on
(``ack_endpoints``) the core is ``Delivery`` (at-least-once: the window, the failure detector,
re-routing a fenced node's positions, FIN, the account of every position); without, it is
``Unacknowledged`` (``p % N``, nothing kept). The sockets to the nodes, their non-blocking
sends and backlogs, are ``node_links.NodeLinks``.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import numpy as np
import zmq

from .. import wire
from ..profile import DetectorProfile
from ..wire import Kind, MalformedMessage
from . import heap, security
from .delivery import Delivery, Router, Unacknowledged, distinct, next_alive, route
from .delivery_types import (Admit, AggregatorStats, Disconnected, EndOfSector, Fence, Finish, Forward, InputsDone,
                             Registered, Reject, SendEnd, SendFin, Tick)
from .endpoints import bind_address
from .node_links import NodeLinks
from .validation import MessageValidator, RejectLog

__all__ = ["Aggregator", "AggregatorStats", "distinct", "fewer_collections", "next_alive", "route"]

log = logging.getLogger("detstream.aggregator")


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
        self.sectors = len(self.own_sectors)
        self.positions = scan_width * scan_height
        self.validator = MessageValidator(profile, scan_width, scan_height)
        self.rejects = RejectLog(log)
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.guard = curve.start(self.ctx, self.rejects) if curve else None
        self.hwm = hwm
        self.linger_s = linger_s
        self.node_timeout_s = node_timeout_s
        self.inbound = self._pull(bind_address(bind, f"aggregator-{shard}-in"))
        self.endpoint = self.inbound.getsockopt_string(zmq.LAST_ENDPOINT)
        # One socket per sector as well: with the window full, the aggregator can go on reading a
        # sector that lags behind, whose blocks complete frames it holds, and no other.
        self.sector_inbound = [self._pull(bind_address(bind, f"aggregator-sector-{k}")) for k in self.own_sectors]
        #: Per sector of the detector, its socket here (None: another shard's sector).
        self.sector_endpoints: list[Optional[str]] = [None] * profile.sectors
        for k, sock in zip(self.own_sectors, self.sector_inbound):
            self.sector_endpoints[k] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sector_of = dict(zip(self.sector_inbound, self.own_sectors))
        self._inputs = [self.inbound, *self.sector_inbound]   # those still open
        self.nodes = len(node_endpoints)
        self.links = NodeLinks(self.ctx, curve, node_endpoints, ack_endpoints, hwm, int(linger_s * 1000))
        shape = dict(nodes=self.nodes, own_sectors=self.own_sectors, detector_sectors=profile.sectors,
                     block_nbytes=profile.sector_nbytes, now=time.monotonic())
        #: The delivery core: what to send where (no I/O of its own).
        self.delivery: Router = (
            Unacknowledged(**shape) if ack_endpoints is None else
            Delivery(self.positions, **shape, window_frames=window_frames, node_timeout_s=node_timeout_s,
                     lease_grace_s=lease_grace_s))
        self.stats: AggregatorStats = self.delivery.stats
        self.messages = ProducerMessages(self.validator, self.rejects, self.stats, self.own_sectors, shard)
        self._do = {Forward: self._forward, SendEnd: self._send_end, SendFin: self._send_fin,
                    Fence: self._fence, Reject: self._reject}
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
        return self.delivery.alive

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
            self.delivery.stall_s = max(node_stall_s, self.node_timeout_s)
        if not self.delivery.detects_failures:
            node_check = None
        with fewer_collections():
            return self._run(should_stop, poll_ms, on_progress, stall_timeout_s, node_check,
                             node_check_s, fin_wait_s)

    def _run(self, should_stop, poll_ms, on_progress, stall_timeout_s, node_check, node_check_s,
             fin_wait_s) -> AggregatorStats:
        core, links = self.delivery, self.links
        last_tick = last_check = 0.0
        last_data = time.monotonic()
        inputs_done = stopped = False
        reason = ""
        while True:
            if not inputs_done and core.all_ended:
                inputs_done = True
                for sock in list(self._inputs):
                    self._close_input(sock)
                self._apply(InputsDone("incomplete", time.monotonic()))
            if inputs_done and core.settled:
                break
            readable = [] if inputs_done else self._readable()
            for s in self._inputs:
                self._watch(s, zmq.POLLIN if s in readable else 0)
            for n in range(self.nodes):
                alive = core.node[n].alive
                self._watch(links.outbound[n], zmq.POLLOUT if links.backlog[n] and alive else 0)
                for s in links.receivers(n) if alive else ():
                    self._watch(s, zmq.POLLIN)
            t_poll = time.monotonic()
            ready = dict(self._poller.poll(poll_ms))
            if core.window_full:
                self.stats.window_full_s += time.monotonic() - t_poll
            for n in range(self.nodes):
                for s in links.receivers(n) if core.node[n].alive else ():
                    if s in ready:
                        self._read_node(n, s)
                if core.node[n].alive and links.outbound[n] in ready:
                    links.flush(n)
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
                    log.warning("stop requested; %d of %d sectors ended", len(core.ended), self.sectors)
                    break
                self._apply(Tick(now, inputs_done))
            if node_check is not None and now - last_check >= node_check_s:
                last_check = now
                self._check_registered(node_check)
            # Only a stream that has started can stall; before that the flow watches startup.
            if (not inputs_done and stall_timeout_s is not None and self.stats.first_recv is not None
                    and now - last_data > stall_timeout_s):
                log.warning("stalled: no message for %g s; %d of %d sectors ended",
                            stall_timeout_s, len(core.ended), self.sectors)
                reason = f"stalled: no message for {stall_timeout_s:g} s"
                inputs_done = True
                self._apply(InputsDone("stalled", now))
            if core.every_node_lost:
                reason, stopped = "every node lost", True
                break
        if not stopped:
            fins = [ins.node for ins in self._apply(Finish(time.monotonic()))]
            links.settle(core.alive, fins, fin_wait_s if fins else self.linger_s)
        self.stats.finish_reason = reason or "complete"
        core.account()
        self.stats.rejected = self.rejects.as_dict()
        return self.stats

    def _apply(self, stimulus) -> list:
        """Hand the core a stimulus and carry out its instructions, in order; return them."""
        instructions = self.delivery.handle(stimulus)
        for ins in instructions:
            self._do[type(ins)](ins)
        return instructions

    def _watch(self, sock, flags: int) -> None:
        """Poll ``sock`` for ``flags`` (0: not at all), touching the poller only on a change."""
        if self._polled.get(sock, 0) != flags:
            if flags:
                self._poller.register(sock, flags)
            else:
                self._poller.unregister(sock)
            self._polled[sock] = flags

    # -- carrying out instructions ---------------------------------------------------------
    def _forward(self, ins: Forward) -> None:
        batch = ins.batch
        self.links.send(ins.node, batch.message() if ins.idx is None else batch.subset(ins.idx).message())

    def _send_end(self, ins: SendEnd) -> None:
        head = ins.marker
        self.links.send(ins.node, [wire.end_header(ins.sector, int(head["scan_number"]), int(head["scan_width"]),
                                                   int(head["scan_height"]), ins.count, int(head["session"])), b""])

    def _send_fin(self, ins: SendFin) -> None:
        v = self.validator
        self.links.send(ins.node, [wire.fin_header(self.messages.scan_number, v.scan_width, v.scan_height, ins.acked,
                                                   shard=self.shard, session=v.session_token), b""])

    def _fence(self, ins: Fence) -> None:
        """Close a lost node's sockets (its unacknowledged positions follow as Forwards)."""
        n = ins.node
        for sock in (self.links.outbound[n], *self.links.receivers(n)):
            self._watch(sock, 0)
        self.links.fence(n)
        self.stats.nodes_lost.append({"node": n, "reason": ins.reason, "detected_at": time.time(),
                                      "unacknowledged": ins.unacknowledged})
        log.error("node %d lost (%s): re-routing its %d unacknowledged positions", n, ins.reason,
                  ins.unacknowledged)

    def _reject(self, ins: Reject) -> None:
        self.rejects.reject(MalformedMessage(ins.reason, ins.detail))

    # -- what the nodes and etcd say -------------------------------------------------------
    def _read_node(self, node: int, sock) -> None:
        """A node's ACK socket (ACKs and heartbeats) or its connection's monitor."""
        if sock is self.links.ack_in[node]:
            for stimulus in self.links.read_control(node, self.rejects.reject):
                self._apply(stimulus)
        elif self.links.disconnected(node):
            self._apply(Disconnected(node, time.monotonic()))

    def _check_registered(self, node_check: Callable[[], Optional[set]]) -> None:
        try:
            registered = node_check()
        except Exception as err:  # etcd unreachable for a moment: decide nothing on it
            log.warning("could not read the registered nodes: %s", err)
            return
        if registered is not None:
            self._apply(Registered(frozenset(registered), time.monotonic()))

    # -- reading the producers ------------------------------------------------------------
    def _readable(self) -> list:
        """The inbound sockets to read now (see _may_read)."""
        return [s for s in self._inputs if self._may_read(s)]

    def _read_inbound(self, socks: list, batch: int = 1024) -> bool:
        """Read up to ``batch`` messages, one socket after the other as the producers' pipes are
        fair-queued, so that no sector runs ahead of the others by a batch."""
        got = False
        ended = self.delivery.ended
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
                for stimulus in self.messages.stimuli(parts):
                    self._apply(stimulus)
                if self._sector_of.get(sock, -1) in ended:
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
        """No reads while a node's backlog holds them back (backpressure), nor while the core's
        window is full, except from a sector it still lacks (``Delivery.may_read``)."""
        return not self.links.full_backlogs and self.delivery.may_read(self._sector_of.get(sock))

    def close(self) -> None:
        """Close every socket (with a bounded linger) and end an owned context; idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in (self.inbound, *self.sector_inbound):
            s.close(0)
        self.links.close()
        if self.guard is not None:
            self.guard.stop()
        if self._own_ctx:
            self.ctx.term()  # returns once queued messages are delivered or the linger expires


class ProducerMessages:
    """Turns a producer's message into the core's stimuli: the batch's good blocks of one sector
    as ``Admit`` (a batch mixing sectors split by sector), END markers as ``EndOfSector``; every
    bad block, and a sector another shard routes, goes to the reject log."""

    def __init__(self, validator: MessageValidator, rejects: RejectLog, stats: AggregatorStats,
                 own_sectors: Sequence[int], shard: int):
        self.validator = validator
        self.rejects = rejects
        self.stats = stats
        self._owned = set(own_sectors)
        self.shard = shard
        self.scan_number = 0

    def stimuli(self, parts) -> list:
        try:
            batch = self.validator.check_batch(parts, self.rejects.reject)
        except MalformedMessage as err:
            self.rejects.reject(err)
            return []
        heads = batch.headers
        if not len(heads):
            return []
        now = time.time()
        if self.stats.first_recv is None:
            self.stats.first_recv = now
            self.scan_number = int(heads["scan_number"][0])
        self.stats.last_recv = now
        return self._stimuli(batch)

    def _stimuli(self, batch) -> list:
        heads = batch.headers
        if (heads["kind"] != Kind.DATA).any():
            return self._markers(batch)
        sectors = heads["sector"]
        if len(heads) > 1 and (sectors != sectors[0]).any():  # producers never send one
            return [s for sector in distinct(sectors).tolist()
                    for s in self._stimuli(batch.subset(np.flatnonzero(sectors == sector)))]
        sector = int(sectors[0])
        if sector not in self._owned:
            for _ in range(len(heads)):
                self.rejects.reject(MalformedMessage("sector_elsewhere", f"sector {sector} is not routed by shard {self.shard}"))
            return []
        return [Admit(sector, batch.positions, batch, time.monotonic())]

    def _markers(self, batch) -> list:
        """END markers (a marker travels alone; any in a batch are taken one by one)."""
        out = []
        for i, head in enumerate(batch.headers):
            kind = Kind(int(head["kind"]))
            if kind is Kind.DATA:
                out += self._stimuli(batch.subset([i]))
                continue
            if kind is not Kind.END:
                self.rejects.reject(MalformedMessage("unexpected_kind", f"{kind.name} from a producer"))
                continue
            sector = int(head["sector"])
            if sector not in self._owned:
                self.rejects.reject(MalformedMessage("sector_elsewhere", f"END of sector {sector} at shard {self.shard}"))
                continue
            out.append(EndOfSector(sector, head, time.monotonic()))
        return out
