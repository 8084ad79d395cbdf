"""What CURVE costs: the same streaming session with --security curve and --security none, in one run.

Each is a real session (harness.run_session: private TLS etcd, 4 producer processes, the
aggregator, N distributors and their counting workers); "curve" encrypts and authenticates every
ZeroMQ hop (producer -> aggregator -> distributor, and the acks back), "none" does not. Runs
alternate so that machine noise hits both alike. Figures: CPU seconds per GB moved (every
service, from /proc, first block sent to last service exited) and GB/s; the cost is CURVE's
ratio over none, median of the pairs.

Run: python benchmarks/bench_security.py [--scan 64x64] [--nodes 2] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from harness import one_run, parse_scan, save_json, summarise_on_off


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the curve/none pairs; print a table and return the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", type=parse_scan, default=(64, 64), help="scan WxH (default 64x64)")
    p.add_argument("--nodes", type=int, default=2, help="distributors (default 2)")
    p.add_argument("--counting", choices=("on", "off"), default="off", help="count electrons (default off: "
                   "the data plane alone, where CURVE's share is largest)")
    p.add_argument("--repeats", type=int, default=2, help="curve/none pairs; medians kept")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from detstream.session import coordination

    workdir = Path(tempfile.mkdtemp(prefix="detstream-bench-security-"))
    runs: dict = {"on": [], "off": []}  # on = curve, off = none
    try:
        with coordination(None, "/detstream-bench") as (endpoint, coord):
            for rep in range(args.repeats):
                for label in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                    runs[label].append(one_run(
                        acks=True, counting=args.counting == "on", scan=args.scan, nodes=args.nodes,
                        workdir=workdir, endpoint=endpoint, coord=coord,
                        spec_fields={"security": "curve" if label == "on" else "none"}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise_on_off(runs)
    result = {"benchmark": "security", "scan": f"{args.scan[0]}x{args.scan[1]}", "nodes": args.nodes,
              "counting": args.counting, "repeats": args.repeats, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "none": summary["off"], "curve": summary["on"], "cpu_cost": summary["cpu_cost"],
              "gb_s_change": summary["gb_s_change"], "pair_costs": summary["pair_costs"],
              "per_role_cpu_s_per_gb": {role: {"none": v["off"], "curve": v["on"]}
                                        for role, v in summary["per_role_cpu_s_per_gb"].items()}}
    print(f"CURVE vs none: {result['scan']} scan, {args.nodes} nodes, counting {args.counting}, "
          f"median of {args.repeats}")
    for label in ("none", "curve"):
        print(f"  {label:5s} {result[label]['cpu_s_per_gb']:6.2f} CPU s/GB  {result[label]['gb_s']:6.3f} GB/s")
    print(f"  cost of CURVE: {result['cpu_cost']:+.1%} CPU s/GB (pairs: "
          f"{', '.join(f'{c:+.1%}' for c in result['pair_costs'])}), {result['gb_s_change']:+.1%} GB/s")
    print("  per service, CPU s/GB none -> curve: " + "; ".join(
        f"{role} {v['none']:.2f} -> {v['curve']:.2f}" for role, v in result["per_role_cpu_s_per_gb"].items()))
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
