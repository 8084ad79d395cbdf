"""The ZeroMQ data plane on real loopback sockets: routing, assembly, counting, bad input, backpressure."""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import zmq

from detstream import wire
from detstream.config import CountingParams
from detstream.counting import count_frame
from detstream.profile import NCEM_4D_CAMERA, SMALL_TEST_CAMERA
from detstream.services.aggregator import Aggregator, route
from detstream.services.distributor import Distributor
from detstream.services.producer import BatchBuffers, Pacer, run_producer
from detstream.sources import Simulator


class Collected:
    """Stands in for a PartWriter: keeps (position, events) in memory."""

    def __init__(self):
        self.events: dict[int, np.ndarray] = {}

    def add(self, position, events):
        assert position not in self.events
        self.events[position] = np.array(events)  # a copy: the view would keep the message


class Pipeline:
    """Distributors + aggregator on threads in this process, every socket real; with ``acks``,
    acknowledged delivery (the sessions' default)."""

    def __init__(self, profile, w, h, nodes, counting=CountingParams(enabled=False), stall=10.0,
                 hwm=64, bind="tcp://127.0.0.1:*", acks=False, window=64, counting_mode="processes", shards=1,
                 max_partial=256):
        self.ctx = zmq.Context()
        self.parts = [Collected() for _ in range(nodes)]
        self.dists = [Distributor(profile, w, h, i, nodes, counting, workers=1, part_writer=self.parts[i],
                                  ctx=self.ctx, stall_timeout_s=stall, hwm=hwm, bind=bind, acks=acks,
                                  segment_seconds=0.05, counting_mode=counting_mode, shards=shards,
                                  max_partial_frames=max_partial)
                      for i in range(nodes)]
        share = np.array_split(np.arange(profile.sectors), shards)  # shard k: sectors share[k]
        self.aggs = [Aggregator(profile, w, h, [d.endpoint for d in self.dists], ctx=self.ctx, hwm=hwm, bind=bind,
                                ack_endpoints=[d.ack_endpoints[k] for d in self.dists] if acks else None,
                                window_frames=window, linger_s=1.0, sectors=share[k].tolist(), shard=k)
                     for k in range(shards)]
        self.agg = self.aggs[0]
        #: Per sector, its socket at the shard that routes it.
        self.sector_endpoints = [next(a.sector_endpoints[s] for a in self.aggs if a.sector_endpoints[s])
                                 for s in range(profile.sectors)]
        self.results = {}
        self.threads = [threading.Thread(target=lambda d=d: self.results.__setitem__(d.node_index, d.run()),
                                         daemon=True) for d in self.dists]
        self.threads += [threading.Thread(target=lambda k=k, a=a: self.results.__setitem__(
            "agg" if k == 0 else f"agg-{k}", a.run(stall_timeout_s=stall, fin_wait_s=1.0)), daemon=True)
            for k, a in enumerate(self.aggs)]
        for t in self.threads:
            t.start()

    def produce(self, source, batch=1, slow=None):
        """Stream every sector of ``source``, ``batch`` blocks per message (``slow``: sector -> a source)."""
        _produce(source, self.sector_endpoints, self.ctx, range(source.profile.sectors), batch, len(self.dists),
                 sources=slow)

    def join(self, timeout=60):
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "pipeline did not finish"
        return [self.results[i] for i in range(len(self.dists))]

    def events(self) -> dict[int, np.ndarray]:
        """Every node's counted events by position (each position on one node only)."""
        out = {}
        for part in self.parts:
            assert not set(out) & set(part.events)
            out.update(part.events)
        return out

    def close(self):
        for a in self.aggs:
            a.close()
        for d in self.dists:
            d.close()
        self.ctx.destroy(linger=0)


@pytest.fixture
def pipelines():
    """Make Pipelines (transport="ipc": in a private temp folder); all closed and removed at the end."""
    made, dirs = [], []

    def make(*args, transport="tcp", **kw):
        if transport == "ipc":
            dirs.append(tempfile.mkdtemp(prefix="ds-"))
            kw["bind"] = f"ipc://{dirs[-1]}"
        p = Pipeline(*args, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _produce(src, endpoint, ctx, sectors, batch=1, nodes=1, sources=None):
    """One producer thread per sector; ``endpoint`` is one for all, or a list (one per sector);
    ``sources`` may give some sectors a source of their own."""
    sources = sources or {}
    threads = [threading.Thread(target=run_producer, args=(sources.get(s, src), s,
                                                           endpoint if isinstance(endpoint, str) else endpoint[s]),
                                kwargs={"ctx": ctx, "batch_blocks": batch, "nodes": nodes})
               for s in sectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@pytest.mark.e2e  # a whole multi-process pipeline: not in make test-fast
def test_every_frame_reaches_its_node_and_is_counted(pipelines):
    sim = Simulator(NCEM_4D_CAMERA, 6, 5, seed=2, pool_size=8)
    dark = sim.dark_reference()
    import os
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "dark.npy")
    np.save(path, dark)
    p = pipelines(NCEM_4D_CAMERA, 6, 5, 3, counting=CountingParams(dark_reference=path))
    _produce(sim, p.agg.endpoint, p.ctx, range(4))
    results = p.join()
    for node, (res, part) in enumerate(zip(results, p.parts)):
        assert res.missing == [] and res.finish_reason == "complete"
        assert sorted(part.events) == [q for q in range(30) if route(q, 3) == node]
        for q, ev in part.events.items():
            np.testing.assert_array_equal(ev, count_frame(sim.frame(q), dark, None, 12.0, 2000.0))


class _Sock:
    """Sends hand-made messages to the aggregator."""

    def __init__(self, ctx, endpoint):
        self.s = ctx.socket(zmq.PUSH)
        self.s.setsockopt(zmq.LINGER, 5000)
        self.s.connect(endpoint)

    def send(self, *parts):
        self.s.send_multipart(list(parts))


def test_malformed_messages_are_counted_and_the_rest_survive(pipelines, caplog):
    prof = SMALL_TEST_CAMERA
    w, h = 4, 2
    p = pipelines(prof, w, h, 1)
    s = _Sock(p.ctx, p.agg.endpoint)
    good = np.zeros(prof.sector_shape, np.uint16).tobytes()
    def hdr(sector=0, x=0, y=0, sw=w, sh=h):
        return wire.data_header(sector, 1, 1, sw, sh, x, y, 0)
    s.send(hdr())                                             # wrong number of parts
    s.send(hdr()[:10], good)                                  # short header
    s.send(hdr(), good[:-2])                                  # payload size
    s.send(hdr(sector=9), good)                               # sector out of range
    s.send(hdr(x=7), good)                                    # frame outside the scan
    s.send(b"\x07" + hdr()[1:], good)                         # unknown header version
    for pos in range(w * h):                                  # every real frame, complete
        for sector in range(prof.sectors):
            s.send(hdr(sector=sector, x=pos % w, y=pos // w), good)
    s.send(hdr(sector=1, x=1, y=1), good)                     # duplicate sector
    for sector in range(prof.sectors):
        s.send(wire.end_header(sector, 1, w, h, w * h), b"")
    (res,) = p.join()
    rejected = dict(p.agg.stats.rejected)
    for k, v in res.rejected.items():
        rejected[k] = rejected.get(k, 0) + v
    assert rejected == {"wrong_part_count": 1, "short_header": 1, "payload_size": 1,
                        "sector_out_of_range": 1, "frame_outside_scan": 1, "unknown_version": 1,
                        "duplicate_sector": 1}
    assert res.frames_received == w * h and res.missing == []
    for reason in rejected:
        assert sum(reason in r.getMessage() for r in caplog.records) == 1, reason


def test_missing_and_partial_frames_are_listed(pipelines):
    prof = SMALL_TEST_CAMERA
    w, h = 3, 3
    p = pipelines(prof, w, h, 2)
    s = _Sock(p.ctx, p.agg.endpoint)
    block = np.zeros(prof.sector_shape, np.uint16).tobytes()
    for pos in range(w * h):
        if pos == 4:
            continue                                          # never sent: missing
        for sector in range(prof.sectors):
            if pos == 7 and sector == 2:
                continue                                      # one sector short: partial
            s.send(wire.data_header(sector, 1, pos + 1, w, h, pos % w, pos // w, pos), block)
    for sector in range(prof.sectors):
        s.send(wire.end_header(sector, 1, w, h, 0), b"")
    results = p.join()
    missing = sorted(m for r in results for m in r.missing)
    partial = sorted(m for r in results for m in r.partial)
    assert missing == [4, 7] and partial == [7]
    assert sum(r.frames_received for r in results) == 7


def test_a_stalled_stream_ends_with_what_arrived(pipelines):
    prof = SMALL_TEST_CAMERA
    p = pipelines(prof, 2, 1, 1, stall=0.5)
    s = _Sock(p.ctx, p.agg.endpoint)
    block = np.zeros(prof.sector_shape, np.uint16).tobytes()
    for sector in range(prof.sectors):                        # position 0 only, and no END markers
        s.send(wire.data_header(sector, 1, 1, 2, 1, 0, 0, 0), block)
    (res,) = p.join()
    assert res.finish_reason.startswith("stalled") and res.missing == [1]
    assert res.frames_received == 1


@pytest.mark.e2e  # a whole multi-process pipeline: not in make test-fast
def test_backpressure_blocks_the_producer_and_memory_stays_bounded(wait_until):
    """A node that does not read holds the producer back after a bounded number of blocks."""
    prof = SMALL_TEST_CAMERA
    ctx = zmq.Context()
    try:
        sink = ctx.socket(zmq.PULL)
        sink.setsockopt(zmq.RCVHWM, 4)
        port = sink.bind_to_random_port("tcp://127.0.0.1")
        sim = Simulator(prof, 64, 64, pool_size=2)
        sent, taken, held = [], [], threading.Event()

        class Taken:  # the producer's tee: sees every block the producer takes from the source
            def write(self, meta, block):
                taken.append(meta.frame_number)

        def should_stop() -> bool:
            # The producer asks this between blocks, and while a send is held back (in _send,
            # after waiting a whole SNDTIMEO slice): the latter is the event this test waits for.
            if sys._getframe(1).f_code.co_name == "_send":
                held.set()
            return False
        t = threading.Thread(target=lambda: sent.append(run_producer(
            sim, 0, f"tcp://127.0.0.1:{port}", hwm=4, ctx=ctx, tee=Taken(), should_stop=should_stop)),
            daemon=True)
        t.start()
        # The producer is held back well before the scan's 4096 blocks.
        wait_until(held.is_set, timeout_s=30, what="the producer to be held back")
        assert len(taken) < 64 * 64, "producer took the whole scan for a node that never reads"
        got = 0
        deadline = time.monotonic() + 30
        while got < 64 * 64 + 1 and time.monotonic() < deadline:  # now drain: everything arrives
            if sink.poll(100):
                sink.recv_multipart()
                got += 1
        assert got == 64 * 64 + 1                              # every block and the END marker
        assert t.is_alive()                                    # it waits for the reader to hang up...
        sink.close(0)
        t.join(10)
        assert not t.is_alive()                                # ...and then closes
    finally:
        ctx.destroy(linger=0)


def test_a_paced_producer_sends_no_faster_than_the_frame_rate():
    """With frame_rate_hz, block n leaves no earlier than n / rate after the producer starts, as a
    camera acquires (unpaced, the 48 blocks below arrive within milliseconds)."""
    rate, frames = 200.0, 48
    ctx = zmq.Context()
    try:
        sink = ctx.socket(zmq.PULL)
        port = sink.bind_to_random_port("tcp://127.0.0.1")
        sim = Simulator(SMALL_TEST_CAMERA, frames, 1, pool_size=2)
        started = time.monotonic()
        t = threading.Thread(target=run_producer, args=(sim, 0, f"tcp://127.0.0.1:{port}"),
                             kwargs={"ctx": ctx, "frame_rate_hz": rate}, daemon=True)
        t.start()
        arrivals = []
        deadline = time.monotonic() + 30
        while len(arrivals) < frames + 1 and time.monotonic() < deadline:  # the blocks and END
            if sink.poll(100):
                sink.recv_multipart()
                arrivals.append(time.monotonic() - started)
        assert len(arrivals) == frames + 1
        early = [n for n in range(frames) if arrivals[n] < n / rate]
        assert early == [], f"blocks {early} arrived before their time at {rate:g} frames/s"
        sink.close(0)  # the producer closes once its reader hangs up
        t.join(10)
        assert not t.is_alive()
    finally:
        ctx.destroy(linger=0)


def test_a_paced_producer_does_not_hold_frames_back_for_a_whole_batch():
    """Batching waits for nothing when pacing: a block of a slow camera leaves when the next is
    due, not once 63 more have joined its batch (at 20 frames/s, 3.2 s later)."""
    frames = 8
    ctx = zmq.Context()
    try:
        sink = ctx.socket(zmq.PULL)
        port = sink.bind_to_random_port("tcp://127.0.0.1")
        sim = Simulator(SMALL_TEST_CAMERA, frames, 1, pool_size=2)
        t = threading.Thread(target=run_producer, args=(sim, 0, f"tcp://127.0.0.1:{port}"),
                             kwargs={"ctx": ctx, "frame_rate_hz": 20.0, "batch_blocks": 64}, daemon=True)
        t.start()
        sizes = []
        deadline = time.monotonic() + 30
        while sum(sizes) < frames and time.monotonic() < deadline:
            if sink.poll(100):
                sizes.append(len(wire.parse_headers(sink.recv_multipart()[0])))
        assert sizes == [1] * frames  # unpaced: one message of all 8
        sink.close(0)
        t.join(10)
        assert not t.is_alive()
    finally:
        ctx.destroy(linger=0)


def test_batch_buffers_are_a_fixed_pool_however_long_the_scan():
    """Joining waits for a buffer ZeroMQ has finished with instead of making another, so a
    producer's memory does not grow with the scan when sends outrun ZeroMQ's releases."""
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 100)
        with socket.socket() as s:  # a port nobody listens on: the messages wait in the queue
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        push.connect(f"tcp://127.0.0.1:{port}")
        pool = BatchBuffers(count=4, wait_slice_s=0.05)
        blocks = [np.full(1 << 16, k, np.uint8) for k in range(4)]
        used = set()
        for _ in range(4):
            joined = pool.join(blocks)
            used.add(joined.obj.ctypes.data)
            pool.sent(push.send(joined, copy=False, track=True))
        assert len(used) == 4
        asked = []
        assert pool.join(blocks, should_stop=lambda: asked.append(1) or len(asked) >= 3) is None
        assert len(asked) == 3  # it waited, asking whether to stop, rather than make a fifth buffer
        with pytest.raises(TimeoutError, match="sent nothing for 0.1 s"):
            pool.join(blocks, timeout_s=0.1)
    finally:
        ctx.destroy(linger=0)


def test_a_paced_producer_still_stops_when_told():
    """A stop requested while the pacer waits ends the wait at once (not after the long gap)."""
    pacer = Pacer(rate_hz=0.01, slice_s=0.05)
    assert pacer.wait(0)
    started = time.monotonic()
    assert pacer.wait(1, should_stop=lambda: True) is False
    assert time.monotonic() - started < 5.0  # the frame was due in 100 s
    fast, asked = Pacer(rate_hz=100.0, slice_s=0.5), []
    assert fast.wait(0) and fast.wait(1, should_stop=lambda: asked.append(1) or False)
    assert asked == []  # a wait shorter than a slice asks nothing (the stop check is an etcd read)


# --------------------------------------------------------------------------- batches (wire v2) and ipc
@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    sim = Simulator(NCEM_4D_CAMERA, 7, 5, seed=11, pool_size=6)
    path = tmp_path_factory.mktemp("dark") / "dark.npy"
    np.save(path, sim.dark_reference())
    return sim, CountingParams(dark_reference=path)


def _stream(pipelines, scan, batch, transport, nodes=2, counting_mode="processes", shards=1, slow=None):
    sim, counting = scan
    p = pipelines(sim.profile, sim.scan_width, sim.scan_height, nodes, counting, transport=transport,
                  acks=True, stall=20.0, counting_mode=counting_mode, shards=shards, window=16)
    if transport == "ipc":
        assert p.agg.endpoint.startswith("ipc://") and p.dists[0].endpoint.startswith("ipc://")
    p.produce(sim, batch, slow=slow)
    res = p.join()
    for name in ["agg", *(f"agg-{k}" for k in range(1, shards))]:
        agg = p.results[name]
        assert agg.lost == [] and agg.finish_reason == "complete" and agg.rejected == {}, name
    assert all(r.partial == [] and r.fin for r in res)
    assert sum(r.frames_counted for r in res) == sim.frames
    return p.events(), res


@pytest.mark.e2e  # four data planes with counting processes or threads: too slow for test-fast
def test_batched_and_ipc_give_the_events_of_the_unbatched_tcp_path(pipelines, scan):
    """Batched (tcp, counted in threads), batched ipc (worker processes) and 2 aggregator shards:
    the events, position by position, of one block per message through one aggregator over tcp."""
    sim, _ = scan
    reference, _ = _stream(pipelines, scan, 1, "tcp")
    assert sorted(reference) == list(range(sim.frames))
    dark = sim.dark_reference()
    np.testing.assert_array_equal(reference[3], count_frame(sim.frame(3), dark, None, 12.0, 2000.0))
    for batch, transport, mode, shards in [(8, "tcp", "threads", 1), (5, "ipc", "processes", 1), (4, "ipc", "threads", 2)]:
        got, res = _stream(pipelines, scan, batch, transport, counting_mode=mode, shards=shards)
        assert sorted(got) == sorted(reference)
        for pos in reference:
            np.testing.assert_array_equal(got[pos], reference[pos], err_msg=f"{batch} {transport} {mode} {shards}: {pos}")
        assert res[0].rejected == {}


def test_a_bad_block_inside_a_batch_is_rejected_alone(pipelines):
    prof = SMALL_TEST_CAMERA
    w, h = 4, 2
    p = pipelines(prof, w, h, 1, acks=True)
    senders = []
    for ep in p.agg.sector_endpoints:
        s = p.ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect(ep)
        senders.append(s)
    good = np.zeros(prof.sector_shape, np.uint16).tobytes()
    def hdr(s, pos, x=None, sector=None):
        return wire.data_header(s if sector is None else sector, 1, pos + 1, w, h,
                                pos % w if x is None else x, pos // w, pos)
    # Sector 0's batch: position 2's block names sector 9, the 4th block lies outside the scan.
    senders[0].send_multipart(wire.batch_message([hdr(0, 0), hdr(0, 1), hdr(0, 2, sector=9), hdr(0, 3, x=9)],
                                                 [good] * 4))
    senders[0].send_multipart(wire.batch_message([hdr(0, p) for p in range(4, 8)], [good] * 4))
    # A batch whose payload bytes do not pair with its headers cannot be read: rejected whole.
    senders[0].send_multipart([hdr(0, 5) + hdr(0, 6), good])
    for sector in range(1, prof.sectors):
        senders[sector].send_multipart(wire.batch_message([hdr(sector, p) for p in range(8)], [good] * 8))
    for sector, s in enumerate(senders):
        s.send_multipart([wire.end_header(sector, 1, w, h, 8), b""])
    (res,) = p.join()
    for s in senders:
        s.close(0)
    agg = p.results["agg"]
    assert agg.rejected == {"sector_out_of_range": 1, "frame_outside_scan": 1, "payload_size": 1}
    assert res.frames_received == 6 and res.rejected == {}    # every position but 2 and 3
    assert sorted(agg.lost) == [2, 3] and agg.lost_reasons == {"incomplete": 2}


class Slowed:
    """A source whose blocks come ``delay_s`` apart: a producer that lags the others."""

    def __init__(self, source, delay_s):
        self.source, self.delay_s = source, delay_s

    def __getattr__(self, name):
        return getattr(self.source, name)

    def iter_sector(self, sector):
        for item in self.source.iter_sector(sector):
            time.sleep(self.delay_s)
            yield item


@pytest.mark.e2e  # a whole multi-process pipeline: not in make test-fast
def test_sharded_aggregators_keep_the_sectors_in_step_behind_a_slow_producer(pipelines):
    """Two shards (sectors 0-1, 2-3); sector 3's producer is slowed to a crawl. The fast shard's
    window (16 positions) holds it back: the nodes never hold more partial frames than the
    windows allow, none is evicted, every frame arrives whole."""
    prof = SMALL_TEST_CAMERA
    sim = Simulator(prof, 24, 16, seed=4, pool_size=4)
    window = 16
    p = pipelines(prof, 24, 16, 2, acks=True, shards=2, window=window, hwm=4, max_partial=48, stall=30.0)
    t0 = time.monotonic()
    p.produce(sim, batch=4, slow={3: Slowed(sim, 0.002)})
    res = p.join()
    assert time.monotonic() - t0 > 384 * 0.002               # the slow sector did set the pace
    assert sum(r.frames_received for r in res) == 384
    assert all(r.partial == [] and r.missing == [] and r.fin for r in res)
    # Bounded skew: at most the fast shard's window (twice it, for its own lagging sectors) plus a batch.
    assert max(r.partial_peak for r in res) <= 2 * window + 4
    for name in ("agg", "agg-1"):
        assert p.results[name].lost == [] and p.results[name].window_peak <= 2 * window + 4
