"""Distributor: one per compute node. Assembles frames, has them counted, writes its part.

It binds a PULL socket that the aggregator connects to, collects the sectors of each of its
scan positions (``position % nodes == node_index``), copies a complete frame once into a
slot of its counting pool (its own threads, or worker processes over shared memory), and appends
the sparse results to its part file. It finishes when every sector's END marker has arrived and every frame is counted, when
the stream stalls, or when told to stop; frames it never completed are listed, not dropped.

With acks, it also binds a PUSH socket for acknowledgements: it acknowledges positions once
counted and committed in a part segment (every ``segment_frames`` frames or
``segment_seconds``), sends a heartbeat with its counts every ``heartbeat_s``, takes any
position the aggregator sends (the aggregator re-routes a lost node's frames), and finishes
on the aggregator's FIN -- or, if the aggregator hangs up first (it fenced this node, or died),
then.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import zmq

from zmq.utils.monitor import recv_monitor_message

from .. import wire
from ..memory import peak_rss_mib
from ..config import CountingParams
from ..profile import DetectorProfile
from ..wire import Control, Kind, MalformedMessage
from .aggregator import route
from .counting_pool import CountingPool
from . import heap, security
from .counting_threads import ThreadCountingPool
from .endpoints import bind_address
from .validation import MessageValidator, RejectLog, SectorCopies

log = logging.getLogger("detstream.distributor")


@dataclass
class DistributorResult:
    node_index: int
    frames_expected: int
    frames_received: int = 0
    frames_counted: int = 0
    frames_acked: int = 0
    events: int = 0
    bytes_received: int = 0
    missing: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)
    conflicted: list[int] = field(default_factory=list)
    partial_peak: int = 0   # most frames partly received at once: how far the sectors ran apart
    rejected: dict = field(default_factory=dict)
    end_markers: int = 0
    fin: bool = False
    finish_reason: str = ""
    first_recv: Optional[float] = None
    last_recv: Optional[float] = None
    assemble_seconds: float = 0.0
    counting_seconds: float = 0.0
    peak_rss_mib: float = 0.0
    worker_peak_rss_mib: list[float] = field(default_factory=list)
    part_path: Optional[str] = None
    segments: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["stream_seconds"] = (self.last_recv - self.first_recv) if self.first_recv and self.last_recv else 0.0
        return d


class _Held:
    """A received payload frame some partial or waiting frame still needs: its blocks (uint8
    rows, and the same as sector arrays) and how many of them are not assembled yet."""

    __slots__ = ("blocks", "sectors", "live")

    def __init__(self, blocks: np.ndarray, profile: DetectorProfile, live: int):
        self.blocks = blocks
        self.sectors = blocks.view(profile.np_dtype).reshape(len(blocks), *profile.sector_shape)
        self.live = live


class Distributor:
    """Receives this node's share of the scan and turns it into counted events."""

    def __init__(self, profile: DetectorProfile, scan_width: int, scan_height: int,
                 node_index: int, nodes: int, counting: CountingParams, workers: int = 1,
                 part_writer=None, bind: str = "tcp://127.0.0.1:*", hwm: int = 64,
                 max_partial_frames: int = 256, stall_timeout_s: float = 60.0,
                 ctx: Optional[zmq.Context] = None, acks: bool = False, segment_frames: int = 256,
                 segment_seconds: float = 0.5, heartbeat_s: float = 0.5, linger_s: float = 2.0,
                 counting_mode: str = "processes", shards: int = 1, live=None,
                 curve: Optional[security.Curve] = None):
        """``live``: a detstream.live.LiveImages fed every counted frame (the live images)."""
        if not 0 <= node_index < nodes:
            raise ValueError(f"node index {node_index} outside 0..{nodes - 1}")
        heap.keep_freed_buffers()  # received batches reuse freed ones warm
        self.profile = profile
        self.node_index = node_index
        self.nodes = nodes
        self.positions = scan_width * scan_height
        self.validator = MessageValidator(profile, scan_width, scan_height)
        self.copies = SectorCopies(self.positions, profile.sectors)
        self.rejects = RejectLog(log)
        self.part_writer = part_writer
        # Producers may run up to their queues' depth (send + receive HWM, and socket buffers)
        # apart; below a few times that, frames still being completed would be evicted.
        self.max_partial = max(max_partial_frames, 4 * hwm)
        self.stall_timeout_s = stall_timeout_s
        self.acks = acks
        self.segment_frames = segment_frames
        self.segment_seconds = segment_seconds
        self.heartbeat_s = heartbeat_s
        self.live = live
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        # Workers are spawned before this process's sockets exist.
        try:
            pool = ThreadCountingPool if counting_mode == "threads" else CountingPool
            self.pool = pool(profile, counting, workers, ctx=self.ctx)
        except BaseException:
            if self._own_ctx:
                self.ctx.term()
            raise
        self.guard = curve.start(self.ctx, self.rejects) if curve else None
        self.inbound = security.server(self.guard, self.ctx.socket(zmq.PULL))
        self.inbound.setsockopt(zmq.RCVHWM, hwm)
        self.inbound.setsockopt(zmq.LINGER, 0)
        self.inbound.bind(bind_address(bind, f"node-{node_index}-data"))
        self.endpoint = self.inbound.getsockopt_string(zmq.LAST_ENDPOINT)
        # With acks, one ACK socket per aggregator shard: each shard's window holds its own
        # sectors of a position, and each must hear of every acknowledgement.
        self.shards = shards
        self.ack_outs: list[zmq.Socket] = []
        self.monitors: list[zmq.Socket] = []
        self.ack_endpoints: list[str] = []
        for k in range(shards if acks else 0):
            sock = security.server(self.guard, self.ctx.socket(zmq.PUSH), watch=False)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
            self.monitors.append(sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED))
            sock.bind(bind_address(bind, f"node-{node_index}-acks" + (f"-{k}" if shards > 1 else "")))
            self.ack_outs.append(sock)
            self.ack_endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.ack_endpoint: Optional[str] = self.ack_endpoints[0] if self.ack_endpoints else None
        mine = len(range(node_index, self.positions, nodes))
        self.result = DistributorResult(node_index=node_index, frames_expected=mine)
        # Partial frames as arrays over (position, sector), filled per batch with numpy: which
        # received payload frame holds each block (-1: none) and at which row.
        nsec = profile.sectors
        self._holder = np.full((self.positions, nsec), -1, dtype=np.int32)
        self._row = np.zeros((self.positions, nsec), dtype=np.int32)
        self._have = np.zeros(self.positions, dtype=np.uint8)   # sectors held of a partial frame
        self._held: dict[int, _Held] = {}        # holder id -> the payload frame, while any block is unassembled
        self._next_holder = 0
        self._pending: dict[int, None] = {}      # partial positions, oldest first
        self._ready: deque = deque()             # positions complete, waiting for a slot
        self._done = np.zeros(self.positions, dtype=bool)
        self._ends: dict[int, int] = {}          # sector -> blocks the aggregator sent us
        self._blocks_per_sector = [0] * profile.sectors
        self._undurable: list[int] = []          # counted, not yet committed and acknowledged
        self._undurable_since = 0.0
        self._acks_out = [deque() for _ in self.ack_outs]  # per shard: ACKs its socket has not taken yet
        self._last_heartbeat = 0.0
        self._shard_seen = [False] * shards
        self._shard_gone = [False] * shards
        self._fins: set[int] = set()
        self._closed = False

    # -- receiving -------------------------------------------------------------------------
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
        if self.result.first_recv is None:
            self.result.first_recv = now
        self.result.last_recv = now
        kinds = heads["kind"]
        data = kinds == Kind.DATA
        if data.all():
            self._blocks(batch, slice(None))
            return
        if data.any():
            self._blocks(batch, np.flatnonzero(data))
        for i in np.flatnonzero(~data).tolist():
            s, count = int(heads["sector"][i]), int(heads["count"][i])
            if kinds[i] == Kind.END:
                if s in self._ends:
                    self.rejects.reject(MalformedMessage("duplicate_end", f"second END for sector {s}"))
                else:
                    self._ends[s] = count
                    self.result.end_markers += 1
            else:  # FIN: its sector field is the shard's index
                self._fins.add(s)
                self.result.fin = len(self._fins) >= self.shards

    @property
    def _aggregator_gone(self) -> bool:
        """An aggregator shard hung up before its FIN (it fenced this node, or died)."""
        return any(gone and k not in self._fins for k, gone in enumerate(self._shard_gone))

    def _blocks(self, batch, idx) -> None:
        """A batch's data blocks (``idx`` of its good blocks) into their positions' frames,
        numpy over the batch; complete frames wait for a slot."""
        frames, frame_of, row_of = batch.block_rows()
        pos, sec = batch.positions[idx], batch.headers["sector"][idx].astype(np.int64)
        frame_of, row_of = frame_of[idx], row_of[idx]
        # With acks the aggregator is the routing authority: it re-routes a lost node's positions.
        if not self.acks:
            wrong = pos % self.nodes != self.node_index
            if wrong.any():
                for p in pos[wrong].tolist():
                    self.rejects.reject(MalformedMessage(
                        "wrong_node", f"position {p} belongs to node {route(p, self.nodes)}"))
                keep = ~wrong
                pos, sec, frame_of, row_of = pos[keep], sec[keep], frame_of[keep], row_of[keep]
        self._take(frames, pos, sec, frame_of, row_of)

    def _take(self, frames: list, pos, sec, frame_of, row_of) -> None:
        """Hold blocks (frame ``frame_of``, row ``row_of`` of ``frames``) for (``pos``, ``sec``)."""
        key = pos * self.profile.sectors + sec
        firsts = np.unique(key, return_index=True)[1]
        if len(firsts) < len(key):  # a sector of a position twice in one batch: the first copy first
            later = np.ones(len(key), dtype=bool)
            later[firsts] = False
            firsts = np.sort(firsts)
            self._take(frames, pos[firsts], sec[firsts], frame_of[firsts], row_of[firsts])
            self._take(frames, pos[later], sec[later], frame_of[later], row_of[later])
            return
        again = self._done[pos] | (self._holder[pos, sec] >= 0)
        if again.any():
            for i in np.flatnonzero(again).tolist():
                p, s = int(pos[i]), int(sec[i])
                payload = frames[frame_of[i]][row_of[i]]
                if self._done[p]:
                    self.rejects.reject(self.copies.second(p, s, payload))
                else:
                    first = self._held[int(self._holder[p, s])].blocks[self._row[p, s]]
                    self.rejects.reject(self.copies.second(p, s, payload, first))
            keep = ~again
            pos, sec, frame_of, row_of = pos[keep], sec[keep], frame_of[keep], row_of[keep]
            if not len(pos):
                return
        touched, per_pos = np.unique(pos, return_counts=True)
        new = touched[self._have[touched] == 0]
        base = self._next_holder
        self._next_holder += len(frames)
        self._holder[pos, sec] = base + frame_of
        self._row[pos, sec] = row_of
        self._have[touched] += per_pos.astype(np.uint8)
        live = np.bincount(frame_of, minlength=len(frames))
        for f in np.flatnonzero(live).tolist():
            self._held[base + f] = _Held(frames[f], self.profile, int(live[f]))
            rows = row_of if len(frames) == 1 else row_of[frame_of == f]
            at = slice(None) if len(frames) == 1 else frame_of == f
            self.copies.firsts(pos[at], sec[at], frames[f], rows)
        for s, n in enumerate(np.bincount(sec, minlength=self.profile.sectors).tolist()):
            self._blocks_per_sector[s] += n
        self.result.bytes_received += len(pos) * self.profile.sector_nbytes
        self._pending.update(dict.fromkeys(new.tolist()))
        complete = touched[self._have[touched] == self.profile.sectors]
        if len(complete):
            self._done[complete] = True
            for p in complete.tolist():
                del self._pending[p]
            self._ready.extend(complete.tolist())
            self.result.frames_received += len(complete)
        while len(self._pending) > self.max_partial:
            self._evict_oldest()
        if len(self._pending) > self.result.partial_peak:
            self.result.partial_peak = len(self._pending)

    def _release(self, pos: int) -> None:
        """A position's blocks are no longer needed here: let go of frames that held only them."""
        for h in self._holder[pos][self._holder[pos] >= 0].tolist():
            held = self._held[h]
            held.live -= 1
            if not held.live:
                del self._held[h]
        self._holder[pos] = -1

    def _evict_oldest(self) -> None:
        pos = next(iter(self._pending))
        del self._pending[pos]
        self._release(pos)
        self._have[pos] = 0
        self.result.partial.append(pos)
        log.warning("position %d evicted incomplete: more than %d frames partly received",
                    pos, self.max_partial)

    # -- counting --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        rows = self.profile.sector_rows
        held = self._held
        while self._ready and self.pool.has_free_slot():
            pos = self._ready.popleft()
            t0 = time.perf_counter()
            slot = self.pool.acquire()
            frame = self.pool.ring[slot]
            for s, (h, r) in enumerate(zip(self._holder[pos].tolist(), self._row[pos].tolist())):
                frame[s * rows:(s + 1) * rows] = held[h].sectors[r]
            self._release(pos)
            self.result.assemble_seconds += time.perf_counter() - t0
            self.pool.submit(slot, pos)
            if self.acks and not self.pool.workers:  # counting off: assembled is as far as it goes
                self._made(pos)
        self.pool.flush()

    def _collect(self) -> None:
        for pos, events in self.pool.collect():
            self.result.frames_counted += 1
            self.result.events += len(events)
            if self.part_writer is not None:
                self.part_writer.add(pos, events)
            if self.live is not None:
                self.live.add(pos, events)
            if self.acks:
                self._made(pos)

    def _input_done(self) -> bool:
        """Nothing more will come: FIN with acks, every sector's END without."""
        return self.result.fin if self.acks else len(self._ends) == self.profile.sectors

    def _finished(self) -> bool:
        return self._input_done() and not self._ready and self.pool.idle

    # -- acknowledging ---------------------------------------------------------------------
    def _made(self, pos: int) -> None:
        """A position counted (or assembled, counting off): acknowledged at the next commit."""
        if not self._undurable:
            self._undurable_since = time.monotonic()
        self._undurable.append(pos)

    def _deliver(self, now: float, force: bool = False) -> None:
        """Commit the segment when due and acknowledge its positions; send a heartbeat when due."""
        if self._undurable and (force or len(self._undurable) >= self.segment_frames
                                or now - self._undurable_since >= self.segment_seconds):
            commit = getattr(self.part_writer, "commit", None)
            if commit is not None:
                commit()
            positions = np.asarray(self._undurable, dtype=np.uint32)
            self._undurable = []
            self.result.frames_acked += len(positions)
            ack = self._control(Control.ACK, positions)
            for queue in self._acks_out:
                queue.append(ack)
        for sock, queue in zip(self.ack_outs, self._acks_out):
            while queue:
                try:
                    sock.send_multipart(queue[0], zmq.NOBLOCK)
                except zmq.Again:  # no aggregator yet, or its queue is full: keep them, in order
                    break
                queue.popleft()
        if now - self._last_heartbeat >= self.heartbeat_s:
            self._last_heartbeat = now
            beat = self._control(Control.HEARTBEAT)
            for sock in self.ack_outs:
                try:
                    sock.send_multipart(beat, zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def _control(self, kind: Control, positions=None) -> list:
        """An ACK or HEARTBEAT carrying this node's counts."""
        r = self.result
        return wire.control_message(kind, self.node_index, r.frames_received, r.frames_counted, positions)

    def _read_monitor(self, k: int) -> None:
        """Note aggregator shard ``k`` connecting to its ack socket, and hanging up."""
        while True:
            try:
                event = recv_monitor_message(self.monitors[k], zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._shard_seen[k] = True
            elif event["event"] == zmq.EVENT_DISCONNECTED and self._shard_seen[k]:
                self._shard_gone[k] = True

    # -- main loop -------------------------------------------------------------------------
    def run(self, should_stop: Optional[Callable[[], Optional[str]]] = None,
            on_progress: Optional[Callable[[DistributorResult], None]] = None,
            progress_interval_s: float = 0.5) -> DistributorResult:
        """Receive and count until finished; ``should_stop`` returns a reason to stop, or None."""
        poller = zmq.Poller()
        poller.register(self.pool.results, zmq.POLLIN)
        for monitor in self.monitors:
            poller.register(monitor, zmq.POLLIN)
        reading = False
        last_data = last_turn = time.monotonic()
        last_tick = 0.0
        reason = ""
        while not self._finished():
            want = len(self._ready) < self.pool.task_batch and not self._input_done()
            if want and not reading:
                poller.register(self.inbound, zmq.POLLIN)
            elif reading and not want:
                poller.unregister(self.inbound)
            reading = want
            ready = dict(poller.poll(100))
            if time.monotonic() - last_turn > 5.0:
                # This process was stopped (SIGSTOP, a paused VM): its own pause is no stall;
                # let what happened meanwhile (an aggregator that hung up) arrive first.
                last_data = time.monotonic()
            if self.pool.results in ready:
                self._collect()
            if self.inbound in ready:
                self._read_inbound()
                last_data = time.monotonic()
            self._dispatch()
            now = last_turn = time.monotonic()
            if self.acks:
                # Past every END with nothing left to count, what is counted need not wait for
                # the segment to fill: the aggregator's FIN waits on it.
                drained = len(self._ends) == self.profile.sectors and not self._ready and self.pool.idle
                self._deliver(now, force=drained)
                for k, monitor in enumerate(self.monitors):
                    if monitor in ready:
                        self._read_monitor(k)
                if self._aggregator_gone:
                    # A FIN sent just before may still be on its way: take what has arrived.
                    if self.inbound.poll(200):
                        self._read_inbound()
                    if not self.result.fin:
                        reason = "aggregator hung up before FIN"
                        log.warning(reason)
                    break
            if now - last_tick >= progress_interval_s:
                last_tick = now
                if on_progress is not None:
                    on_progress(self.result)
                if should_stop is not None:
                    reason = should_stop() or ""
                    if reason:
                        break
            # The stall clock runs once data has started; before that the session watches startup.
            if reading and self.result.first_recv is not None and now - last_data > self.stall_timeout_s:
                reason = f"stalled: no data for {self.stall_timeout_s:g} s"
                log.warning(reason)
                break
        # Count what is already assembled or in flight before leaving.
        deadline = time.monotonic() + 30
        while (self._ready or not self.pool.idle) and time.monotonic() < deadline:
            self._dispatch()
            if self.pool.results.poll(100):
                self._collect()
        if self.acks:
            self._deliver(time.monotonic(), force=True)
        self.result.finish_reason = reason or "complete"
        return self._finish()

    def _read_inbound(self) -> None:
        """Handle what is queued, up to a batch, stopping once enough frames wait for a slot."""
        for _ in range(256):
            try:
                parts = self.inbound.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._handle(parts)
            if len(self._ready) >= self.pool.task_batch:
                break

    def _finish(self) -> DistributorResult:
        r = self.result
        r.partial = sorted(set(r.partial) | set(self._pending))
        if self.acks:  # positions go where the aggregator sends them; it accounts for every one
            r.missing = []
        else:
            mine = np.arange(self.node_index, self.positions, self.nodes)
            r.missing = mine[~self._done[mine]].tolist()
        r.rejected = self.rejects.as_dict()
        r.conflicted = sorted(self.copies.conflicted)
        r.counting_seconds = self.pool.counting_seconds
        if self.pool.enabled and r.frames_counted != r.frames_received:
            log.error("%d frames received but %d counted", r.frames_received, r.frames_counted)
        return r

    def close(self) -> None:
        """Stop the workers, close the sockets (acks linger briefly) and end an owned context."""
        if self._closed:
            return
        self._closed = True
        self.pool.close()
        self.result.worker_peak_rss_mib = self.pool.worker_peak_rss_mib
        self.result.peak_rss_mib = peak_rss_mib()
        self.inbound.close()
        for sock, monitor in zip(self.ack_outs, self.monitors):
            sock.disable_monitor()
            monitor.close(0)
            sock.close()
        if self.guard is not None:
            self.guard.stop()
        if self._own_ctx:
            self.ctx.term()
