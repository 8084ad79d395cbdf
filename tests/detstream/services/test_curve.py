"""CURVE on the data plane's hops, every socket real: only the session's own keys deliver anything."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from detstream import wire
from detstream.config import CountingParams
from detstream.profile import SMALL_TEST_CAMERA
from detstream.services.aggregator import Aggregator
from detstream.services.distributor import Distributor
from detstream.services.producer import run_producer
from detstream.services.security import Curve, public_keys, session_keys, uses_curve
from detstream.sources import Simulator

# Unmarked tests here are unit tests (tests/conftest.py); the whole-pipeline one is e2e.

PROFILE, W, H = SMALL_TEST_CAMERA, 4, 4


class Collected:
    """Stands in for a PartWriter: keeps (position, events) in memory."""

    def __init__(self):
        self.events: dict[int, np.ndarray] = {}

    def add(self, position, events):
        self.events[position] = np.asarray(events).copy()


class SecurePipeline:
    """One distributor and the aggregator, each with its own context (one ZAP handler each), CURVE on."""

    def __init__(self, env, nodes=1):
        keys = public_keys(env)
        self.env, self.keys = env, keys
        self.parts = [Collected() for _ in range(nodes)]
        counting = CountingParams(background_threshold=0.0, xray_threshold=60000.0)
        self.dists = [Distributor(PROFILE, W, H, i, nodes, counting, part_writer=self.parts[i], stall_timeout_s=10,
                                  curve=Curve("distributor", keys, serve=True, environ=env)) for i in range(nodes)]
        self.agg = Aggregator(PROFILE, W, H, [d.endpoint for d in self.dists],
                              curve=Curve("aggregator", keys, serve=True, servers=frozenset({"distributor"}),
                                          environ=env))
        self.results = {}
        self.over = threading.Event()
        stop = lambda: "test over" if self.over.is_set() else None  # noqa: E731
        self.threads = [threading.Thread(target=lambda d=d: self.results.__setitem__(d.node_index, d.run(stop)),
                                         daemon=True) for d in self.dists]
        self.threads.append(threading.Thread(target=self.agg.run, kwargs={"stall_timeout_s": 10, "should_stop": stop},
                                             daemon=True))

    def start(self):
        for t in self.threads:
            t.start()

    def produce(self, sim):
        producer = Curve("producer", self.keys, servers=frozenset({"aggregator"}), environ=self.env)
        threads = [threading.Thread(target=run_producer, args=(sim, s, self.agg.endpoint), kwargs={"curve": producer})
                   for s in range(PROFILE.sectors)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    def join(self):
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "pipeline did not finish"
        return [self.results[i] for i in range(len(self.dists))]

    def close(self):
        self.over.set()
        for t in self.threads:
            if t.ident is not None:
                t.join(30)
        self.agg.close()
        for d in self.dists:
            d.close()


@pytest.fixture
def pipelines():
    made = []

    def make(*args, **kw):
        made.append(SecurePipeline(*args, **kw))
        return made[-1]
    yield make
    for p in made:
        p.close()


def _last_position_forgery(endpoint, server_key=None):
    """The issue's attack: a PUSH at a node's endpoint, garbage sectors for the last position."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    if server_key is not None:  # a CURVE client, but with a key of its own making
        public, secret = zmq.curve_keypair()
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server_key.encode()
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 200)
    s.connect(endpoint)
    garbage = np.full(PROFILE.sector_shape, 5000, np.uint16)
    garbage[::3, ::3] = 40000
    for sector in range(PROFILE.sectors):
        try:
            s.send_multipart([wire.data_header(sector, 1, 0, W, H, W - 1, H - 1, 0), garbage.tobytes()])
        except zmq.Again:  # nothing to hand it to: the handshake was refused
            pass
    return ctx, s


def test_modes_by_name_and_by_where_a_socket_listens():
    assert uses_curve("auto", "tcp://0.0.0.0:*") and uses_curve("auto", "tcp://10.1.2.3:5000")
    assert not uses_curve("auto", "tcp://127.0.0.1:*") and not uses_curve("auto", "ipc:///run/x")
    assert uses_curve("curve", "tcp://127.0.0.1:*") and not uses_curve("none", "tcp://0.0.0.0:*")
    with pytest.raises(ValueError, match="security mode 'off'"):
        uses_curve("off", "tcp://0.0.0.0:*")
    with pytest.raises(ValueError, match="DETSTREAM_CURVE_SECRET_DISTRIBUTOR is not set"):
        Curve("distributor", {}, serve=True, environ={}).secret()


@pytest.mark.e2e  # a whole multi-process pipeline: not in make test-fast
def test_forged_sectors_without_the_sessions_key_deliver_nothing(pipelines, wait_until):
    env = session_keys()
    sim = Simulator(PROFILE, W, H, seed=7)
    clean = pipelines(env)
    clean.start()
    clean.produce(sim)
    (clean_result,) = clean.join()
    assert clean_result.frames_counted == W * H

    attacked = pipelines(env)
    attacked.start()
    forgers = [_last_position_forgery(attacked.dists[0].endpoint),
               _last_position_forgery(attacked.dists[0].endpoint, attacked.keys["distributor"])]
    try:
        wait_until(lambda: attacked.dists[0].rejects.counts["unauthenticated"] >= 2, timeout_s=10,
                   what="both forgers refused")
        attacked.produce(sim)
        (result,) = attacked.join()
    finally:
        for ctx, s in forgers:
            s.close(0)
            ctx.term()
    assert result.frames_counted == W * H and result.rejected.get("unauthenticated", 0) >= 2
    assert "duplicate_sector" not in result.rejected
    assert sorted(attacked.parts[0].events) == sorted(clean.parts[0].events)
    for position, events in clean.parts[0].events.items():
        np.testing.assert_array_equal(attacked.parts[0].events[position], events)


def test_a_producer_without_the_sessions_key_delivers_nothing(pipelines, wait_until):
    env = session_keys()
    p = pipelines(env)
    p.start()
    stranger = {**env, "DETSTREAM_CURVE_SECRET_PRODUCER": zmq.curve_keypair()[1].decode()}
    impostor = Curve("producer", p.keys, servers=frozenset({"aggregator"}), environ=stranger)
    sim = Simulator(PROFILE, W, H, seed=1)
    t = threading.Thread(target=run_producer, args=(sim, 0, p.agg.endpoint),
                         kwargs={"curve": impostor, "linger_s": 0.1, "send_timeout_s": 1.0}, daemon=True)
    t.start()
    wait_until(lambda: p.agg.rejects.counts["unauthenticated"] >= 1, timeout_s=10, what="the impostor refused")
    t.join(30)
    assert p.agg.stats.frames_routed == [0] and p.dists[0].result.frames_received == 0
