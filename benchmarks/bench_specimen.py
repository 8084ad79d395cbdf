"""The simulated specimen and the centre of mass, in one run: the simulator's frames per second per
core beside the pipeline's that consumes them, and what the nodes' centre of mass costs.

* Pipeline: real counting sessions on the simulated scan (harness.one_run: private etcd, 4
  producers, the aggregator, N distributors counting in threads, acks, live images on), CPU sampled
  from /proc for every service from the first block sent until every service exited. Frames per
  second per core = frames / CPU seconds, for the whole data plane (its producers render the
  frames, so the simulator's own cost is inside it) and without the simulator's share.
* Simulator: every sector of the same scan rendered as producers do (``iter_sector``), in this
  process, CPU time (``time.process_time``), between the sessions so machine noise hits both.
* Centre of mass: a node's live-image work (``LiveImages.add`` on each counted frame, ``changes()``
  at a node's publish rate) with and without the centre of mass, on the simulated scan's counted
  events, best of ``--passes``; the difference set against the nodes' CPU per frame (distributors
  and their counting, from the same sessions) and as CPU s per GB.

Run: python benchmarks/bench_specimen.py [--scan 64x64] [--nodes 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

from harness import one_run, parse_scan, save_json

TARGET_SIM_RATIO = 3.0  # the simulator at least 3x the pipeline's frames/s per core
TARGET_COM_COST = 0.01  # the nodes' centre of mass at most 1% of the nodes' CPU s per GB


def simulator_rate(scan: tuple[int, int], seed: int = 0) -> dict:
    """The simulator's frames per CPU second, rendering every sector of the scan as producers do."""
    from detstream.profile import get_profile
    from detstream.sources.simulator import Simulator

    profile = get_profile("4dcamera")
    t0 = time.process_time()
    sim = Simulator(profile, *scan, seed=seed)
    build = time.process_time() - t0
    sim.frame(0)  # numba's kernels loaded from the cache (or compiled) before the clock starts
    per_sector = []
    for sector in range(profile.sectors):
        t0 = time.process_time()
        for _ in sim.iter_sector(sector):
            pass
        per_sector.append((time.process_time() - t0) / sim.frames)
    per_frame = sum(per_sector)
    return {"frames": sim.frames, "build_cpu_s": build, "cpu_us_per_frame": per_frame * 1e6,
            "cpu_us_per_sector_block": [s * 1e6 for s in per_sector], "frames_per_s_per_core": 1 / per_frame}


def com_cost(scan: tuple[int, int], nodes: int, passes: int = 5) -> dict:
    """A node's live-image work per frame with and without the centre of mass (CPU us per frame)."""
    import numpy as np

    from detstream.config import VirtualImaging
    from detstream.counting import Counter
    from detstream.live import LiveImages
    from detstream.profile import get_profile
    from detstream.sources.simulator import Simulator

    sim = Simulator(get_profile("4dcamera"), *scan)
    counter = Counter(sim.profile.frame_shape, sim.dark_reference(), None, *sim.suggested_thresholds())
    n = scan[0] * scan[1]
    mine = range(0, n, nodes)  # node 0's share
    events = [counter.count(sim.frame(p)) for p in mine]
    imaging = VirtualImaging(center=sim.centre, bf_radius=sim.disk_radius)
    out: dict = {"events_per_frame": float(np.mean([len(e) for e in events]))}
    for label, com in (("without", False), ("with", True)):
        best = float("inf")
        for _ in range(passes):
            live = LiveImages(n, sim.profile.frame_shape, imaging, com=com)
            t0 = time.process_time()
            for i, (p, ev) in enumerate(zip(mine, events)):
                live.add(p, ev)
                if i % 500 == 499:  # ~ one publish a second at a node's rate on this machine
                    live.changes()
            live.finish(own_disk=True)
            live.changes()
            best = min(best, time.process_time() - t0)
        out[label] = {"us_per_frame": best / len(events) * 1e6}
    out["com_us_per_frame"] = out["with"]["us_per_frame"] - out["without"]["us_per_frame"]
    return out


def _nodes_cpu_s(run: dict) -> float:
    return sum(v for k, v in run["to_exit"]["per_role_cpu_s"].items()
               if k.startswith("distributor") or k.startswith("worker"))


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print a summary and return the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", type=parse_scan, default=(64, 64), help="scan WxH (default 64x64)")
    p.add_argument("--nodes", type=int, default=2, help="distributors (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="sessions (and simulator passes); medians kept")
    p.add_argument("--passes", type=int, default=5, help="passes of the node's live work; best kept")
    p.add_argument("--etcd", default=None, help="use this etcd instead of a private one")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from detstream.session import coordination

    frame_gb = 576 * 576 * 2 / 1e9
    result: dict = {"benchmark": "specimen", "scan": f"{args.scan[0]}x{args.scan[1]}", "nodes": args.nodes,
                    "repeats": args.repeats, "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "target_sim_ratio": TARGET_SIM_RATIO,
                    "target_com_cost": TARGET_COM_COST}
    sessions, sims = [], []
    workdir = Path(tempfile.mkdtemp(prefix="detstream-bench-specimen-"))
    try:
        with coordination(args.etcd, "/detstream-bench") as (endpoint, coord):
            for _ in range(args.repeats):  # interleaved: machine noise hits both alike
                sessions.append(one_run(acks=True, counting=True, scan=args.scan, nodes=args.nodes,
                                        workdir=workdir, endpoint=endpoint, coord=coord))
                sims.append(simulator_rate(args.scan))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    sim_us = statistics.median(s["cpu_us_per_frame"] for s in sims)
    frames = sessions[0]["frames"]
    pipe_us = statistics.median(r["to_exit"]["cpu_s"] / r["frames"] for r in sessions) * 1e6
    nodes_us = statistics.median(_nodes_cpu_s(r) / r["frames"] for r in sessions) * 1e6
    result["sessions"] = [{"cpu_s_per_gb": r["to_exit"]["cpu_s_per_gb"], "frames": r["frames"],
                           "cpu_s": r["to_exit"]["cpu_s"], "nodes_cpu_s": _nodes_cpu_s(r),
                           "per_role_cpu_s": r["to_exit"]["per_role_cpu_s"], "gb_s": r["gb_s"]} for r in sessions]
    result["simulator_runs"] = sims
    result["simulator"] = {"cpu_us_per_frame": sim_us, "frames_per_s_per_core": 1e6 / sim_us}
    result["pipeline"] = {
        "frames": frames, "cpu_us_per_frame": pipe_us, "frames_per_s_per_core": 1e6 / pipe_us,
        "cpu_s_per_gb": pipe_us / 1e6 / frame_gb,
        # the producers render the frames: the pipeline's own cost leaves the simulator's out
        "without_simulator": {"cpu_us_per_frame": pipe_us - sim_us, "frames_per_s_per_core": 1e6 / (pipe_us - sim_us),
                              "cpu_s_per_gb": (pipe_us - sim_us) / 1e6 / frame_gb}}
    result["sim_ratio"] = (1e6 / sim_us) / (1e6 / (pipe_us - sim_us))
    result["sim_ratio_with_its_share"] = (1e6 / sim_us) / (1e6 / pipe_us)
    result["nodes"] = {"cpu_us_per_frame": nodes_us, "cpu_s_per_gb": nodes_us / 1e6 / frame_gb}
    com = com_cost(args.scan, args.nodes, args.passes)
    result["com"] = {**com, "cpu_s_per_gb": com["com_us_per_frame"] / 1e6 / frame_gb,
                     "share_of_nodes": com["com_us_per_frame"] / nodes_us}
    result["meets_sim_target"] = bool(result["sim_ratio"] >= TARGET_SIM_RATIO)
    result["meets_com_target"] = bool(result["com"]["share_of_nodes"] <= TARGET_COM_COST)

    print(f"specimen: {result['scan']} scan, {args.nodes} nodes, counting on, median of {args.repeats}")
    print(f"  simulator: {result['simulator']['frames_per_s_per_core']:.0f} frames/s per core "
          f"({sim_us:.0f} CPU us per frame, all four sectors)")
    print(f"  pipeline:  {result['pipeline']['frames_per_s_per_core']:.0f} frames/s per core with the simulator's "
          f"share, {result['pipeline']['without_simulator']['frames_per_s_per_core']:.0f} without "
          f"({result['pipeline']['without_simulator']['cpu_s_per_gb']:.2f} CPU s/GB)")
    print(f"  simulator / pipeline: {result['sim_ratio']:.1f}x (with its share in the pipeline: "
          f"{result['sim_ratio_with_its_share']:.1f}x); target {TARGET_SIM_RATIO:g}x: "
          f"{'met' if result['meets_sim_target'] else 'NOT met'}")
    print(f"  centre of mass on a node: {com['com_us_per_frame']:.1f} CPU us per frame "
          f"({com['events_per_frame']:.0f} events per frame; live images {com['without']['us_per_frame']:.1f} -> "
          f"{com['with']['us_per_frame']:.1f}) = {result['com']['share_of_nodes']:.2%} of the nodes' "
          f"{nodes_us:.0f} CPU us per frame ({result['nodes']['cpu_s_per_gb']:.2f} CPU s/GB); target "
          f"{TARGET_COM_COST:.0%}: {'met' if result['meets_com_target'] else 'NOT met'}")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
