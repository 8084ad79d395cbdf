"""Job start latency: from submitting a session's nodes to every distributor registered in etcd,
on a private Slurm cluster (4 slurmd on loopback, tests/slurm_cluster.py) beside the local backend.

Each run is a real StreamingSession up to its nodes (open -> reserve -> every distributor
registered), then cancelled; runs alternate local / slurm. The first Slurm run after the cluster
starts waits for slurmctld's first scheduling pass and is reported on its own ("cold").

Run: python benchmarks/bench_slurm.py [--nodes 4] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _slurm_cluster_module():
    """tests/slurm_cluster.py, loaded by path (tests/ on sys.path would shadow the detstream package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_cluster", HERE.parent / "tests" / "slurm_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start_once(backend_name: str, etcd, work: Path, nodes: int, slurm_conf: str | None) -> dict:
    """Open a session, reserve its nodes and wait for every distributor; the seconds each step took."""
    from detstream.backends.local import LocalBackend
    from detstream.backends.slurm import SlurmBackend, SlurmJobSettings, SlurmSettings
    from detstream.coordination import Coordinator
    from detstream.profile import get_profile
    from detstream.session import StreamingSession, make_spec
    from detstream.states import SessionState

    sid = f"bench{uuid.uuid4().hex[:8]}"
    spec = make_spec(scan_width=8, scan_height=8, profile=get_profile("4dcamera"), output_dir=str(work),
                     session_id=sid, nodes=nodes, workers_per_node=1, etcd_prefix=f"/b{sid}")
    logs = spec.session_dir / "logs"
    if backend_name == "local":
        backend = LocalBackend(log_dir=logs)
    else:
        job = SlurmJobSettings(command=[sys.executable, "-m", "detstream"], bind_host="127.0.0.1",
                               advertise_host="127.0.0.1", qos="realtime", constraint="cpu")
        backend = SlurmBackend(SlurmSettings(slurm_conf=slurm_conf), job, work_dir=logs, poll_interval_s=0.05)
    with Coordinator(etcd.endpoint, prefix=spec.etcd_prefix) as coord:
        session = StreamingSession(spec, coord, backend, etcd.endpoint)
        try:
            session.open()
            t0 = time.perf_counter()
            session.reserve(60)
            running = time.perf_counter()
            session._await_nodes(60)
            registered = time.perf_counter()
        finally:
            session.close(SessionState.CANCELLED, "benchmark: start latency only")
    return {"to_running_s": running - t0, "to_registered_s": registered - t0,
            "queue_wait_s": session.reservation.queue_wait_s if session.reservation else None}


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from detstream.etcd_server import EmbeddedEtcd

    sc = _slurm_cluster_module()
    SlurmCluster, missing_programs = sc.SlurmCluster, sc.missing_programs

    if missing_programs():
        return {"skipped": f"Slurm not installed ({', '.join(missing_programs())} missing)"}
    work = Path(tempfile.mkdtemp(prefix="detstream-bench-slurm-"))
    runs: dict[str, list[dict]] = {"local": [], "slurm": []}
    try:
        t = time.perf_counter()
        with SlurmCluster(nodes=args.nodes) as cluster, EmbeddedEtcd(data_dir=work / "etcd") as etcd:
            cluster_start = time.perf_counter() - t
            cold = _start_once("slurm", etcd, work, args.nodes, str(cluster.conf))
            print(f"slurm cold: {cold}", flush=True)
            for i in range(args.repeats):
                for name in ("local", "slurm"):
                    runs[name].append(_start_once(name, etcd, work, args.nodes, str(cluster.conf)))
                    print(f"{name} run {i + 1}: {runs[name][-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "nodes": args.nodes, "repeats": args.repeats, "cluster_start_s": cluster_start, "slurm_cold": cold,
        "median_to_registered_s": {n: _median(r, "to_registered_s") for n, r in runs.items()},
        "median_to_running_s": {n: _median(r, "to_running_s") for n, r in runs.items()},
        "range_to_registered_s": {n: [min(x["to_registered_s"] for x in r), max(x["to_registered_s"] for x in r)]
                                  for n, r in runs.items()},
        "runs": runs,
    }
    loc, slu = result["median_to_registered_s"]["local"], result["median_to_registered_s"]["slurm"]
    result["slurm_over_local"] = slu / loc if loc else None
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
