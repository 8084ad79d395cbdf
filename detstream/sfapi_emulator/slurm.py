"""The emulator's jobs on a real Slurm cluster: submit is sbatch, state is scontrol, cancel is scancel.

A drop-in for the local ``JobRunner``: the same ``Job`` records (so squeue/sacct answers keep
their shape) filled from what Slurm says. The batch script runs unchanged under the real
scheduler, ``srun`` included; Slurm itself refuses what it would refuse (QOS, features, node
count). ``never_start`` submits held (``scontrol release`` starts it), ``start_delay`` with
``--begin``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional, Sequence

import psutil

from ..backends.sfapi import expand_nodelist
from ..backends.slurm import SlurmClient, SlurmError, SlurmRefused, SlurmSettings, _epoch
from .jobs import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, TERMINAL_STATES, TIMEOUT, Job, JobRunner
from .sbatch import SbatchError, parse_sbatch_options

log = logging.getLogger(__name__)

_STATES = {"PENDING": PENDING, "CONFIGURING": PENDING, "REQUEUED": PENDING, "SUSPENDED": PENDING,
           "RUNNING": RUNNING, "COMPLETING": RUNNING, "COMPLETED": COMPLETED, "CANCELLED": CANCELLED,
           "PREEMPTED": CANCELLED, "DEADLINE": CANCELLED, "TIMEOUT": TIMEOUT, "FAILED": FAILED,
           "NODE_FAIL": FAILED, "BOOT_FAIL": FAILED, "OUT_OF_MEMORY": FAILED}


class SlurmJobRunner(JobRunner):
    """Emulated SFAPI jobs as real Slurm jobs of the cluster ``settings`` points at."""

    def __init__(self, workdir: Path, settings: SlurmSettings, kill_grace: float = 2.0, user: Optional[str] = None):
        super().__init__(workdir, kill_grace=kill_grace, user=user)
        self.slurm = SlurmClient(settings)

    def submit(self, script: str, *, machine: str = "perlmutter", args: Sequence[str] = (),
               start_delay: float = 0.0, never_start: bool = False, hidden_polls: int = 0,
               check_perlmutter: bool = True) -> Job:
        """sbatch the script (SbatchError with Slurm's words if refused); the job as the emulator keeps it."""
        opts = parse_sbatch_options(script)
        with self._lock:
            if self._closing:
                raise SbatchError("sbatch: error: Batch job submission failed: Slurm is shutting down")
            self._next_jobid += 1
            job_dir = self.workdir / "jobs" / f"submit-{self._next_jobid}"
        job_dir.mkdir(parents=True, exist_ok=True)
        script_path = job_dir / "slurm_script"
        script_path.write_text(script)
        script_path.chmod(0o700)
        extra = ["--hold"] if never_start else []
        if start_delay > 0:
            extra.append(f"--begin=now+{max(1, int(round(start_delay)))}")
        try:
            jobid = self.slurm.submit(script_path, Path(opts.chdir or self.submit_dir),
                                      None if opts.output else "slurm-%j.out", options=extra, args=args)
        except SlurmRefused as err:
            raise SbatchError(f"sbatch: error: {err}") from None
        except SlurmError as err:
            raise SbatchError(f"sbatch: error: Batch job submission failed: {err}") from None
        job = Job(jobid=int(jobid), machine=machine, user=self.user, script=script, options=opts, args=list(args),
                  job_dir=job_dir, submit_dir=self.submit_dir, submit_time=time.time(), start_delay=start_delay,
                  never_start=never_start, hidden_polls=hidden_polls)
        job.done.clear()
        with self._lock:
            self._jobs[job.jobid] = job
        self._refresh(job)
        return job

    def _refresh(self, job: Job) -> None:
        """Fill the record from ``scontrol show job``; a job Slurm has purged keeps its last state."""
        if job.state in TERMINAL_STATES:
            return
        try:
            info = self.slurm.show(str(job.jobid))
        except SlurmError as err:
            log.warning("job %s: %s", job.jobid, err)
            return
        if info is None:
            return
        raw = info.get("JobState", "PENDING")
        with self._lock:
            job.state = _STATES.get(raw, PENDING)
            job.reason = info.get("Reason", "None")
            if job.state != PENDING:
                job.nodes = expand_nodelist(info.get("NodeList")) or job.nodes
                job.start_time = _epoch(info.get("StartTime")) or job.start_time
            if job.state in TERMINAL_STATES:
                job.end_time = _epoch(info.get("EndTime")) or time.time()
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                job.exit_code = -int(sig) if sig and sig != "0" else int(code or 0)
                job.done.set()
            if info.get("StdOut"):
                job.stdout_path = job.stderr_path = Path(info["StdOut"])
            if info.get("StdErr"):
                job.stderr_path = Path(info["StdErr"])

    def get(self, jobid) -> Optional[Job]:
        job = super().get(jobid)
        if job is not None:
            self._refresh(job)
        return job

    def jobs(self) -> List[Job]:
        jobs = super().jobs()
        for job in jobs:
            self._refresh(job)
        return jobs

    def cancel(self, jobid) -> Optional[Job]:
        job = super().get(jobid)
        if job is None:
            return None
        job.cancel_requested = True
        try:
            self.slurm.cancel(str(job.jobid))
        except SlurmError as err:
            log.warning("%s", err)
        return job

    def release(self, jobid) -> Optional[Job]:
        job = super().get(jobid)
        if job is not None:
            job.released = True
            self.slurm.run("scontrol", "release", str(job.jobid))
        return job

    def live_pids(self, jobid) -> set:
        """Processes of the job on any node: its slurmstepd and what runs under them."""
        job = super().get(jobid)
        if job is None:
            return set()
        pids = set()
        tag = f"[{job.jobid}."
        for proc in psutil.process_iter(["cmdline", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("slurmstepd") and tag in cmd:
                    pids.add(proc.pid)
                elif proc.environ().get("SLURM_JOB_ID") == str(job.jobid) and \
                        proc.environ().get("SLURM_CONF") == self.slurm.settings.slurm_conf:
                    pids.add(proc.pid)
            except (psutil.Error, OSError):
                continue
        return pids

    def shutdown(self, timeout: float = 10.0) -> None:
        """scancel every job this emulator submitted and wait until Slurm has them out of its queue."""
        with self._lock:
            self._closing = True
        jobs = super().jobs()
        for job in jobs:
            self._refresh(job)
            if job.state not in TERMINAL_STATES:
                self.cancel(job.jobid)
        deadline = time.monotonic() + timeout
        for job in jobs:
            while self.slurm.in_queue(str(job.jobid)) and time.monotonic() < deadline:
                time.sleep(0.1)
            self._refresh(job)
