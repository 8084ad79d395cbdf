"""The fault table: each fault injected into a real session at a fixed point (after N frames
received, as etcd reports them), with the frames lost, the time from the fault to its
detection, and the time from the fault to the session's end.

Run: python benchmarks/bench_faults.py [--scan 48x48] [--after 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def _first_end_event(coord, sid: str, since: float):
    """Time of the first terminal state recorded after ``since`` (the session noticing the fault)."""
    for e in coord.events(sid):
        if e["time"] >= since and e["state"] in ("failed", "incomplete", "cancelled", "abandoned"):
            return e["time"]
    return None


class _Fault:
    """A progress listener that runs ``action`` once, when the session has received ``after`` frames."""

    def __init__(self, after: int, action):
        self.after, self.action, self.at = after, action, None

    def __call__(self, p) -> None:
        if self.at is None and p.frames_received >= self.after:
            self.at = time.time()
            self.action()


def _run_session(work: Path, etcd, scan: tuple[int, int], nodes: int, after: int, make_action, **extra) -> dict:
    from detstream import progress
    from detstream.coordination import Coordinator
    from detstream.flows import streaming_session

    sid = "fault" + uuid.uuid4().hex[:8]
    prefix = f"/bench{uuid.uuid4().hex[:8]}"
    coord = Coordinator(etcd.endpoint, prefix=prefix)
    fault = _Fault(after, make_action(coord, sid))
    progress.LISTENERS.append(fault)
    error = None
    try:
        streaming_session(detector="4dcamera", scan_width=scan[0], scan_height=scan[1], nodes=nodes,
                          etcd_url=etcd.endpoint, etcd_prefix=prefix, output_dir=str(work), session_id=sid,
                          stall_timeout_s=20.0, **extra)
    except Exception as err:  # the faults that end a session raise; the account is still written
        error = f"{type(err).__name__}: {err}"[:200]
    finally:
        progress.LISTENERS.remove(fault)
    ended = time.time()
    if not (work / sid / "summary.json").exists():
        return {"error": f"no summary.json: {error}"}
    summary = json.loads((work / sid / "summary.json").read_text())
    agg_path = work / sid / "services" / "aggregator-0.json"
    agg = json.loads(agg_path.read_text()) if agg_path.exists() else {}
    detected = None
    if agg.get("nodes_lost"):
        detected = agg["nodes_lost"][0]["detected_at"]
    elif fault.at is not None:
        detected = _first_end_event(coord, sid, fault.at)
    shutil.rmtree(work / sid, ignore_errors=True)
    return {"state": summary["state"], "frames_lost": summary["frames_missing"],
            "frames_counted": summary["frames_counted"],
            "detection_s": None if detected is None or fault.at is None else detected - fault.at,
            "to_end_s": None if fault.at is None else ended - fault.at, "error": error}


def _kill(role: str, name: str, sig=signal.SIGKILL):
    def make(coord, sid):
        return lambda: os.kill(coord.services(sid, role)[name]["pid"], sig)
    return make


def _pause(role: str, name: str, seconds: float):
    def make(coord, sid):
        def act():
            pid = coord.services(sid, role)[name]["pid"]
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(seconds, os.kill, (pid, signal.SIGCONT)).start()
        return act
    return make


def _etcd_restart(etcd, seconds: float):
    def make(coord, sid):
        def act():
            etcd.stop()
            threading.Timer(seconds, etcd.start).start()
        return act
    return make


def _etcd_gone(work: Path, scan: tuple[int, int], after: int, budget_s: float = 5.0) -> dict:
    """etcd stopped for good mid-scan: the scan still finishes and is written; the summary says
    the end state is not in etcd. Detection = the summary's note (the outage budget spent)."""
    from detstream import progress
    from detstream.blocks import EtcdCoordinator
    from detstream.etcd_server import EmbeddedEtcd
    from detstream.flows import streaming_session

    sid = "gone" + uuid.uuid4().hex[:8]
    with EmbeddedEtcd(data_dir=work / "etcd-gone") as etcd:
        block = EtcdCoordinator(endpoints=[etcd.endpoint], prefix="/gone", outage_budget_s=budget_s)
        fault = _Fault(after, etcd.stop)
        progress.LISTENERS.append(fault)
        error = None
        try:
            streaming_session(detector="4dcamera", scan_width=scan[0], scan_height=scan[1], nodes=2, etcd=block,
                              output_dir=str(work), session_id=sid, stall_timeout_s=20.0)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"[:200]
        finally:
            progress.LISTENERS.remove(fault)
    ended = time.time()
    summary = json.loads((work / sid / "summary.json").read_text())
    shutil.rmtree(work / sid, ignore_errors=True)
    return {"state": summary["state"], "frames_lost": summary["frames_missing"],
            "frames_counted": summary["frames_counted"], "detection_s": budget_s,
            "to_end_s": None if fault.at is None else ended - fault.at, "error": error,
            "note": f"outage budget {budget_s:g} s; summary: {summary.get('etcd_unrecorded', 'no note')[:60]}"}


def _start_run(work: Path, etcd, sid: str, scan: tuple[int, int], out=subprocess.DEVNULL) -> subprocess.Popen:
    """`detstream run --etcd` for session ``sid`` in a process of its own (its own Prefect server)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.Popen([sys.executable, "-m", "detstream.flows.cli", "run", "--etcd", etcd.endpoint,
                             "--session-id", sid, "--output", str(work), "--scan", f"{scan[0]}x{scan[1]}"],
                            stdout=out, stderr=subprocess.STDOUT if out is subprocess.PIPE else subprocess.DEVNULL,
                            env=env, text=True)


def _kill_run_after(proc: subprocess.Popen, coord, sid: str, after: int) -> float | None:
    """kill -9 of the run once ``after`` frames are received; the time of the kill (None: it ended first)."""
    while sum(coord.received(sid, 1).values()) < after:
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    fault_at = time.time()
    proc.kill()
    proc.wait()
    return fault_at


def _orchestrator_kill(work: Path, etcd, scan: tuple[int, int], after: int) -> dict:
    """kill -9 of `detstream run`: time until nothing of it runs, then `detstream salvage`."""
    import psutil

    from detstream.coordination import Coordinator

    sid = "orch" + uuid.uuid4().hex[:8]
    coord = Coordinator(etcd.endpoint)
    fault_at = _kill_run_after(_start_run(work, etcd, sid, scan), coord, sid, after)
    if fault_at is None:
        return {"error": "run ended before the fault"}

    def leftovers():
        return [p for p in psutil.process_iter(["cmdline"]) if sid in " ".join(p.info["cmdline"] or [])]
    while leftovers() and time.time() - fault_at < 60:
        time.sleep(0.1)
    gone_at = time.time()
    subprocess.run([sys.executable, "-m", "detstream", "salvage", str(work / sid), "--etcd", etcd.endpoint],
                   capture_output=True)
    summary = json.loads((work / sid / "summary.json").read_text())
    shutil.rmtree(work / sid, ignore_errors=True)
    return {"state": summary["state"], "frames_lost": summary["frames_missing"],
            "frames_counted": summary["frames_counted"], "detection_s": gone_at - fault_at,
            "to_end_s": time.time() - fault_at, "error": None,
            "note": "detection = every process of the run gone; end = salvage written"}


def _orchestrator_retry(work: Path, etcd, scan: tuple[int, int], after: int) -> dict:
    """kill -9 of `detstream run`, and the same command again at once: how long the retry waits
    out the dead session's lock lease, and how the two sessions end."""
    from detstream.coordination import Coordinator

    dead, retry = "orch" + uuid.uuid4().hex[:8], "retry" + uuid.uuid4().hex[:8]
    coord = Coordinator(etcd.endpoint)
    fault_at = _kill_run_after(_start_run(work, etcd, dead, scan), coord, dead, after)
    if fault_at is None:
        return {"error": "run ended before the fault"}
    again = _start_run(work, etcd, retry, scan, subprocess.PIPE)
    waited_s = None
    for line in again.stdout:
        if "ran out" in line and waited_s is None:
            waited_s = time.time() - fault_at
    code = again.wait()
    ended = time.time()
    summary = json.loads((work / retry / "summary.json").read_text()) if (work / retry / "summary.json").exists() else {}
    dead_summary = json.loads((work / dead / "summary.json").read_text()) if (work / dead / "summary.json").exists() else {}
    shutil.rmtree(work / dead, ignore_errors=True)
    shutil.rmtree(work / retry, ignore_errors=True)
    return {"state": f"retry {summary.get('state')} (exit {code}); dead session {coord.get_state(dead)}, "
                     f"salvaged: {dead_summary.get('state')}",
            "frames_lost": summary.get("frames_missing"), "frames_counted": summary.get("frames_counted"),
            "detection_s": waited_s, "to_end_s": ended - fault_at, "error": None,
            "note": "detection = the retry saw the dead lock lease run out; end = the retry's session completed"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default="48x48")
    ap.add_argument("--after", type=int, default=256, help="Frames received before the fault.")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="Run only the faults whose name contains this.")
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    from detstream.etcd_server import EmbeddedEtcd

    scan = tuple(int(v) for v in args.scan.split("x"))
    work = Path(tempfile.mkdtemp(prefix="detstream-bench-faults-"))
    rows = {}
    try:
        with EmbeddedEtcd(data_dir=work / "etcd") as etcd:
            faults = {
                "kill -9 distributor (1 of 2)": (2, _kill("distributor", "node-1")),
                "kill -9 distributor (1 of 4)": (4, _kill("distributor", "node-2")),
                "SIGSTOP distributor 3 s, SIGCONT": (2, _pause("distributor", "node-1", 3.0)),
                "kill -9 producer": (2, _kill("producer", "sector-1")),
                "kill -9 aggregator": (2, _kill("aggregator", "0")),
                "etcd restart, 5 s": (2, _etcd_restart(etcd, 5.0)),
                "kill -9 distributor (1 of 2, 2 aggregator shards)": (2, _kill("distributor", "node-1"),
                                                                       {"aggregators": 2}),
            }
            others = {
                "etcd gone for good": lambda: _etcd_gone(work / "runs", scan, args.after),
                "kill -9 orchestrator (detstream run)": lambda: _orchestrator_kill(work / "runs", etcd, scan,
                                                                                   args.after),
                "kill -9 orchestrator, the same run again at once": lambda: _orchestrator_retry(
                    work / "runs", etcd, scan, args.after),
            }
            for name, (nodes, make, *extra) in faults.items():
                if args.only and args.only not in name:
                    continue
                rows[name] = _run_session(work / "runs", etcd, scan, nodes, args.after, make, **(extra or [{}])[0])
                print(f"{name}: {rows[name]}", flush=True)
            for name, fn in others.items():
                if args.only and args.only not in name:
                    continue
                rows[name] = fn()
                print(f"{name}: {rows[name]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "faults", "scan": args.scan, "after_frames": args.after, "faults": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
