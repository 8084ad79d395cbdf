"""The emulator's jobs on a real Slurm cluster: submit is sbatch, state is scontrol, cancel is scancel.

A drop-in for the local ``JobRunner``: the same ``Job`` records (so squeue/sacct answers keep
their shape) filled from what Slurm says. The batch script runs unchanged under the real
scheduler, ``srun`` included; Slurm itself refuses what it would refuse (QOS, features, node
count). ``never_start`` submits held (``scontrol release`` starts it), ``start_delay`` with
``--begin``.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from .jobs import CANCELLED, COMPLETED, FAILED, PENDING, RUNNING, TERMINAL_STATES, TIMEOUT, Job, JobRunner
from .sbatch import SbatchError, parse_sbatch_options
from .srun import expand_nodelist

log = logging.getLogger(__name__)


@dataclass
class SlurmSettings:
    """Which Slurm cluster: its slurm.conf (None: the site's default) and the folder of its commands
    (None: PATH). detstream's own ``SlurmSettings`` has the same two fields and does as well."""

    slurm_conf: Optional[str] = None
    bin_dir: Optional[str] = None


class SlurmError(RuntimeError):
    """A Slurm command failed or is missing; the message has what Slurm said."""


class SlurmRefused(SlurmError):
    """sbatch refused the job: nothing was queued."""


def _fields(text: str) -> Dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show job -o`` (values may hold '=' but not ' Key=')."""
    return dict(m.groups() for m in re.finditer(r"(\w[\w/:]*)=(.*?)(?= \w[\w/:]*=|$)", text.strip()))


def _epoch(text: Optional[str]) -> Optional[float]:
    try:
        return time.mktime(time.strptime(text or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


class SlurmCommands:
    """sbatch, scontrol, squeue and scancel of one cluster. The emulator's own, written apart from
    detstream's Slurm backend so that the double does not share the code it stands in for."""

    def __init__(self, settings, timeout_s: float = 30.0):
        self.settings = settings
        self.timeout_s = timeout_s

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        bin_dir = getattr(self.settings, "bin_dir", None)
        cmd = [str(Path(bin_dir) / argv[0]) if bin_dir else argv[0], *argv[1:]]
        env = dict(os.environ)
        if self.settings.slurm_conf:
            env["SLURM_CONF"] = str(self.settings.slurm_conf)
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=self.timeout_s,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SlurmError(f"{cmd[0]} not found: is Slurm's client installed?") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{shlex.join(cmd)} did not answer within {self.timeout_s:g} s") from None

    def submit(self, script_path: Path, work_dir: Path, output: Optional[str] = None,
               options: Sequence[str] = (), args: Sequence[str] = ()) -> str:
        """sbatch the script from ``work_dir``; the job id, or SlurmRefused with sbatch's words."""
        cmd = ["sbatch", "--parsable", f"--chdir={work_dir}", *options]
        if output:
            cmd.append(f"--output={output}")
        r = self.run(*cmd, str(script_path), *args)
        if r.returncode != 0:
            said = "; ".join(line.removeprefix("sbatch: error: ").strip()
                             for line in r.stderr.splitlines() if line.strip()) or f"exit {r.returncode}"
            raise SlurmRefused(said)
        return r.stdout.strip().split(";")[0]

    def show(self, jobid: str) -> Optional[Dict[str, str]]:
        """``scontrol show job`` as a dict; None once Slurm no longer knows the job."""
        r = self.run("scontrol", "show", "job", "-o", str(jobid))
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return None
            raise SlurmError(f"scontrol show job {jobid}: {r.stderr.strip() or r.returncode}")
        return _fields(r.stdout.splitlines()[0]) if r.stdout.strip() else None

    def in_queue(self, jobid: str) -> bool:
        r = self.run("squeue", "-h", "-j", str(jobid), "-o", "%T")
        return r.returncode == 0 and bool(r.stdout.strip())

    def cancel(self, jobid: str) -> None:
        r = self.run("scancel", str(jobid))
        if r.returncode != 0 and "Invalid job id" not in r.stderr and "already completing" not in r.stderr:
            raise SlurmError(f"scancel {jobid}: {r.stderr.strip() or r.returncode}")

_STATES = {"PENDING": PENDING, "CONFIGURING": PENDING, "REQUEUED": PENDING, "SUSPENDED": PENDING,
           "RUNNING": RUNNING, "COMPLETING": RUNNING, "COMPLETED": COMPLETED, "CANCELLED": CANCELLED,
           "PREEMPTED": CANCELLED, "DEADLINE": CANCELLED, "TIMEOUT": TIMEOUT, "FAILED": FAILED,
           "NODE_FAIL": FAILED, "BOOT_FAIL": FAILED, "OUT_OF_MEMORY": FAILED}


class SlurmJobRunner(JobRunner):
    """Emulated SFAPI jobs as real Slurm jobs of the cluster ``settings`` points at."""

    def __init__(self, workdir: Path, settings, kill_grace: float = 2.0, user: Optional[str] = None):
        """``settings``: a ``SlurmSettings``, or any object with ``slurm_conf`` (and ``bin_dir``)."""
        super().__init__(workdir, kill_grace=kill_grace, user=user)
        self.slurm = SlurmCommands(settings)

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
