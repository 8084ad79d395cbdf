"""The aggregator's delivery, as a state machine that does no I/O.

Modelled on dask's ``distributed/worker_state_machine.py``: the aggregator (``aggregator.py``)
is a shell that reads sockets, clocks and etcd, turns what it reads into a *stimulus* (a batch
of blocks admitted, an ACK, a heartbeat, a dropped connection, the nodes etcd still lists, the
clock's tick, the end of input, the finish), hands it to ``handle`` and carries out the
*instructions* that come back (forward blocks to a node, send END or FIN, fence a node, reject
a block); both are dataclasses in ``delivery_types.py``. Time comes in with each stimulus:
nothing here reads a clock, a socket or etcd, so a test drives the delivery through any
interleaving (``tests/detstream/services/test_delivery_core.py``, hypothesis stateful tests).

Two routers answer the same stimuli:

* ``Delivery``: acknowledged delivery, the sessions' default. The window over scan positions,
  acknowledgements, the failure detector, re-routing a fenced node's positions, FIN, and the
  account of every position.
* ``Unacknowledged``: ``SessionSpec.acks=False``, kept for comparison. Every sector of position
  ``p`` goes to node ``p % N``; nothing is kept, no node is ever fenced.

Both keep the numpy-per-batch design: a stimulus carries a batch's positions as an array, and
the work per batch is a few numpy operations, never Python per block.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from .delivery_types import (Acked, AggregatorStats, Admit, Disconnected, EndOfSector, Fence, Finish, Forward,
                             Heartbeat, InputsDone, NodeState, Registered, Reject, SendEnd, SendFin, Tick)

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


# --------------------------------------------------------------------------- routers
class Router:
    """What both routers share: the nodes, END markers, and the books of what went where.

    ``handle(stimulus)`` returns the instructions, in the order they are to be carried out.
    """

    #: Whether the shell should feed it the nodes' liveness (ACKs, monitors, etcd's list).
    detects_failures = False

    def __init__(self, nodes: int, own_sectors: Sequence[int], detector_sectors: int, block_nbytes: int,
                 now: float, acks: bool = False, window_frames: int = 0):
        self.nodes = nodes
        self.own_sectors = sorted(own_sectors)
        #: Sectors per position here: a position is whole at this shard with every sector it owns.
        self.sectors = len(self.own_sectors)
        self.block_nbytes = block_nbytes
        self.node = [NodeState(now) for _ in range(nodes)]
        self.ended: set[int] = set()
        # per_sector_node[s][n]: data blocks of sector s sent to node n (the END marker's count).
        self.per_sector_node = [[0] * nodes for _ in range(detector_sectors)]
        self.stats = AggregatorStats(frames_routed=[0] * nodes, acks=acks, window_frames=window_frames,
                                     positions_routed=[0] * nodes, positions_acked=[0] * nodes)
        self._handlers = {Admit: self._admit, EndOfSector: self._end}  # _admit: each router's own

    def handle(self, stimulus) -> list:
        """What to send for ``stimulus`` (a stimulus this router has no use for: nothing)."""
        handler = self._handlers.get(type(stimulus))
        return handler(stimulus) if handler is not None else []

    # -- what the shell asks ------------------------------------------------------------
    @property
    def alive(self) -> list[bool]:
        return [n.alive for n in self.node]

    @property
    def all_ended(self) -> bool:
        return len(self.ended) == self.sectors

    @property
    def settled(self) -> bool:
        """Nothing is left to acknowledge."""
        return True

    @property
    def every_node_lost(self) -> bool:
        return not any(n.alive for n in self.node)

    @property
    def window_full(self) -> bool:
        return False

    def may_read(self, sector: Optional[int]) -> bool:
        """Whether to read from ``sector``'s socket (None: the shared one) now."""
        return True

    def account(self) -> None:
        """At the very end: the positions no node acknowledged, with why, into ``stats``."""

    # -- shared ---------------------------------------------------------------------------
    def _route(self, sector: int, batch, nodes: np.ndarray, keep: Optional[np.ndarray]) -> list:
        """Forward the blocks (those at ``keep`` of ``batch``, None: all) to ``nodes``, one each:
        the batch whole when it goes to one node, else one message per node."""
        first = int(nodes[0])
        if len(nodes) == 1 or not (nodes != first).any():
            return [self._forward(first, sector, batch, keep, len(nodes))]
        out = []
        for node in distinct(nodes).tolist():
            idx = np.flatnonzero(nodes == node)
            out.append(self._forward(node, sector, batch, idx if keep is None else keep[idx], len(idx)))
        return out

    def _forward(self, node: int, sector: int, batch, idx, blocks: int) -> Forward:
        self.per_sector_node[sector][node] += blocks
        self.stats.frames_routed[node] += blocks
        self.stats.bytes_routed += blocks * self.block_nbytes
        return Forward(node, batch, idx)

    def _end(self, s: EndOfSector) -> list:
        if s.sector in self.ended:
            return [Reject("duplicate_end", f"second END from sector {s.sector}")]
        self.ended.add(s.sector)
        self.stats.ends_seen += 1
        counts = self.per_sector_node[s.sector]
        return [SendEnd(n, s.sector, counts[n], s.marker) for n in range(self.nodes) if self.node[n].alive]


class Unacknowledged(Router):
    """``acks=False`` (kept for comparison): position ``p`` to node ``p % N``, nothing kept,
    no node fenced; the shell drains what it queued at the end, and no FIN is sent."""

    def _admit(self, s: Admit) -> list:
        return self._route(s.sector, s.batch, s.positions % self.nodes, None)


# A position's state in the window arrays.
UNSEEN, WINDOW, ACKED, DROPPED = 0, 1, 2, 3


class _Held:
    """A batch the window still refers to: the batch, which of its blocks are held (None: all),
    and how many of them belong to positions still in the window."""

    __slots__ = ("batch", "keep", "live")

    def __init__(self, batch, keep: Optional[np.ndarray], live: int):
        self.batch = batch
        self.keep = keep
        self.live = live

    def at(self, idx: np.ndarray) -> np.ndarray:
        """The batch's indices of the held blocks at ``idx``."""
        return idx if self.keep is None else self.keep[idx]


class Delivery(Router):
    """Acknowledged delivery, at-least-once.

    * every position stays in a bounded window (the batches, by reference) from its first
      sector until a node acknowledges it durable; a batch is let go once none of its positions
      is in the window. A full window tells the shell to stop reading (``may_read``), except a
      sector that lags behind, whose blocks complete what the window already holds;
    * the failure detector: a node is lost only on evidence that holds under load. Its connection
      drops; it holds complete unacknowledged positions and has sent nothing at all (no heartbeat,
      no ACK) for ``node_timeout_s`` ("unreachable"); or etcd no longer lists it *and* it has been
      silent for ``lease_grace_s`` (a lease lapses under load, or a cut to etcd alone, while the
      node still acknowledges). A node that heartbeats but acknowledges nothing with work pending
      for ``stall_s`` is fenced as "stalled". The last live node is never fenced for being slow:
      with nowhere to re-route, that would only lose its frames (once nothing more will come, its
      positions still unacknowledged after ``stall_s`` are dropped as "stalled"). A fenced node's
      window entries and its future positions go to the next alive node, each position to one node;
    * a fenced node's messages are ignored from then on, whatever comes late or comes back;
    * at the end FIN goes to every surviving node, and ``account`` lists what no node acknowledged.
    """

    detects_failures = True

    def __init__(self, positions: int, nodes: int, own_sectors: Sequence[int], detector_sectors: int,
                 block_nbytes: int, now: float, window_frames: int = 1024, node_timeout_s: float = 10.0,
                 lease_grace_s: float = 2.0, stall_s: float = float("inf")):
        super().__init__(nodes, own_sectors, detector_sectors, block_nbytes, now, acks=True,
                         window_frames=window_frames)
        self.positions = positions
        self.window_frames = window_frames
        self.node_timeout_s = node_timeout_s
        self.lease_grace_s = lease_grace_s
        self.stall_s = stall_s
        nsec = detector_sectors
        # The window, as arrays over positions (numpy work per batch, not Python per block):
        # state, owning node, which sectors arrived, and where each block is held.
        self.state = np.zeros(positions, dtype=np.uint8)
        self.node_of = np.full(positions, -1, dtype=np.int16)
        self._got = np.zeros((positions, nsec), dtype=bool)
        self._have_n = np.zeros(positions, dtype=np.uint8)
        self._held_in = np.full((positions, nsec), -1, dtype=np.int32)   # batch id
        self._held_at = np.zeros((positions, nsec), dtype=np.int32)      # index in the batch
        self._batches: dict[int, _Held] = {}
        self._next_batch = 0
        self.in_window = 0
        self._target_cache: Optional[np.ndarray] = None
        self._have_in_window = np.zeros(nsec, dtype=np.int64)  # window positions having sector s
        self.lost_why: dict[str, set] = {}
        self._handlers.update({Acked: self._acked, Heartbeat: self._heard, Disconnected: self._disconnected,
                               Registered: self._registered, Tick: self._tick, InputsDone: self._inputs_done,
                               Finish: self._finish})

    # -- what the shell asks ------------------------------------------------------------
    @property
    def settled(self) -> bool:
        return not self.in_window

    @property
    def window_full(self) -> bool:
        return self.in_window >= self.window_frames

    def may_read(self, sector: Optional[int]) -> bool:
        """With the window full, only a sector some window entry still lacks (up to twice the window)."""
        if self.in_window < self.window_frames:
            return True
        return (sector is not None and self.in_window - int(self._have_in_window[sector]) > 0
                and self.in_window < 2 * self.window_frames)

    # -- admitting blocks -----------------------------------------------------------------
    def _admit(self, s: Admit) -> list:
        """Put a batch of one sector's blocks into the window and forward those it may."""
        sector, positions = s.sector, s.positions
        out: list = []
        state = self.state[positions]
        refused = (state >= ACKED) | self._got[positions, sector]
        if len(positions) > 1:  # a position twice in the batch: the later write of its index wins
            order = np.arange(len(positions), dtype=np.int32)
            marks = self._held_at[:, sector]
            before = marks[positions]
            marks[positions] = order
            refused |= marks[positions] != order
            marks[positions] = before
        keep = None
        if refused.any():
            out += [Reject("duplicate_sector", f"sector {sector} of position {positions[i]} twice or after it "
                                               "was acknowledged") for i in np.flatnonzero(refused).tolist()]
            keep = np.flatnonzero(~refused)
            positions, state = positions[keep], state[keep]
        new = positions[state == UNSEEN]
        if len(new):
            target = self._targets()[new % self.nodes]
            orphan = target < 0
            if orphan.any():
                lost = new[orphan]
                self.state[lost] = DROPPED
                self.lost_why.setdefault("no_node", set()).update(lost.tolist())
                new, target = new[~orphan], target[~orphan]
                sendable = self.state[positions] != DROPPED
                keep = (np.arange(len(refused)) if keep is None else keep)[sendable]
                positions = positions[sendable]
            self.state[new] = WINDOW
            self.node_of[new] = target
            self.in_window += len(new)
            routed = np.bincount(target, minlength=self.nodes)
            for n in np.flatnonzero(routed).tolist():
                self.stats.positions_routed[n] += int(routed[n])
            if self.in_window > self.stats.window_peak:
                self.stats.window_peak = self.in_window
        if not len(positions):
            return out
        bid = self._next_batch
        self._next_batch += 1
        self._batches[bid] = _Held(s.batch, keep, len(positions))
        self._got[positions, sector] = True
        self._held_in[positions, sector] = bid
        self._held_at[positions, sector] = np.arange(len(positions), dtype=np.int32)
        self._have_n[positions] += 1
        self._have_in_window[sector] += len(positions)
        nodes = self.node_of[positions].astype(np.int64)
        self._gave_work(nodes[self._have_n[positions] == self.sectors], s.now)
        return out + self._route(sector, s.batch, nodes, keep)

    def _targets(self) -> np.ndarray:
        """For each home node, where its positions go now (-1: no node alive)."""
        if self._target_cache is None:
            alive = self.alive
            self._target_cache = np.array([-1 if (t := next_alive(h, alive)) is None else t
                                           for h in range(self.nodes)], dtype=np.int64)
        return self._target_cache

    def _gave_work(self, nodes: np.ndarray, now: float) -> None:
        """Whole positions (one entry each, its node) are now theirs to acknowledge; a node's
        no-progress clock starts when it goes from none to some."""
        if not len(nodes):
            return
        counts = np.bincount(nodes, minlength=self.nodes)
        for n in np.flatnonzero(counts).tolist():
            state = self.node[n]
            if state.complete_unacked == 0:
                state.busy_since = now
            state.complete_unacked += int(counts[n])

    # -- acknowledgements -------------------------------------------------------------------
    def _heard(self, s) -> list:
        """Any message says a node is reachable (a fenced node's are ignored)."""
        state = self.node[s.node]
        if state.alive:
            state.last_heard = s.now
            state.received, state.counted = s.received, s.counted
        return []

    def _acked(self, s: Acked) -> list:
        """Release acknowledged positions (stale, repeated or unknown ones are ignored)."""
        state = self.node[s.node]
        if not state.alive:
            return []
        self._heard(s)
        state.last_ack = s.now
        state.stall_noted = False
        positions = s.positions[s.positions < self.positions].astype(np.int64)
        positions = distinct(positions[self.state[positions] == WINDOW])
        if len(positions):
            self.stats.positions_acked[s.node] += len(positions)
            self._leave(positions, ACKED)
        return []

    def _leave(self, positions: np.ndarray, new_state: int) -> None:
        """Positions leave the window: keep the counts straight, let go of batches no longer held."""
        have_n = self._have_n[positions]
        complete = self.node_of[positions][have_n == self.sectors].astype(np.int64)
        if len(complete):
            counts = np.bincount(complete, minlength=self.nodes)
            for n in np.flatnonzero(counts).tolist():
                self.node[n].complete_unacked -= int(counts[n])
        got = self._got[positions]
        self._have_in_window -= got.sum(axis=0)
        self.in_window -= len(positions)
        self.state[positions] = new_state
        bids, counts = np.unique(self._held_in[positions][got], return_counts=True)
        batches = self._batches
        for bid, n in zip(bids.tolist(), counts.tolist()):
            held = batches[bid]
            held.live -= n
            if not held.live:
                del batches[bid]

    def _drop(self, positions: np.ndarray, why: str) -> None:
        """Take positions out of the window unacknowledged, as lost for ``why``."""
        self._leave(positions, DROPPED)
        self.lost_why.setdefault(why, set()).update(positions.tolist())

    # -- the failure detector -----------------------------------------------------------------
    def _disconnected(self, s: Disconnected) -> list:
        return self._lose(s.node, "disconnected", s.now) if self.node[s.node].alive else []

    def _registered(self, s: Registered) -> list:
        """Lose a node whose leased key has gone and that has been silent meanwhile: a node
        still heard from is alive whatever etcd says (a lapsed lease, a cut to etcd)."""
        out: list = []
        for n, state in enumerate(self.node):
            if state.alive and n not in s.nodes and s.now - state.last_heard > self.lease_grace_s:
                out += self._lose(n, "service key gone", s.now)
        return out

    def _tick(self, s: Tick) -> list:
        """The clocks: fence a node unreachable past ``node_timeout_s``, or stalled (heard from,
        acknowledging nothing) past ``stall_s``; never the last live node for either. That one,
        once nothing more will come, has its unacknowledged positions dropped as ``stalled``
        after ``stall_s``, so a stuck node never hangs the session."""
        out: list = []
        now = s.now
        live = sum(n.alive for n in self.node)
        for n, state in enumerate(self.node):
            if not (state.alive and state.complete_unacked):
                continue
            silent = now - max(state.last_heard, state.busy_since)
            idle = now - max(state.last_ack, state.busy_since)
            if live > 1 and silent > self.node_timeout_s:
                out += self._lose(n, f"unreachable: no message for {self.node_timeout_s:g} s with "
                                     f"{state.complete_unacked} frames unacknowledged", now)
                live -= 1
            elif live > 1 and idle > self.stall_s:
                out += self._lose(n, f"stalled: heartbeats but no acknowledgement for {self.stall_s:g} s with "
                                     f"{state.complete_unacked} frames unacknowledged", now)
                live -= 1
            elif live == 1 and max(silent, idle) > self.stall_s:
                if not state.stall_noted:
                    state.stall_noted = True
                    log.warning("node %d, the last one alive, has acknowledged nothing for %g s "
                                "(%d frames pending); it is not fenced for being slow", n,
                                self.stall_s, state.complete_unacked)
                if s.inputs_done:
                    mine = np.flatnonzero((self.state == WINDOW) & (self.node_of == n))
                    log.error("node %d stalled with nothing more to come: %d positions given up as lost",
                              n, len(mine))
                    self._drop(mine, "stalled")
                    state.complete_unacked = 0
        return out

    def _lose(self, node: int, why: str, now: float) -> list:
        """Fence a lost node and send its unacknowledged positions elsewhere, each to one node."""
        state = self.node[node]
        state.alive = False
        mine = np.flatnonzero((self.state == WINDOW) & (self.node_of == node))
        out: list = [Fence(node, why, len(mine))]
        self._target_cache = None
        targets = self._targets()[mine % self.nodes]
        orphan = targets < 0
        if orphan.any():
            self._drop(mine[orphan], "no_node")
            mine, targets = mine[~orphan], targets[~orphan]
        state.complete_unacked = 0
        if not len(mine):
            return out
        self.node_of[mine] = targets
        self.stats.rerouted.extend(mine.tolist())
        routed = np.bincount(targets, minlength=self.nodes)
        for n in np.flatnonzero(routed).tolist():
            self.stats.positions_routed[n] += int(routed[n])
        self._gave_work(targets[self._have_n[mine] == self.sectors], now)
        return out + self._resend(mine, targets)

    def _resend(self, positions: np.ndarray, targets: np.ndarray) -> list:
        """Forward the held blocks of ``positions`` to ``targets`` (one message per batch and target)."""
        got = self._got[positions]
        rows, sectors = np.nonzero(got)
        bids = self._held_in[positions[rows], sectors]
        at = self._held_at[positions[rows], sectors]
        dest = targets[rows]
        order = np.lexsort((at, dest, bids))
        bids, at, dest = bids[order], at[order], dest[order]
        cuts = np.flatnonzero((np.diff(bids) != 0) | (np.diff(dest) != 0)) + 1
        out = []
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(bids)]):
            node = int(dest[lo])
            held = self._batches[int(bids[lo])]
            out.append(Forward(node, held.batch, held.at(at[lo:hi])))
            self.stats.frames_routed[node] += hi - lo
        return out

    # -- the end ----------------------------------------------------------------------------
    def _inputs_done(self, s: InputsDone) -> list:
        """No more sector blocks will come: positions still incomplete never will be."""
        incomplete = np.flatnonzero((self.state == WINDOW) & (self._have_n < self.sectors))
        if len(incomplete):
            self._drop(incomplete, s.why)
            log.warning("%d positions never received every sector (%s)", len(incomplete), s.why)
        return []

    def _finish(self, s: Finish) -> list:
        """Everything is acknowledged: FIN to every surviving node."""
        out = []
        for n, state in enumerate(self.node):
            if state.alive:
                out.append(SendFin(n, self.stats.positions_acked[n]))
                self.stats.fin_sent.append(n)
        return out

    def account(self) -> None:
        """Every position no node acknowledged, with why."""
        left = np.flatnonzero(self.state == WINDOW)
        if len(left):
            self._drop(left, "unacknowledged")
        lost = np.flatnonzero(self.state != ACKED)
        explained = set().union(*self.lost_why.values()) if self.lost_why else set()
        never = [int(p) for p in lost if int(p) not in explained]
        if never:
            self.lost_why["never_received"] = set(never)
        self.stats.lost = lost.tolist()
        self.stats.lost_reasons = {k: len(v) for k, v in self.lost_why.items() if v}
        if self.stats.lost:
            log.error("%d positions lost: %s", len(self.stats.lost), self.stats.lost_reasons)
