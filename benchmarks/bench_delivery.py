"""What acknowledged delivery costs: the same streaming session with acks on and off, in one run.

"On" is the default data plane (nodes acknowledge durable positions, the aggregator keeps a
bounded window of unacknowledged frames, parts are written as committed segments); "off" is
SessionSpec(acks=False), the fire-and-forget path. Runs alternate on/off so that machine noise
hits both alike; each is a real session (bench_pipeline.run_session: private etcd, 4 producer
processes, the aggregator, N distributors and their counting workers), and its CPU time is
sampled from /proc for every service. The figure of merit is CPU seconds per GB moved (all
services), which does not depend on how much of the shared machine we got; GB/s is shown too.

Run: python benchmarks/bench_delivery.py [--scan 64x64] [--nodes 2] [--counting off,on] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import _cpu_table, _parse_scan, pipeline_figures, run_session, save_json  # noqa: E402

TARGET_COST = 0.05  # acks + window may cost at most 5% more CPU per GB


def one_run(*, acks: bool, counting: bool, scan, nodes: int, workdir: Path, endpoint: str, coord,
            spec_fields: Optional[dict] = None) -> dict:
    """One session; its pipeline figures plus what the aggregator says about the window."""
    run = run_session(scan=scan, nodes=nodes, counting=counting, workdir=workdir, endpoint=endpoint,
                      coord=coord, spec_fields={**(spec_fields or {}), "acks": acks})
    fig = pipeline_figures(run)
    if fig["frames"] != scan[0] * scan[1]:
        summary = run["summary"]
        raise RuntimeError(f"acks={acks}, counting={counting}: {fig['frames']} of {scan[0] * scan[1]} frames; "
                           f"{summary['frames_missing']} missing, {len(summary['partial_positions'])} partial, "
                           f"finish reasons {summary['finish_reasons']}, rejected {summary['rejected']}")
    agg = run["reports"].get("aggregator-0", {})
    fig["window"] = {k: agg.get(k) for k in ("window_frames", "window_peak", "window_full_seconds")}
    # pipeline_figures stops the clock at the last frame received, before a fire-and-forget node
    # has counted its last frames and closed its part, and after an acknowledging node has
    # (FIN comes once all is durable). For a like-for-like cost, CPU from the first block sent
    # until every service has exited (the part durable in both).
    producers = [r for k, r in run["reports"].items() if k.startswith("producer-")]
    t0 = min(r["first_send"] for r in producers)
    t1 = max(rec["series"][-1][0] for role, recs in run["samples"].items() if role != "etcd" for rec in recs)
    table = _cpu_table(run["samples"], t0, t1, None)
    fig["to_exit"] = {"seconds": t1 - t0, "cpu_s": table["all"]["cpu_s"],
                      "cpu_s_per_gb": table["all"]["cpu_s"] / (fig["bytes"] / 1e9),
                      "per_role_cpu_s": {role: c["cores"] * (t1 - t0) for role, c in table.items() if role != "all"}}
    shutil.rmtree(run["spec"].session_dir, ignore_errors=True)
    return fig


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the comparison; print a table and return the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", type=_parse_scan, default=(64, 64), help="scan WxH (default 64x64)")
    p.add_argument("--nodes", type=int, default=2, help="distributors (default 2)")
    p.add_argument("--counting", default="off,on", help="counting modes to run: off, on or both (default)")
    p.add_argument("--repeats", type=int, default=3, help="on/off pairs per counting mode; medians kept")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a SessionSpec field for both runs, e.g. window_frames=4096 (repeatable)")
    p.add_argument("--etcd", default=None, help="use this etcd instead of a private one")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from detstream.session import coordination

    modes = [m.strip() == "on" for m in args.counting.split(",") if m.strip()]
    fields = {k: json.loads(v) for k, _, v in (a.partition("=") for a in args.set)}
    result: dict = {"benchmark": "delivery", "scan": f"{args.scan[0]}x{args.scan[1]}", "nodes": args.nodes,
                    "repeats": args.repeats, "python": platform.python_version(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "target_cost": TARGET_COST, "modes": {},
                    "spec_fields": fields}
    workdir = Path(tempfile.mkdtemp(prefix="detstream-bench-delivery-"))
    try:
        with coordination(args.etcd, "/detstream-bench") as (endpoint, coord):
            for counting in modes:
                runs = {"on": [], "off": []}
                for rep in range(args.repeats):
                    for label in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                        runs[label].append(one_run(acks=label == "on", counting=counting, scan=args.scan,
                                                   nodes=args.nodes, workdir=workdir, endpoint=endpoint,
                                                   coord=coord, spec_fields=fields))
                result["modes"]["counting" if counting else "no counting"] = _summarise(runs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"acknowledged delivery vs fire-and-forget: {result['scan']} scan, {args.nodes} nodes, "
          f"median of {args.repeats}")
    print("  CPU s/GB: all services, first block sent to last service exited; (streaming: to the last"
          " frame received)")
    print(f"  {'mode':12s} {'acks':4s} {'CPU s/GB':>9s} {'(streaming)':>11s} {'GB/s':>6s} {'window peak':>12s} "
          f"{'window full s':>14s}")
    for mode, m in result["modes"].items():
        for label in ("off", "on"):
            v = m[label]
            print(f"  {mode:12s} {label:4s} {v['cpu_s_per_gb']:9.2f} {v['cpu_s_per_gb_streaming']:11.2f} "
                  f"{v['gb_s']:6.2f} {str(v['window_peak']):>12s} {v['window_full_seconds'] or 0:14.2f}")
        print(f"  {mode:12s} cost of acks: {m['cpu_cost']:+.1%} CPU s/GB (each pair: "
              f"{', '.join(f'{c:+.1%}' for c in m['pair_costs'])}), {m['gb_s_change']:+.1%} GB/s")
        print(f"  {'':12s} per service, CPU s/GB off -> on: " + "; ".join(
            f"{role} {v['off']:.2f} -> {v['on']:.2f}" for role, v in m["per_role_cpu_s_per_gb"].items()))
    result["meets_target"] = all(m["cpu_cost"] <= TARGET_COST for m in result["modes"].values())
    print(f"  target: at most {TARGET_COST:.0%} more CPU per GB: {'met' if result['meets_target'] else 'NOT met'}")
    save_json(args.json, result)
    return result


def _summarise(runs: dict) -> dict:
    out: dict = {"runs": runs}
    for label, rs in runs.items():
        out[label] = {
            "cpu_s_per_gb": statistics.median(r["to_exit"]["cpu_s_per_gb"] for r in rs),
            "cpu_s_per_gb_streaming": statistics.median(r["cpu_s_per_gb"] for r in rs),
            "gb_s": statistics.median(r["gb_s"] for r in rs),
            "window_peak": max((r["window"]["window_peak"] or 0) for r in rs) if label == "on" else None,
            "window_full_seconds": statistics.median((r["window"]["window_full_seconds"] or 0) for r in rs),
        }
    on, off = out["on"], out["off"]
    out["cpu_cost"] = on["cpu_s_per_gb"] / off["cpu_s_per_gb"] - 1
    out["gb_s_change"] = on["gb_s"] / off["gb_s"] - 1
    # Pairs run back to back, so each pair's ratio is its own noise-matched comparison.
    out["pair_costs"] = [a["to_exit"]["cpu_s_per_gb"] / b["to_exit"]["cpu_s_per_gb"] - 1
                         for a, b in zip(runs["on"], runs["off"])]
    roles = sorted({_role(k) for r in runs["on"] + runs["off"] for k in r["to_exit"]["per_role_cpu_s"]})
    out["per_role_cpu_s_per_gb"] = {
        role: {label: statistics.median(_role_sum(r, role) for r in runs[label]) for label in ("off", "on")}
        for role in roles}
    return out


def _role(name: str) -> str:
    """producer-2 -> producer, worker@distributor-0 -> worker: one line per kind of service."""
    return "worker" if name.startswith("worker") else name.split("-")[0]


def _role_sum(run: dict, role: str) -> float:
    cpu = sum(v for k, v in run["to_exit"]["per_role_cpu_s"].items() if _role(k) == role)
    return cpu / (run["bytes"] / 1e9)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
