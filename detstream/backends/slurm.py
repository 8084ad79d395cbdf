"""Slurm backend: a session's nodes are one batch job submitted straight to Slurm (no Superfacility API).

For any Slurm site, or a session started on a login node. It calls Slurm's own commands
(``sbatch``, ``scontrol show job``, ``squeue``, ``scancel``) with the same batch script the
SFAPI backend renders. A job gone from the scheduler (purged after MinJobAge) counts as ended:
its last state seen by scontrol is kept, else it reads ENDED, never a made-up COMPLETED.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from pydantic import BaseModel, Field, field_validator
from sfapi_client.jobs import JobState as SlurmState

from .base import ComputeBackend, JobState, NodeLaunch, Reservation, ReservationError
from .jobscript import NerscJobSettings, _check_sbatch_value, batch_script
from .sfapi import _STATE_MAP, expand_nodelist

Logger = Union[logging.Logger, logging.LoggerAdapter]


class SlurmError(ReservationError):
    """A Slurm command failed or is missing; the message has what Slurm said."""


class SlurmRefused(SlurmError):
    """sbatch refused the job (QOS, constraint, node count, account...): nothing was queued."""


class SlurmSettings(BaseModel):
    """How to reach a Slurm cluster from where the flow runs."""

    slurm_conf: Optional[str] = Field(default=None, description="SLURM_CONF for every Slurm command; "
                                      "empty: the site's default configuration.")
    bin_dir: Optional[str] = Field(default=None, description="Folder of sbatch, squeue, scontrol, scancel; "
                                   "empty: from PATH.")
    work_dir: Optional[str] = Field(default=None, description="Where job scripts and Slurm output files go "
                                    "(visible to the nodes); empty: the session's logs folder.")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        return env

    def program(self, name: str) -> str:
        return str(Path(self.bin_dir) / name) if self.bin_dir else name


class SlurmJobSettings(NerscJobSettings):
    """The batch job for any Slurm site: NERSC's job settings, with QOS and constraint optional and a partition."""

    machine: str = Field(default="slurm", description="Cluster name, for records and messages.")
    qos: Optional[str] = Field(default=None, description="Slurm QOS (-q), e.g. realtime; empty: the default.")
    constraint: Optional[str] = Field(default=None, description="Node features (-C), e.g. cpu; empty: any.")
    partition: Optional[str] = Field(default=None, description="Partition (-p); empty: the default.")

    @field_validator("machine")
    @classmethod
    def _required_sbatch_word(cls, v: str, info) -> str:
        if not v:
            raise ValueError(f"{info.field_name} must not be empty")
        return _check_sbatch_value(info.field_name, v)

    @field_validator("account", "reservation", "output", "qos", "constraint", "partition")
    @classmethod
    def _optional_sbatch_word(cls, v: Optional[str], info) -> Optional[str]:
        return _check_sbatch_value(info.field_name, v or None)


def _fields(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol show job -o`` (values may hold '=' but not ' Key=')."""
    return dict(m.groups() for m in re.finditer(r"(\w[\w/:]*)=(.*?)(?= \w[\w/:]*=|$)", text.strip()))


def _epoch(text: Optional[str]) -> Optional[float]:
    try:
        return time.mktime(time.strptime(text or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def job_state(slurm_state: str) -> JobState:
    """Slurm's state name (RUNNING, CANCELLED, NODE_FAIL, ...) as a backend JobState."""
    try:
        return _STATE_MAP.get(SlurmState(slurm_state.split()[0]), JobState.PENDING)
    except ValueError:
        return JobState.PENDING


class SlurmClient:
    """Slurm's commands with this cluster's configuration; errors carry what Slurm printed."""

    def __init__(self, settings: Optional[SlurmSettings] = None, timeout_s: float = 30.0):
        self.settings = settings or SlurmSettings()
        self.timeout_s = timeout_s

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        cmd = [self.settings.program(argv[0]), *argv[1:]]
        try:
            return subprocess.run(cmd, env=self.settings.env(), capture_output=True, text=True,
                                  timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SlurmError(f"{cmd[0]} not found: is Slurm's client installed (slurm-client), or "
                             "bin_dir set?") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{shlex.join(cmd)} did not answer within {self.timeout_s:g} s "
                             "(slurmctld down?)") from None

    def submit(self, script_path: Path, work_dir: Path, output: Optional[str] = None,
               options: Sequence[str] = (), args: Sequence[str] = ()) -> str:
        """sbatch the script from ``work_dir`` (more sbatch ``options``, script ``args``); the job id,
        or SlurmRefused with sbatch's words."""
        cmd = ["sbatch", "--parsable", f"--chdir={work_dir}", *options]
        if output:
            cmd.append(f"--output={output}")
        r = self.run(*cmd, str(script_path), *args)
        if r.returncode != 0:
            said = "; ".join(line.removeprefix("sbatch: error: ").strip()
                             for line in r.stderr.splitlines() if line.strip()) or f"exit {r.returncode}"
            raise SlurmRefused(said)
        return r.stdout.strip().split(";")[0]

    def show(self, jobid: str) -> Optional[dict[str, str]]:
        """``scontrol show job`` as a dict; None once Slurm no longer knows the job (purged)."""
        r = self.run("scontrol", "show", "job", "-o", str(jobid))
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return None
            raise SlurmError(f"scontrol show job {jobid}: {r.stderr.strip() or r.returncode}")
        return _fields(r.stdout.splitlines()[0]) if r.stdout.strip() else None

    def in_queue(self, jobid: str) -> bool:
        """squeue still lists the job (pending, running or completing)."""
        r = self.run("squeue", "-h", "-j", str(jobid), "-o", "%T")
        return r.returncode == 0 and bool(r.stdout.strip())

    def cancel(self, jobid: str) -> None:
        r = self.run("scancel", str(jobid))
        if r.returncode != 0 and "Invalid job id" not in r.stderr and "already completing" not in r.stderr:
            raise SlurmError(f"scancel {jobid}: {r.stderr.strip() or r.returncode}")


def _failure(info: dict[str, str]) -> Optional[str]:
    """Exit code and output file of a job that did not complete, for the session's error."""
    code = info.get("ExitCode", "")
    out = info.get("StdOut")
    words = [f"exit code {code}" if code and code != "0:0" else None, f"output {out}" if out else None]
    return "; ".join(w for w in words if w) or None


_TASK_EXIT = re.compile(r"srun: error: (\S+): tasks? ([\d,-]+): (Exited with exit code \d+|Killed|Terminated)")


def _failed_tasks(output: Optional[str]) -> Optional[str]:
    """Tasks srun reported dead while the job still runs (its other nodes go on), from the job's output."""
    try:
        with open(output or "", errors="replace") as fh:
            found = _TASK_EXIT.findall(fh.read()[-65536:])
    except OSError:
        return None
    if not found:
        return None
    return "; ".join(f"task {task} on node {node}: {what.lower()}" for node, task, what in found) + f"; output {output}"


class SlurmBackend(ComputeBackend):
    """Reserve nodes as one Slurm job; each node runs ``detstream <service>`` under srun."""

    name = "slurm"

    def __init__(self, settings: Optional[SlurmSettings] = None, job: Optional[SlurmJobSettings] = None,
                 work_dir: Optional[Path] = None, poll_interval_s: float = 0.25, release_timeout_s: float = 30.0,
                 logger: Optional[Logger] = None):
        self.settings = settings or SlurmSettings()
        self.job = job or SlurmJobSettings()
        self.work_dir = Path(self.settings.work_dir or work_dir or Path.cwd())
        self.slurm = SlurmClient(self.settings)
        self.poll_interval_s = poll_interval_s
        self.release_timeout_s = release_timeout_s
        self.log = logger or logging.getLogger(__name__)

    def reserve(self, nodes: int, launch: NodeLaunch) -> Reservation:
        """Write and sbatch the batch script; return at once (PENDING). A refusal names what Slurm said."""
        script = batch_script(self.job, nodes, launch)
        name = self.job.job_name(launch.session_id)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / f"{name}.sbatch"
        path.write_text(script)
        path.chmod(0o700)
        submitted_at = time.time()
        try:
            jobid = self.slurm.submit(path, self.work_dir, None if self.job.output else "slurm-%j.out")
        except SlurmRefused as err:
            raise SlurmRefused(f"Slurm refused job {name} ({nodes} nodes, qos {self.job.qos or 'default'}, "
                               f"constraint {self.job.constraint or 'none'}): {err}") from None
        self.log.info("submitted Slurm job %s (%s): %d nodes", jobid, name, nodes)
        return Reservation(backend=self.name, job_id=jobid, nodes=nodes, state=JobState.PENDING, detail=name,
                           host=self.job.machine, submitted_at=submitted_at)

    def wait_running(self, reservation: Reservation, timeout_s: float) -> Reservation:
        """Poll until the job runs (with its nodes); on timeout or an early end, cancel and raise."""
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            res = self.poll(reservation)
            if res.state is JobState.RUNNING and res.node_names:
                self.log.info("Slurm job %s running on %s after %.2f s in the queue", res.job_id,
                              ",".join(res.node_names), res.queue_wait_s or 0.0)
                return res
            if res.state.finished:
                raise ReservationError(f"Slurm job {res.job_id} ended {res.scheduler_state} before it ran"
                                       + (f" ({res.failure})" if res.failure else ""))
            if res.scheduler_state != last:
                self.log.info("Slurm job %s is %s", res.job_id, res.scheduler_state)
                last = res.scheduler_state
            if time.monotonic() >= deadline:
                released = self.release(res)
                raise ReservationError(f"Slurm job {res.job_id} did not start within {timeout_s:g} s "
                                       f"(last state: {last}); cancelled it ({released.scheduler_state})")
            reservation = res
            time.sleep(self.poll_interval_s)

    def poll(self, reservation: Reservation) -> Reservation:
        """The job's state from scontrol; gone from Slurm: ended, keeping the last real state seen."""
        if reservation.state.finished and reservation.scheduler_state:
            return reservation
        info = self.slurm.show(reservation.job_id)
        if info is None:
            last = reservation.scheduler_state
            if reservation.state.finished:
                return reservation
            return reservation.model_copy(update={
                "state": JobState.ENDED,
                "scheduler_state": f"gone from Slurm (last seen {last or 'never'})"})
        raw = info.get("JobState", "UNKNOWN")
        reason = info.get("Reason")
        state = job_state(raw)
        update: dict = {"state": state, "scheduler_state": raw if reason in (None, "None") else f"{raw} ({reason})"}
        nodes = expand_nodelist(info.get("NodeList")) if state is not JobState.PENDING else []
        if nodes:
            update["node_names"] = nodes
        if state is not JobState.PENDING and reservation.started_at is None:
            # Seen from here (to a poll interval) when we submitted it: Slurm's own times are whole seconds.
            now = time.time()
            start, submit = _epoch(info.get("StartTime")), _epoch(info.get("SubmitTime"))
            update["started_at"] = now
            update["queue_wait_s"] = (now - reservation.submitted_at if reservation.submitted_at else
                                      max(0.0, start - submit) if start and submit else None)
        if state in (JobState.FAILED, JobState.CANCELLED):
            update["failure"] = _failure(info)
        elif state is JobState.RUNNING:
            update["failure"] = _failed_tasks(info.get("StdOut"))
        return reservation.model_copy(update=update)

    def release(self, reservation: Reservation) -> Reservation:
        """scancel unless ended, then wait until Slurm has the job out of its queue; idempotent."""
        res = self.poll(reservation)
        if not res.state.finished:
            self.slurm.cancel(res.job_id)
            self.log.info("cancel requested for Slurm job %s", res.job_id)
        deadline = time.monotonic() + self.release_timeout_s
        while self.slurm.in_queue(res.job_id) and time.monotonic() < deadline:
            time.sleep(self.poll_interval_s)
        if self.slurm.in_queue(res.job_id):
            self.log.warning("Slurm job %s: still in the queue %g s after scancel", res.job_id, self.release_timeout_s)
        res = self.poll(res)
        return res if res.state.finished else res.model_copy(update={"state": JobState.CANCELLED})


def cancel_slurm_job(settings: SlurmSettings, reservation: Reservation, wait_s: float = 10.0,
                     logger: Optional[Logger] = None) -> Reservation:
    """Cancel a Slurm job from its etcd record alone (for hooks in another process); idempotent."""
    if reservation.backend != SlurmBackend.name:
        return reservation
    return SlurmBackend(settings, release_timeout_s=wait_s, logger=logger).release(reservation)
