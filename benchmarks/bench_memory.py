"""Peak memory of every service while streaming a small and a large scan (counting on).

Real streaming sessions, driven through ``detstream.session`` (no Prefect), on scans of
different sizes (default 32x32, 96x96 and 128x128: 16x the frames from first to last),
counting on with one worker per node. For each service -- producers, aggregator, distributors, counting workers -- it reports
the kernel's high-water mark sampled from /proc (VmHWM; RssAnon = private memory), the peak
the service wrote in its own report (``peak_rss_mib``, a cross-check: VmHWM since c6d7e66,
before which it was ``ru_maxrss`` and floored at the launcher's size, since Linux carries a
process's high-water mark over exec), and the ratio large/small. The target
is flat: nothing a service holds should grow with the scan. A growth is then explained: the
distributor's per-position bookkeeping is O(positions) by design, and its part writer buffers
up to ``flush_every`` (4096) frames of sparse events before appending them to its file, so
it grows until a node's share passes a few times 4096 frames (the buffer, the flush's
temporary copies, and allocator fragmentation settling over the first flushes) and then stays
put: the middle scan, and the private memory over the second half of the largest scan, are
there to tell such a bounded growth from one that goes on.

Run: python benchmarks/bench_memory.py [--scans 32x32,96x96,128x128] [--nodes 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import _parse_scan, run_session, save_json  # noqa: E402

# A service whose peak grows by less than this between the two scans counts as flat: allocator
# noise is a few MiB, and how full the ZeroMQ queues get (HWM 64 messages of 162 KiB each per
# pipe: the aggregator has 4 in and one out per node) varies from run to run by some more.
# Scans too small to fill the queues or the part writer's buffer (the --quick sizes) cannot
# tell a bounded growth from an unbounded one.
FLAT_MIB = 10.0
FLAT_RATIO = 1.10


def service_peaks(run: dict) -> dict[str, dict]:
    """Per service: peak RSS from its own report and from the /proc samples (MiB)."""
    reports, samples = run["reports"], run["samples"]
    out: dict[str, dict] = {}

    def sampled(role: str) -> dict:
        recs = samples.get(role, [])
        return {"vm_hwm_mib": max((r.get("vm_hwm_mib", 0.0) for r in recs), default=None),
                "rss_anon_peak_mib": max((r.get("rss_anon_peak_mib", 0.0) for r in recs), default=None)}

    for name, rep in reports.items():
        role, _, ident = name.partition("-")
        if role == "producer":
            key, sample_role = f"producer-{rep['sector']}", f"producer-{rep['sector']}"
        elif role == "aggregator":
            key, sample_role = "aggregator", "aggregator"
        elif role == "distributor":
            node = rep["node_index"]
            key, sample_role = f"distributor-{node}", f"distributor-{node}"
            worker_recs = samples.get(f"worker@distributor-{node}", [])
            for i, peak in enumerate(rep.get("worker_peak_rss_mib", [])):
                rec = worker_recs[i] if i < len(worker_recs) else {}
                out[f"worker-{node}.{i}"] = {
                    "report_peak_rss_mib": peak, "vm_hwm_mib": rec.get("vm_hwm_mib"),
                    "rss_anon_peak_mib": rec.get("rss_anon_peak_mib")}
        else:
            continue
        out[key] = {"report_peak_rss_mib": rep.get("peak_rss_mib"), **sampled(sample_role)}
    return dict(sorted(out.items()))


def second_half_growth(run: dict) -> dict[str, dict]:
    """Per service, in one run: private memory (RssAnon) at the middle of the stream, and how
    much it rose after that, to the service's exit. Anything that holds frames or per-frame
    data keeps rising through the second half; bounded buffers have filled by then."""
    reports = run["reports"]
    t0 = min(r["first_send"] for k, r in reports.items() if k.startswith("producer-"))
    t1 = max(r["last_recv"] for k, r in reports.items() if k.startswith("distributor-"))
    mid = (t0 + t1) / 2
    out = {}
    for role, recs in run["samples"].items():
        if role == "etcd":
            continue
        for i, rec in enumerate(recs):
            series = [(s[0], s[4]) for s in rec.get("series", []) if s[4] > 0]
            before = [a for t, a in series if t <= mid]
            after = [a for t, a in series if t > mid]
            if not before or not after:
                continue
            if role.startswith("worker@distributor-"):
                name = f"worker-{role.rsplit('-', 1)[1]}.{i}"
            else:
                name = role if len(recs) == 1 else f"{role}.{i}"
            out[name] = {"anon_at_middle_mib": before[-1], "anon_peak_after_mib": max(after),
                         "growth_mib": max(after) - before[-1]}
    return dict(sorted(out.items()))


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print a summary and return the figures (for benchmarks/run_all.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", default="32x32,96x96,128x128",
                   help="comma-separated scan sizes, smallest first (default 32x32,96x96,128x128: "
                        "the last two both exceed the part writer's 4096-frame buffer on 2 nodes)")
    p.add_argument("--nodes", type=int, default=1,
                   help="compute nodes (default 1: the largest scan then passes 4 part-writer flushes)")
    p.add_argument("--workers", type=int, default=1, help="counting workers per node (default 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="sessions per scan size; the largest peak of each service is kept (default 1)")
    p.add_argument("--etcd", default=None, help="use this etcd instead of a private one")
    p.add_argument("--keep", type=Path, default=None, help="keep the session folders here")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from detstream.session import coordination

    scans = [_parse_scan(x) for x in args.scans.split(",") if x]
    if len(scans) < 2:
        p.error("give at least two scan sizes")
    labels = [f"{w}x{h}" for w, h in scans]
    frames = {lab: w * h for lab, (w, h) in zip(labels, scans)}
    result: dict = {
        "benchmark": "memory",
        "nodes": args.nodes,
        "workers_per_node": args.workers,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "scans": labels,
        "frames": frames,
        "runs": {lab: [] for lab in labels},
    }
    workdir = Path(tempfile.mkdtemp(prefix="detstream-bench-memory-"))
    try:
        with coordination(args.etcd, "/detstream-bench") as (endpoint, coord):
            for rep in range(args.repeats):
                for label, scan in zip(labels, scans):
                    run = run_session(scan=scan, nodes=args.nodes, counting=True, workdir=workdir,
                                      endpoint=endpoint, coord=coord, workers_per_node=args.workers)
                    summary = run["summary"]
                    if summary["frames_received"] != frames[label]:
                        raise RuntimeError(f"{label} scan: {summary['frames_received']} of "
                                           f"{frames[label]} frames received")
                    dists = [r for k, r in run["reports"].items() if k.startswith("distributor-")]
                    result["runs"][label].append({
                        "peaks": service_peaks(run),
                        "second_half_growth": second_half_growth(run),
                        "frames_received": summary["frames_received"],
                        "frames_counted": sum(d["frames_counted"] for d in dists),
                        "events": summary["events"],
                        "partial_positions": len(summary["partial_positions"]),
                        "throughput_gb_s": summary["throughput_gb_s"],
                        "wall_s": run["wall_s"],
                    })
                    if args.keep is None:
                        shutil.rmtree(run["spec"].session_dir, ignore_errors=True)
    finally:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for d in workdir.iterdir():
                shutil.move(str(d), args.keep / d.name)
        shutil.rmtree(workdir, ignore_errors=True)

    # Largest peak of each service over the repeats, per scan size.
    peaks: dict[str, dict] = {}
    for label, runs in result["runs"].items():
        for run in runs:
            for svc, fig in run["peaks"].items():
                cur = peaks.setdefault(svc, {}).setdefault(label, {})
                for k, v in fig.items():
                    if v is not None:
                        cur[k] = max(cur.get(k, 0.0), v)
    small, large, before = labels[0], labels[-1], labels[-2]
    services = {}
    for svc, by in peaks.items():
        row: dict = {"by_scan": by}
        for k in ("vm_hwm_mib", "rss_anon_peak_mib", "report_peak_rss_mib"):
            a, b, c = by.get(small, {}).get(k), by.get(large, {}).get(k), by.get(before, {}).get(k)
            if a and b:
                row[f"ratio_{k}"] = b / a
                row[f"growth_{k}"] = b - a
            if b and c:
                row[f"growth_last_step_{k}"] = b - c
        key = "vm_hwm_mib" if "ratio_vm_hwm_mib" in row else "report_peak_rss_mib"
        ratio, growth = row.get(f"ratio_{key}"), row.get(f"growth_{key}")
        last = row.get(f"growth_last_step_{key}")
        # In the largest scan: did the service's private memory still rise after mid-stream?
        halves = [r["second_half_growth"].get(svc) for r in result["runs"][large]]
        halves = [h for h in halves if h]
        row["second_half_growth_mib"] = max((h["growth_mib"] for h in halves), default=None)
        if halves:
            row["anon_at_middle_mib"] = halves[0]["anon_at_middle_mib"]
            row["anon_peak_after_mib"] = halves[0]["anon_peak_after_mib"]
        if ratio is None:
            row["verdict"] = "unknown"
        elif ratio <= FLAT_RATIO or growth <= FLAT_MIB:
            row["verdict"] = "flat"
        elif ((row["second_half_growth_mib"] is not None and row["second_half_growth_mib"] <= FLAT_MIB)
              or (len(labels) > 2 and last is not None and last <= FLAT_MIB)):
            # Grew with the scan at first, then stopped: within the largest run, or between the
            # two largest scans.
            row["verdict"] = "bounded"
        else:
            row["verdict"] = "GROWS"
        services[svc] = row
    result["services"] = services
    result["ratio_large_small"] = {svc: r.get("ratio_vm_hwm_mib") for svc, r in services.items()}
    result["all_flat_or_bounded"] = all(r["verdict"] in ("flat", "bounded") for r in services.values())
    events_per_frame = {lab: result["runs"][lab][0]["events"] / frames[lab] for lab in labels}
    result["events_per_frame"] = events_per_frame
    # What the distributor's part writer holds between appends by design (PartWriter
    # flush_every=4096 frames): the sparse events of min(frames per node, 4096) frames, 4 B each.
    result["part_writer_buffer_mib"] = {
        lab: min(-(-frames[lab] // args.nodes), 4096) * events_per_frame[lab] * 4 / 2**20 for lab in labels}

    print(f"peak memory per service (MiB, VmHWM): scans {', '.join(f'{lab} ({frames[lab]} frames)' for lab in labels)}; "
          f"counting on, {args.nodes} node(s) x {args.workers} worker(s)")
    head = "".join(f"{lab:>10s}" for lab in labels)
    print(f"  {'service':16s}{head} {'ratio':>7s} {'growth':>7s} {'last step':>9s}   "
          f"{'anon ' + small:>13s} {'anon ' + large:>13s} {'2nd half':>8s}   {'reported ' + large:>17s}  verdict")
    for svc, r in services.items():
        by = r["by_scan"]
        cells = "".join(f"{by.get(lab, {}).get('vm_hwm_mib', float('nan')):10.1f}" for lab in labels)

        def q(k, fmt):
            return format(r[k], fmt) if r.get(k) is not None else "-"
        print(f"  {svc:16s}{cells} {q('ratio_vm_hwm_mib', '7.2f'):>7s} {q('growth_vm_hwm_mib', '+7.1f'):>7s} "
              f"{q('growth_last_step_vm_hwm_mib', '+9.1f'):>9s}   "
              f"{by.get(small, {}).get('rss_anon_peak_mib', float('nan')):13.1f} "
              f"{by.get(large, {}).get('rss_anon_peak_mib', float('nan')):13.1f} "
              f"{q('second_half_growth_mib', '+8.1f'):>8s}   "
              f"{by.get(large, {}).get('report_peak_rss_mib', float('nan')):17.1f}  {r['verdict']}")
    pw = result["part_writer_buffer_mib"]
    print("  distributor part-writer event buffer by design (<= 4096 frames/node): " + ", ".join(
        f"{lab} {pw[lab]:.1f} MiB" for lab in labels) + f" ({events_per_frame[large]:.0f} events/frame)")
    print(f"  flat: ratio <= {FLAT_RATIO} or growth <= {FLAT_MIB:g} MiB; bounded: grew with the scan, but by "
          f"<= {FLAT_MIB:g} MiB from {before} to {large} ('last step') or over the second half of the {large} "
          f"scan ('2nd half', private memory). "
          f"{'No service grows with the scan.' if result['all_flat_or_bounded'] else 'SOME SERVICE GROWS WITH THE SCAN.'}")
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
