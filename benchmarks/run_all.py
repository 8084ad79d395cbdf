"""Run every benchmark, print a table, save the figures, and print a block for RESULTS.md.

Each benchmark is a module in this folder with ``main(argv=None) -> dict``. To add one, append
a ``Benchmark`` to ``BENCHMARKS`` (and, optionally, a formatter to ``FORMATTERS`` for its
table row and markdown; without one a generic summary of its top-level figures is used).

Writes benchmarks/out/results-<date>.json (git-ignored). Run: python benchmarks/run_all.py
[--only pipeline,memory] [--quick] [--out DIR]. ``make bench`` runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    argv: tuple[str, ...] = ()
    quick_argv: tuple[str, ...] = ()  # a smoke run of a few seconds, for checking the harness
    description: str = ""


BENCHMARKS: list[Benchmark] = [
    Benchmark("counting", "bench_counting", (), ("--frames", "50", "--repeats", "1", "--pool", "8"),
              "counting kernel vs stempy, frames/s on one core"),
    Benchmark("pipeline", "bench_pipeline", (), ("--scan", "16x16", "--repeats", "1"),
              "end-to-end throughput, counting off, vs a raw single pyzmq hop"),
    Benchmark("memory", "bench_memory", (), ("--quick",),
              "peak RSS of every process, the orchestrator's included, 32x32 vs 64x64 vs 256x256, counting on"),
    Benchmark("compare", "bench_compare", (), ("--scans", "8x8", "--repeat", "1"),
              "streaming vs file transfer, time to counted result (64x64 and 128x128, 3 runs each)"),
    Benchmark("faults", "bench_faults", (), ("--scan", "24x24", "--after", "64"),
              "fault table: frames lost, time to detection and to the session's end, per fault"),
    Benchmark("delivery", "bench_delivery", (), ("--scan", "16x16", "--repeats", "1", "--counting", "off"),
              "acknowledged delivery (acks, window, segments) vs fire-and-forget, CPU s per GB"),
    Benchmark("slurm", "bench_slurm", (), ("--repeats", "1"),
              "job start latency on a private 4-node Slurm cluster (submit -> every distributor registered) vs local"),
    Benchmark("live", "bench_live", (), ("--scan", "16x16", "--repeats", "1"),
              "live virtual images on vs off, counting on: CPU s per GB and GB/s"),
    Benchmark("specimen", "bench_specimen", (), ("--scan", "16x16", "--repeats", "1", "--passes", "1"),
              "simulator frames/s per core vs the counting pipeline's; the nodes' centre of mass vs their CPU"),
    Benchmark("security", "bench_security", (), ("--scan", "16x16", "--repeats", "1"),
              "CURVE on every ZeroMQ hop vs --security none, CPU s per GB and GB/s"),
    Benchmark("dataplane", "bench_dataplane", (),
              ("--tiny-scan", "32x32", "--full-scan", "16x16", "--batches", "1,64", "--shards", "1,2",
               "--count-frames", "200"),
              "capacity model: each stage's CPU s per GB and rates per core, batching, shards, cores for the camera"),
]


# --------------------------------------------------------------------------- machine
def machine_info() -> dict:
    info: dict = {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                               platform.processor())
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        info["memory_gib"] = None
    for mod, attr in (("numpy", "__version__"), ("zmq", "__version__"), ("numba", "__version__"),
                      ("h5py", "__version__"), ("stempy", "__version__")):
        try:
            info[mod if mod != "zmq" else "pyzmq"] = getattr(importlib.import_module(mod), attr, "unknown")
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    try:
        import zmq

        info["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    try:
        load = os.getloadavg()
        info["load_average_at_start"] = [round(x, 2) for x in load]
    except OSError:
        pass
    return info


def machine_markdown(m: dict, date: str) -> str:
    versions = ", ".join(f"{k} {m[k]}" for k in ("python", "numpy", "pyzmq", "libzmq", "numba", "h5py", "stempy")
                         if m.get(k))
    return (f"- date: {date}\n"
            f"- CPU: {m.get('cpu')}, {m.get('cores')} cores; memory {m.get('memory_gib')} GiB; "
            f"Linux {m.get('kernel')}\n"
            f"- {versions}\n"
            f"- load average when the run started: {m.get('load_average_at_start')} (a shared machine: "
            "every figure is a ratio against a baseline measured in the same script)")


# --------------------------------------------------------------------------- formatters
def _fmt_counting(r: dict) -> tuple[str, str]:
    head = f"detstream {r['detstream_fps']:.0f} frames/s vs stempy {r['stempy_fps']:.0f} ({r['ratio']:.1f}x)"
    rows = ["| mode | events/frame | stempy frames/s | detstream frames/s | ratio |", "|---|---|---|---|---|"]
    for mode, m in r["modes"].items():
        rows.append(f"| {mode} | {m['events_per_frame']:.0f} | {m['stempy_fps']:.0f} | {m['detstream_fps']:.0f} "
                    f"| {m['ratio']:.1f}x |")
    md = (f"One core, {r['frame_shape'][0]}x{r['frame_shape'][1]} frames, {r['frames']} per pass, best of "
          f"{r['repeats']}; baseline: stempy.image.electron_count_frame (stempy {r.get('stempy_version')}) "
          f"on the same frames, after checking both find the same events.\n\n" + "\n".join(rows))
    return head, md


def _fmt_pipeline(r: dict) -> tuple[str, str]:
    base = r["baseline"]
    head = "; ".join(f"{n} node(s) {v['gb_s']:.2f} GB/s = {v['ratio']:.2f}x single hop ({base['gb_s']:.2f})"
                     for n, v in r["pipeline"].items())
    rows = ["| run | GB/s | frames/s | ratio to single hop | CPU s per GB |", "|---|---|---|---|---|",
            f"| raw PUSH/PULL, one hop (baseline) | {base['gb_s']:.2f} | {base['frames_per_s']:.0f} | 1.00 "
            f"| {base['cpu_s_per_gb']:.2f} |"]
    for n, v in r["pipeline"].items():
        rows.append(f"| pipeline, {n} node(s) | {v['gb_s']:.2f} | {v['frames_per_s']:.0f} | {v['ratio']:.2f} "
                    f"| {v['cpu_s_per_gb']:.2f} |")
    md = (f"{r['scan']} scan ({r['frames']} frames, {r['frames'] * 4 * 165888 / 1e9:.2f} GB), median of "
          f"{r['repeats']} runs interleaved with the baseline; target ratio >= {r['target_ratio']}: "
          f"{'met' if r['meets_target'] else 'not met'}.\n\n" + "\n".join(rows))
    stage_rows = ["| pipeline | per service: CPU s per GB moved (main thread + I/O threads) | machine busy cores: "
                  "ours / others | ours waiting for a CPU (cores) |", "|---|---|---|---|"]
    for n, v in r["pipeline"].items():
        cpu = v["median_run"]["cpu"]
        gb_s = v["median_run"]["gb_s"]
        per = "; ".join(f"{role} {c['cores'] / gb_s:.2f} ({c['main_thread_cores'] / gb_s:.2f}+"
                        f"{c['other_threads_cores'] / gb_s:.2f})" for role, c in cpu.items() if role != "all")
        a = cpu["all"]
        stage_rows.append(f"| {n} node(s) | {per} | {a['cores']:.2f} / {a['others_cores']:.2f} "
                          f"| {a['runqueue_wait_cores']:.2f} |")
    md += "\n\nWhere the CPU goes (the median run):\n\n" + "\n".join(stage_rows)
    bound_rows = ["| pipeline | rate at which each service's busiest thread would fill a core (GB/s) |", "|---|---|"]
    for n, v in r["pipeline"].items():
        tb = v["median_run"].get("thread_bound_gb_s", {})
        bound_rows.append(f"| {n} node(s) | " + "; ".join(f"{role} {b['gb_s']:.1f} ({b['thread']} thread)"
                                                       for role, b in tb.items()) + " |")
    md += "\n\n" + "\n".join(bound_rows)
    return head, md


def _fmt_memory(r: dict) -> tuple[str, str]:
    labels = r["scans"]
    svc = r["services"]
    off = [k for k, v in svc.items() if v["verdict"] != "flat"]
    head = (f"{labels[0]} -> {labels[-1]}: " + ("every process flat within 5 %" if not off
                                                 else f"beyond 5 %: {', '.join(off)}"))
    second = len(labels) > 2
    rows = ["| process | " + " | ".join(f"{lab} (MiB)" for lab in labels) + f" | ratio {labels[-1]}/{labels[0]} "
            + (f"| ratio {labels[-1]}/{labels[1]} " if second else "")
            + f"| the process's own report, {labels[-1]} (MiB) | verdict |",
            "|---|" + "---|" * (len(labels) + 3 + second)]
    for name, v in svc.items():
        cells = " | ".join(f"{v['by_scan'].get(lab, {}).get('vm_hwm_mib', float('nan')):.1f}" for lab in labels)
        ratio, from2 = v.get("ratio_vm_hwm_mib"), v.get("ratio_from_second")
        ru = v["by_scan"].get(labels[-1], {}).get("report_peak_rss_mib")
        rows.append(f"| {name} | {cells} | {f'{ratio:.3f}' if ratio else '-'} | "
                    + (f"{f'{from2:.3f}' if from2 else '-'} | " if second else "")
                    + f"{f'{ru:.1f}' if ru else '-'} | {v['verdict']} |")
    scans = ", ".join(f"{lab} ({r['frames'][lab]} frames)" for lab in labels)
    md = (f"Peak RSS (VmHWM) per process, counting on ({r.get('counting_mode', 'threads')}), {r['nodes']} node(s) x "
          f"{r['workers_per_node']} worker(s); scans {scans}.\n\n" + "\n".join(rows))
    return head, md


def _fmt_compare(r: dict) -> tuple[str, str]:
    rows = ["| scan | raw GB | streaming s, median (min-max, sd) | file transfer s, median (min-max, sd) | ratio | identical events |",
            "|---|---|---|---|---|---|"]
    heads = []
    for scan, e in r["scans"].items():
        s, f = e["streaming"]["time_to_result_s"], e["file-transfer"]["time_to_result_s"]
        def cell(t):
            return f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}, {t['stdev']:.1f})"
        rows.append(f"| {scan} | {e['raw_gb']:.1f} | {cell(s)} | {cell(f)} | {e['speedup_median']:.1f}x | "
                    f"{e['identical_events']} |")
        heads.append(f"{scan} {e['speedup_median']:.1f}x")
    md = (f"Time from the first frame produced to the counted HDF5 closed, {r['repeat']} runs of each "
          f"workflow alternating, {r['nodes']} nodes.\n\n" + "\n".join(rows))
    return "streaming vs file: " + ", ".join(heads), md


def _fmt_delivery(r: dict) -> tuple[str, str]:
    head = "; ".join(f"{mode}: acks cost {m['cpu_cost']:+.1%} CPU s/GB" for mode, m in r["modes"].items())
    rows = ["| counting | acks | CPU s per GB (to exit) | CPU s per GB (streaming) | GB/s | window peak (frames) |",
            "|---|---|---|---|---|---|"]
    for mode, m in r["modes"].items():
        for label in ("off", "on"):
            v = m[label]
            rows.append(f"| {mode} | {label} | {v['cpu_s_per_gb']:.2f} | {v['cpu_s_per_gb_streaming']:.2f} "
                        f"| {v['gb_s']:.2f} | {v['window_peak'] if v['window_peak'] is not None else '-'} |")
    costs = "\n".join(f"- {mode}: {m['cpu_cost']:+.1%} CPU s/GB (pairs: "
                       f"{', '.join(f'{c:+.1%}' for c in m['pair_costs'])}); per service off -> on: "
                       + "; ".join(f"{role} {v['off']:.2f} -> {v['on']:.2f}"
                                   for role, v in m["per_role_cpu_s_per_gb"].items())
                       for mode, m in r["modes"].items())
    md = (f"{r['scan']} scan, {r['nodes']} nodes, acks on/off alternating, median of {r['repeats']}; "
          f"target at most {r['target_cost']:.0%} more CPU per GB: {'met' if r['meets_target'] else 'not met'}."
          f"\n\n" + "\n".join(rows) + "\n\n" + costs)
    return head, md


def _fmt_dataplane(r: dict) -> tuple[str, str]:
    c = r.get("capacity")
    head = (f"pipeline {c['pipeline_to_floor']:.2f}x floor, {c['cores_for_camera']:.0f} cores for 87k frames/s"
            if c else "partial run")
    rows = ["| transport | batch | aggregator: tiny blocks/s per core | aggregator GB/s per core | of a raw hop's |",
            "|---|---|---|---|---|"]
    for a in r.get("aggregator", []):
        if a["what"] == "raw hop":
            rows.append(f"| {a['transport']} | raw hop | {a['blocks_per_core_s']:,.0f} | {a['full']['gb_per_core_s']:.2f} | 1.00 |")
        else:
            rows.append(f"| {a['transport']} | {a['batch']} | {a['blocks_per_core_s']:,.0f} | "
                        f"{a['full']['gb_per_core_s']:.2f} | {a['gb_ratio_to_hop']:.2f} |")
    counting = "\n".join(f"- counting in {k['mode']}, {k['workers']} worker(s): {k['frames_per_core_s']:,.0f} frames/s per core"
                          for k in r.get("counting", []))
    shards = "\n".join(f"- {k['shards']} aggregator shard(s): {k['cpu_s_per_gb']:.3f} CPU-s/GB ({k['scaling']:.2f} of linear)"
                        for k in r.get("shards", []))
    model = ""
    if c:
        model = ("| stage | CPU-s per GB | cores for 87,000 frames/s |\n|---|---|---|\n" + "\n".join(
            f"| {name} | {v['cpu_s_per_gb']:.3f} | {v['cores_for_camera']:.0f} |" for name, v in c["stages"].items())
            + f"\n| **pipeline** (floor {c['floor_cpu_s_per_gb']:.2f}: {c['pipeline_to_floor']:.2f}x) | "
              f"{c['pipeline_cpu_s_per_gb']:.2f} | {c['cores_for_camera']:.0f} |")
    return head, "\n\n".join(x for x in ("\n".join(rows), counting, shards, model) if x)


def _fmt_slurm(r: dict) -> tuple[str, str]:
    if "skipped" in r:
        return r["skipped"], r["skipped"]
    reg, run = r["median_to_registered_s"], r["median_to_running_s"]
    head = (f"start, {r['nodes']} nodes: slurm {reg['slurm']:.2f} s vs local {reg['local']:.2f} s "
            f"({r['slurm_over_local']:.2f}x)")
    rows = ["| backend | submit -> job running (s) | submit -> every distributor registered (s), median (min-max) |",
            "|---|---|---|"]
    for name in ("local", "slurm"):
        lo, hi = r["range_to_registered_s"][name]
        rows.append(f"| {name} | {run[name]:.2f} | {reg[name]:.2f} ({lo:.2f}-{hi:.2f}) |")
    cold = r["slurm_cold"]
    md = (f"{r['nodes']} nodes, median of {r['repeats']} runs each, alternating; the cluster (munge, slurmctld, "
          f"{r['nodes']} slurmd) started in {r['cluster_start_s']:.2f} s; the first Slurm job after it "
          f"(cold): {cold['to_running_s']:.2f} s to running, {cold['to_registered_s']:.2f} s to registered."
          f"\n\n" + "\n".join(rows))
    return head, md


def _fmt_live(r: dict) -> tuple[str, str]:
    head = f"live images cost {r['cpu_cost']:+.1%} CPU s/GB, {r['gb_s_change']:+.1%} GB/s"
    rows = ["| live images | CPU s per GB (data plane) | distributors + workers CPU s per GB | GB/s | frames/s "
            "| redraws | orchestrator CPU s drawing |", "|---|---|---|---|---|---|---|"]
    for label in ("off", "on"):
        v = r[label]
        rows.append(f"| {label} | {v['cpu_s_per_gb']:.3f} | {v['distributor_cpu_s_per_gb']:.3f} | {v['gb_s']:.3f} "
                    f"| {v['frames_per_s']:.0f} | {v['draws']:.0f} | {v['draw_cpu_s']:.2f} |")
    md = (f"{r['scan']} scan, {r['nodes']} nodes, counting on, live on/off alternating, median of {r['repeats']}, "
          f"nodes publish every {r['interval_s'] / 2:g} s, redraw every {r.get('redraw_s', r['interval_s']):g} s; target at most {r['target_cost']:.0%} more CPU per GB: "
          f"{'met' if r['meets_target'] else 'not met'}.\n\n" + "\n".join(rows) + "\n\n"
          f"- cost: {r['cpu_cost']:+.1%} CPU s/GB of the data plane (pairs: "
          f"{', '.join(f'{c:+.1%}' for c in r['pair_costs'])}); distributors alone {r['distributor_cost']:+.1%}; "
          f"GB/s {r['gb_s_change']:+.1%}\n- the orchestrator's drawing (where the flow runs, not on the nodes): "
          f"{r['draw_share']:.1%} of the data plane's CPU")
    return head, md


FORMATTERS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "slurm": _fmt_slurm,
    "live": _fmt_live,
    "dataplane": _fmt_dataplane,
    "delivery": _fmt_delivery,
    "counting": _fmt_counting,
    "pipeline": _fmt_pipeline,
    "memory": _fmt_memory,
    "compare": _fmt_compare,
}


def _generic(r: dict) -> tuple[str, str]:
    scalars = {k: v for k, v in r.items() if isinstance(v, (int, float, str, bool))}
    head = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(scalars.items())[:6])
    md = "\n".join(f"- {k}: {v}" for k, v in scalars.items())
    return head, md


# --------------------------------------------------------------------------- main
@dataclass
class Outcome:
    bench: Benchmark
    seconds: float
    result: Optional[dict] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny runs, to check the harness only")
    p.add_argument("--out", type=Path, default=HERE / "out", help="where results-<date>.json goes")
    args = p.parse_args(argv)

    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {b.name for b in BENCHMARKS}
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {[b.name for b in BENCHMARKS]}")
    selected = [b for b in BENCHMARKS if not wanted or b.name in wanted]
    date = dt.date.today().isoformat()
    machine = machine_info()
    outcomes: list[Outcome] = []
    for bench in selected:
        argv_b = list(bench.quick_argv if args.quick else bench.argv)
        print(f"\n=== {bench.name}: {bench.description} ({bench.module} {' '.join(argv_b)})", flush=True)
        t0 = time.monotonic()
        try:
            result = importlib.import_module(bench.module).main(argv_b)
            outcomes.append(Outcome(bench, time.monotonic() - t0, result=result))
        except (Exception, SystemExit) as err:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            outcomes.append(Outcome(bench, time.monotonic() - t0, error=f"{type(err).__name__}: {err}"))

    print("\n=== summary")
    print(f"  {'benchmark':10s} {'time':>7s}  result")
    blocks = []
    for o in outcomes:
        if o.error:
            print(f"  {o.bench.name:10s} {o.seconds:6.0f}s  FAILED: {o.error}")
            blocks.append(f"### {o.bench.name} ({o.bench.module}.py)\n\nFailed: {o.error}")
            continue
        head, md = FORMATTERS.get(o.bench.name, _generic)(o.result)
        print(f"  {o.bench.name:10s} {o.seconds:6.0f}s  {head}")
        blocks.append(f"### {o.bench.description or o.bench.name} ({o.bench.module}.py, {o.seconds:.0f} s)\n\n{md}")

    report = {
        "date": date,
        "quick": args.quick,
        "machine": machine,
        "benchmarks": {o.bench.name: {"module": o.bench.module, "argv": list(o.bench.quick_argv if args.quick
                                                                               else o.bench.argv),
                                      "seconds": o.seconds, "error": o.error, "result": o.result}
                       for o in outcomes},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results-{date}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")

    markdown = f"## Results {date}\n\n{machine_markdown(machine, date)}\n\n" + "\n\n".join(blocks)
    print("\n--- markdown for benchmarks/RESULTS.md ---\n")
    print(markdown)
    print("\n--- end ---")
    report["markdown"] = markdown
    if any(o.error for o in outcomes):
        report["failed"] = [o.bench.name for o in outcomes if o.error]
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(1 if rep.get("failed") else 0)
