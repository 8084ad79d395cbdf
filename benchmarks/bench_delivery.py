"""What acknowledged delivery costs: the same streaming session with acks on and off, in one run.

"On" is the default data plane (nodes acknowledge durable positions, the aggregator keeps a
bounded window of unacknowledged frames, parts are written as committed segments); "off" is
SessionSpec(acks=False), the fire-and-forget path. Runs alternate on/off so that machine noise
hits both alike; each is a real session (harness.run_session: private etcd, 4 producer
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
import tempfile
import time
from pathlib import Path
from typing import Optional

from harness import one_run, parse_scan, save_json, summarise_on_off

TARGET_COST = 0.05  # acks + window may cost at most 5% more CPU per GB


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the comparison; print a table and return the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", type=parse_scan, default=(64, 64), help="scan WxH (default 64x64)")
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
                result["modes"]["counting" if counting else "no counting"] = summarise_on_off(runs)
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


if __name__ == "__main__":
    main()
