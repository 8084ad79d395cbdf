"""The delivery core's stimuli (what happened, with when) and instructions (what to send),
what it knows of a node (``NodeState``), and the aggregator's account (``AggregatorStats``):
see ``delivery.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


# --------------------------------------------------------------------------- stimuli
@dataclass(slots=True)
class Admit:
    """Good data blocks of one sector arrived: their positions, and the batch that holds them
    (opaque here: an instruction hands it back, with the indices of the blocks to send)."""
    sector: int
    positions: np.ndarray
    batch: Any
    now: float


@dataclass(slots=True)
class EndOfSector:
    """A sector's END marker (``marker``: its header, handed back with each SendEnd)."""
    sector: int
    marker: Any
    now: float


@dataclass(slots=True)
class Acked:
    """A node's ACK: these positions are durable there."""
    node: int
    positions: np.ndarray
    received: int
    counted: int
    now: float


@dataclass(slots=True)
class Heartbeat:
    """A node's heartbeat: it is reachable (its counts say nothing of progress)."""
    node: int
    received: int
    counted: int
    now: float


@dataclass(slots=True)
class Disconnected:
    """The connection to a node dropped."""
    node: int
    now: float


@dataclass(slots=True)
class Registered:
    """The nodes whose leased key etcd still lists."""
    nodes: frozenset
    now: float


@dataclass(slots=True)
class Tick:
    """The clock, twice a second: the failure detector's timeouts. ``inputs_done``: nothing
    more will come from the producers."""
    now: float
    inputs_done: bool


@dataclass(slots=True)
class InputsDone:
    """No more sector blocks will come (every END read, or the stream stalled: ``why``)."""
    why: str
    now: float


@dataclass(slots=True)
class Finish:
    """Every sector has ended and nothing is left unacknowledged: close the nodes' streams."""
    now: float


# --------------------------------------------------------------------------- instructions
@dataclass(slots=True)
class Forward:
    """Send ``node`` the blocks of ``batch`` at ``idx`` (None: the batch as received)."""
    node: int
    batch: Any
    idx: Optional[np.ndarray]


@dataclass(slots=True)
class SendEnd:
    """Tell ``node`` that ``sector`` has ended after ``count`` blocks sent to it."""
    node: int
    sector: int
    count: int
    marker: Any


@dataclass(slots=True)
class SendFin:
    """Tell ``node`` that everything is acknowledged (``acked`` positions of it)."""
    node: int
    acked: int


@dataclass(slots=True)
class Fence:
    """``node`` is lost: close its sockets and drop what is queued for it. The Forwards that
    follow in the same answer re-route its ``unacknowledged`` positions."""
    node: int
    reason: str
    unacknowledged: int


@dataclass(slots=True)
class Reject:
    """A block or marker refused (the MalformedMessage reason and detail)."""
    reason: str
    detail: str


# --------------------------------------------------------------------------- the account
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


class NodeState:
    """What the delivery knows of one node's liveness."""

    __slots__ = ("alive", "complete_unacked", "busy_since", "last_heard", "last_ack", "received",
                 "counted", "stall_noted")

    def __init__(self, now: float):
        self.alive = True
        self.complete_unacked = 0      # positions with every sector sent to it, not yet acknowledged
        self.busy_since = now          # when complete_unacked last went from 0 to 1
        self.last_heard = now          # last message of any kind (heartbeat or ACK)
        self.last_ack = now            # last ACK
        self.received = self.counted = -1
        self.stall_noted = False       # the last live node's stall has been logged
