"""Local backend: the "nodes" are distributor processes on this machine."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from ..processes import ManagedProcess, detstream_argv
from .base import ComputeBackend, JobState, NodeLaunch, Reservation, ReservationError

# What one service process (a distributor or a counting worker, numba loaded) holds at its peak.
PROCESS_MEMORY_MIB = 300


class LocalBackend(ComputeBackend):
    """Starts one node-service process per node, in its own process group; ``env`` is added to theirs."""

    name = "local"
    transport = "ipc"  # every "node" is a process on this host

    needs_env_file = False

    def __init__(self, log_dir: Path, env: dict | None = None):
        self.log_dir = Path(log_dir)
        self.env = env
        self._jobs: dict[str, list[ManagedProcess]] = {}

    def check_request(self, nodes: int, workers_per_node: int) -> None:
        """All nodes run on this machine: bound their processes by its cores and memory."""
        import psutil

        cores = os.cpu_count() or 1
        per_node = 1 + workers_per_node  # the distributor and its counting workers
        by_cores = max(8, 4 * cores)
        by_memory = int(psutil.virtual_memory().available // (PROCESS_MEMORY_MIB << 20))
        allowed = min(by_cores, by_memory)
        if nodes * per_node > allowed:
            raise ValueError(
                f"the local backend runs every node on this machine: {nodes} nodes x {per_node} processes "
                f"(1 distributor + {workers_per_node} counting workers) = {nodes * per_node}, but this machine "
                f"({cores} cores, {psutil.virtual_memory().available / 2**30:.1f} GiB available) takes at most "
                f"{allowed}; ask for fewer nodes or workers, or use a cluster backend")

    def reserve(self, nodes: int, launch: NodeLaunch) -> Reservation:
        if nodes < 1:
            raise ReservationError(f"cannot reserve {nodes} nodes")
        procs = []
        for i in range(nodes):
            procs.append(ManagedProcess(
                detstream_argv(*launch.argv(node_index=i)),
                self.log_dir / f"distributor-{i}.log", env=self.env, name=f"distributor-{i}",
            ).start())
        job_id = f"local-{os.getpid()}-{procs[0].pid}"
        self._jobs[job_id] = procs
        return Reservation(backend=self.name, job_id=job_id, nodes=nodes,
                           node_names=[f"{socket.gethostname()}/{i}" for i in range(nodes)],
                           pids=[p.pid for p in procs], host=socket.gethostname(),
                           state=JobState.RUNNING)

    def wait_running(self, reservation: Reservation, timeout_s: float) -> Reservation:
        return self.poll(reservation)

    def poll(self, reservation: Reservation) -> Reservation:
        procs = self._jobs.get(reservation.job_id, [])
        codes = [p.poll() for p in procs]
        if reservation.state is JobState.CANCELLED:
            return reservation
        if any(c not in (None, 0) for c in codes):
            state = JobState.FAILED  # one node's service died: the job is broken, as srun would say
        elif any(c is None for c in codes):
            state = JobState.RUNNING
        elif all(c == 0 for c in codes):
            state = JobState.COMPLETED
        else:
            state = JobState.FAILED
        return reservation.model_copy(update={"state": state})

    def wait_finished(self, reservation: Reservation, timeout_s: float) -> Reservation:
        """Wait for every distributor to exit by itself (the normal end of a session)."""
        deadline = time.monotonic() + timeout_s
        for p in self._jobs.get(reservation.job_id, []):
            p.wait(max(0.0, deadline - time.monotonic()))
        return self.poll(reservation)

    def release(self, reservation: Reservation) -> Reservation:
        procs = self._jobs.pop(reservation.job_id, [])
        if not procs:
            return reservation
        codes = [p.poll() for p in procs]
        for p in procs:
            p.stop()
        if any(c is None for c in codes):
            state = JobState.CANCELLED
        else:
            state = JobState.COMPLETED if all(c == 0 for c in codes) else JobState.FAILED
        return reservation.model_copy(update={"state": state})


def kill_local_job(reservation: Reservation) -> None:
    """Cancel a local job from its etcd record alone (for hooks in another process)."""
    if reservation.host not in (None, socket.gethostname()):
        return
    for pid in reservation.pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
