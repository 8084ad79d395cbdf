"""Peak memory of every process of a streaming session, the orchestrator's included, small vs large scan.

Real streaming sessions with counting on, driven through ``detstream.session`` (no Prefect) by an
orchestrator process of their own: the process that opens the session, follows the nodes, draws
the live images, merges the nodes' parts into counted.h5 and writes the summary and the final
PNGs (what the flow's process does). Default scans 32x32, 64x64 and 256x256 (64x the frames from
first to last; 256x256 streams ~43 GB). For each process -- orchestrator, producers, aggregator,
distributors, counting workers (``--counting-mode processes``; in the default ``threads`` the
counting runs inside the distributor) -- it reports the kernel's high-water mark sampled from /proc
(VmHWM; RssAnon = private memory), the peak the process reported itself (``peak_rss_mib``), and
the ratio large/small. The target (issue #10) is flat within +-5 %: nothing a process holds may
grow with the scan. The orchestrator also reports its peak per step (streaming; merge + summary +
figures), the high-water mark reset between them (/proc/self/clear_refs), and with ``--trace``
where its main thread was when its RSS peaked in each step, to find what grows.

Run: python benchmarks/bench_memory.py [--scans 32x32,64x64,256x256] [--nodes 1] [--quick]
     [--counting-mode threads|processes] [--trace] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from harness import ProcessSampler, parse_scan, run_session, save_json, service_role

TARGET_RATIO = 1.05  # issue #10: flat within +-5 % from 32x32 to 256x256
ORCHESTRATOR_FLAG = "--orchestrate"


def _status_mib(fields=("VmHWM", "VmRSS", "RssAnon")) -> dict[str, float]:
    """This process's /proc/self/status memory fields, in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                out[key] = int(line.split()[1]) / 1024.0
    return out


class PeakLocator:
    """A thread that reads this process's RSS every few ms and, at each new maximum, keeps where
    the main thread was: the line of our code that holds the peak (--trace)."""

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.interval_s = interval_s
        self.main = threading.main_thread().ident
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-locator", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.peak_mib, self.where, self.steps = 0.0, [], []

    @staticmethod
    def _ours(stack) -> str:
        """The innermost frame of detstream's own code in a stack (else the innermost)."""
        for f in reversed(stack):
            if "/detstream/" in f.filename:
                return f"{Path(f.filename).name}:{f.lineno} {f.name}"
        return f"{Path(stack[-1].filename).name}:{stack[-1].lineno}" if stack else "?"

    def _loop(self) -> None:
        import traceback

        while not self._stop.wait(self.interval_s):
            rss = _status_mib(("VmRSS",)).get("VmRSS", 0.0)
            if rss > self.peak_mib:
                frame = sys._current_frames().get(self.main)
                stack = traceback.extract_stack(frame) if frame is not None else []
                if rss > self.peak_mib + 4 or not self.steps:  # the climb, in steps of 4 MiB
                    self.steps.append(f"{rss:.0f} MiB at {self._ours(stack)}")
                self.peak_mib = rss
                self.where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[-8:]]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


def _reset_hwm() -> bool:
    """Start this process's VmHWM afresh (Linux >= 4.0), so that each step has its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the orchestrator
def orchestrate(job_path: Path) -> None:
    """Child process: run one session (this process is its orchestrator) and write what it saw."""
    from detstream.session import coordination

    job = json.loads(job_path.read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # close() the session on the way out
    tracing = job.get("trace")
    locator = PeakLocator() if tracing else None
    steps: dict[str, dict] = {}

    def on_phase(name: str) -> None:
        step = {**{k.lower() + "_mib": v for k, v in _status_mib().items()}, "t": time.time()}
        if locator is not None:
            step["peak_rss_seen_mib"], step["peak_at"] = locator.peak_mib, locator.where
            step["climb"] = locator.steps
            locator.reset()
        steps[name] = step
        _reset_hwm()

    with coordination(job.get("etcd"), "/detstream-bench") as (endpoint, coord):
        run = run_session(scan=tuple(job["scan"]), nodes=job["nodes"], counting=True,
                          workdir=Path(job["workdir"]), endpoint=endpoint, coord=coord,
                          workers_per_node=job["workers"], sample=False, timeout_s=job["timeout_s"],
                          spec_fields={"counting_mode": job["counting_mode"]}, on_phase=on_phase)
    out = {"summary": run["summary"], "reports": run["reports"], "wall_s": run["wall_s"],
           "session_dir": str(run["spec"].session_dir), "steps": steps}
    Path(job["out"]).write_text(json.dumps(out, default=str))


def _classify_with_orchestrator(cmdline: list[str], parent_role: Optional[str]) -> Optional[str]:
    if parent_role == "orchestrator" and _is_orchestrator(cmdline):
        return None  # a service forked by the orchestrator, not yet exec'd: asked again later
    if _is_orchestrator(cmdline):
        return "orchestrator"
    return service_role(cmdline, parent_role)


def _is_orchestrator(cmdline: list[str]) -> bool:
    """This script's session process, or `detstream run`: the flow's own process (--via cli)."""
    return ORCHESTRATOR_FLAG in cmdline or (
        "run" in cmdline[1:3] and any(Path(a).name == "detstream" for a in cmdline[:2]))


def run_orchestrated(*, scan: tuple[int, int], nodes: int, workers: int, counting_mode: str,
                     workdir: Path, etcd: Optional[str], trace: bool, timeout_s: float,
                     via: str = "session") -> dict:
    """One session run by an orchestrator process of its own, every process sampled from /proc:
    this script driving ``detstream.session`` (``via="session"``), or ``detstream run``, the CLI
    running the Prefect flow with its temporary Prefect server (``via="cli"``)."""
    job_path = Path(tempfile.mkstemp(prefix="job-", suffix=".json", dir=workdir)[1])
    out_path = job_path.with_suffix(".out.json")
    job_path.write_text(json.dumps({"scan": scan, "nodes": nodes, "workers": workers, "etcd": etcd,
                                    "counting_mode": counting_mode, "workdir": str(workdir),
                                    "trace": trace, "timeout_s": timeout_s, "out": str(out_path)}))
    if via == "cli":
        argv = [str(Path(sys.executable).parent / "detstream"), "run", "--scan", f"{scan[0]}x{scan[1]}",
                "--nodes", str(nodes), "--workers-per-node", str(workers), "--output", str(workdir),
                "--json", str(out_path), *(["--etcd", etcd] if etcd else [])]
    else:
        argv = [sys.executable, __file__, ORCHESTRATOR_FLAG, str(job_path)]
    t0 = time.time()
    log_path = job_path.with_suffix(".log")
    with ProcessSampler(classify=_classify_with_orchestrator) as sampler, open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout_s + 120)
        finally:
            if proc.poll() is None:
                proc.terminate()  # its session closes: no service is left behind
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"the orchestrator of the {scan[0]}x{scan[1]} session exited {rc}:\n  "
                           + "\n  ".join(tail))
    run = json.loads(out_path.read_text())
    for p in (job_path, out_path, log_path):
        p.unlink()
    if via == "cli":  # the flow's summary: the reports are in its session folder
        folder = Path(run["outputs"]["summary"]).parent
        run = {"summary": run, "session_dir": str(folder), "steps": {}, "wall_s": time.time() - t0,
               "reports": {p.stem: json.loads(p.read_text()) for p in sorted((folder / "services").glob("*.json"))}}
    run["samples"] = sampler.by_role()
    return run


# --------------------------------------------------------------------------- figures
def service_peaks(run: dict) -> dict[str, dict]:
    """Per process: peak RSS from its own report and from the /proc samples (MiB)."""
    reports, samples = run["reports"], run["samples"]
    out: dict[str, dict] = {}

    def sampled(role: str) -> dict:
        recs = samples.get(role, [])
        return {"vm_hwm_mib": max((r.get("vm_hwm_mib", 0.0) for r in recs), default=None),
                "rss_anon_peak_mib": max((r.get("rss_anon_peak_mib", 0.0) for r in recs), default=None)}

    for name, rep in reports.items():
        role, _, ident = name.partition("-")
        if role == "producer":
            key = sample_role = f"producer-{rep['sector']}"
        elif role == "aggregator":
            key = sample_role = "aggregator" if rep.get("shard", 0) == 0 else f"aggregator-{rep['shard']}"
        elif role == "distributor":
            node = rep["node_index"]
            key = sample_role = f"distributor-{node}"
            worker_recs = samples.get(f"worker@distributor-{node}", [])
            # Counting threads report the distributor's own peak: worker processes only.
            for i, peak in enumerate(rep.get("worker_peak_rss_mib", []) if worker_recs else []):
                rec = worker_recs[i] if i < len(worker_recs) else {}
                out[f"worker-{node}.{i}"] = {
                    "report_peak_rss_mib": peak, "vm_hwm_mib": rec.get("vm_hwm_mib"),
                    "rss_anon_peak_mib": rec.get("rss_anon_peak_mib")}
        else:
            continue
        out[key] = {"report_peak_rss_mib": rep.get("peak_rss_mib"), **sampled(sample_role)}
    # The orchestrator resets its high-water mark between steps: its own figures are the exact
    # peaks, the samples (every 0.2 s) a cross-check.
    steps = run.get("steps", {})
    own = max((s.get("vmhwm_mib", 0.0) for s in steps.values()), default=None)
    orch = sampled("orchestrator")
    out["orchestrator"] = {"report_peak_rss_mib": own,
                           "vm_hwm_mib": max(v for v in (own, orch["vm_hwm_mib"]) if v is not None) if (own or orch["vm_hwm_mib"]) else None,
                           "rss_anon_peak_mib": orch["rss_anon_peak_mib"],
                           "steps": {k: s.get("vmhwm_mib") for k, s in steps.items()}}
    return dict(sorted(out.items()))


def second_half_growth(run: dict) -> dict[str, dict]:
    """Per process, in one run: private memory (RssAnon) at the middle of the stream, and how
    much it rose after that, to the end of the stream. Anything that holds frames or per-frame
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
            series = [(s[0], s[4]) for s in rec.get("series", []) if s[4] > 0 and s[0] <= t1]
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


def verdicts(result: dict, labels: list[str]) -> dict[str, dict]:
    """Per process: its peak per scan, the ratio largest/smallest, and whether it meets the target."""
    peaks: dict[str, dict] = {}
    for label in labels:
        for run in result["runs"][label]:  # the largest peak over the repeats
            for svc, fig in run["peaks"].items():
                cur = peaks.setdefault(svc, {}).setdefault(label, {})
                for k, v in fig.items():
                    if isinstance(v, (int, float)):
                        cur[k] = max(cur.get(k, 0.0), v)
                    elif k == "steps":
                        cur[k] = v
    small, large = labels[0], labels[-1]
    services = {}
    for svc, by in peaks.items():
        row: dict = {"by_scan": by}
        for k in ("vm_hwm_mib", "rss_anon_peak_mib", "report_peak_rss_mib"):
            a, b = by.get(small, {}).get(k), by.get(large, {}).get(k)
            if a and b:
                row[f"ratio_{k}"] = b / a
                row[f"growth_{k}"] = b - a
        # From the second scan: a scan long enough for every in-flight buffer (the window, the
        # ZeroMQ queues, the producers' batch buffers) to have filled, as the smallest may not be.
        a, b = by.get(labels[1], {}).get("vm_hwm_mib"), by.get(large, {}).get("vm_hwm_mib")
        if len(labels) > 2 and a and b:
            row["ratio_from_second"] = b / a
        halves = [r["second_half_growth"].get(svc) for r in result["runs"][large]]
        halves = [h for h in halves if h]
        row["second_half_growth_mib"] = max((h["growth_mib"] for h in halves), default=None)
        ratio, from_second = row.get("ratio_vm_hwm_mib"), row.get("ratio_from_second")
        if ratio is None:
            row["verdict"] = "unknown"
        elif 1 / TARGET_RATIO <= ratio <= TARGET_RATIO:
            row["verdict"] = "flat"
        elif from_second is not None and 1 / TARGET_RATIO <= from_second <= TARGET_RATIO:
            row["verdict"] = "flat once filled"  # the smallest scan ended before its buffers filled
        else:
            row["verdict"] = "GROWS"
        services[svc] = row
    return services


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print a summary and return the figures (for benchmarks/run_all.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", default="32x32,64x64,256x256",
                   help="comma-separated scan sizes, smallest first (default 32x32,64x64,256x256: "
                        "the ratios are the largest against the smallest and against the second)")
    p.add_argument("--quick", action="store_true", help="a smoke test: scans 8x8,16x16")
    p.add_argument("--nodes", type=int, default=1, help="compute nodes (default 1)")
    p.add_argument("--workers", type=int, default=1, help="counting workers per node (default 1)")
    p.add_argument("--counting-mode", choices=("threads", "processes"), default="threads",
                   help="counting in the distributor's threads (default) or in worker processes")
    p.add_argument("--repeats", type=int, default=1,
                   help="sessions per scan size; the largest peak of each process is kept (default 1)")
    p.add_argument("--trace", action="store_true",
                   help="find where the orchestrator's RSS peaks in each step (its main thread's stack)")
    p.add_argument("--via", choices=("session", "cli"), default="session",
                   help="the orchestrator: this script driving detstream.session (default; its peak per "
                        "step), or `detstream run` (the Prefect flow, with its temporary Prefect server)")
    p.add_argument("--etcd", default=None, help="use this etcd instead of a private one per session")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per session (default 1800)")
    p.add_argument("--keep", type=Path, default=None, help="keep the session folders here")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.scans = "8x8,16x16"

    scans = [parse_scan(x) for x in args.scans.split(",") if x]
    if len(scans) < 2:
        p.error("give at least two scan sizes")
    labels = [f"{w}x{h}" for w, h in scans]
    frames = {lab: w * h for lab, (w, h) in zip(labels, scans)}
    result: dict = {
        "benchmark": "memory", "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "nodes": args.nodes, "workers_per_node": args.workers, "counting_mode": args.counting_mode,
        "via": args.via,
        "repeats": args.repeats, "python": platform.python_version(), "scans": labels,
        "frames": frames, "runs": {lab: [] for lab in labels},
    }
    workdir = Path(tempfile.mkdtemp(prefix="detstream-bench-memory-"))
    try:
        for _ in range(args.repeats):
            for label, scan in zip(labels, scans):
                run = run_orchestrated(scan=scan, nodes=args.nodes, workers=args.workers,
                                       counting_mode=args.counting_mode, workdir=workdir,
                                       etcd=args.etcd, trace=args.trace, timeout_s=args.timeout,
                                       via=args.via)
                summary = run["summary"]
                if summary["frames_counted"] != frames[label]:
                    raise RuntimeError(f"{label} scan: {summary['frames_counted']} of "
                                       f"{frames[label]} frames counted")
                result["runs"][label].append({
                    "peaks": service_peaks(run),
                    "second_half_growth": second_half_growth(run),
                    "orchestrator_steps": run["steps"],
                    "frames_counted": summary["frames_counted"],
                    "events": summary["events"],
                    "bytes_moved": summary["bytes_moved"],
                    "partial_positions": len(summary["partial_positions"]),
                    "throughput_gb_s": summary["throughput_gb_s"],
                    "wall_s": run["wall_s"],
                })
                if args.keep is None:
                    shutil.rmtree(run["session_dir"], ignore_errors=True)
                print(f"  {label}: {frames[label]} frames, {summary['bytes_moved'] / 1e9:.1f} GB in "
                      f"{run['wall_s']:.0f} s", flush=True)
    finally:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for d in workdir.iterdir():
                shutil.move(str(d), args.keep / d.name)
        shutil.rmtree(workdir, ignore_errors=True)

    services = result["services"] = verdicts(result, labels)
    result["ratio_large_small"] = {svc: r.get("ratio_vm_hwm_mib") for svc, r in services.items()}
    result["all_flat"] = all(r["verdict"] == "flat" for r in services.values())
    small, large = labels[0], labels[-1]
    print(f"peak memory per process (MiB, VmHWM): scans {', '.join(f'{lab} ({frames[lab]} frames)' for lab in labels)}; "
          f"counting on ({args.counting_mode}), {args.nodes} node(s) x {args.workers} worker(s)")
    head = "".join(f"{lab:>10s}" for lab in labels)
    second = f"{large}/{labels[1]}" if len(labels) > 2 else ""
    print(f"  {'process':16s}{head} {'ratio':>7s} {'growth':>7s} {second:>15s}   {'anon ' + large:>13s} {'2nd half':>8s}  verdict")
    for svc, r in services.items():
        by = r["by_scan"]
        cells = "".join(f"{by.get(lab, {}).get('vm_hwm_mib', float('nan')):10.1f}" for lab in labels)

        def q(k, fmt, r=r):
            return format(r[k], fmt) if r.get(k) is not None else "-"
        print(f"  {svc:16s}{cells} {q('ratio_vm_hwm_mib', '7.3f'):>7s} {q('growth_vm_hwm_mib', '+7.1f'):>7s} "
              f"{q('ratio_from_second', '15.3f') if second else '':>15s}   "
              f"{by.get(large, {}).get('rss_anon_peak_mib', float('nan')):13.1f} "
              f"{q('second_half_growth_mib', '+8.1f'):>8s}  {r['verdict']}")
    for label in labels:
        steps = result["runs"][label][0]["orchestrator_steps"]
        if not steps:
            continue
        print(f"  orchestrator {label}: " + "; ".join(
            f"{k} peak {s['vmhwm_mib']:.1f} MiB" for k, s in steps.items()))
        for k, s in steps.items():
            if s.get("peak_at"):
                print(f"      {k}: RSS {s['peak_rss_seen_mib']:.1f} MiB at " + " < ".join(reversed(s["peak_at"])))
                print(f"      {k}: climbed " + "; ".join(s["climb"]))
    off = [k for k, r in services.items() if r["verdict"] != "flat"]
    print(f"  target: every process within +-{TARGET_RATIO - 1:.0%} from {small} to {large}"
          + (f" ({large}/{labels[1]}: 'flat once filled')" if len(labels) > 2 else "") + ". "
          + ("Met." if not off else "Not met by: " + ", ".join(f"{k} ({services[k]['verdict']})" for k in off)))
    save_json(args.json, result)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == ORCHESTRATOR_FLAG:
        orchestrate(Path(sys.argv[2]))
    else:
        main()
