"""The data plane's capacity, stage by stage: CPU-seconds from getrusage (every thread of the
stage's own process), as ratios against a raw hop measured in the same run.

* aggregator: 4 producer processes -> one aggregator process (acks on, the sessions' default)
  -> one sink process that acknowledges whole positions. Per batch size and transport, with
  tiny payloads (4 bytes: the per-message cost, sector blocks/s per core) and full 4D Camera
  sector blocks (165,888 bytes: GB/s per core). Baseline: a raw hop, one PUSH process -> one
  PULL process, the same blocks one per message, zero-copy, the same transport; its CPU is the
  sender's plus the receiver's (one send and one receive, as the aggregator does).
* distributor: assembling frames from 4 sectors' batches, counting off (frames/s per core).
* counting: worker processes fed batched tasks vs counting in the distributor's own threads
  (numba nogil), frames/s per core.
* shards: K aggregator processes (K = 1, 2, 4), each a share of the sectors, CPU-s per GB.

Run: python benchmarks/bench_dataplane.py [--batches 1,16,64,128] [--transports tcp,ipc] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np


CAMERA_FRAMES_PER_S = 87_000
TINY = dict(name="tiny", frame_rows=4, frame_cols=2, sectors=4)


def _cpu_s() -> float:
    """This process's CPU seconds, every thread (ZeroMQ's I/O threads included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _faults() -> int:
    """This process's minor page faults so far (a fresh buffer faults in every page it touches)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _procs_cpu_s(procs) -> float:
    """CPU seconds so far of these (live) processes, from /proc/<pid>/stat."""
    total = 0
    for p in procs:
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _profile(tiny: bool):
    from detstream.profile import DetectorProfile, get_profile

    return DetectorProfile(**TINY) if tiny else get_profile("4dcamera")


class _Scan:
    """A source of sector blocks (the producer's interface) over a pool of prepared blocks."""

    def __init__(self, profile, width: int, height: int):
        self.profile, self.scan_width, self.scan_height, self.scan_number = profile, width, height, 1
        rng = np.random.default_rng(0)
        self.pool = [rng.integers(0, 60, profile.sector_shape, dtype=profile.np_dtype) for _ in range(8)]

    def iter_sector(self, sector: int):
        from types import SimpleNamespace

        for pos in range(self.scan_width * self.scan_height):
            y, x = divmod(pos, self.scan_width)
            yield (SimpleNamespace(scan_number=1, frame_number=pos + 1, scan_width=self.scan_width,
                                   scan_height=self.scan_height, x=x, y=y), self.pool[pos % 8])


# --------------------------------------------------------------------------- processes
def _producer(endpoint: str, sector: int, tiny: bool, scan: tuple, batch: int, nodes: int, hwm: int,
              q=None) -> None:
    from detstream.services.producer import run_producer

    cpu0 = _cpu_s()
    stats = run_producer(_Scan(_profile(tiny), *scan), sector, endpoint, hwm=hwm, batch_blocks=batch, nodes=nodes)
    if q is not None:
        q.put({"cpu_s": _cpu_s() - cpu0, "bytes": stats.bytes_sent})


def _sink(q, bind: str, positions: int, sectors: int, acks: bool, shards: int = 1, node: int = 0) -> None:
    """A node that takes every block and acknowledges (to every shard) each position once all its
    sectors came; done at every shard's FIN (acks) or every sector's END."""
    import zmq

    from detstream import wire
    from detstream.services.endpoints import bind_address

    ctx = zmq.Context()
    data = ctx.socket(zmq.PULL)
    data.bind(bind_address(bind, f"sink-{node}-data"))
    ack_socks = []
    for k in range(shards):
        ack_socks.append(ctx.socket(zmq.PUSH))
        ack_socks[-1].bind(bind_address(bind, f"sink-{node}-acks-{k}"))
    q.put((data.getsockopt_string(zmq.LAST_ENDPOINT), [a.getsockopt_string(zmq.LAST_ENDPOINT) for a in ack_socks]))
    have = np.zeros(positions, dtype=np.uint8)
    blocks = ends = fins = 0
    done: list = []

    def send_acks():
        msg = wire.control_message(wire.Control.ACK, node, 0, 0, np.concatenate(done))
        for a in ack_socks:
            a.send_multipart(msg)
        done.clear()

    while True:
        if not data.poll(100):
            if done:
                send_acks()
            continue
        parts = data.recv_multipart(copy=False)
        heads = wire.parse_headers(parts[0].buffer)
        kind = int(heads["kind"][0])
        if kind == wire.Kind.END:
            ends += 1
            if ends == sectors and not acks:
                break
            continue
        if kind == wire.Kind.FIN:
            fins += 1
            if fins == shards:
                break
            continue
        pos = heads["y"].astype(np.int64) * heads["scan_width"] + heads["x"]
        blocks += len(pos)
        have[pos] += 1
        whole = pos[have[pos] == sectors]
        if len(whole) and acks:
            done.append(whole.astype(np.uint32))
            if sum(len(d) for d in done) >= 128:
                send_acks()
    q.put({"blocks": blocks})
    data.close(0)
    for a in ack_socks:
        a.close(0)
    ctx.term()


def _aggregator(q, go, tiny: bool, scan: tuple, nodes: list, acks: bool, bind: str, hwm: int, window: int,
                sectors: Optional[list] = None, shard: int = 0) -> None:
    from detstream.services.aggregator import Aggregator

    agg = Aggregator(_profile(tiny), *scan, [n[0] for n in nodes], bind=bind, hwm=hwm,
                     ack_endpoints=[n[1][shard] for n in nodes] if acks else None, window_frames=window,
                     sectors=sectors, shard=shard)
    q.put(agg.sector_endpoints)
    go.wait()
    cpu0, faults0 = _cpu_s(), _faults()
    stats = agg.run(fin_wait_s=2.0)
    cpu = _cpu_s() - cpu0
    faults = _faults() - faults0
    agg.close()
    q.put({"cpu_s": cpu, "faults": faults, "seconds": stats.last_recv - stats.first_recv, "blocks": sum(stats.frames_routed),
           "bytes": stats.bytes_routed, "lost": len(stats.lost), "rejected": stats.rejected})


def _hop_receiver(q, bind: str, expected: int) -> None:
    import zmq

    from detstream.services.endpoints import bind_address

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(bind_address(bind, "hop"))
    q.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    n = nbytes = 0
    cpu0 = None
    while n < expected:
        parts = sock.recv_multipart(copy=False)
        if cpu0 is None:
            cpu0, t0, faults0 = _cpu_s(), time.time(), _faults()
        n += 1
        nbytes += len(parts[1].buffer)
    q.put({"cpu_s": _cpu_s() - cpu0, "bytes": nbytes, "seconds": time.time() - t0, "faults": _faults() - faults0})
    sock.close(0)
    ctx.term()


def _hop_sender(q, endpoint: str, tiny: bool, scan: tuple, sectors: int) -> None:
    import zmq

    from detstream import wire
    from detstream.services.producer import _await_hangup

    src = _Scan(_profile(tiny), *scan)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, -1)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    cpu0 = _cpu_s()
    w, h = scan
    for pos in range(w * h):
        for s in range(sectors):
            sock.send_multipart([wire.data_header(s, 1, pos + 1, w, h, pos % w, pos // w, pos), src.pool[pos % 8]],
                                copy=False)
    _await_hangup(monitor, 120.0, 0.5, None)  # the receiver closes once it has everything
    sock.disable_monitor()
    monitor.close(0)
    sock.close()
    ctx.term()
    q.put({"cpu_s": _cpu_s() - cpu0})


# --------------------------------------------------------------------------- runs
class _Transport:
    """A bind base for one run: tcp loopback, or ipc in a private temp folder."""

    def __init__(self, name: str):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="dsb-") if name == "ipc" else None
        self.base = f"ipc://{self.dir}" if self.dir else "tcp://127.0.0.1:*"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _procs():
    return mp.get_context("fork")


def aggregator_run(*, tiny: bool, scan: tuple, batch: int, transport: str, acks: bool = True,
                   shards: int = 1, hwm_blocks: int = 64, window: int = 512, timeout_s: float = 300.0) -> dict:
    """Producers -> ``shards`` aggregators -> one sink; the aggregators' CPU per block and per GB."""
    ctx = _procs()
    profile = _profile(tiny)
    sectors = profile.sectors
    positions = scan[0] * scan[1]
    hwm = max(2, hwm_blocks // batch)
    with _Transport(transport) as tr:
        q, pq = ctx.Queue(), ctx.Queue()
        sink = ctx.Process(target=_sink, args=(q, tr.base, positions, sectors, acks, shards), daemon=True)
        sink.start()
        node = q.get(timeout=60)
        aggs, agg_qs, go = [], [], ctx.Event()
        share = np.array_split(np.arange(sectors), shards)
        sector_eps: dict[int, str] = {}
        for k in range(shards):
            aq = ctx.Queue()
            p = ctx.Process(target=_aggregator, daemon=True,
                            args=(aq, go, tiny, scan, [node], acks, tr.base, hwm, window, share[k].tolist(), k))
            p.start()
            for s, ep in enumerate(aq.get(timeout=60)):
                if ep:
                    sector_eps[s] = ep
            aggs.append(p)
            agg_qs.append(aq)
        go.set()
        prods = [ctx.Process(target=_producer, args=(sector_eps[s], s, tiny, scan, batch, 1, hwm, pq), daemon=True)
                 for s in range(sectors)]
        for p in prods:
            p.start()
        results = [aq.get(timeout=timeout_s) for aq in agg_qs]
        sink_res = q.get(timeout=60)
        prod_res = [pq.get(timeout=60) for _ in prods]
        for p in [*prods, *aggs, sink]:
            p.join(10)
            if p.is_alive():
                p.kill()
    blocks = sum(r["blocks"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    if blocks != positions * sectors or sink_res["blocks"] != blocks or any(r["lost"] for r in results):
        raise RuntimeError(f"aggregator run lost blocks: {results} {sink_res}")
    prod_cpu = sum(r["cpu_s"] for r in prod_res)
    return {"batch": batch, "transport": transport, "tiny": tiny, "shards": shards, "blocks": blocks,
            "producers_cpu_s_per_gb": prod_cpu / (nbytes / 1e9) if nbytes else None,
            "producers_gb_per_core_s": nbytes / 1e9 / prod_cpu if prod_cpu else None,
            "cpu_s": cpu, "blocks_per_core_s": blocks / cpu, "gb_per_core_s": nbytes / 1e9 / cpu,
            "cpu_s_per_gb": cpu / (nbytes / 1e9) if nbytes else None,
            "seconds": max(r["seconds"] for r in results), "per_shard_cpu_s": [r["cpu_s"] for r in results],
            "faults_per_gb": sum(r["faults"] for r in results) / (nbytes / 1e9) if nbytes else None}


def hop_run(*, tiny: bool, scan: tuple, transport: str, timeout_s: float = 300.0) -> dict:
    """One PUSH process -> one PULL process, the same blocks one per message."""
    ctx = _procs()
    sectors = _profile(tiny).sectors
    expected = scan[0] * scan[1] * sectors
    with _Transport(transport) as tr:
        rq, sq = ctx.Queue(), ctx.Queue()
        recv = ctx.Process(target=_hop_receiver, args=(rq, tr.base, expected), daemon=True)
        recv.start()
        ep = rq.get(timeout=60)
        send = ctx.Process(target=_hop_sender, args=(sq, ep, tiny, scan, sectors), daemon=True)
        send.start()
        r = rq.get(timeout=timeout_s)
        s = sq.get(timeout=60)
        for p in (send, recv):
            p.join(10)
    cpu = r["cpu_s"] + s["cpu_s"]
    return {"transport": transport, "tiny": tiny, "blocks": expected, "cpu_s": cpu,
            "blocks_per_core_s": expected / cpu, "gb_per_core_s": r["bytes"] / 1e9 / cpu,
            "cpu_s_per_gb": cpu / (r["bytes"] / 1e9), "seconds": r["seconds"],
            "receiver_faults_per_gb": r["faults"] / (r["bytes"] / 1e9)}


def _distributor(q, go, scan: tuple, bind: str, hwm: int) -> None:
    from detstream.config import CountingParams
    from detstream.services.distributor import Distributor

    # No aggregator to keep the producers in step here: room for the whole scan's partial frames.
    dist = Distributor(_profile(False), *scan, 0, 1, CountingParams(enabled=False), bind=bind, hwm=hwm,
                       max_partial_frames=scan[0] * scan[1])
    q.put(dist.endpoint)
    go.wait()
    cpu0 = _cpu_s()
    result = dist.run()
    cpu = _cpu_s() - cpu0
    dist.close()
    q.put({"cpu_s": cpu, "frames": result.frames_received, "rejected": result.rejected,
           "blocks": dist._blocks_per_sector, "ends": dist._ends, "partial": len(result.partial),
           "reason": result.finish_reason})


def distributor_run(*, scan: tuple, batch: int, transport: str, hwm_blocks: int = 64,
                    timeout_s: float = 300.0) -> dict:
    """4 producers straight into one distributor, counting off: its CPU per frame assembled."""
    ctx = _procs()
    hwm = max(2, hwm_blocks // batch)
    with _Transport(transport) as tr:
        q, go = ctx.Queue(), ctx.Event()
        dist = ctx.Process(target=_distributor, args=(q, go, scan, tr.base, hwm), daemon=True)
        dist.start()
        ep = q.get(timeout=60)
        go.set()
        prods = [ctx.Process(target=_producer, args=(ep, s, False, scan, batch, 1, hwm), daemon=True)
                 for s in range(_profile(False).sectors)]
        for p in prods:
            p.start()
        r = q.get(timeout=timeout_s)
        for p in [*prods, dist]:
            p.join(10)
            if p.is_alive():
                p.kill()
    frames = scan[0] * scan[1]
    if r["frames"] != frames:
        raise RuntimeError(f"distributor assembled {r['frames']} of {frames} frames: {r}")
    nbytes = frames * _profile(False).frame_nbytes
    return {"batch": batch, "transport": transport, "frames": frames, "cpu_s": r["cpu_s"],
            "frames_per_core_s": frames / r["cpu_s"], "cpu_s_per_gb": r["cpu_s"] / (nbytes / 1e9)}


def copy_cpu_s_per_gb(frames: int = 400) -> float:
    """The assembly copy alone: 4 sector blocks into a frame buffer, CPU-s per GB."""
    profile = _profile(False)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 60, profile.sector_shape, dtype=profile.np_dtype) for _ in range(4)]
    ring = np.empty((8, *profile.frame_shape), dtype=profile.np_dtype)
    rows = profile.sector_rows
    cpu0 = _cpu_s()
    for f in range(frames):
        frame = ring[f % 8]
        for s, b in enumerate(blocks):
            frame[s * rows:(s + 1) * rows] = b
    return (_cpu_s() - cpu0) / (frames * profile.frame_nbytes / 1e9)


def _child(q, fn, kwargs) -> None:
    try:
        q.put((True, fn(**kwargs)))
    except BaseException as err:  # the parent raises it instead of waiting out its timeout
        q.put((False, repr(err)))
        raise


def in_child(fn, **kwargs):
    """``fn(**kwargs)`` in a process of its own: threads it starts (counting threads, ZeroMQ's)
    leave malloc arenas in this process that every later forked stage would inherit, whose
    libzmq thread could then land in one that unmaps its memory whenever it empties."""
    ctx = _procs()
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, kwargs))  # not a daemon: it may start workers
    p.start()
    try:
        ok, result = q.get(timeout=600)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process: {result}")
    return result


def counting_run(*, mode: str, workers: int, frames: int, dark: bool = True) -> dict:
    """Assemble ``frames`` frames into a pool's slots and have them counted (worker processes
    with batched tasks, or the distributor's own threads); CPU of this process and its workers."""
    import zmq

    from detstream.config import CountingParams
    from detstream.services.counting_pool import CountingPool
    from detstream.services.counting_threads import ThreadCountingPool
    from detstream.sources import Simulator

    profile = _profile(False)
    sim = Simulator(profile, 8, 8, seed=3, pool_size=8)
    tmp = tempfile.mkdtemp(prefix="dsb-")
    try:
        counting = CountingParams()
        if dark:
            np.save(f"{tmp}/dark.npy", sim.dark_reference())
            counting = CountingParams(dark_reference=f"{tmp}/dark.npy")
        sources = [sim.frame(i) for i in range(8)]
        ctx = zmq.Context()
        pool = (ThreadCountingPool if mode == "threads" else CountingPool)(profile, counting, workers, ctx=ctx)
        workers_cpu0 = _procs_cpu_s(getattr(pool, "_procs", []))
        cpu0, t0 = _cpu_s(), time.perf_counter()
        done = sent = events = 0
        while done < frames:
            while sent < frames and pool.has_free_slot():
                slot = pool.acquire()
                pool.ring[slot][...] = sources[sent % 8]   # the assembly copy
                pool.submit(slot, sent)
                sent += 1
            pool.flush()
            if pool.results.poll(1000):
                for _, ev in pool.collect():
                    done += 1
                    events += len(ev)
        seconds = time.perf_counter() - t0
        cpu = _cpu_s() - cpu0 + _procs_cpu_s(getattr(pool, "_procs", [])) - workers_cpu0
        pool.close()
        ctx.term()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"mode": mode, "workers": workers, "frames": frames, "cpu_s": cpu, "seconds": seconds,
            "frames_per_core_s": frames / cpu, "frames_per_s": frames / seconds, "events": events}


# --------------------------------------------------------------------------- main
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def capacity(out: dict, batch: int, transport: str) -> dict:
    """The capacity model at the default batch and chosen transport: each stage's CPU-s per GB,
    its rates per core, the cores it needs for the camera's 87,000 frames/s, the floor."""
    from detstream.profile import get_profile

    frame_gb = get_profile("4dcamera").frame_nbytes / 1e9
    camera_gb_s = CAMERA_FRAMES_PER_S * frame_gb
    agg = next(r for r in out["aggregator"] if r["what"] == "aggregator" and r["batch"] == batch
               and r["transport"] == transport)
    hop = next(r for r in out["aggregator"] if r["what"] == "raw hop" and r["transport"] == transport)
    dist = out["distributor"]
    kernel = max(out["counting"], key=lambda r: r["frames_per_core_s"])  # the mode kept
    stages = {
        "producers (4)": agg["full"]["producers_cpu_s_per_gb"],
        "aggregator": agg["full"]["cpu_s_per_gb"],
        "distributor (receive + assemble)": dist["cpu_s_per_gb"],
        f"counting ({kernel['mode']})": 1 / (kernel["frames_per_core_s"] * frame_gb),
    }
    pipeline = sum(stages.values())
    counting_only = 1 / (kernel["frames_per_core_s"] * frame_gb)
    floor = 2 * hop["full"]["cpu_s_per_gb"] + out["assembly_copy_cpu_s_per_gb"] + counting_only
    return {
        "batch": batch, "transport": transport, "camera_gb_s": camera_gb_s,
        "stages": {name: {"cpu_s_per_gb": v, "cores_for_camera": v * camera_gb_s} for name, v in stages.items()},
        "aggregator_blocks_per_core_s": agg["blocks_per_core_s"],
        "aggregator_gb_per_core_s": agg["full"]["gb_per_core_s"],
        "aggregator_gb_ratio_to_hop": agg["gb_ratio_to_hop"],
        "distributor_frames_per_core_s": dist["frames_per_core_s"],
        "counting_frames_per_core_s": kernel["frames_per_core_s"],
        "pipeline_cpu_s_per_gb": pipeline, "floor_cpu_s_per_gb": floor, "pipeline_to_floor": pipeline / floor,
        "cores_for_camera": pipeline * camera_gb_s,
    }


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print a summary and return the figures (for benchmarks/run_all.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny-scan", default="128x128", help="scan for the per-message runs (4-byte blocks)")
    p.add_argument("--full-scan", default="48x48", help="scan for the per-byte runs (165,888-byte blocks)")
    p.add_argument("--batches", default="1,16,64,128")
    p.add_argument("--batch", type=int, default=64, help="the batch the capacity model and shard runs use")
    p.add_argument("--transports", default="tcp,ipc")
    p.add_argument("--transport", default="ipc", help="the transport of the capacity model and shard runs")
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--parts", default="aggregator,counting,distributor,shards",
                   help="comma-separated: aggregator, counting, distributor, shards (the model needs the first 3)")
    p.add_argument("--count-frames", type=int, default=2000, help="frames per counting run")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    tiny_scan = tuple(int(v) for v in args.tiny_scan.split("x"))
    full_scan = tuple(int(v) for v in args.full_scan.split("x"))
    parts = set(args.parts.split(","))
    out: dict = {"date": time.strftime("%Y-%m-%d"), "tiny_scan": args.tiny_scan, "full_scan": args.full_scan}
    if "aggregator" in parts:
        rows = []
        for transport in args.transports.split(","):
            hop_tiny = hop_run(tiny=True, scan=tiny_scan, transport=transport)
            hop_full = hop_run(tiny=False, scan=full_scan, transport=transport)
            rows.append({"what": "raw hop", **hop_tiny, "full": hop_full})
            print(f"{transport} raw hop: {hop_tiny['blocks_per_core_s']:,.0f} tiny blocks/s per core; "
                  f"{hop_full['gb_per_core_s']:.2f} GB/s per core", flush=True)
            for batch in _ints(args.batches):
                tiny = aggregator_run(tiny=True, scan=tiny_scan, batch=batch, transport=transport)
                full = aggregator_run(tiny=False, scan=full_scan, batch=batch, transport=transport)
                rows.append({"what": "aggregator", **tiny, "full": full,
                             "gb_ratio_to_hop": full["gb_per_core_s"] / hop_full["gb_per_core_s"]})
                print(f"{transport} batch {batch}: {tiny['blocks_per_core_s']:,.0f} tiny blocks/s per core; "
                      f"{full['gb_per_core_s']:.2f} GB/s per core "
                      f"({rows[-1]['gb_ratio_to_hop']:.2f} of the raw hop's {hop_full['gb_per_core_s']:.2f}); "
                      f"{full['faults_per_gb']:,.0f} page faults per GB (the hop's receiver "
                      f"{hop_full['receiver_faults_per_gb']:,.0f})",
                      flush=True)
        out["aggregator"] = rows
    if "counting" in parts:
        rows = []
        for workers in (1, 2):
            for mode in ("processes", "threads"):
                r = in_child(counting_run, mode=mode, workers=workers, frames=args.count_frames)
                rows.append(r)
                print(f"counting in {mode}, {workers} worker(s): {r['frames_per_core_s']:,.0f} frames/s per core, "
                      f"{r['frames_per_s']:,.0f} frames/s", flush=True)
        out["counting"] = rows
    if "distributor" in parts:
        out["distributor"] = distributor_run(scan=full_scan, batch=args.batch, transport=args.transport)
        out["assembly_copy_cpu_s_per_gb"] = copy_cpu_s_per_gb()
        print(f"distributor, counting off: {out['distributor']['frames_per_core_s']:,.0f} frames/s per core; "
              f"assembly copy alone {out['assembly_copy_cpu_s_per_gb']:.3f} CPU-s/GB", flush=True)
    if "shards" in parts:
        rows = [aggregator_run(tiny=False, scan=full_scan, batch=args.batch, transport=args.transport, shards=k)
                for k in _ints(args.shards)]
        for r in rows:
            r["scaling"] = rows[0]["cpu_s_per_gb"] / r["cpu_s_per_gb"]  # 1.0: CPU per GB constant = linear
            print(f"{r['shards']} aggregator shard(s): {r['cpu_s_per_gb']:.3f} CPU-s/GB in all "
                  f"({r['scaling']:.2f} of linear)", flush=True)
        out["shards"] = rows
    if {"aggregator", "counting", "distributor"} <= parts:
        out["capacity"] = capacity(out, args.batch, args.transport)
        c = out["capacity"]
        for name, v in c["stages"].items():
            print(f"{name}: {v['cpu_s_per_gb']:.3f} CPU-s/GB, {v['cores_for_camera']:.0f} cores for 87,000 frames/s")
        print(f"pipeline {c['pipeline_cpu_s_per_gb']:.2f} CPU-s/GB = {c['pipeline_to_floor']:.2f} x the floor "
              f"({c['floor_cpu_s_per_gb']:.2f}); {c['cores_for_camera']:.0f} cores for the camera")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
