"""What the benchmarks share: a streaming session run step by step and sampled from /proc, its
figures, the CPU table, and the small command-line and output helpers.

A benchmark imports it as a sibling module (``from harness import ...``): run as
``python benchmarks/bench_x.py``, the script's own folder is first on ``sys.path``, and
``benchmarks/run_all.py`` imports the benchmarks from the same folder. detstream itself comes
from the installed package (``make install``), so no benchmark edits ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

# --------------------------------------------------------------------------- process sampling
def service_role(cmdline: list[str], parent_role: Optional[str]) -> Optional[str]:
    """A role name for one of our descendants, from its command line (None: not ours to show)."""
    line = " ".join(cmdline)
    if "-m detstream" in line or "detstream " in line:
        for arg in cmdline:
            if arg == "producer":
                sector = cmdline[cmdline.index("--sector") + 1] if "--sector" in cmdline else "?"
                return f"producer-{sector}"
            if arg == "aggregator":
                return "aggregator"
            if arg == "distributor":
                node = cmdline[cmdline.index("--node-index") + 1] if "--node-index" in cmdline else "0"
                return f"distributor-{node}"
    if "multiprocessing" in line and "spawn_main" in line and parent_role and parent_role.startswith("distributor"):
        return f"worker@{parent_role}"
    if cmdline and os.path.basename(cmdline[0]).startswith("etcd"):
        return "etcd"
    return None


def _read_status_kib(pid: int, fields=("VmHWM", "VmRSS", "RssAnon")) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in fields:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def _schedstat(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of ``pid``: (on-CPU seconds, seconds runnable but waiting for a CPU), from /proc."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _ = f.read().split()
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(run_ns) / 1e9, int(wait_ns) / 1e9)
    return out


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, everyone's processes) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ProcessSampler:
    """Samples every descendant of this process from /proc, and the machine's busy time.

    Per process, as a time series: on-CPU seconds of the main thread and of the other threads
    (ZeroMQ I/O threads), seconds spent runnable but waiting for a CPU (schedstat: CPU
    contention) and RssAnon (private memory); and the peaks of VmHWM and RssAnon. A process's samples stop when it exits, so its figures lag its end by at most
    one interval. VmHWM is the kernel's high-water mark of the process's own address space
    (it starts afresh at exec): a cross-check of the services' self-reported ru_maxrss.
    """

    def __init__(self, interval_s: float = 0.2, classify=None):
        """``classify(cmdline, parent_role)``: a role for a process, None to leave it out
        (default: the pipeline's services, workers and etcd)."""
        import psutil

        self.psutil = psutil
        self.interval_s = interval_s
        self.classify = classify or service_role
        self.procs: dict[int, dict] = {}
        self.machine: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="process-sampler", daemon=True)

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            self.machine.append((time.time(), _machine_busy_s()))
            try:
                children = me.children(recursive=True)
            except self.psutil.Error:
                children = []
            for child in children:
                self._sample(child)
            self._stop.wait(self.interval_s)

    def _sample(self, proc) -> None:
        pid = proc.pid
        rec = self.procs.get(pid)
        try:
            if rec is None or (rec["role"] is None and rec["tries"] < 20):
                # Re-read while unknown: a child sampled between fork and exec shows our own cmdline.
                parent = self.procs.get(proc.ppid())
                role = self.classify(proc.cmdline(), parent["role"] if parent else None)
                if rec is None:
                    rec = self.procs[pid] = {"pid": pid, "role": role, "tries": 0}
                rec["role"] = role
                rec["tries"] += 1
            if rec["role"] is None:
                return
            threads = _schedstat(pid)
            status = _read_status_kib(pid)
        except (self.psutil.Error, OSError):
            return
        now = time.time()
        # Keep every thread ever seen, so that a thread that ends keeps its CPU time.
        seen = rec.setdefault("threads", {})
        seen.update(threads)
        main = seen.get(pid, (0.0, 0.0))[0]
        other = sum(v[0] for t, v in seen.items() if t != pid)
        wait = sum(v[1] for v in seen.values())
        anon = status.get("RssAnon", 0) / 1024.0
        rec.setdefault("series", []).append((now, main, other, wait, anon))
        if "VmHWM" in status:
            rec["vm_hwm_mib"] = max(rec.get("vm_hwm_mib", 0.0), status["VmHWM"] / 1024.0)
        if "VmRSS" in status:
            rec["vm_rss_mib"] = status["VmRSS"] / 1024.0
        if "RssAnon" in status:  # private memory (heap, ZeroMQ buffers), without mapped files
            rec["rss_anon_peak_mib"] = max(rec.get("rss_anon_peak_mib", 0.0), status["RssAnon"] / 1024.0)

    def by_role(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for rec in self.procs.values():
            if rec.get("role") and rec.get("series"):
                out.setdefault(rec["role"], []).append(rec)
        return out

    def machine_busy_cores(self, t0: float, t1: float) -> Optional[float]:
        """Average busy cores of the whole machine (everyone's processes) over [t0, t1]."""
        if len(self.machine) < 2 or t1 <= t0:
            return None
        ts, busy = zip(*self.machine)
        return float(np.interp(t1, ts, busy) - np.interp(t0, ts, busy)) / (t1 - t0)


# --------------------------------------------------------------------------- one session
def run_session(*, scan: tuple[int, int], nodes: int, counting: bool, workdir: Path,
                endpoint: str, coord, workers_per_node: int = 1, seed: int = 0,
                sample: bool = True, timeout_s: float = 300.0, spec_fields: Optional[dict] = None,
                on_phase=None) -> dict:
    """One streaming session driven step by step; returns its summary, service reports and samples.

    ``on_phase(name)`` is called as each step of the orchestrator's ends ("stream": the scan is
    done and every service has exited, "collect": the merge and summary are written).
    The session's close() stops every service it started, whatever happens.
    """
    from detstream import results
    from detstream.backends.local import LocalBackend
    from detstream.profile import get_profile
    from detstream.services.security import session_env
    from detstream.session import SessionError, StreamingSession, make_spec
    from detstream.session.etcd import service_login_env
    from detstream.states import SessionState

    spec = make_spec(scan_width=scan[0], scan_height=scan[1], profile=get_profile("4dcamera"),
                     output_dir=str(workdir), counting={"enabled": counting}, nodes=nodes,
                     workers_per_node=workers_per_node, seed=seed, stall_timeout_s=30.0,
                     etcd_prefix=coord.prefix, register_timeout_s=120.0,
                     **(spec_fields or {}))
    env = {**service_login_env(endpoint, coord.prefix, (spec.session_id, spec.detector), {}), **session_env(spec)}
    session = StreamingSession(spec, coord, LocalBackend(log_dir=spec.session_dir / "logs", env=env), endpoint,
                               service_env=env)
    sampler = ProcessSampler() if sample else None
    t_start = time.time()
    try:
        if sampler is not None:
            sampler.__enter__()
        session.open()
        session.reserve(timeout_s)
        session.start_services()
        session.stream(poll_s=0.25, finish_timeout_s=timeout_s)
        # Let the producers and the aggregator write their reports and exit by themselves.
        deadline = time.monotonic() + 30
        while any(p.poll() is None for p in session.local) and time.monotonic() < deadline:
            time.sleep(0.05)
        if session.reservation is not None:
            session.backend.wait_finished(session.reservation, 30)
        if on_phase is not None:
            on_phase("stream")
        summary = results.collect(spec, "benchmark", session.timings)
        if on_phase is not None:
            on_phase("collect")
        session.close(SessionState.COMPLETED, result={k: summary[k] for k in ("frames_received", "throughput_gb_s")})
    except BaseException as err:
        session.close(SessionState.FAILED, f"{type(err).__name__}: {err}")
        if isinstance(err, SessionError):
            raise RuntimeError(f"benchmark session failed: {err}{_log_tails(spec.session_dir)}") from err
        raise
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
    folder = spec.session_dir / "services"
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    return {"spec": spec, "summary": summary, "reports": reports,
            "samples": sampler.by_role() if sampler else {}, "wall_s": time.time() - t_start,
            "machine": sampler.machine_busy_cores if sampler else None}


def _log_tails(session_dir: Path, lines: int = 4) -> str:
    """The last lines of every service's log, for an error message (the session folder is
    deleted afterwards unless --keep)."""
    out = []
    for log in sorted((session_dir / "logs").glob("*.log")):
        try:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        if tail:
            out.append(f"\n  {log.name}:\n    " + "\n    ".join(tail))
    return "".join(out)


def pipeline_figures(run: dict) -> dict:
    """End-to-end and per-stage rates of one counting-off session."""
    spec, summary, reports, samples = run["spec"], run["summary"], run["reports"], run["samples"]
    producers = [r for k, r in reports.items() if k.startswith("producer-")]
    dists = [r for k, r in reports.items() if k.startswith("distributor-")]
    agg = reports.get("aggregator-0", {})
    sector_nbytes = spec.profile.sector_nbytes
    first_send = min(p["first_send"] for p in producers)
    all_sending = max(p["first_send"] for p in producers)
    last_send = max(p["last_send"] for p in producers)
    last_assembled = max(d["last_recv"] for d in dists)
    nbytes = sum(d["bytes_received"] for d in dists)
    frames = sum(d["frames_received"] for d in dists)
    e2e = last_assembled - first_send
    out = {
        "scan": f"{spec.scan_width}x{spec.scan_height}",
        "nodes": spec.nodes,
        "frames": frames,
        "frames_expected": spec.frames_expected,
        "frames_missing": summary["frames_missing"],
        "partial_positions": len(summary["partial_positions"]),
        "bytes": nbytes,
        "seconds": e2e,
        "gb_s": nbytes / e2e / 1e9,
        "frames_per_s": frames / e2e,
        # Producers start one after another (each renders its frame pool first): how long the
        # first one sent alone, and the rate once all four were sending.
        "producer_start_skew_s": all_sending - first_send,
        "gb_s_after_all_started": nbytes / (last_assembled - all_sending) / 1e9,
        "summary_throughput_gb_s": summary["throughput_gb_s"],
        "stages": {
            "producer_gb_s_each": [p["bytes_sent"] / p["seconds"] / 1e9 for p in producers if p["seconds"]],
            "producers_send_span_s": last_send - first_send,
            "aggregator_gb_s": agg.get("bytes_routed", 0) / agg["seconds"] / 1e9 if agg.get("seconds") else None,
            "distributor_gb_s": [d["bytes_received"] / d["stream_seconds"] / 1e9 for d in dists
                                 if d["stream_seconds"]],
            # Copy of the sectors into the frame slot alone: the distributor's assembly capacity.
            "assemble_capacity_gb_s": [d["frames_received"] * 4 * sector_nbytes / d["assemble_seconds"] / 1e9
                                       for d in dists if d["assemble_seconds"]],
        },
        # CPU spent by each service while the scan streamed (sampled from /proc every 0.2 s).
        "cpu": cpu_table(samples, first_send, last_assembled,
                          run["machine"](first_send, last_assembled) if run.get("machine") else None),
    }
    a = out["cpu"].get("all", {})
    # CPU cost per GB moved, independent of how much CPU the machine gave us.
    out["cpu_s_per_gb"] = a["cpu_s"] / (nbytes / 1e9) if a.get("cpu_s") else None
    # The rate at which a service's busiest thread would reach 100% of a core, were it alone on
    # its cores: the stage that would hold the pipeline back on dedicated hardware.
    out["thread_bound_gb_s"] = {}
    for role, c in out["cpu"].items():
        if role in ("all", "etcd"):
            continue
        busiest = max(c["main_thread_cores"], c["other_threads_cores"])
        if busiest > 0:
            out["thread_bound_gb_s"][role] = {
                "gb_s": out["gb_s"] / busiest,
                "thread": "main" if c["main_thread_cores"] >= c["other_threads_cores"] else "I/O"}
    return out


def _in_window(series: list, t0: float, t1: float) -> np.ndarray:
    """How much each cumulative counter of a sample series grew between t0 and t1 (interpolated;
    a process sampled only outside the window contributes nothing)."""
    if not series:
        return np.zeros(3)
    arr = np.array(series)
    return np.array([np.interp(t1, arr[:, 0], arr[:, k]) - np.interp(t0, arr[:, 0], arr[:, k])
                     for k in range(1, 4)])


def cpu_table(samples: dict, t0: float, t1: float, machine_busy: Optional[float]) -> dict:
    """Per role, over [t0, t1]: cores used (main thread, other threads) and cores' worth of time
    spent runnable but waiting for a CPU; plus the machine's busy cores and others' share."""
    table = {}
    wall = t1 - t0
    if wall <= 0:
        return table
    for role, recs in sorted(samples.items()):
        main, other, wait = sum((_in_window(r["series"], t0, t1) for r in recs), np.zeros(3))
        table[role] = {"cores": (main + other) / wall, "main_thread_cores": main / wall,
                       "other_threads_cores": other / wall, "runqueue_wait_cores": wait / wall}
    for v in table.values():
        for k in v:
            v[k] = max(0.0, v[k])  # interpolating a thread that ended can go a hair below zero
    ours = sum(v["cores"] for v in table.values())
    table["all"] = {"cores": ours, "cpu_s": ours * wall, "runqueue_wait_cores": sum(v["runqueue_wait_cores"] for v in table.values()),
                    "machine_busy_cores": machine_busy,
                    "others_cores": (machine_busy - ours) if machine_busy is not None else None}
    return table


# --------------------------------------------------------------------------- on/off pairs of sessions
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
    table = cpu_table(run["samples"], t0, t1, None)
    fig["to_exit"] = {"seconds": t1 - t0, "cpu_s": table["all"]["cpu_s"],
                      "cpu_s_per_gb": table["all"]["cpu_s"] / (fig["bytes"] / 1e9),
                      "per_role_cpu_s": {role: c["cores"] * (t1 - t0) for role, c in table.items() if role != "all"}}
    shutil.rmtree(run["spec"].session_dir, ignore_errors=True)
    return fig


def summarise_on_off(runs: dict) -> dict:
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


# --------------------------------------------------------------------------- command line and output
def parse_scan(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def save_json(path: Optional[Path], result: dict) -> None:
    """Write a benchmark's figures to `path` (--json), if given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
