"""Local job runner standing in for Slurm on Perlmutter.

A submitted batch script is parsed like sbatch does (leading ``#SBATCH`` lines), then run as
a local process group with the Slurm environment a real job sees and a stand-in ``srun`` first
on PATH. Job state follows Slurm: PENDING until started, RUNNING while the batch script lives,
then COMPLETED / FAILED by exit code, TIMEOUT past the walltime, CANCELLED on scancel.
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

from .sbatch import BatchOptions, SbatchError, _check_perlmutter, parse_sbatch_options
from .srun import compress_nodelist, expand_nodelist

log = logging.getLogger(__name__)

__all__ = [
    "Job", "JobRunner", "compress_nodelist", "expand_nodelist", "format_duration",
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "TERMINAL_STATES",
]

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
TERMINAL_STATES = (COMPLETED, FAILED, CANCELLED, TIMEOUT)
_SQUEUE_CODES = {PENDING: "PD", RUNNING: "R", COMPLETED: "CD", FAILED: "F", CANCELLED: "CA", TIMEOUT: "TO"}

CPUS_PER_NODE = 256  # logical CPUs on a Perlmutter CPU node


def format_duration(seconds: Optional[float], style: str = "squeue") -> str:
    """Seconds as Slurm prints them: squeue ``M:SS``/``H:MM:SS``/``D-HH:MM:SS``, sacct ``HH:MM:SS``."""
    if seconds is None:
        return "UNLIMITED"
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}-{h:02d}:{m:02d}:{s:02d}"
    if style == "sacct":
        return f"{h:02d}:{m:02d}:{s:02d}"
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _timestamp(t: Optional[float], missing: str = "Unknown") -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else missing


@dataclass
class Job:
    """One emulated Slurm job; fields are read and written under the runner's lock."""

    jobid: int
    machine: str
    user: str
    script: str
    options: BatchOptions
    args: List[str]
    job_dir: Path
    submit_dir: Path
    submit_time: float
    start_delay: float = 0.0
    never_start: bool = False
    hidden_polls: int = 0
    state: str = PENDING
    reason: str = "Priority"
    nodes: List[str] = field(default_factory=list)
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    exit_code: Optional[int] = None  # Popen return code (negative = signal)
    pid: Optional[int] = None
    stdout_path: Optional[Path] = None
    stderr_path: Optional[Path] = None
    cancel_requested: bool = False
    timed_out: bool = False
    released: bool = False
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    wake: threading.Event = field(default_factory=threading.Event, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def time_limit(self) -> Optional[float]:
        """Walltime in seconds (QOS default when the script gives none)."""
        if self.options.time_limit is not None:
            return self.options.time_limit
        return 30 * 60.0 if self.options.qos == "debug" else 12 * 3600.0

    @property
    def partition(self) -> str:
        if self.options.partition:
            return self.options.partition
        gpu = "gpu" in (self.options.constraint or "")
        return "gpu_ss11" if gpu else f"{self.options.qos}_milan_ss11"

    @property
    def nodelist(self) -> str:
        return compress_nodelist(self.nodes) if self.nodes else ""

    @property
    def account(self) -> str:
        return self.options.account or "m0000"

    def _exitcode(self) -> str:
        rc = self.exit_code
        if rc is None:
            return "0:0"
        return f"{rc}:0" if rc >= 0 else f"0:{-rc}"

    def _elapsed(self, now: float) -> float:
        if self.start_time is None:
            return 0.0
        return (self.end_time or now) - self.start_time

    def squeue_record(self, now: float) -> Dict[str, str]:
        """The job as one row of SFAPI's squeue output (every value a string)."""
        running = self.state == RUNNING
        n = str(len(self.nodes) or self.options.nodes)
        reason = "None" if running else self.reason
        return {
            "account": self.account, "tres_per_node": "N/A", "min_cpus": "1", "min_tmp_disk": "0",
            "end_time": _timestamp(self.start_time + self.time_limit if running and self.time_limit else None, "N/A"),
            "features": self.options.constraint or "(null)", "group": self.user,
            "over_subscribe": "NO" if self.options.exclusive else "OK", "jobid": str(self.jobid),
            "name": self.options.job_name, "comment": "(null)",
            "time_limit": format_duration(self.time_limit), "min_memory": "0", "req_nodes": "",
            "command": str(self.job_dir / "slurm_script"), "priority": "69120", "qos": self.options.qos,
            "reason": reason, "st": _SQUEUE_CODES.get(self.state, "CG"), "user": self.user,
            "reservation": "(null)", "wckey": "(null)", "exc_nodes": "", "nice": "0", "s:c:t": "*:*:*",
            "exec_host": self.nodes[0] if running and self.nodes else "n/a",
            "cpus": str(int(n) * CPUS_PER_NODE), "nodes": n, "dependency": "(null)",
            "array_job_id": str(self.jobid), "sockets_per_node": "*", "cores_per_socket": "*",
            "threads_per_core": "*", "array_task_id": "N/A",
            "time_left": format_duration(self.time_limit - self._elapsed(now)) if self.time_limit else "UNLIMITED",
            "time": format_duration(self._elapsed(now)), "nodelist": self.nodelist if running else "",
            "contiguous": "0", "partition": self.partition,
            "nodelist(reason)": self.nodelist if running else f"({reason})",
            "start_time": _timestamp(self.start_time, "N/A"), "state": self.state,
            "uid": str(os.getuid()), "submit_time": _timestamp(self.submit_time),
            "licenses": "(null)", "core_spec": "N/A", "schednodes": "(null)",
            "work_dir": str(self.options.chdir or self.submit_dir),
        }

    def sacct_record(self, now: float) -> Dict[str, str]:
        """The job's allocation line as SFAPI's sacct output shows it (every value a string)."""
        state = self.state
        if state == CANCELLED:
            state = f"CANCELLED by {os.getuid()}"
        elapsed = self._elapsed(now)
        n = str(len(self.nodes) or self.options.nodes)
        return {
            "account": self.account, "alloccpus": str(int(n) * CPUS_PER_NODE) if self.nodes else "0",
            "allocnodes": str(len(self.nodes)), "cluster": self.machine,
            "constraints": self.options.constraint or "", "elapsed": format_duration(elapsed, "sacct"),
            "elapsedraw": str(int(elapsed)), "eligible": _timestamp(self.submit_time),
            "end": _timestamp(self.end_time), "exitcode": self._exitcode(),
            "derivedexitcode": self._exitcode(), "group": self.user, "jobid": str(self.jobid),
            "jobidraw": str(self.jobid), "jobname": self.options.job_name, "nnodes": n,
            "nodelist": self.nodelist or "None assigned", "ncpus": str(int(n) * CPUS_PER_NODE),
            "ntasks": "", "partition": self.partition, "qos": self.options.qos,
            "reason": "None" if self.state != PENDING else self.reason, "reqnodes": str(self.options.nodes),
            "start": _timestamp(self.start_time), "state": state, "submit": _timestamp(self.submit_time),
            "timelimit": format_duration(self.time_limit, "sacct"),
            "timelimitraw": str(int(self.time_limit // 60)) if self.time_limit else "UNLIMITED",
            "uid": str(os.getuid()), "user": self.user, "workdir": str(self.options.chdir or self.submit_dir),
        }

    def to_dict(self) -> Dict[str, object]:
        """A JSON-able summary for the admin API and debugging."""
        return {
            "jobid": self.jobid, "machine": self.machine, "user": self.user, "state": self.state,
            "reason": self.reason, "nodes": self.nodes, "nodelist": self.nodelist,
            "job_name": self.options.job_name, "qos": self.options.qos,
            "constraint": self.options.constraint, "account": self.options.account,
            "exclusive": self.options.exclusive, "num_nodes": self.options.nodes,
            "time_limit": self.time_limit, "submit_time": self.submit_time,
            "start_time": self.start_time, "end_time": self.end_time, "exit_code": self.exit_code,
            "pid": self.pid, "stdout_path": str(self.stdout_path) if self.stdout_path else None,
            "stderr_path": str(self.stderr_path) if self.stderr_path else None,
            "hidden_polls": self.hidden_polls, "never_start": self.never_start,
            "start_delay": self.start_delay,
        }


def _group_pids(pgid: int) -> set:
    """Live (non-zombie) processes in process group ``pgid``."""
    found = set()
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.add(pid)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return found


def _alive(pids) -> set:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.Error:
            continue
    return out


class JobRunner:
    """Runs emulated batch jobs as local process groups and keeps their Slurm-like state."""

    def __init__(self, workdir: Path, submit_dir: Optional[Path] = None, kill_grace: float = 2.0,
                 first_jobid: int = 30000001, node_prefix: str = "nid", first_node: int = 1000,
                 user: Optional[str] = None, extra_env: Optional[Dict[str, str]] = None):
        self.workdir = Path(workdir)
        self.submit_dir = Path(submit_dir) if submit_dir else self.workdir / "home"
        self.kill_grace = kill_grace
        self.user = user or getpass.getuser()
        self.extra_env = dict(extra_env or {})
        self._next_jobid = first_jobid
        self._node_prefix = node_prefix
        self._next_node = first_node
        self._lock = threading.RLock()
        self._jobs: Dict[int, Job] = {}
        self._closing = False
        self.bin_dir = self.workdir / "bin"
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        self.submit_dir.mkdir(parents=True, exist_ok=True)
        srun_py = Path(__file__).with_name("srun.py").resolve()
        wrapper = self.bin_dir / "srun"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(srun_py))} "$@"\n')
        wrapper.chmod(0o755)

    # -- submission and control -------------------------------------------------------------

    def submit(self, script: str, *, machine: str = "perlmutter", args: Sequence[str] = (),
               start_delay: float = 0.0, never_start: bool = False, hidden_polls: int = 0,
               check_perlmutter: bool = True) -> Job:
        """Queue a batch script like sbatch (raises SbatchError) and start its runner thread."""
        opts = parse_sbatch_options(script)
        if check_perlmutter and machine == "perlmutter":
            _check_perlmutter(opts)
        with self._lock:
            if self._closing:
                raise SbatchError("sbatch: error: Batch job submission failed: Slurm is shutting down")
            jobid = self._next_jobid
            self._next_jobid += 1
            job_dir = self.workdir / "jobs" / str(jobid)
            job_dir.mkdir(parents=True, exist_ok=True)
            script_path = job_dir / "slurm_script"
            script_path.write_text(script)
            script_path.chmod(0o700)
            job = Job(jobid=jobid, machine=machine, user=self.user, script=script, options=opts,
                      args=list(args), job_dir=job_dir, submit_dir=self.submit_dir,
                      submit_time=time.time(), start_delay=start_delay, never_start=never_start,
                      hidden_polls=hidden_polls)
            self._jobs[jobid] = job
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"emu-job-{jobid}",
                                          daemon=True)
            job.thread.start()
        return job

    def get(self, jobid) -> Optional[Job]:
        try:
            return self._jobs.get(int(jobid))
        except (TypeError, ValueError):
            return None

    def jobs(self) -> List[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, jobid) -> Optional[Job]:
        """scancel: a pending job ends CANCELLED; a running one gets SIGTERM, then SIGKILL after the grace."""
        job = self.get(jobid)
        if job is None:
            return None
        with self._lock:
            if job.state in TERMINAL_STATES or job.cancel_requested:
                return job
            job.cancel_requested = True
            job.wake.set()
            running = job.state == RUNNING
        if running:
            threading.Thread(target=self._terminate, args=(job,), daemon=True,
                             name=f"emu-kill-{job.jobid}").start()
        return job

    def release(self, jobid) -> Optional[Job]:
        """Start a pending job now (ends a start delay or a 'never start' hold)."""
        job = self.get(jobid)
        if job is not None:
            with self._lock:
                job.released = True
                job.wake.set()
        return job

    def live_pids(self, jobid) -> set:
        """Pids still alive in the job's process group (empty once the job is fully gone)."""
        job = self.get(jobid)
        if job is None or job.pid is None:
            return set()
        return _group_pids(job.pid)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait for their process groups to be gone."""
        with self._lock:
            self._closing = True
            jobs = list(self._jobs.values())
        for job in jobs:
            self.cancel(job.jobid)
        deadline = time.monotonic() + timeout
        for job in jobs:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))
        for job in jobs:  # whatever still lives after the grace: kill outright
            if job.pid is not None:
                self._signal_group(job, signal.SIGKILL)

    # -- internals -----------------------------------------------------------------------------

    def _allocate_nodes(self, count: int) -> List[str]:
        first = self._next_node
        self._next_node += count
        if self._next_node > 999999 - count:
            self._next_node = 1000
        return [f"{self._node_prefix}{n:06d}" for n in range(first, first + count)]

    def _expand_pattern(self, pattern: str, job: Job) -> str:
        out = pattern.replace("%%", "\0").replace("%j", str(job.jobid)).replace("%A", str(job.jobid))
        out = out.replace("%x", job.options.job_name).replace("%u", job.user)
        out = out.replace("%N", job.nodes[0] if job.nodes else "").replace("%a", "4294967294")
        return out.replace("\0", "%")

    def _job_env(self, job: Job, cwd: Path) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "SBATCH_"))}
        env.update(self.extra_env)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        n = len(job.nodes)
        o = job.options
        env.update({
            "SLURM_JOB_ID": str(job.jobid), "SLURM_JOBID": str(job.jobid),
            "SLURM_JOB_NAME": o.job_name, "SLURM_JOB_NUM_NODES": str(n), "SLURM_NNODES": str(n),
            "SLURM_JOB_NODELIST": job.nodelist, "SLURM_NODELIST": job.nodelist,
            "SLURM_SUBMIT_DIR": str(job.submit_dir), "SLURM_SUBMIT_HOST": socket.gethostname(),
            "SLURM_CLUSTER_NAME": job.machine, "SLURM_JOB_QOS": o.qos,
            "SLURM_JOB_ACCOUNT": job.account, "SLURM_JOB_PARTITION": job.partition,
            "SLURM_JOB_USER": job.user, "SLURM_JOB_UID": str(os.getuid()),
            "SLURM_JOB_GID": str(os.getgid()), "SLURM_NODEID": "0", "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0", "SLURMD_NODENAME": job.nodes[0],
            "SLURM_CPUS_ON_NODE": str(CPUS_PER_NODE),
            "SLURM_JOB_CPUS_PER_NODE": f"{CPUS_PER_NODE}(x{n})" if n > 1 else str(CPUS_PER_NODE),
            "SLURM_JOB_START_TIME": str(int(job.start_time or time.time())),
            "SLURM_EMULATOR": "1", "SLURM_EMULATOR_JOB_DIR": str(job.job_dir),
            "SLURM_WORKING_DIR": str(cwd),
        })
        if job.time_limit:
            env["SLURM_JOB_END_TIME"] = str(int((job.start_time or time.time()) + job.time_limit))
        if o.constraint:
            env["SLURM_JOB_CONSTRAINTS"] = o.constraint
        ntasks = o.ntasks or (o.ntasks_per_node * n if o.ntasks_per_node else None)
        if ntasks:
            env["SLURM_NTASKS"] = env["SLURM_NPROCS"] = str(ntasks)
        if o.ntasks_per_node:
            env["SLURM_NTASKS_PER_NODE"] = str(o.ntasks_per_node)
            env["SLURM_TASKS_PER_NODE"] = f"{o.ntasks_per_node}(x{n})" if n > 1 else str(o.ntasks_per_node)
        else:
            env["SLURM_TASKS_PER_NODE"] = f"1(x{n})" if n > 1 else "1"
        return env

    def _wait_to_start(self, job: Job) -> None:
        """Block while the job is held PENDING (start delay / never start), waking on cancel or release."""
        deadline = job.submit_time + job.start_delay
        while True:
            with self._lock:
                if job.cancel_requested or job.released or self._closing:
                    return
                if not job.never_start and time.time() >= deadline:
                    return
                timeout = None if job.never_start else max(0.0, deadline - time.time())
                job.wake.clear()
            job.wake.wait(timeout)

    def _start(self, job: Job) -> bool:
        """Start the batch script (under the lock) unless cancelled meanwhile; False if it did not start."""
        with self._lock:
            if job.cancel_requested or self._closing:
                job.state, job.reason, job.end_time = CANCELLED, "None", time.time()
                return False
            job.nodes = self._allocate_nodes(job.options.nodes)
            cwd = Path(job.options.chdir) if job.options.chdir else job.submit_dir
            job.start_time = time.time()
            out_pattern = job.options.output or "slurm-%j.out"
            job.stdout_path = cwd / self._expand_pattern(out_pattern, job)
            job.stderr_path = cwd / self._expand_pattern(job.options.error, job) if job.options.error else job.stdout_path
            try:
                job.stdout_path.parent.mkdir(parents=True, exist_ok=True)
                job.stderr_path.parent.mkdir(parents=True, exist_ok=True)
                with open(job.stdout_path, "ab") as out:
                    err = open(job.stderr_path, "ab") if job.stderr_path != job.stdout_path else out
                    try:
                        job.proc = subprocess.Popen(
                            [str(job.job_dir / "slurm_script"), *job.args], cwd=str(cwd),
                            env=self._job_env(job, cwd), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=err, start_new_session=True)
                    finally:
                        if err is not out:
                            err.close()
            except OSError as exc:
                log.warning("job %s failed to launch: %s", job.jobid, exc)
                job.state, job.reason, job.end_time, job.exit_code = FAILED, "None", time.time(), 1
                return False
            job.pid = job.proc.pid
            job.state, job.reason = RUNNING, "None"
            return True

    def _run(self, job: Job) -> None:
        try:
            self._wait_to_start(job)
            if not self._start(job):
                return
            limit = job.time_limit
            while True:
                timeout = None if limit is None else max(0.0, job.start_time + limit - time.time())
                try:
                    rc = job.proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    with self._lock:
                        if not job.cancel_requested:
                            job.timed_out = True
                    self._terminate(job)
                    limit = None
            # The batch script is done: like slurmstepd, kill whatever it left behind.
            if _group_pids(job.pid):
                self._terminate(job)
            with self._lock:
                job.exit_code = rc
                job.end_time = time.time()
                if job.cancel_requested:
                    job.state = CANCELLED
                elif job.timed_out:
                    job.state = TIMEOUT
                else:
                    job.state = COMPLETED if rc == 0 else FAILED
        except Exception:  # keep the emulator alive; the job reads FAILED
            log.exception("emulated job %s crashed", job.jobid)
            with self._lock:
                if job.state not in TERMINAL_STATES:
                    job.state, job.end_time = FAILED, time.time()
        finally:
            job.done.set()

    def _signal_group(self, job: Job, sig: int, extra=()) -> None:
        try:
            os.killpg(job.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in extra:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _terminate(self, job: Job) -> None:
        """SIGTERM the job's process group (and descendants that left it), SIGKILL after the grace."""
        if job.pid is None:
            return
        tracked = set()
        try:
            tracked = {p.pid for p in psutil.Process(job.pid).children(recursive=True)}
        except psutil.Error:
            pass
        self._signal_group(job, signal.SIGTERM, tracked)
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline:
            if not (_group_pids(job.pid) | _alive(tracked)):
                return
            time.sleep(0.05)
        self._signal_group(job, signal.SIGKILL, _alive(tracked))
