"""Issue benchmark: streaming vs file transfer, time to counted result, on the same scans.

Runs the compare_workflows flow (both workflows alternating, same scan, same seed) on a
64x64 scan (2.7 GB raw) and a 128x128 scan (11 GB raw), three runs each, and reports per
workflow the median, min, max and standard deviation of the time from the first frame
produced to the counted HDF5 closed, the per-stage timings, and the ratio.

    python benchmarks/bench_compare.py [--scans 64x64 128x128] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", nargs="+", default=["64x64", "128x128"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--output", default=None, help="Work folder (default: a temporary one, removed).")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from detstream.flows import compare_workflows

    work = Path(args.output or tempfile.mkdtemp(prefix="detstream-bench-compare-"))
    results = {"benchmark": "compare", "nodes": args.nodes, "repeat": args.repeat, "scans": {}}
    try:
        for scan in args.scans:
            w, h = (int(v) for v in scan.split("x"))
            t0 = time.time()
            report = compare_workflows(scan_width=w, scan_height=h, repeat=args.repeat, nodes=args.nodes,
                                       output_dir=str(work / scan))
            wf = report["workflows"]
            entry = {
                "raw_gb": w * h * 576 * 576 * 2 / 1e9,
                "wall_s": time.time() - t0,
                "identical_events": report["identical_events"],
                "speedup_median": report["speedup_median"],
                **{name: {"time_to_result_s": data["time_to_result_s"],
                          "stages_s": {k: v.get("median") for k, v in data["stages_s"].items()}}
                   for name, data in wf.items()},
            }
            results["scans"][scan] = entry
            s, f = wf["streaming"]["time_to_result_s"], wf["file-transfer"]["time_to_result_s"]
            print(f"{scan}: streaming {s['median']:.2f} s [{s['min']:.2f}-{s['max']:.2f}, sd {s['stdev']:.2f}]"
                  f"  file {f['median']:.2f} s [{f['min']:.2f}-{f['max']:.2f}, sd {f['stdev']:.2f}]"
                  f"  ratio {report['speedup_median']:.2f}x  identical={report['identical_events']}",
                  flush=True)
            shutil.rmtree(work / scan, ignore_errors=True)
    finally:
        if args.output is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
