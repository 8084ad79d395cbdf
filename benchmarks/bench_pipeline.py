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
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

TARGET_RATIO = 0.5


# --------------------------------------------------------------------------- process sampling
def _classify(cmdline: list[str], parent_role: Optional[str]) -> Optional[str]:
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
        self.classify = classify or _classify
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
        "cpu": _cpu_table(samples, first_send, last_assembled,
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


def _cpu_table(samples: dict, t0: float, t1: float, machine_busy: Optional[float]) -> dict:
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
def _parse_scan(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; print a summary and return the figures (for benchmarks/run_all.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", type=_parse_scan, default=(64, 64), help="scan WxH (default 64x64)")
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


def save_json(path: Optional[Path], result: dict) -> None:
    """Write a benchmark's figures to `path` (--json), if given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
