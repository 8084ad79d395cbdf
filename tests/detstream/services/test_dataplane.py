"""The ZeroMQ data plane on real loopback sockets: routing, assembly, counting, bad input, backpressure."""

from __future__ import annotations

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
from detstream.services.producer import run_producer
from detstream.sources import Simulator


class Collected:
    """Stands in for a PartWriter: keeps (position, events) in memory."""

    def __init__(self):
        self.events: dict[int, np.ndarray] = {}

    def add(self, position, events):
        assert position not in self.events
        self.events[position] = events


class Pipeline:
    """Distributors + aggregator on threads in this process, every socket real."""

    def __init__(self, profile, w, h, nodes, counting=CountingParams(enabled=False), stall=10.0,
                 hwm=64):
        self.ctx = zmq.Context()
        self.parts = [Collected() for _ in range(nodes)]
        self.dists = [Distributor(profile, w, h, i, nodes, counting, workers=1, part_writer=self.parts[i],
                                  ctx=self.ctx, stall_timeout_s=stall, hwm=hwm) for i in range(nodes)]
        self.agg = Aggregator(profile, w, h, [d.endpoint for d in self.dists], ctx=self.ctx, hwm=hwm)
        self.results = {}
        self.threads = [threading.Thread(target=lambda d=d: self.results.__setitem__(d.node_index, d.run()),
                                         daemon=True) for d in self.dists]
        self.threads.append(threading.Thread(target=self.agg.run, kwargs={"stall_timeout_s": stall}, daemon=True))
        for t in self.threads:
            t.start()

    def join(self, timeout=60):
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "pipeline did not finish"
        return [self.results[i] for i in range(len(self.dists))]

    def close(self):
        self.agg.close()
        for d in self.dists:
            d.close()
        self.ctx.destroy(linger=0)


@pytest.fixture
def pipelines():
    made = []

    def make(*args, **kw):
        p = Pipeline(*args, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _produce(src, endpoint, ctx, sectors):
    threads = [threading.Thread(target=run_producer, args=(src, s, endpoint), kwargs={"ctx": ctx})
               for s in sectors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_every_frame_reaches_its_node_and_is_counted(pipelines):
    sim = Simulator(NCEM_4D_CAMERA, 6, 5, seed=2, pool_size=8)
    dark = sim.dark_reference()
    import tempfile, os
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
    hdr = lambda sector=0, x=0, y=0, sw=w, sh=h: wire.data_header(sector, 1, 1, sw, sh, x, y, 0)
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


def test_backpressure_blocks_the_producer_and_memory_stays_bounded():
    """A node that does not read holds the producer back after a bounded number of blocks."""
    prof = SMALL_TEST_CAMERA
    ctx = zmq.Context()
    try:
        sink = ctx.socket(zmq.PULL)
        sink.setsockopt(zmq.RCVHWM, 4)
        port = sink.bind_to_random_port("tcp://127.0.0.1")
        sim = Simulator(prof, 64, 64, pool_size=2)
        sent = []
        t = threading.Thread(target=lambda: sent.append(run_producer(
            sim, 0, f"tcp://127.0.0.1:{port}", hwm=4, ctx=ctx)), daemon=True)
        t.start()
        # The producer must stop making progress well before the scan's 4096 blocks.
        t.join(3.0)
        assert t.is_alive(), "producer sent the whole scan into a node that never reads"
        got = 0
        while sink.poll(100):                                 # now drain: everything arrives
            sink.recv_multipart()
            got += 1
        deadline = time.monotonic() + 30
        while t.is_alive() and time.monotonic() < deadline:
            if sink.poll(100):
                sink.recv_multipart()
                got += 1
        t.join(5)
        assert not t.is_alive()
        while sink.poll(200):
            sink.recv_multipart()
            got += 1
        assert got == 64 * 64 + 1                              # every block and the END marker
    finally:
        ctx.destroy(linger=0)
