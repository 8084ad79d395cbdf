"""Acknowledged delivery: the window, re-routing a lost node's frames, FIN, durable segments,
and whole service processes surviving kill -9 and SIGSTOP with every position counted once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import zmq

from detstream import wire
from detstream.config import CountingParams, SessionSpec
from detstream.output import PartWriter, merge_parts, read_part
from detstream.processes import ManagedProcess, detstream_argv
from detstream.profile import SMALL_TEST_CAMERA
from detstream.services.aggregator import Aggregator
from detstream.services.segments import SegmentedPart, part_files
from detstream.sources import Simulator
from detstream.wire import Control, Kind, MalformedMessage

from account_check import check_counted
from conftest import detstream_children

PROFILE = SMALL_TEST_CAMERA
BLOCK = np.zeros(PROFILE.sector_shape, np.uint16).tobytes()


# --------------------------------------------------------------------------- wire and files
def test_control_messages_round_trip_and_bad_ones_are_named():
    head, payload = wire.control_message(Control.ACK, 3, 10, 9, np.array([5, 7], np.uint32))
    msg = wire.parse_control([head, payload])
    assert (msg.kind, msg.node, msg.received, msg.counted, msg.positions.tolist()) == (Control.ACK, 3, 10, 9, [5, 7])
    hb = wire.parse_control(wire.control_message(Control.HEARTBEAT, 1, 2, 2))
    assert hb.kind is Control.HEARTBEAT and hb.positions.size == 0
    with pytest.raises(MalformedMessage, match="unknown_version"):
        wire.parse_control([b"\x07" + head[1:], payload])
    with pytest.raises(MalformedMessage, match="unknown_kind"):
        wire.parse_control([head[:1] + b"\x09" + head[2:], payload])
    with pytest.raises(MalformedMessage, match="payload_size"):
        wire.parse_control([head, payload[:-1]])
    fin = wire.Header.unpack(wire.fin_header(1, 4, 2, 8))
    assert fin.kind is Kind.FIN and fin.count == 8 and fin.version == wire.WIRE_VERSION


def test_segments_are_durable_one_by_one_and_the_index_reads_as_one_part(tmp_path):
    events = {p: np.array([p, p + 1], np.uint32) for p in range(10)}
    seg = SegmentedPart(tmp_path / "parts", "node-0", (4, 4))
    for p in range(4):
        seg.add(p, events[p])
    first = seg.commit()
    assert read_part(first).positions.tolist() == [0, 1, 2, 3]  # readable as soon as committed
    for p in range(4, 7):
        seg.add(p, events[p])
    assert part_files(tmp_path / "parts") == [first]  # the open segment is not a part yet
    index = seg.write_index(extra={"node_index": 0})
    assert part_files(tmp_path / "parts") == [index]
    part = read_part(index)
    assert part.positions.tolist() == list(range(7)) and part.extra["segments"] == 2
    assert dict(part.iter_events()).keys() == set(range(7))
    for p, ev in part.iter_events():
        np.testing.assert_array_equal(ev, events[p])
    assert part.summed_pattern().sum() == 14


def test_merge_keeps_the_first_copy_of_a_rerouted_position(tmp_path):
    def part(name, positions):
        with PartWriter(tmp_path / name, (4, 4)) as w:
            for p in positions:
                w.add(p, np.array([p % 16], np.uint32))
        return tmp_path / name

    parts = [part("a.h5", range(0, 7)), part("b.h5", range(5, 12))]
    with pytest.raises(ValueError, match="two parts"):
        merge_parts(parts, tmp_path / "m.h5", 4, 3, (4, 4))
    report = merge_parts(parts, tmp_path / "m.h5", 4, 3, (4, 4), on_duplicate="first", block_positions=3)
    assert report.duplicates == 2 and report.missing == [] and report.total_events == 12
    with h5py.File(tmp_path / "m.h5") as f:
        rows = f["electron_events/frames"][()]
    assert [r.tolist() for r in rows] == [[p] for p in range(12)]


# --------------------------------------------------------------------------- one aggregator, fake nodes
class FakeNode:
    """A node's two sockets, driven by the test: data in, ACKs out."""

    def __init__(self, ctx, index):
        self.index = index
        self.data = ctx.socket(zmq.PULL)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.bind("tcp://127.0.0.1:*")
        self.acks = ctx.socket(zmq.PUSH)
        self.acks.setsockopt(zmq.LINGER, 0)
        self.acks.bind("tcp://127.0.0.1:*")
        self.got: list[wire.Header] = []

    def endpoints(self):
        return (self.data.getsockopt_string(zmq.LAST_ENDPOINT), self.acks.getsockopt_string(zmq.LAST_ENDPOINT))

    def read(self, timeout_ms=100) -> list[wire.Header]:
        out = []
        while self.data.poll(timeout_ms):
            out.append(wire.Header.unpack(self.data.recv_multipart()[0]))
            timeout_ms = 20
        self.got += out
        return out

    def has(self, n: int, kind: Kind = Kind.DATA):
        """A wait_until predicate: at least ``n`` messages of ``kind`` have arrived."""
        return lambda: (self.read(), sum(h.kind is kind for h in self.got) >= n)[1]

    def ack(self, positions):
        self.acks.send_multipart(wire.control_message(Control.ACK, self.index, 0, 0, np.asarray(positions, np.uint32)))

    def die(self):
        self.data.close(0)
        self.acks.close(0)


@pytest.fixture
def fake_cluster():
    """An Aggregator (acks on) on a thread, with FakeNodes and one PUSH per sector into it."""
    ctx = zmq.Context()
    stop = threading.Event()
    made = {}

    def make(nodes=2, w=4, h=2, window=8, node_timeout_s=30.0, node_check=None):
        fakes = [FakeNode(ctx, i) for i in range(nodes)]
        agg = Aggregator(PROFILE, w, h, [f.endpoints()[0] for f in fakes], ctx=ctx,
                         ack_endpoints=[f.endpoints()[1] for f in fakes], window_frames=window,
                         node_timeout_s=node_timeout_s, linger_s=1.0)
        senders = []
        for ep in agg.sector_endpoints:
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            senders.append(s)
        stats = {}
        t = threading.Thread(target=lambda: stats.update(agg.run(
            should_stop=stop.is_set, fin_wait_s=0.2, node_check=node_check, node_check_s=0.1).as_dict()), daemon=True)
        made.update(agg=agg, fakes=fakes, senders=senders, thread=t, stats=stats, w=w, h=h)
        t.start()
        return made

    yield make
    stop.set()
    if made:
        made["thread"].join(10)
        made["agg"].close()
        for f in made["fakes"]:
            if not f.data.closed:
                f.die()
        for s in made["senders"]:
            s.close(0)
    ctx.destroy(linger=0)


def _send(c, pos, sectors):
    w, h = c["w"], c["h"]
    for s in sectors:
        c["senders"][s].send_multipart([wire.data_header(s, 1, pos + 1, w, h, pos % w, pos // w, pos), BLOCK])


def _end(c):
    for s in range(PROFILE.sectors):
        c["senders"][s].send_multipart([wire.end_header(s, 1, c["w"], c["h"], 0), b""])


def test_a_full_window_holds_back_the_producers_until_acks_free_it(fake_cluster, wait_until):
    """The producers are held back (their sends would block) while the window is full, and the
    node has then been sent exactly the window: a condition on events, not a quiet interval."""
    w = 256  # about 3x the blocks per sector that the sockets and kernel buffers between hold
    c = fake_cluster(nodes=1, w=w, h=1, window=4)
    node = c["fakes"][0]
    ctx = zmq.Context.instance()
    senders = []
    for ep in c["agg"].sector_endpoints:  # producers' sockets with the smallest queues
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1)
        sock.setsockopt(zmq.SNDBUF, 4096)
        sock.connect(ep)
        senders.append(sock)
    pending = [(pos, sector) for pos in range(w) for sector in range(4)]
    pending.reverse()

    def held_back() -> bool:
        """Send, in scan order, until a send would block (True) or everything is sent (False)."""
        while pending:
            pos, sector = pending[-1]
            try:
                senders[sector].send_multipart([wire.data_header(sector, 1, pos + 1, w, 1, pos, 0, pos), BLOCK],
                                               zmq.NOBLOCK)
            except zmq.Again:
                return True
            pending.pop()
        return False

    try:
        # Sends block now and then while connections start; once the node has 4 positions, the
        # window is full until an ack, and the producers are held back for good.
        wait_until(lambda: all([held_back(), node.has(16)()]), timeout_s=30,
                   what="4 whole positions forwarded and the producers held back")
        # Held back with the window full: the node has exactly the window's 4 positions.
        assert len(node.got) == 16 and sorted({h.position for h in node.got}) == list(range(4))
        node.ack([0, 1])
        wait_until(lambda: all([held_back(), node.has(24)()]), what="2 more positions once 2 are acknowledged")
        assert len(node.got) == 24 and sorted({h.position for h in node.got}) == list(range(6))
        acked = 6
        node.ack(range(2, 6))

        def whole() -> int:  # positions the node has every sector of, from the first
            held = np.bincount([h.position for h in node.got if h.kind is Kind.DATA], minlength=w)
            return int(np.argmin(held == 4)) if (held < 4).any() else w

        def the_rest_flows() -> bool:
            """Acknowledge whole positions as they come, while anything comes."""
            nonlocal acked
            while node.read(50):
                done = whole()
                if done > acked:
                    node.ack(range(acked, done))
                    acked = done
                held_back()
            return not held_back() and acked == w
        wait_until(the_rest_flows, timeout_s=120, what="the whole scan through the window")
        for sector in range(4):
            senders[sector].send_multipart([wire.end_header(sector, 1, w, 1, 0), b""])
        wait_until(node.has(1, Kind.FIN), what="FIN once everything is acknowledged")
        wait_until(lambda: c["stats"], what="the aggregator to finish")
        assert sum(h.kind is Kind.DATA for h in node.got) == 4 * w and sum(h.kind is Kind.END for h in node.got) == 4
        assert c["stats"]["lost_positions"] == [] and c["stats"]["fin_sent_to"] == [0]
        assert c["stats"]["window_peak"] == 4
    finally:
        for sock in senders:
            sock.close(0)


def test_a_lost_node_s_positions_go_to_the_next_node_partial_ones_included(fake_cluster, wait_until):
    c = fake_cluster(nodes=2, w=4, h=2, window=64)
    n0, n1 = c["fakes"]
    _send(c, 1, range(4))           # node 1's, whole, never acknowledged
    _send(c, 3, [0, 2])             # node 1's, two sectors so far
    _send(c, 0, range(4))           # node 0's
    wait_until(n1.has(6), what="node 1 to get its 6 blocks")
    n1.die()                        # its connection drops
    wait_until(n0.has(4 + 6), what="node 1's blocks at node 0")
    _send(c, 3, [1, 3])             # the rest of position 3, and a later position of node 1
    _send(c, 5, range(4))
    wait_until(n0.has(16), what="the new blocks at node 0")
    got = sorted((h.position, h.sector) for h in n0.got)
    assert got == sorted((p, s) for p in (0, 1, 3, 5) for s in range(4))  # each block once
    n0.ack([0, 1, 3, 5])
    for pos in (2, 4, 6, 7):
        _send(c, pos, range(4))
    _end(c)
    wait_until(n0.has(4, Kind.END), what="END markers at node 0")
    n0.ack([2, 4, 6, 7])
    wait_until(lambda: c["stats"], what="the aggregator to finish")
    st = c["stats"]
    assert [(n["node"], n["reason"]) for n in st["nodes_lost"]] == [(1, "disconnected")]
    assert st["rerouted_positions"] == [1, 3] and st["lost_positions"] == []
    assert st["positions_acked_per_node"] == [8, 0] and st["fin_sent_to"] == [0]


@pytest.mark.parametrize("how", ["key", "silence"])
def test_a_node_is_lost_when_its_key_goes_or_it_makes_no_progress(fake_cluster, wait_until, how):
    """Two more ways to learn of a lost node: its leased etcd key vanishes (node_check), or it
    holds whole positions without acknowledging anything for node_timeout_s."""
    registered = {0, 1}
    c = fake_cluster(nodes=2, w=2, h=1, window=64, node_timeout_s=1.0 if how == "silence" else 30.0,
                     node_check=lambda: set(registered))
    n0, n1 = c["fakes"]
    _send(c, 0, range(4))
    _send(c, 1, range(4))
    wait_until(n1.has(4), what="node 1 to get position 1")
    n0.ack([0])
    if how == "key":
        registered.discard(1)
    wait_until(n0.has(8), what="position 1 re-routed to node 0")
    n0.ack([1])
    _end(c)
    wait_until(lambda: c["stats"], what="the aggregator to finish")
    lost = c["stats"]["nodes_lost"]
    assert [n["node"] for n in lost] == [1] and c["stats"]["lost_positions"] == []
    assert lost[0]["reason"] == ("service key gone" if how == "key" else
                                 "unreachable: no message for 1 s with 1 frames unacknowledged")


def test_with_every_node_lost_the_unacknowledged_positions_are_listed(fake_cluster, wait_until):
    c = fake_cluster(nodes=1, w=4, h=1, window=64)
    (n0,) = c["fakes"]
    for pos in range(3):
        _send(c, pos, range(4))
    wait_until(n0.has(12), what="12 blocks at node 0")
    n0.die()
    wait_until(lambda: c["stats"], what="the aggregator to give up")
    st = c["stats"]
    assert st["finish_reason"] == "every node lost"
    assert st["lost_positions"] == [0, 1, 2, 3] and st["lost_reasons"] == {"no_node": 3, "never_received": 1}


# --------------------------------------------------------------------------- whole services
class Services:
    """One session's services as real processes (``detstream distributor|aggregator|producer``)
    against the test etcd; a private temp dir (TMPDIR of the services too) removed at the end."""

    def __init__(self, coord, etcd_endpoint: str, root: Path, nodes: int, width: int, height: int, **fields):
        self.coord = coord
        self.etcd = etcd_endpoint
        self.root = root
        root.mkdir(parents=True)
        self.sim = Simulator(PROFILE, width, height, seed=5)  # what source_for_spec makes of the spec
        dark = root / "dark.npy"
        np.save(dark, self.sim.dark_reference())
        self.dark = self.sim.dark_reference()
        self.spec = SessionSpec(session_id="dl" + uuid.uuid4().hex[:8], detector_profile=PROFILE,
                                scan_width=width, scan_height=height, nodes=nodes, output_dir=root / "runs",
                                counting=CountingParams(dark_reference=dark), etcd_prefix=coord.prefix, seed=5,
                                stall_timeout_s=30.0, register_timeout_s=60.0, **fields)
        self.sid = self.spec.session_id
        self.env = {**os.environ, "TMPDIR": str(root / "tmp")}
        (root / "tmp").mkdir()
        self.procs: dict[str, ManagedProcess] = {}
        self.tracked: list[psutil.Process] = []  # every process of the session, once started
        self.node_wiped = False  # a whole node killed takes its /tmp leftovers with it (the fixture's rmtree)
        coord.put_spec(self.sid, self.spec)
        coord.set_state(self.sid, "streaming")

    def _start(self, role: str, name: str, *args: str) -> ManagedProcess:
        argv = detstream_argv(role, "--session", self.sid, "--etcd", self.etcd, "--prefix", self.coord.prefix, *args)
        proc = ManagedProcess(argv, self.root / "logs" / f"{role}-{name}.log", env=self.env, name=f"{role}-{name}")
        self.procs[f"{role}-{name}"] = proc.start()
        return proc

    def start(self) -> "Services":
        for i in range(self.spec.nodes):
            self._start("distributor", f"node-{i}", "--node-index", str(i))
        self.coord.wait_for_services(self.sid, "distributor", self.spec.nodes, 60)
        for k in range(self.spec.aggregators):
            self._start("aggregator", str(k), "--shard", str(k))
        self.coord.wait_for_services(self.sid, "aggregator", self.spec.aggregators, 60)
        for s in range(PROFILE.sectors):
            self._start("producer", str(s), "--sector", str(s))
        # Counting workers included, to check all are gone at the end (a killed distributor's
        # workers are no longer anyone's children here).
        self.tracked = [q for p in self.procs.values() for q in _tree(p)]
        return self

    def received(self, node: int) -> int:
        return self.coord.received(self.sid, self.spec.scan_number).get(f"node-{node}", 0)

    def share(self, node: int) -> int:
        return len(range(node, self.spec.frames_expected, self.spec.nodes))

    def wait_exit(self, names, wait_until, timeout_s=90.0) -> None:
        wait_until(lambda: all(self.procs[n].poll() is not None for n in names), timeout_s=timeout_s,
                   interval_s=0.1, what=f"{', '.join(names)} to exit (logs in {self.root / 'logs'})")

    def report(self, role: str, name: str) -> dict:
        return json.loads((self.spec.session_dir / "services" / f"{role}-{name}.json").read_text())

    def merged_rows(self) -> tuple:
        """Merge every committed part (dead nodes' segments too), first copy kept; the rows."""
        out = self.root / "counted.h5"
        report = merge_parts(part_files(self.spec.session_dir / "parts"), out, self.spec.scan_width,
                             self.spec.scan_height, PROFILE.frame_shape, on_duplicate="first",
                             bright_field=False)
        with h5py.File(out) as f:
            rows = f["electron_events/frames"][()]
        return report, rows

    def check_counted_once(self) -> object:
        """Every position in the merged output, with the events the counting rule gives."""
        report, rows = self.merged_rows()
        assert report.missing == [], f"positions missing from the merge: {report.missing[:20]}"
        check_counted(self.root / "counted.h5", self.spec)  # tests/account_check.py: an independent recount
        return report

    def stop(self) -> None:
        for p in self.procs.values():
            p.signal_group(signal.SIGCONT)  # a stopped group cannot act on SIGTERM
            p.stop(grace_s=5.0)


def _shm() -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


@pytest.fixture
def services(etcd_server, coordinator, wait_until):
    """Start a session's services; at the end every process, lease, shm segment and temp dir is gone."""
    made: list[Services] = []
    root = Path(tempfile.mkdtemp(prefix="detstream-delivery-"))
    shm_before = _shm()

    def make(nodes=2, width=48, height=48, **fields) -> Services:
        s = Services(coordinator, etcd_server.endpoint, root / f"s{len(made)}", nodes, width, height, **fields)
        made.append(s)
        return s

    try:
        yield make
        for s in made:  # what the test itself must leave clean (kill -9 included)
            wait_until(lambda s=s: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in s.tracked),
                       timeout_s=30, what="every service process (and counting worker) to exit")
            assert not detstream_children(), "service processes left running"
            for role in ("producer", "aggregator", "distributor"):  # a killed node's lease expires
                wait_until(lambda s=s, role=role: coordinator.services(s.sid, role) == {}, timeout_s=20,
                           what=f"every {role} lease to go")
            if not s.node_wiped:
                assert list((s.root / "tmp").iterdir()) == [], "temp dirs left by the services"
        wait_until(lambda: not (_shm() - shm_before), timeout_s=10, what="no shared memory left")
    finally:
        for s in made:
            s.stop()
            coordinator.cleanup_session(s.sid)
        shutil.rmtree(root, ignore_errors=True)


def _tree(proc: ManagedProcess) -> list[psutil.Process]:
    try:
        parent = psutil.Process(proc.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.e2e
def test_every_position_once_with_acks_and_fin(services, wait_until):
    s = services(nodes=2, width=32, height=32).start()
    s.wait_exit(list(s.procs), wait_until)
    assert all(p.poll() == 0 for p in s.procs.values()), {n: p.log_tail(5) for n, p in s.procs.items()}
    agg = s.report("aggregator", "0")
    assert agg["finish_reason"] == "complete" and agg["lost_positions"] == [] and agg["nodes_lost"] == []
    assert agg["positions_acked_per_node"] == [512, 512] and agg["fin_sent_to"] == [0, 1]
    for i in range(2):
        node = s.report("distributor", f"node-{i}")
        assert node["fin"] and node["finish_reason"] == "complete" and node["frames_acked"] == 512
        assert node["part_path"] == str(s.spec.session_dir / "parts" / f"node-{i}.h5") and node["segments"]
    assert s.check_counted_once().duplicates == 0


@pytest.mark.chaos
@pytest.mark.parametrize("nodes, aggregators", [(2, 1), (4, 1), (2, 2)])
def test_a_node_killed_mid_scan_loses_nothing(services, wait_until, nodes, aggregators):
    """kill -9 of one node once it has assembled 200 frames and committed a segment: what it
    acknowledged is read from its segments, its unacknowledged frames and its later positions
    go to the others; every position is in the merge exactly once. With two aggregator shards,
    each re-routes its own sectors of the lost node's positions, to the same node."""
    s = services(nodes=nodes, width=128, height=96, aggregators=aggregators).start()  # the kill lands mid-scan
    victim = s.procs["distributor-node-1"]
    segments = s.spec.session_dir / "parts" / "node-1"
    wait_until(lambda: s.received(1) >= 200 and any(segments.glob("seg-*.h5")), timeout_s=60,
               what="node 1 to assemble 200 frames and commit a segment")
    if nodes == 2:
        os.kill(victim.pid, signal.SIGKILL)         # the distributor alone: its workers must notice
    else:
        victim.signal_group(signal.SIGKILL)         # the whole node
        s.node_wiped = True
    s.wait_exit([n for n in s.procs if n != "distributor-node-1"], wait_until)
    for k in range(aggregators):
        agg = s.report("aggregator", str(k))
        assert agg["finish_reason"] == "complete" and agg["lost_positions"] == []
        assert [n["node"] for n in agg["nodes_lost"]] == [1] and agg["rerouted_positions"]
        assert agg["fin_sent_to"] == [n for n in range(nodes) if n != 1]
        assert sum(agg["positions_acked_per_node"]) == s.spec.frames_expected
        assert agg["positions_acked_per_node"][1] > 0  # merged from the dead node's segments
    assert not (s.spec.session_dir / "services" / "distributor-node-1.json").exists()
    s.check_counted_once()


@pytest.mark.chaos
def test_a_stopped_node_is_fenced_and_its_late_copies_are_dropped(services, wait_until):
    """SIGSTOP of a node mid-scan: the aggregator hears nothing from it, re-routes, finishes without
    it; once continued, the node finds the aggregator gone, commits what it counted and exits."""
    # A scan long enough that node 1 is stopped well before its share has all been sent to it
    # (batches and ipc move a small scan whole within the half second progress takes to show).
    s = services(nodes=2, width=128, height=96, node_timeout_s=2.0).start()
    victim = s.procs["distributor-node-1"]
    wait_until(lambda: s.received(1) >= 200, timeout_s=60, what="node 1 to assemble 200 frames")
    victim.signal_group(signal.SIGSTOP)
    s.wait_exit(["aggregator-0", "distributor-node-0"] + [f"producer-{k}" for k in range(4)], wait_until)
    assert victim.alive
    victim.signal_group(signal.SIGCONT)
    s.wait_exit(["distributor-node-1"], wait_until)
    agg = s.report("aggregator", "0")
    assert agg["finish_reason"] == "complete" and agg["lost_positions"] == []
    assert [n["node"] for n in agg["nodes_lost"]] == [1] and agg["fin_sent_to"] == [0]
    assert agg["nodes_lost"][0]["reason"].startswith(("unreachable", "service key gone"))
    late = s.report("distributor", "node-1")
    assert late["finish_reason"] == "aggregator hung up before FIN" and not late["fin"]
    report = s.check_counted_once()
    # What node 1 had counted but not acknowledged when it stopped was counted again at node 0.
    assert report.duplicates == late["frames_counted"] - agg["positions_acked_per_node"][1]


@pytest.mark.chaos
def test_a_counting_worker_paused_at_the_end_of_the_scan_still_counts_everything(services, wait_until):
    """A slow consumer at the end: node 0's counting worker stopped until the producers are done.
    Queues and window are made deep enough to take the rest of the scan, so the producers finish
    and the aggregator has every END while node 0 still holds frames it cannot count; the
    aggregator waits for them (no tail dropped at exit), nothing is lost or re-routed."""
    # A scan long enough that node 0 is a quarter through well before its end, with queues and a
    # window that take all of it (batches move a small scan whole in about a second).
    s = services(nodes=2, width=128, height=128, node_timeout_s=60.0, send_hwm=65536, window_frames=16384,
                 counting_mode="processes")
    s.start()
    share = s.share(0)

    def workers():
        found = []
        for p in _tree(s.procs["distributor-node-0"])[1:]:
            try:
                if "spawn_main" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:  # a helper process that came and went while we looked
                pass
        return found
    worker = wait_until(lambda: workers() or None, timeout_s=30, what="node 0's counting worker to be listed")
    wait_until(lambda: s.received(0) >= share // 4, timeout_s=60, what="node 0 a quarter through")
    assert len(worker) == 1
    worker[0].send_signal(signal.SIGSTOP)
    try:
        s.wait_exit([f"producer-{k}" for k in range(4)], wait_until)
        assert s.procs["aggregator-0"].alive and s.procs["distributor-node-0"].alive
    finally:
        worker[0].send_signal(signal.SIGCONT)
    s.wait_exit(list(s.procs), wait_until)
    agg = s.report("aggregator", "0")
    assert agg["nodes_lost"] == [] and agg["rerouted_positions"] == [] and agg["lost_positions"] == []
    assert s.check_counted_once().duplicates == 0
