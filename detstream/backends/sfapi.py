"""SFAPI backend: a session's nodes are one Slurm batch job submitted through NERSC's Superfacility API.

It drives the real ``sfapi_client`` and adds what that client leaves to the caller: refusing to
submit during an outage, retrying "Job not found" while SFAPI's job-status cache catches up,
logging in again after a server-side token revocation, cancelling a job that did not start in
time, and turning key problems into one clear error instead of a traceback. The private key and
the access tokens are never logged, put in a repr or written to disk here.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Optional, TypeVar, Union

import httpx
import tenacity
from authlib.common.errors import AuthlibBaseError
from pydantic import ValidationError
from sfapi_client import Client, SfApiError, StatusValue
from sfapi_client.jobs import JobCommand
from sfapi_client.jobs import JobState as SlurmState

from .base import ComputeBackend, NodeLaunch, JobState, Reservation, ReservationError
from .jobscript import MAX_WALLTIME_MINUTES, NerscJobSettings, batch_script, render_for_cli, render_job_script
from .sfapi_settings import SfapiAuthError, SfapiError, SfapiSettings, SfapiUnavailableError

__all__ = [
    "MAX_WALLTIME_MINUTES", "NerscJobSettings", "SfapiAuthError", "SfapiBackend", "SfapiError",
    "SfapiSettings", "SfapiUnavailableError", "cancel_sfapi_job", "expand_nodelist",
    "render_for_cli", "render_job_script",
]

T = TypeVar("T")


# -- job states ----------------------------------------------------------------------------------

_STATE_MAP = {
    SlurmState.RUNNING: JobState.RUNNING, SlurmState.COMPLETING: JobState.RUNNING,
    SlurmState.RESIZING: JobState.RUNNING, SlurmState.SIGNALING: JobState.RUNNING,
    SlurmState.STAGE_OUT: JobState.RUNNING,
    SlurmState.COMPLETED: JobState.COMPLETED,
    SlurmState.CANCELLED: JobState.CANCELLED, SlurmState.PREEMPTED: JobState.CANCELLED,
    SlurmState.REVOKED: JobState.CANCELLED, SlurmState.DEADLINE: JobState.CANCELLED,
    SlurmState.FAILED: JobState.FAILED, SlurmState.BOOT_FAIL: JobState.FAILED,
    SlurmState.NODE_FAIL: JobState.FAILED, SlurmState.OUT_OF_MEMORY: JobState.FAILED,
    SlurmState.TIMEOUT: JobState.FAILED, SlurmState.SPECIAL_EXIT: JobState.FAILED,
}  # everything else (PENDING, CONFIGURING, REQUEUED, SUSPENDED, ...) reads PENDING


def expand_nodelist(text: Optional[str]) -> list[str]:
    """Node names of a Slurm hostlist: ``nid[001000-001002,001007],login01`` -> 4 + 1 names."""
    names: list[str] = []
    if not text or text.strip().startswith("(") or text.strip() in ("None assigned", "n/a"):
        return names
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text.strip()):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            names.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            hi = hi or lo
            for n in range(int(lo), int(hi) + 1):
                names.append(f"{prefix}{n:0{len(lo)}d}{suffix}")
    return names


def _slurm_time(text: Optional[str]) -> Optional[datetime]:
    try:
        return datetime.strptime(text or "", "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None


@dataclass
class _JobInfo:
    """One job as squeue (or, once it left the queue, sacct) reports it."""

    slurm_state: str
    state: JobState
    nodes: list[str] = field(default_factory=list)
    reason: Optional[str] = None
    queue_wait_s: Optional[float] = None

    @classmethod
    def from_row(cls, row) -> "_JobInfo":
        raw = row.state.value if row.state is not None else "UNKNOWN"
        state = _STATE_MAP.get(row.state, JobState.PENDING)
        submit = _slurm_time(getattr(row, "submit_time", None) or getattr(row, "submit", None))
        start = _slurm_time(getattr(row, "start_time", None) or getattr(row, "start", None))
        wait = (start - submit).total_seconds() if submit and start and start >= submit else None
        nodes = expand_nodelist(row.nodelist) if state is not JobState.PENDING else []
        return cls(raw, state, nodes, getattr(row, "reason", None), wait)


# -- the backend ---------------------------------------------------------------------------------

class SfapiBackend(ComputeBackend):
    """Reserve nodes as one Slurm job through SFAPI; each node runs ``detstream distributor`` via srun.

    ``poll_interval_s`` paces state queries; "Job not found" is retried with exponential backoff
    (``poll_interval_s`` doubling up to ``max_backoff_s``) at most ``not_found_retries`` times,
    and in ``poll`` a job younger than ``not_found_grace_s`` that SFAPI cannot see yet keeps its
    last known state. ``release`` waits up to ``release_timeout_s`` for Slurm to confirm.
    """

    name = "sfapi"

    def __init__(self, settings: SfapiSettings, job: NerscJobSettings, poll_interval_s: float = 1.0,
                 not_found_retries: int = 10, not_found_grace_s: float = 120.0, max_backoff_s: float = 10.0,
                 transient_retries: int = 3, release_timeout_s: float = 30.0,
                 logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None):
        self.settings = settings
        self.job = job
        self.poll_interval_s = float(poll_interval_s)
        self.not_found_retries = int(not_found_retries)
        self.not_found_grace_s = float(not_found_grace_s)
        self.max_backoff_s = float(max_backoff_s)
        self.transient_retries = int(transient_retries)
        self.release_timeout_s = float(release_timeout_s)
        self.log = logger or logging.getLogger(__name__)
        self._lock = threading.RLock()
        self._sf: Optional[Client] = None
        self._pm = None  # sfapi_client Compute for self.job.machine
        self._client_id: Optional[str] = settings.client_id

    def __repr__(self) -> str:
        return (f"SfapiBackend(client_id={self._client_id!r}, machine={self.job.machine!r}, "
                f"api={self.settings.api_base_url!r})")

    def __enter__(self) -> "SfapiBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session (the job, if any, is left as it is)."""
        with self._lock:
            if self._sf is not None:
                try:
                    self._sf.close()
                except Exception:  # closing must never fail a caller
                    pass
            self._sf, self._pm = None, None

    # -- ComputeBackend ------------------------------------------------------------------------

    def reserve(self, nodes: int, launch: NodeLaunch) -> Reservation:
        """Check the machine, submit the batch script and return at once (state PENDING)."""
        machine = self.job.machine
        script = batch_script(self.job, nodes, launch)
        pm = self._call(f"checking the status of {machine}", self._fresh_compute)
        status = pm.status
        notes = "; ".join(pm.notes or []) or (pm.description or "no details given")
        if status == StatusValue.unavailable:
            raise SfapiUnavailableError(f"{machine} is unavailable: {notes}")
        if status != StatusValue.active:
            self.log.warning("%s reports status %s (%s); submitting anyway", machine, status.value, notes)
        name = self.job.job_name(launch.session_id)
        submitted_at = time.time()
        try:
            job = self._call(f"submitting job {name} to {machine}", lambda: self._compute().submit_job(script),
                             retry_transient=False)
        except SfApiError as err:
            raise ReservationError(f"{machine} refused job {name}: {err.message}") from None
        except SfapiUnavailableError as err:  # SFAPI may have queued it before failing: say how to find it
            raise SfapiUnavailableError(f"{err}; if {machine} queued it anyway, it is the job named {name}") from None
        self.log.info("submitted SFAPI job %s (%s) on %s: %d nodes, qos %s, walltime %d min",
                      job.jobid, name, machine, nodes, self.job.qos, self.job.walltime_minutes)
        return Reservation(backend=self.name, job_id=str(job.jobid), nodes=nodes, state=JobState.PENDING,
                           detail=name, host=machine, submitted_at=submitted_at)

    def wait_running(self, reservation: Reservation, timeout_s: float) -> Reservation:
        """Poll until the job runs (with its node names); on timeout or early end cancel and raise."""
        if reservation.state is JobState.RUNNING and reservation.node_names:
            return reservation
        jobid, machine = reservation.job_id, self._machine(reservation)
        deadline = time.monotonic() + timeout_s
        last = "not yet visible"
        while True:
            try:
                info = self._lookup_new(jobid, machine, self.not_found_retries, deadline)
            except SfapiUnavailableError as err:  # keep waiting: SFAPI may come back before the deadline
                self.log.warning("job %s: %s", jobid, err)
                last = f"unknown ({err})"
            else:
                if info is None:
                    if time.monotonic() < deadline:
                        cancelled = self._cancel_quietly(jobid, machine)
                        raise ReservationError(
                            f"SFAPI job {jobid} on {machine} was still not found after "
                            f"{self.not_found_retries + 1} queries{self._machine_note(machine)}; {cancelled}")
                elif info.state is JobState.RUNNING:
                    res = self._apply(reservation, info)
                    self.log.info("SFAPI job %s running on %d nodes %s after %.1f s in the queue", jobid,
                                  len(res.node_names), ",".join(res.node_names), res.queue_wait_s or 0.0)
                    return res
                elif info.state.finished:
                    raise ReservationError(
                        f"SFAPI job {jobid} on {machine} ended {info.slurm_state} before it was seen running; "
                        "see its Slurm output file in the submit directory")
                else:
                    state = info.slurm_state + (f" ({info.reason})" if info.reason else "")
                    if state != last:
                        self.log.info("SFAPI job %s on %s is %s", jobid, machine, state)
                    last = state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cancelled = self._cancel_quietly(jobid, machine)
                raise ReservationError(f"SFAPI job {jobid} on {machine} did not start within {timeout_s:g} s "
                                       f"(last state: {last}); {cancelled}")
            time.sleep(min(self.poll_interval_s, remaining))

    def poll(self, reservation: Reservation) -> Reservation:
        """The job's current state; a young job SFAPI cannot see yet keeps its state.

        Raises SfapiUnavailableError when SFAPI kept failing or lost an older job (during an
        outage every job reads "not found"): the state is then unknown, not necessarily bad.
        """
        if reservation.state.finished:
            return reservation
        jobid, machine = reservation.job_id, self._machine(reservation)
        young = time.time() - (reservation.submitted_at or 0.0) < self.not_found_grace_s
        info = self._lookup_new(jobid, machine, 0 if young else min(3, self.not_found_retries))
        if info is None:
            if young:
                return reservation
            raise SfapiUnavailableError(f"SFAPI cannot find job {jobid} on {machine}"
                                        f"{self._machine_note(machine)}")
        return self._apply(reservation, info)

    def release(self, reservation: Reservation) -> Reservation:
        """Cancel the job unless it already ended, and wait briefly for Slurm to confirm; idempotent."""
        if reservation.state.finished:
            return reservation
        jobid, machine = reservation.job_id, self._machine(reservation)
        try:
            info = self._lookup(jobid, machine)
        except SfapiUnavailableError as err:
            self.log.warning("job %s: state unknown before cancelling: %s", jobid, err)
            info = None
        if info is not None and info.state.finished:
            return self._apply(reservation, info)
        self._cancel(jobid, machine)
        deadline = time.monotonic() + self.release_timeout_s
        while time.monotonic() < deadline:
            try:
                info = self._lookup(jobid, machine)
            except SfapiUnavailableError:
                info = None
            if info is not None and info.state.finished:
                self.log.info("SFAPI job %s on %s released: %s", jobid, machine, info.slurm_state)
                return self._apply(reservation, info)
            time.sleep(self.poll_interval_s)
        self.log.warning("SFAPI job %s on %s: cancel requested, not confirmed within %g s", jobid, machine,
                         self.release_timeout_s)
        return reservation.model_copy(update={"state": JobState.CANCELLED})

    # -- internals -----------------------------------------------------------------------------

    def _machine(self, reservation: Reservation) -> str:
        return reservation.host or self.job.machine

    def _backoff(self, deadline: Optional[float] = None) -> Callable[[tenacity.RetryCallState], float]:
        """Waits doubling from ``poll_interval_s`` up to ``max_backoff_s``, never past ``deadline``."""
        grow = tenacity.wait_exponential(multiplier=self.poll_interval_s, max=self.max_backoff_s)
        if deadline is None:
            return grow
        return lambda state: min(grow(state), max(0.0, deadline - time.monotonic()))

    def _client(self) -> Client:
        with self._lock:
            if self._sf is None:
                client_id, secret = self.settings.credentials()
                self._client_id = client_id
                self._sf = Client(client_id, secret, api_base_url=self.settings.api_base_url,
                                  token_url=self.settings.token_url, wait_interval=1)
            return self._sf

    def _fresh_compute(self, machine: Optional[str] = None):
        """GET status/<machine> (also logs in on first use); keeps the Compute for job queries."""
        machine = machine or self.job.machine
        try:
            pm = self._client().compute(machine)
        except ValueError as err:
            if "PublicHost" in str(err) or "is not a valid" in str(err):
                raise SfapiError(f"SFAPI does not know machine {machine!r}") from None
            raise
        if machine == self.job.machine:
            self._pm = pm
        return pm

    def _compute(self, machine: Optional[str] = None):
        machine = machine or self.job.machine
        if machine == self.job.machine and self._pm is not None:
            return self._pm
        return self._fresh_compute(machine)

    def _reset_client(self) -> None:
        self.close()

    def _auth_error(self, err: AuthlibBaseError) -> SfapiAuthError:
        who = f"client id {self._client_id}" if self._client_id else "the SFAPI client"
        if self.settings.key_file is not None:
            who += f" (key file {self.settings.key_file})"
        if err.error == "invalid_client":
            return SfapiAuthError(f"SFAPI rejected the key of {who} ({err.description or err.error}); "
                                  "check the client id and private key, or create a new client in Iris")
        return SfapiAuthError(f"SFAPI login failed for {who}: {err.error}: {err.description}")

    def _call(self, what: str, fn: Callable[[], T], retry_transient: bool = True) -> T:
        """Run one sfapi_client operation, mapping its failures to SfapiError subclasses.

        A 401 (token revoked server-side) builds a new Client once and repeats. A 5xx or dropped
        connection that sfapi_client does not retry itself is retried ``transient_retries`` times
        with backoff when ``retry_transient`` (idempotent calls only: never a submission).
        """
        transient = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_transient), wait=self._backoff(), reraise=True,
            stop=tenacity.stop_after_attempt(1 + (self.transient_retries if retry_transient else 0)),
            before_sleep=lambda state: self.log.warning(
                "%s; retrying in %.1f s", _failure(state.outcome.exception(), what), state.next_action.sleep))
        relogin = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_unauthorized), stop=tenacity.stop_after_attempt(2),
            reraise=True, before_sleep=lambda state: self._relogin(what))
        try:
            return relogin(transient, fn)
        except AuthlibBaseError as err:
            raise self._auth_error(err) from None
        except httpx.HTTPStatusError as err:
            code = err.response.status_code
            if code in (401, 403):
                who = f"client id {self._client_id}" if self._client_id else "the SFAPI client"
                raise SfapiAuthError(f"SFAPI refused {who} (HTTP {code}) while {what}") from None
            if code < 500:
                raise SfapiError(_failure(err, what)) from None
            raise SfapiUnavailableError(_failure(err, what)) from None
        except tenacity.RetryError as err:  # sfapi_client's own retries (429/5xx/connect) ran out
            last = err.last_attempt.exception()
            detail = (f"HTTP {last.response.status_code}" if isinstance(last, httpx.HTTPStatusError)
                      else f"{type(last).__name__}: {last}")
            raise SfapiUnavailableError(f"SFAPI kept failing while {what}: {detail}") from None
        except httpx.TransportError as err:
            raise SfapiUnavailableError(_failure(err, what)) from None
        except ValidationError as err:
            raise SfapiError(f"unexpected SFAPI answer while {what}: {err.error_count()} "
                             "validation errors") from None

    def _relogin(self, what: str) -> None:
        self.log.warning("SFAPI refused the access token (HTTP 401) while %s; logging in again", what)
        self._reset_client()

    def _lookup(self, jobid: str, machine: str) -> Optional[_JobInfo]:
        """The job from squeue, else sacct; None while SFAPI reports "Job not found"."""
        def query():
            pm = self._compute(machine)
            rows = pm.jobs(jobids=[jobid], command=JobCommand.squeue)
            if not rows:
                rows = pm.jobs(jobids=[jobid], command=JobCommand.sacct)
            return _JobInfo.from_row(rows[0]) if rows else None
        return self._call(f"reading the state of job {jobid}", query)

    def _lookup_new(self, jobid: str, machine: str, retries: int,
                    deadline: Optional[float] = None) -> Optional[_JobInfo]:
        """``_lookup``, asked again with backoff while "Job not found" (SFAPI's status cache lags new jobs)."""
        stop = tenacity.stop_after_attempt(retries + 1)
        if deadline is not None:
            stop = stop | (lambda state: time.monotonic() >= deadline)
        return tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda info: info is None), stop=stop,
            wait=self._backoff(deadline), retry_error_callback=lambda state: None,
            before_sleep=lambda state: self.log.info(
                "job %s not found yet (SFAPI status cache); retry %d/%d in %.1f s", jobid,
                state.attempt_number, retries, state.next_action.sleep),
        )(self._lookup, jobid, machine)

    def _apply(self, reservation: Reservation, info: _JobInfo) -> Reservation:
        update: dict = {"state": info.state, "scheduler_state": info.slurm_state}
        if info.nodes:
            update["node_names"] = info.nodes
        if info.state is not JobState.PENDING and reservation.started_at is None:
            now = time.time()
            update["started_at"] = now
            wait = info.queue_wait_s
            if wait is None and reservation.submitted_at is not None:
                wait = max(0.0, now - reservation.submitted_at)
            update["queue_wait_s"] = wait
        return reservation.model_copy(update=update)

    def _cancel(self, jobid: str, machine: str) -> None:
        """scancel through SFAPI; an unknown or finished job is not an error."""
        def delete():
            r = self._client().delete(f"compute/jobs/{machine}/{jobid}")
            try:
                body = r.json()
            except ValueError:
                body = {}
            return body if isinstance(body, dict) else {}
        body = self._call(f"cancelling job {jobid}", delete)
        if str(body.get("status", "")).upper() == "ERROR":
            self.log.warning("SFAPI job %s on %s: cancel answered: %s", jobid, machine, body.get("error"))
        else:
            self.log.info("cancel requested for SFAPI job %s on %s", jobid, machine)

    def _cancel_quietly(self, jobid: str, machine: str) -> str:
        """Cancel and say how it went, for an error message that must not be masked by another."""
        try:
            self._cancel(jobid, machine)
            return "cancelled it"
        except SfapiError as err:
            self.log.error("could not cancel SFAPI job %s: %s", jobid, err)
            return f"cancelling it failed too: {err}"

    def _machine_note(self, machine: str) -> str:
        """', <machine> is unavailable: notes' when SFAPI says so (job queries then read "not found")."""
        try:
            pm = self._call(f"checking the status of {machine}", lambda: self._fresh_compute(machine),
                            retry_transient=False)
        except SfapiError:
            return ""
        if pm.status == StatusValue.active:
            return ""
        return f" ({machine} is {pm.status.value}: {'; '.join(pm.notes or []) or pm.description})"


def _is_transient(err: BaseException) -> bool:
    """A dropped connection or a 5xx: worth asking again if the call is idempotent."""
    return isinstance(err, httpx.TransportError) or (
        isinstance(err, httpx.HTTPStatusError) and err.response.status_code >= 500)


def _is_unauthorized(err: BaseException) -> bool:
    return isinstance(err, httpx.HTTPStatusError) and err.response.status_code == 401


def _failure(err: BaseException, what: str) -> str:
    if isinstance(err, httpx.HTTPStatusError):
        return f"SFAPI answered HTTP {err.response.status_code} while {what}"
    return f"cannot reach SFAPI while {what}: {type(err).__name__}: {err}"


def cancel_sfapi_job(settings: SfapiSettings, reservation: Reservation, wait_s: float = 10.0,
                     logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None) -> Reservation:
    """Cancel an SFAPI job from its etcd record alone (for hooks in another process); idempotent."""
    if reservation.backend != SfapiBackend.name:
        return reservation
    job = NerscJobSettings(machine=reservation.host or "perlmutter")
    with SfapiBackend(settings, job, release_timeout_s=wait_s, logger=logger) as backend:
        return backend.release(reservation)
