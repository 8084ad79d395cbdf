"""The failure detector never cries wolf: a node is fenced only on evidence that holds under load.

The false loss a fresh machine found (a live node 0 fenced after node 1 was killed, with two
aggregator shards) came from the node's side: after a re-route it held partial frames from both
shards' windows, more than its eviction bound (sized for one window), so it evicted some; those
positions could then never be completed or acknowledged, and the aggregator fenced a live node
for "no progress". The first test reproduces that with a real Distributor; the others drive a
real Aggregator with nodes the test plays, through the detector's rules one by one.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from detstream import wire
from detstream.config import CountingParams, SessionSpec
from detstream.profile import SMALL_TEST_CAMERA
from detstream.services.aggregator import Aggregator
from detstream.services.distributor import Distributor
from detstream.services.serve import partial_frames_bound
from detstream.wire import Control, Kind

from test_delivery import FakeNode  # noqa: I001 (a sibling test module)

PROFILE = SMALL_TEST_CAMERA
BLOCK = np.zeros(PROFILE.sector_shape, np.uint16).tobytes()


# --------------------------------------------------------------------------- the node's side
def test_a_node_holds_partial_frames_from_every_shard_s_window(tmp_path, wait_until):
    """Two shards, each a window apart: shard 1 has re-sent its sectors of a lost node's window
    (positions W..2W-1) while shard 0 is still ahead on positions 0..W-1. The node holds 2W partial
    frames; with the eviction bound serve.py gives it, none is evicted, and every position is
    acknowledged to both shards once the other halves arrive."""
    spec = SessionSpec(session_id="fd1", detector_profile=PROFILE, scan_width=64, scan_height=32,
                       nodes=2, aggregators=2, output_dir=tmp_path,
                       counting=CountingParams(enabled=False))
    window = spec.delivery_window
    assert spec.frames_expected >= 2 * window
    w, h = spec.scan_width, spec.scan_height
    ctx = zmq.Context()
    dist = Distributor(PROFILE, w, h, 0, spec.nodes, spec.counting, part_writer=None, ctx=ctx, acks=True,
                       shards=2, max_partial_frames=partial_frames_bound(spec), counting_mode="threads")
    acks = []
    for ep in dist.ack_endpoints:
        a = ctx.socket(zmq.PULL)
        a.setsockopt(zmq.LINGER, 0)
        a.connect(ep)
        acks.append(a)
    shards = []
    for _ in range(2):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(dist.endpoint)
        shards.append(s)
    stop = threading.Event()
    out = {}
    runner = threading.Thread(target=lambda: out.update(r=dist.run(
        should_stop=lambda: "test over" if stop.is_set() else None)), daemon=True)
    runner.start()
    acked = [set(), set()]

    def send(shard: int, positions: range) -> None:
        for pos in positions:
            for sec in (0, 1) if shard == 0 else (2, 3):
                shards[shard].send_multipart([wire.data_header(sec, 1, pos + 1, w, h, pos % w, pos // w, pos),
                                              BLOCK])

    def read_acks() -> None:
        for k, sock in enumerate(acks):
            while sock.poll(0):
                msg = wire.parse_control(sock.recv_multipart(copy=False))
                if msg.kind is Control.ACK:
                    acked[k].update(msg.positions.tolist())

    try:
        send(0, range(0, window))            # shard 0 ahead on its own positions
        send(1, range(window, 2 * window))   # shard 1's re-sent window, the other halves not yet
        wait_until(lambda: dist.result.partial_peak >= 2 * window or dist.result.partial, timeout_s=30,
                   what="the node to hold both shards' halves")
        send(0, range(window, 2 * window))
        send(1, range(0, window))

        def all_acked() -> bool:
            read_acks()
            return acked[0] == acked[1] == set(range(2 * window)) or bool(dist.result.partial)
        wait_until(all_acked, timeout_s=60, what="every position acknowledged to both shards")
        assert dist.result.partial == [], f"{len(dist.result.partial)} partial frames evicted"
        assert acked[0] == acked[1] == set(range(2 * window))
    finally:
        stop.set()
        runner.join(30)
        dist.close()
        for s in shards + acks:
            s.close(0)
        ctx.term()


# --------------------------------------------------------------------------- the aggregator's side
class Node(FakeNode):
    """A node the test plays (test_delivery's), which can also heartbeat."""

    def positions(self) -> set[int]:
        self.read(0)
        return {h.position for h in self.got if h.kind is Kind.DATA}

    def beat(self) -> None:
        """A heartbeat with the same counts every time: alive, and no visible progress."""
        try:  # a fenced node's heartbeats find nobody listening: they are dropped, as a node's are
            self.acks.send_multipart(wire.control_message(Control.HEARTBEAT, self.index, 0, 0), zmq.NOBLOCK)
        except zmq.Again:
            pass


@pytest.fixture
def cluster():
    """A real Aggregator (acks on) on a thread, nodes the test plays, one PUSH per sector into it;
    every socket and the thread are gone at the end, also on failure."""
    ctx = zmq.Context()
    stop = threading.Event()
    made: dict = {}

    def make(nodes=2, w=4, h=1, node_timeout_s=1.0, node_stall_s=30.0, node_check=None, lease_grace_s=2.0):
        fakes = [Node(ctx, i) for i in range(nodes)]
        agg = Aggregator(PROFILE, w, h, [f.endpoints()[0] for f in fakes], ctx=ctx,
                         ack_endpoints=[f.endpoints()[1] for f in fakes], window_frames=64,
                         node_timeout_s=node_timeout_s, linger_s=1.0, lease_grace_s=lease_grace_s)
        senders = []
        for ep in agg.sector_endpoints:
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            senders.append(s)
        stats: dict = {}
        t = threading.Thread(target=lambda: stats.update(agg.run(
            should_stop=stop.is_set, fin_wait_s=0.2, stall_timeout_s=120.0, node_stall_s=node_stall_s,
            node_check=node_check, node_check_s=0.1).as_dict()), daemon=True)
        made.update(agg=agg, fakes=fakes, senders=senders, thread=t, stats=stats, w=w, h=h)
        t.start()
        return made

    yield make
    stop.set()
    if made:
        made["thread"].join(10)
        made["agg"].close()
        for s in made["senders"]:
            s.close(0)
        for f in made["fakes"]:
            f.data.close(0)
            f.acks.close(0)
    ctx.destroy(linger=0)


def _send(c, pos):
    w, h = c["w"], c["h"]
    for s in range(PROFILE.sectors):
        c["senders"][s].send_multipart([wire.data_header(s, 1, pos + 1, w, h, pos % w, pos // w, pos), BLOCK])


def _end(c):
    for s in range(PROFILE.sectors):
        c["senders"][s].send_multipart([wire.end_header(s, 1, c["w"], c["h"], 0), b""])


def _finish(c, wait_until, acks: dict[int, list[int]]):
    """Acknowledge, end every sector, and return the aggregator's report once it has finished."""
    for node, positions in acks.items():
        c["fakes"][node].ack(positions)
    _end(c)
    return wait_until(lambda: c["stats"], timeout_s=20, what="the aggregator to finish")


def _beat_while(c, node: int, condition, timeout_s: float, what: str, wait_until) -> None:
    """Heartbeat from ``node`` (no new counts) until ``condition`` holds."""
    def step():
        c["fakes"][node].beat()
        return condition()
    wait_until(step, timeout_s=timeout_s, interval_s=0.1, what=what)


def test_a_slow_node_that_heartbeats_is_not_lost_however_long_it_takes(cluster, wait_until):
    """The starved survivor: node 1 holds a whole position and shows no new counts for three node
    timeouts, but its heartbeats arrive: it is slow, not lost (main fenced it for 'no progress')."""
    c = cluster(nodes=2, w=2, node_timeout_s=1.0)
    _send(c, 0)
    _send(c, 1)
    wait_until(c["fakes"][1].has(4), what="node 1 to get position 1")
    c["fakes"][0].ack([0])
    agg = c["agg"]
    _beat_while(c, 1, lambda: time.monotonic() - agg.delivery.node[1].last_ack > 3 * agg.node_timeout_s,
                timeout_s=20, what="node 1 silent on acks for 3 node timeouts", wait_until=wait_until)
    st = _finish(c, wait_until, {1: [1]})
    assert st["nodes_lost"] == [] and st["lost_positions"] == [] and st["fin_sent_to"] == [0, 1]


def test_a_node_that_heartbeats_but_never_acknowledges_is_fenced_as_stalled(cluster, wait_until):
    c = cluster(nodes=2, w=2, node_timeout_s=0.5, node_stall_s=1.5)
    n0, n1 = c["fakes"]
    _send(c, 0)
    _send(c, 1)
    wait_until(n1.has(4), what="node 1 to get position 1")
    n0.ack([0])
    _beat_while(c, 1, lambda: 1 in n0.positions(), timeout_s=20,
                what="node 1's position re-routed to node 0 while node 1 heartbeats", wait_until=wait_until)
    st = _finish(c, wait_until, {0: [1]})
    assert [n["node"] for n in st["nodes_lost"]] == [1]
    assert st["nodes_lost"][0]["reason"].startswith("stalled: heartbeats but no acknowledgement")
    assert st["rerouted_positions"] == [1] and st["lost_positions"] == [] and st["fin_sent_to"] == [0]


def test_a_silent_node_is_fenced_as_unreachable(cluster, wait_until):
    c = cluster(nodes=2, w=2, node_timeout_s=0.5)
    n0, n1 = c["fakes"]
    _send(c, 0)
    _send(c, 1)
    wait_until(n1.has(4), what="node 1 to get position 1")
    n0.ack([0])
    _beat_while(c, 0, lambda: 1 in n0.positions(), timeout_s=20, what="node 1's position re-routed to node 0",
                wait_until=wait_until)
    st = _finish(c, wait_until, {0: [1]})
    assert [n["node"] for n in st["nodes_lost"]] == [1]
    assert st["nodes_lost"][0]["reason"] == "unreachable: no message for 0.5 s with 1 frames unacknowledged"


def test_the_last_live_node_is_never_fenced_for_being_slow(cluster, wait_until):
    """One node, silent past its node timeout and its stall timeout while the scan goes on: it is
    kept (main reported 'every node lost'), and its late acknowledgements complete the scan."""
    c = cluster(nodes=1, w=2, node_timeout_s=0.3, node_stall_s=1.0)
    (n0,) = c["fakes"]
    _send(c, 0)
    wait_until(n0.has(4), what="node 0 to get position 0")
    wait_until(lambda: c["agg"].delivery.node[0].stall_noted, timeout_s=20, what="the aggregator to note the stall")
    _send(c, 1)
    wait_until(n0.has(8), what="node 0 to get position 1")
    st = _finish(c, wait_until, {0: [0, 1]})
    assert st["nodes_lost"] == [] and st["finish_reason"] == "complete" and st["lost_positions"] == []


def test_the_last_live_node_stuck_at_the_end_never_hangs_the_session(cluster, wait_until):
    """Every sector has ended and the one node heartbeats but never acknowledges: after the stall
    timeout its positions are given up as lost ('stalled'), and the aggregator finishes."""
    c = cluster(nodes=1, w=2, node_timeout_s=0.3, node_stall_s=1.0)
    (n0,) = c["fakes"]
    _send(c, 0)
    _send(c, 1)
    wait_until(n0.has(8), what="node 0 to get both positions")
    n0.ack([0])
    _end(c)
    _beat_while(c, 0, lambda: c["stats"], timeout_s=30, what="the aggregator to give position 1 up",
                wait_until=wait_until)
    st = c["stats"]
    assert st["nodes_lost"] == [] and st["lost_positions"] == [1] and st["lost_reasons"] == {"stalled": 1}


def test_a_lapsed_lease_does_not_fence_a_node_that_is_still_heard(cluster, wait_until):
    """Node 1's etcd key is gone (a lease lapsed under load, or a cut to etcd alone) but its
    heartbeats arrive: it is kept. Once it also falls silent, the missing key fences it."""
    registered = {0, 1}
    calls = []

    def node_check():
        calls.append(time.monotonic())
        return set(registered)

    c = cluster(nodes=2, w=2, node_timeout_s=30.0, node_check=node_check, lease_grace_s=0.5)
    n0, n1 = c["fakes"]
    _send(c, 0)
    _send(c, 1)
    wait_until(n1.has(4), what="node 1 to get position 1")
    n0.ack([0])
    registered.discard(1)
    gone_at = time.monotonic()
    _beat_while(c, 1, lambda: sum(t > gone_at + 2.0 for t in calls) >= 5, timeout_s=20,
                what="the key checked gone for 4 lease graces while node 1 heartbeats", wait_until=wait_until)
    assert c["agg"].alive == [True, True]
    wait_until(lambda: 1 in n0.positions(), timeout_s=20, what="node 1 fenced once silent, its position re-routed")
    st = _finish(c, wait_until, {0: [1]})
    assert [(n["node"], n["reason"]) for n in st["nodes_lost"]] == [(1, "service key gone")]
    assert st["lost_positions"] == []
