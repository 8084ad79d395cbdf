"""Mutable state of the SFAPI emulator: registered clients, tokens, machines, tasks, jobs and faults.

Everything the HTTP layer answers comes from here, and every fault-injection control is a
method or attribute here, so tests can steer the emulator directly (``server.app_state``) or
through the ``/_emulator`` admin endpoints. All methods are thread-safe.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Deque, Dict, Iterable, List, Optional, Tuple, Union

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from .jobs import PENDING, RUNNING, JobRunner

from .sbatch import SbatchError

if TYPE_CHECKING:
    from .slurm import SlurmSettings

log = logging.getLogger(__name__)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MACHINE_STATUSES = ("active", "unavailable", "degraded", "other")
COMPUTE_MACHINES = ("perlmutter",)
# Path-parameter machines the real API accepts for compute endpoints (sfapi_client's Machine enum).
PUBLIC_HOSTS = ("dtn01", "dtns", "perlmutter")
_RESOURCES = {
    "perlmutter": ("Perlmutter", "compute"),
    "dtns": ("Data Transfer Nodes", "filesystem"),
    "global_homes": ("Global Homes", "filesystem"),
    "community_filesystem": ("Community File System (CFS)", "filesystem"),
    "globus": ("Globus", "service"),
    "iris": ("IRIS", "service"),
    "nersc_center": ("NERSC Center", "service"),
}


class AuthError(Exception):
    """A token request refused with an OAuth error (``error`` code, HTTP ``status``)."""

    def __init__(self, error: str, description: str, status: int = 401):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass
class _HttpFault:
    status: int
    remaining: int
    scope: str  # "api", "token" or "all"
    retry_after: Optional[int]


@dataclass
class _Task:
    id: str
    ready_at: float
    result: Dict[str, object]
    status: str = "completed"


def _b64json(segment: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


class EmulatorState:
    """Clients, tokens, machine status, tasks and jobs of one emulated SFAPI, plus its fault controls.

    Fault-injection controls (plain attributes unless noted):

    - ``token_lifetime`` (s): lifetime of new tokens, enforced by the server and sent as
      ``expires_in``. sfapi_client (authlib) refreshes 60 s before expiry, so <= 60 means a new
      token before every request.
    - ``revoke_tokens()``: invalidate all issued tokens server-side (the client is not told).
    - ``inject_http_errors(status, count, scope)``: answer the next ``count`` requests with
      ``status`` (429/502/503/504 ...), on ``scope`` "api", "token" or "all".
    - ``set_machine_status(machine, status, notes)``: an outage ("unavailable") or "degraded".
    - ``start_delay`` (s) / ``never_start``: new jobs stay PENDING that long / forever
      (``release_job(jobid)`` starts a held job).
    - ``hide_new_jobs_polls``: each new job is missing from its first K job-status answers, so
      sfapi_client raises ``SfApiError("Job not found: N")`` as with SFAPI's status caching.
    - ``task_delay`` (s): submission tasks read "new" that long before completing.
    - ``kill_grace`` (s): SIGTERM-to-SIGKILL grace on cancel and walltime.
    """

    def __init__(self, workdir: Union[str, Path, None] = None, *, token_lifetime: float = 600.0,
                 kill_grace: float = 2.0, user: Optional[str] = None,
                 check_perlmutter_options: bool = True, request_log_size: int = 2000,
                 slurm: Optional["SlurmSettings"] = None):
        """``slurm``: run jobs on that real Slurm cluster (sbatch/scontrol/scancel), else as local
        process groups with the ``srun`` stand-in. Any object with ``slurm_conf`` (and optionally
        ``bin_dir``) will do, e.g. ``slurm.SlurmSettings`` or detstream's own."""
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sfapi-emulator-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if slurm is not None:
            from .slurm import SlurmJobRunner

            self.runner = SlurmJobRunner(self.workdir, slurm, kill_grace=kill_grace, user=user)
            check_perlmutter_options = False  # the real scheduler refuses what it does not have
        else:
            self.runner = JobRunner(self.workdir, kill_grace=kill_grace, user=user)
        self.check_perlmutter_options = check_perlmutter_options
        self._lock = threading.RLock()
        self._clients: Dict[str, RSAKey] = {}
        self._tokens: Dict[str, Tuple[str, float]] = {}
        self._seen_jti: Dict[str, float] = {}
        self._tasks: Dict[str, _Task] = {}
        self._faults: List[_HttpFault] = []
        self._machines: Dict[str, Dict[str, object]] = {}
        for name in _RESOURCES:
            self.set_machine_status(name, "active")
        # fault controls
        self.token_lifetime = float(token_lifetime)
        self.start_delay = 0.0
        self.never_start = False
        self.hide_new_jobs_polls = 0
        self.task_delay = 0.0
        # counters
        self.token_requests = 0
        self.tokens_issued = 0
        self.token_failures = 0
        self.request_counts: Counter = Counter()
        self.request_log: Deque[Tuple[float, str, str, int]] = deque(maxlen=request_log_size)

    # -- properties forwarded to the runner --------------------------------------------------

    @property
    def kill_grace(self) -> float:
        return self.runner.kill_grace

    @kill_grace.setter
    def kill_grace(self, value: float) -> None:
        self.runner.kill_grace = float(value)

    @property
    def user(self) -> str:
        return self.runner.user

    # -- clients and tokens ------------------------------------------------------------------

    def register_client(self, client_id: str, public_key: Union[str, bytes, dict, RSAKey]) -> None:
        """Register a client id with its public key (PEM text/bytes, JWK dict or RSAKey)."""
        key = public_key if isinstance(public_key, RSAKey) else RSAKey.import_key(public_key)
        with self._lock:
            self._clients[client_id] = key

    def authenticate_client(self, form: Dict[str, str], audience: Iterable[str]) -> str:
        """Check a client_credentials request with a private-key JWT assertion; returns the client id."""
        with self._lock:
            self.token_requests += 1
        try:
            if form.get("grant_type") != "client_credentials":
                raise AuthError("unsupported_grant_type", "Only client_credentials is supported", 400)
            assertion = form.get("client_assertion")
            if form.get("client_assertion_type") != JWT_BEARER or not assertion:
                raise AuthError("invalid_client", "Missing private_key_jwt client assertion")
            try:
                claims = _b64json(assertion.split(".")[1])
                client_id = str(claims.get("iss", ""))
            except Exception:
                raise AuthError("invalid_client", "Malformed client assertion") from None
            if form.get("client_id") not in (None, client_id):
                raise AuthError("invalid_client", "client_id does not match the assertion")
            with self._lock:
                key = self._clients.get(client_id)
            if key is None:
                raise AuthError("invalid_client", "Client authentication failed: unknown client")
            try:
                token = jwt.decode(assertion, key, algorithms=["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"])
            except JoseError:
                raise AuthError("invalid_client", "Client authentication failed: bad signature") from None
            auds = [a for a in audience if a]
            registry = jwt.JWTClaimsRegistry(
                leeway=30, iss={"essential": True, "value": client_id},
                sub={"essential": True, "value": client_id},
                aud={"essential": True, "values": auds}, exp={"essential": True},
                jti={"essential": True})
            try:
                registry.validate(token.claims)
            except JoseError as exc:
                raise AuthError("invalid_client", f"Client authentication failed: {exc.error}") from None
            now = time.time()
            with self._lock:
                self._seen_jti = {j: e for j, e in self._seen_jti.items() if e > now - 60}
                jti = str(token.claims["jti"])
                if jti in self._seen_jti:
                    raise AuthError("invalid_client", "Client authentication failed: replayed assertion")
                self._seen_jti[jti] = float(token.claims["exp"])
            return client_id
        except AuthError:
            with self._lock:
                self.token_failures += 1
            raise

    def issue_token(self, client_id: str) -> Dict[str, object]:
        """A new opaque bearer token for an authenticated client, as the token endpoint returns it."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            lifetime = self.token_lifetime
            now = time.time()
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (client_id, now + lifetime)
            self.tokens_issued += 1
        return {"access_token": token, "token_type": "Bearer", "expires_in": max(1, int(lifetime)),
                "scope": "color:blue"}

    def check_token(self, token: Optional[str]) -> Optional[str]:
        """The client id a bearer token belongs to, or None if unknown, revoked or expired."""
        if not token:
            return None
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None or entry[1] <= time.time():
            return None
        return entry[0]

    def revoke_tokens(self) -> int:
        """Invalidate every issued token server-side; returns how many were live."""
        with self._lock:
            n = len(self._tokens)
            self._tokens.clear()
        return n

    # -- HTTP faults -------------------------------------------------------------------------

    def inject_http_errors(self, status: int = 503, count: int = 1, scope: str = "api",
                           retry_after: Optional[int] = None) -> None:
        """Answer the next ``count`` requests in ``scope`` ("api", "token", "all") with HTTP ``status``."""
        if scope not in ("api", "token", "all"):
            raise ValueError(f"scope must be api, token or all, not {scope!r}")
        with self._lock:
            self._faults.append(_HttpFault(int(status), int(count), scope, retry_after))

    def clear_http_errors(self) -> None:
        with self._lock:
            self._faults.clear()

    def take_http_error(self, scope: str) -> Optional[Tuple[int, Optional[int]]]:
        """Consume one injected error for a request in ``scope``; (status, retry_after) or None."""
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.scope in (scope, "all"):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault.status, fault.retry_after
        return None

    def record_request(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.request_counts[f"{method} {path}"] += 1
            self.request_log.append((time.time(), method, path, status))

    def count_requests(self, method: Optional[str] = None, path_contains: str = "") -> int:
        """How many requests matched (method and a substring of the path)."""
        with self._lock:
            return sum(n for key, n in self.request_counts.items()
                       if (method is None or key.startswith(method + " ")) and path_contains in key)

    # -- machine status ----------------------------------------------------------------------

    def set_machine_status(self, machine: str, status: str = "active", notes: Iterable[str] = (),
                           description: Optional[str] = None) -> None:
        """Set a resource's status ("active", "unavailable", "degraded", "other") and notes."""
        if status not in MACHINE_STATUSES:
            raise ValueError(f"status must be one of {MACHINE_STATUSES}")
        full_name, system_type = _RESOURCES.get(machine, (machine, "compute"))
        default_desc = {"active": "System Available", "unavailable": "System Unavailable",
                        "degraded": "System Degraded", "other": "System Status Unknown"}[status]
        with self._lock:
            self._machines[machine] = {
                "name": machine, "full_name": full_name, "description": description or default_desc,
                "system_type": system_type, "notes": list(notes), "status": status,
                "updated_at": datetime.now(timezone.utc).isoformat(),
            }

    def machine_status(self, machine: Optional[str] = None):
        """Status dict of one resource (None if unknown), or the list of all of them."""
        with self._lock:
            if machine is None:
                return [dict(m) for m in self._machines.values()]
            m = self._machines.get(machine)
            return dict(m) if m else None

    def outages(self, machine: str) -> List[Dict[str, object]]:
        """Current outages of a resource in the API's Outage shape (one per 'unavailable' status)."""
        m = self.machine_status(machine)
        if not m or m["status"] != "unavailable":
            return []
        return [{"name": machine, "start_at": m["updated_at"], "end_at": None,
                 "description": m["description"], "notes": "; ".join(m["notes"]), "status": "Active",
                 "swo": None, "update_at": m["updated_at"]}]

    def _unavailable(self, machine: str) -> Optional[str]:
        m = self.machine_status(machine)
        if m and m["status"] == "unavailable":
            notes = "; ".join(m["notes"])
            return f"{machine} is unavailable" + (f": {notes}" if notes else "")
        return None

    # -- tasks and jobs ----------------------------------------------------------------------

    def submit_job(self, machine: str, script: str, is_path: bool = False, args: Iterable[str] = ()) -> str:
        """sbatch through the API: runs the submission now, returns the id of the task reporting it."""
        result: Dict[str, object]
        down = self._unavailable(machine)
        try:
            if down:
                raise SbatchError("sbatch: error: Batch job submission failed: Unable to contact "
                                  f"slurm controller (connect failure) [{down}]")
            if machine not in COMPUTE_MACHINES:
                raise SbatchError(f"sbatch: error: {machine} does not run batch jobs")
            if is_path:
                try:
                    script = Path(script).read_text()
                except OSError as exc:
                    raise SbatchError(f"sbatch: error: Unable to open file {script}: {exc.strerror}") from None
            elif args:
                raise SbatchError("Command line arguments cannot be passed when the script is not a file.")
            with self._lock:
                start_delay, never_start, hidden = self.start_delay, self.never_start, self.hide_new_jobs_polls
            job = self.runner.submit(script, machine=machine, args=list(args), start_delay=start_delay,
                                     never_start=never_start, hidden_polls=hidden,
                                     check_perlmutter=self.check_perlmutter_options)
            result = {"status": "ok", "jobid": str(job.jobid),
                      "output": f"Submitted batch job {job.jobid}\n", "error": None}
        except SbatchError as exc:
            result = {"status": "error", "jobid": None, "output": "", "error": str(exc)}
        task_id = str(secrets.randbelow(10**9))
        with self._lock:
            self._tasks[task_id] = _Task(task_id, time.time() + self.task_delay, result)
        return task_id

    def task(self, task_id: str) -> Optional[Dict[str, object]]:
        """A task as ``GET /tasks/{id}`` returns it: still "new" during ``task_delay``."""
        with self._lock:
            t = self._tasks.get(task_id)
        if t is None:
            return None
        if time.time() < t.ready_at:
            return {"id": t.id, "status": "new", "result": None}
        return {"id": t.id, "status": t.status, "result": json.dumps(t.result)}

    def tasks(self) -> List[Dict[str, object]]:
        with self._lock:
            ids = list(self._tasks)
        return [self.task(i) for i in ids]

    def job_records(self, machine: str, sacct: bool, jobids: Optional[Iterable[str]] = None,
                    user: Optional[str] = None, partition: Optional[str] = None) -> List[Dict[str, str]]:
        """Rows for squeue (pending/running jobs only) or sacct (all jobs), with status-cache misses."""
        wanted = {str(j).strip() for j in jobids} if jobids is not None else None
        now = time.time()
        rows = []
        with self.runner._lock:
            for job in self.runner.jobs():
                if job.machine != machine:
                    continue
                if wanted is not None and str(job.jobid) not in wanted:
                    continue
                if user is not None and job.user != user:
                    continue
                if partition is not None and job.partition != partition:
                    continue
                if not sacct and job.state not in (PENDING, RUNNING):
                    continue
                if job.hidden_polls > 0:  # the API's job-status cache has not seen it yet
                    job.hidden_polls -= 1
                    continue
                rows.append(job.sacct_record(now) if sacct else job.squeue_record(now))
        return rows

    def cancel_job(self, machine: str, jobid: str) -> Optional[str]:
        """scancel; returns an error message or None."""
        job = self.runner.get(jobid)
        if job is None or job.machine != machine:
            return f"scancel: error: Kill job error on job id {jobid}: Invalid job id specified"
        self.runner.cancel(jobid)
        return None

    def release_job(self, jobid) -> bool:
        """Start a job held by ``start_delay`` / ``never_start`` now."""
        return self.runner.release(jobid) is not None

    def job_output(self, jobid, max_bytes: int = 1_000_000) -> Optional[Dict[str, Optional[str]]]:
        """The tail of a job's stdout and stderr files (for debugging a test)."""
        job = self.runner.get(jobid)
        if job is None:
            return None

        def tail(path: Optional[Path]) -> Optional[str]:
            if path is None or not path.exists():
                return None
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - max_bytes))
                return fh.read().decode(errors="replace")

        same = job.stderr_path == job.stdout_path
        return {"stdout_path": str(job.stdout_path) if job.stdout_path else None,
                "stderr_path": str(job.stderr_path) if job.stderr_path else None,
                "stdout": tail(job.stdout_path), "stderr": None if same else tail(job.stderr_path)}

    def snapshot(self) -> Dict[str, object]:
        """Counters, fault settings and jobs as JSON-able data (no tokens or keys)."""
        with self._lock:
            return {
                "workdir": str(self.workdir), "user": self.user,
                "token_lifetime": self.token_lifetime, "start_delay": self.start_delay,
                "never_start": self.never_start, "hide_new_jobs_polls": self.hide_new_jobs_polls,
                "task_delay": self.task_delay, "kill_grace": self.kill_grace,
                "http_errors": [vars(f).copy() for f in self._faults],
                "token_requests": self.token_requests, "tokens_issued": self.tokens_issued,
                "token_failures": self.token_failures, "clients": sorted(self._clients),
                "machines": self.machine_status(),
                "request_counts": dict(self.request_counts),
                "jobs": [j.to_dict() for j in self.runner.jobs()],
            }

    def shutdown(self) -> None:
        """Cancel all jobs and wait until their process groups are gone (idempotent)."""
        self.runner.shutdown()
