"""End-to-end pipeline throughput with counting off, beside a raw single-hop pyzmq PUSH/PULL.

The pipeline run is a real streaming session driven through ``detstream.session`` (no Prefect):
a private etcd, 4 producer processes (one per sector, simulated camera), the aggregator and
N distributor processes that assemble every frame (counting disabled). Throughput is the
scan's bytes over the time from the first sector block produced (producers' ``first_send``)
to the last frame assembled (distributors' ``last_recv``).

The baseline sends the same messages -- ``[header, 165888-byte payload]`` x 4 sectors x
frames, payload zero-copy -- from one sender process to one receiver process over tcp
loopback, timed from the first send to the last receive, in the same script so that the
ratio holds on a noisy machine. Each pipeline run also reports per-service rates and CPU
time (sampled from /proc) so that a shortfall can be pinned on a stage.

Run: python benchmarks/bench_pipeline.py [--scan 64x64] [--nodes 1,2] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from harness import parse_scan, pipeline_figures, run_session, save_json

TARGET_RATIO = 0.5


# --------------------------------------------------------------------------- raw single hop
def _hop_receiver(port_q, result_q, expected: int, hwm: int, sockopts: dict) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, hwm)
    for opt, val in sockopts.items():
        sock.setsockopt(getattr(zmq, opt), val)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    n = nbytes = 0
    first = cpu0 = None
    while n < expected:
        parts = sock.recv_multipart(copy=False)
        if first is None:
            first, cpu0 = time.time(), sum(os.times()[:2])
        n += 1
        nbytes += len(parts[1].buffer)
    result_q.put({"first_recv": first, "last_recv": time.time(), "messages": n, "bytes": nbytes,
                  "cpu_s": sum(os.times()[:2]) - cpu0})
    sock.close(0)
    ctx.term()


def _hop_sender(port: int, result_q, frames: int, sectors: int, hwm: int, sockopts: dict,
                scan_width: int, scan_height: int) -> None:
    import zmq

    from detstream import wire
    from detstream.profile import get_profile

    profile = get_profile("4dcamera")
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 60, profile.sector_shape, dtype=profile.np_dtype) for _ in range(sectors)]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, -1)
    for opt, val in sockopts.items():
        sock.setsockopt(getattr(zmq, opt), val)
    sock.connect(f"tcp://127.0.0.1:{port}")
    t0, cpu0 = time.time(), sum(os.times()[:2])
    for f in range(frames):
        y, x = divmod(f, scan_width)
        for s in range(sectors):
            sock.send_multipart([wire.data_header(s, 1, f + 1, scan_width, scan_height, x, y, f),
                                 payloads[s]], copy=False)
    t_last = time.time()
    sock.close()
    ctx.term()  # waits until the I/O thread has sent everything: its CPU counts too
    result_q.put({"first_send": t0, "last_send": t_last, "cpu_s": sum(os.times()[:2]) - cpu0})


def raw_hop(frames: int, scan: tuple[int, int], sectors: int = 4, hwm: int = 64,
            sockopts: Optional[dict] = None, timeout_s: float = 300.0) -> dict:
    """One sender process -> one receiver process, PUSH/PULL over tcp loopback, the pipeline's messages."""
    from detstream.profile import get_profile

    sockopts = sockopts or {}
    ctx = mp.get_context("spawn")
    port_q, recv_q, send_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(target=_hop_receiver, args=(port_q, recv_q, frames * sectors, hwm, sockopts),
                           name="hop-receiver", daemon=True)
    sender = None
    try:
        receiver.start()
        port = port_q.get(timeout=60)
        sender = ctx.Process(target=_hop_sender, name="hop-sender", daemon=True,
                             args=(port, send_q, frames, sectors, hwm, sockopts, *scan))
        sender.start()
        r = recv_q.get(timeout=timeout_s)
        s = send_q.get(timeout=60)
    finally:
        for p in (sender, receiver):
            if p is not None and p.pid is not None:  # started
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)
    seconds = r["last_recv"] - s["first_send"]
    expect = frames * sectors * get_profile("4dcamera").sector_nbytes
    if r["bytes"] != expect:
        raise RuntimeError(f"raw hop moved {r['bytes']} bytes, expected {expect}")
    cpu = s["cpu_s"] + r["cpu_s"]
    return {"frames": frames, "bytes": r["bytes"], "seconds": seconds, "gb_s": r["bytes"] / seconds / 1e9,
            "frames_per_s": frames / seconds, "sender_cpu_s": s["cpu_s"], "receiver_cpu_s": r["cpu_s"],
            "cores": cpu / seconds, "cpu_s_per_gb": cpu / (r["bytes"] / 1e9)}


# --------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print a summary and return the figures (for benchmarks/run_all.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", type=parse_scan, default=(64, 64), help="scan WxH (default 64x64)")
    p.add_argument("--nodes", default="1,2", help="comma-separated node counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each configuration, interleaved with the baseline; median kept (default 3)")
    p.add_argument("--etcd", default=None, help="use this etcd instead of a private one")
    p.add_argument("--keep", type=Path, default=None, help="keep the session folders here")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from detstream.session import coordination

    node_counts = [int(n) for n in args.nodes.split(",") if n]
    frames = args.scan[0] * args.scan[1]
    result: dict = {
        "benchmark": "pipeline",
        "scan": f"{args.scan[0]}x{args.scan[1]}",
        "frames": frames,
        "repeats": args.repeats,
        "target_ratio": TARGET_RATIO,
        "python": platform.python_version(),
        "baseline_runs": [],
        "pipeline_runs": {str(n): [] for n in node_counts},
    }
    workdir = Path(tempfile.mkdtemp(prefix="detstream-bench-pipeline-"))
    try:
        with coordination(args.etcd, "/detstream-bench") as (endpoint, coord):
            # Interleave baseline and pipeline runs so that machine noise hits both alike.
            for _ in range(args.repeats):
                result["baseline_runs"].append(raw_hop(frames, args.scan))
                for n in node_counts:
                    run = run_session(scan=args.scan, nodes=n, counting=False, workdir=workdir,
                                      endpoint=endpoint, coord=coord)
                    fig = pipeline_figures(run)
                    if fig["frames"] != frames:
                        raise RuntimeError(f"pipeline run with {n} nodes assembled {fig['frames']} of "
                                           f"{frames} frames")
                    result["pipeline_runs"][str(n)].append(fig)
                    if args.keep is None:
                        shutil.rmtree(run["spec"].session_dir, ignore_errors=True)
    finally:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for d in workdir.iterdir():
                shutil.move(str(d), args.keep / d.name)
        shutil.rmtree(workdir, ignore_errors=True)

    base_gb_s = statistics.median(r["gb_s"] for r in result["baseline_runs"])
    result["baseline"] = {"gb_s": base_gb_s,
                          "frames_per_s": statistics.median(r["frames_per_s"] for r in result["baseline_runs"]),
                          "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"] for r in result["baseline_runs"])}
    result["pipeline"] = {}
    for n, runs in result["pipeline_runs"].items():
        best = sorted(runs, key=lambda r: r["gb_s"])[len(runs) // 2]  # the median run, whole
        result["pipeline"][n] = {
            "gb_s": statistics.median(r["gb_s"] for r in runs),
            "frames_per_s": statistics.median(r["frames_per_s"] for r in runs),
            "ratio": statistics.median(r["gb_s"] for r in runs) / base_gb_s,
            "gb_s_after_all_started": statistics.median(r["gb_s_after_all_started"] for r in runs),
            "producer_start_skew_s": statistics.median(r["producer_start_skew_s"] for r in runs),
            "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"] or 0.0 for r in runs),
            "median_run": best,
        }
    result["ratio"] = {n: v["ratio"] for n, v in result["pipeline"].items()}
    result["meets_target"] = all(r >= TARGET_RATIO for r in result["ratio"].values())

    gb = frames * 4 * 165888 / 1e9
    print(f"pipeline, counting off: {result['scan']} scan, {frames} frames, {gb:.2f} GB; median of "
          f"{args.repeats}")
    print(f"  {'run':26s} {'GB/s':>6s} {'frames/s':>9s} {'ratio':>6s} {'CPU s/GB':>9s}")
    print(f"  {'raw PUSH/PULL, one hop':26s} {base_gb_s:6.2f} {result['baseline']['frames_per_s']:9.0f} "
          f"{1.0:6.2f} {result['baseline']['cpu_s_per_gb']:9.2f}")
    for n, v in result["pipeline"].items():
        print(f"  {'pipeline, ' + n + ' node(s)':26s} {v['gb_s']:6.2f} {v['frames_per_s']:9.0f} "
              f"{v['ratio']:6.2f} {v['cpu_s_per_gb']:9.2f}   (after all producers started: "
              f"{v['gb_s_after_all_started']:.2f} GB/s; start skew {v['producer_start_skew_s']:.2f} s)")
        st = v["median_run"]["stages"]
        print(f"      stages GB/s: producers {', '.join(f'{x:.2f}' for x in st['producer_gb_s_each'])}; "
              f"aggregator {st['aggregator_gb_s']:.2f}; distributors "
              f"{', '.join(f'{x:.2f}' for x in st['distributor_gb_s'])}; assembly capacity "
              f"{', '.join(f'{x:.1f}' for x in st['assemble_capacity_gb_s'])}")
        cpu = v["median_run"]["cpu"]
        a = cpu["all"]
        print(f"      cores while streaming (machine has {os.cpu_count()}): machine busy "
              f"{a['machine_busy_cores']:.2f}, ours {a['cores']:.2f}, others {a['others_cores']:.2f}; "
              f"ours waiting for a CPU {a['runqueue_wait_cores']:.2f}")
        tb = v["median_run"]["thread_bound_gb_s"]
        print("      busiest thread saturates at (GB/s): " + "; ".join(
            f"{role} {b['gb_s']:.1f} ({b['thread']})" for role, b in tb.items()))
        print("      per service, cores used (main thread + I/O threads) / waiting: " + "; ".join(
            f"{role} {c['main_thread_cores']:.2f}+{c['other_threads_cores']:.2f}/{c['runqueue_wait_cores']:.2f}"
            for role, c in cpu.items() if role not in ("etcd", "all")))
    print(f"  target: pipeline >= {TARGET_RATIO:.0%} of the single hop: "
          f"{'met' if result['meets_target'] else 'NOT met'}")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
