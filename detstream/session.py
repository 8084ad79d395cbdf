"""A streaming session's steps, without Prefect: the flow's tasks call them in order.

open -> reserve -> start_services -> stream -> collect -> close. Every step records the
session's state in etcd; ``close`` (and ``release_session``, which works from etcd alone, for
hooks that run in another process) leaves no process, lease or endpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .backends.base import ComputeBackend, DistributorLaunch, JobState, Reservation, ReservationError
from .config import SessionSpec
from .coordination import Coordinator, DetectorBusy, KeepAliveLease
from .processes import ManagedProcess, detstream_argv
from .progress import report as report_progress
from .states import TERMINAL_STATES, SessionState

log = logging.getLogger("detstream.session")

LOCK_LEASE_TTL_S = 10


class SessionError(RuntimeError):
    """A session step failed; ``fallback_reason`` is set when a file-transfer fallback makes sense."""

    def __init__(self, message: str, fallback_reason: Optional[str] = None):
        super().__init__(message)
        self.fallback_reason = fallback_reason


class SessionCancelled(RuntimeError):
    """The user cancelled the session."""


def validate_spec(spec: SessionSpec) -> None:
    """Checks that need files (dark, gain, replay data): all before any process starts."""
    shape = spec.profile.frame_shape
    for what, path in (("dark reference", spec.counting.dark_reference), ("gain", spec.counting.gain)):
        if path is None:
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {what} {path}: {err}") from None
        if arr.shape != shape:
            raise ValueError(f"{what} {path} has shape {arr.shape}; detector "
                             f"{spec.detector} frames are {shape}")
    if spec.source == "replay":
        from .sources.rawv5 import ReplaySource

        src = ReplaySource(spec.profile, spec.replay_dir)
        if (src.scan_width, src.scan_height) != (spec.scan_width, spec.scan_height):
            raise ValueError(f"replay data in {spec.replay_dir} is a {src.scan_width}x{src.scan_height} "
                             f"scan, the session asks for {spec.scan_width}x{spec.scan_height}")


def replay_scan_shape(profile, directory) -> tuple[int, int, int]:
    """(width, height, scan number) of a recorded scan, read from its headers."""
    from .sources.rawv5 import ReplaySource

    src = ReplaySource(profile, directory)
    return src.scan_width, src.scan_height, src.scan_number


@dataclass
class Progress:
    frames_expected: int
    frames_received: int = 0
    per_node: dict = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float:
        return self.frames_received / self.frames_expected if self.frames_expected else 1.0


class StreamingSession:
    """Holds what one session owns (lock lease, reservation, local services) and releases it."""

    workflow = "streaming"
    job_poll_s = 2.0  # how often stream() asks the backend about the job

    def __init__(self, spec: SessionSpec, coordinator: Coordinator, backend: ComputeBackend,
                 etcd_endpoint: str, overwrite: bool = False):
        self.spec = spec
        self.coord = coordinator
        self.backend = backend
        self.etcd_endpoint = etcd_endpoint
        self.overwrite = overwrite
        self.sid = spec.session_id
        self.lock_lease: Optional[KeepAliveLease] = None
        self.reservation: Optional[Reservation] = None
        self.local: list[ManagedProcess] = []
        self.timings: dict[str, float] = {}
        self.fallback_reason: Optional[str] = None
        self.closed = False
        self._t0 = time.time()

    # -- steps -------------------------------------------------------------------------------
    def open(self) -> None:
        """Validate, take the detector lock, record the spec; fails at once if the detector is busy."""
        validate_spec(self.spec)
        out = self.spec.session_dir
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise FileExistsError(f"session {self.sid} already has output in {out}; pass overwrite=True "
                                  "(--overwrite) to replace it")
        self.lock_lease = self.coord.lease(LOCK_LEASE_TTL_S)
        try:
            self.coord.lock_detector(self.spec.detector, self.sid, self.lock_lease)
        except DetectorBusy:
            self.lock_lease.revoke()
            self.lock_lease = None
            self.closed = True
            raise
        if self.overwrite:
            shutil.rmtree(out, ignore_errors=True)
        self.spec = with_simulator_dark(self.spec)
        self.coord.put_spec(self.sid, json.loads(self.spec.model_dump_json()))
        self.coord.set_state(self.sid, SessionState.REQUESTED)
        self.coord.set_expected(self.sid, self.spec.scan_number, self.spec.frames_expected)

    def reserve(self, timeout_s: float) -> Reservation:
        """Reserve the nodes and wait until the job runs; ReservationError means fall back."""
        self.coord.set_state(self.sid, SessionState.RESERVING, f"{self.spec.nodes} nodes on {self.backend.name}")
        t0 = time.time()
        launch = DistributorLaunch(session_id=self.sid, etcd_endpoint=self.etcd_endpoint,
                                   etcd_prefix=self.spec.etcd_prefix)
        try:
            self.reservation = self.backend.reserve(self.spec.nodes, launch)
            self._record_job()
            self.reservation = self.backend.wait_running(self.reservation, timeout_s)
        except ReservationError as err:
            raise SessionError(f"node reservation failed: {err}", fallback_reason=f"reservation: {err}") from err
        finally:
            self._record_job()
            self.timings["reserve_s"] = time.time() - t0
        return self.reservation

    def _record_job(self) -> None:
        if self.reservation is not None:
            self.coord.put_job(self.sid, json.loads(self.reservation.model_dump_json()))

    def _start_local(self, role: str, name: str, *args: str) -> ManagedProcess:
        proc = ManagedProcess(
            detstream_argv(role, "--session", self.sid, "--etcd", self.etcd_endpoint,
                           "--prefix", self.spec.etcd_prefix, *args),
            self.spec.session_dir / "logs" / f"{role}-{name}.log", name=f"{role}-{name}").start()
        self.local.append(proc)
        return proc

    def start_services(self) -> dict:
        """Wait for every node's distributor, then start the aggregator and the producers."""
        self.coord.set_state(self.sid, SessionState.STARTING)
        t0 = time.time()
        nodes = self._await_nodes(self.spec.register_timeout_s)
        self.timings["register_s"] = time.time() - t0
        self.aggregator = self._start_local("aggregator", "0")
        self.coord.wait_for_services(self.sid, "aggregator", 1, self.spec.register_timeout_s)
        self.producers = [self._start_local("producer", str(s), "--sector", str(s))
                          for s in range(self.spec.profile.sectors)]
        return nodes

    def _await_nodes(self, timeout_s: float) -> dict:
        """Wait for every node's service to register; give up early if the job has ended."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.coord.wait_for_services(self.sid, "distributor", self.spec.nodes,
                                                    min(2.0, max(0.0, deadline - time.monotonic())))
            except TimeoutError as err:
                job = self.backend.poll(self.reservation) if self.reservation is not None else None
                if job is not None and job.state in (JobState.FAILED, JobState.COMPLETED, JobState.CANCELLED):
                    msg = (f"distributors did not register: job {job.job_id} ended ({job.state.value}) "
                           f"first; see {self.spec.session_dir / 'logs'}")
                    raise SessionError(msg, fallback_reason=f"registration: {msg}") from err
                if time.monotonic() >= deadline:
                    raise SessionError(f"distributors did not register: {err}",
                                       fallback_reason=f"registration: {err}") from err

    def progress(self) -> Progress:
        per_node = self.coord.received(self.sid, self.spec.scan_number)
        return Progress(self.spec.frames_expected, sum(per_node.values()), per_node,
                        time.time() - self._t0)

    def stream(self, on_progress: Optional[Callable[[Progress], None]] = None,
               cancelled: Optional[Callable[[], bool]] = None, poll_s: float = 0.5,
               finish_timeout_s: float = 120.0, set_state: bool = True) -> Progress:
        """Watch the scan until every distributor has reported; raise on stall or failure."""
        if set_state:
            self.coord.set_state(self.sid, SessionState.STREAMING)
        t0 = time.time()
        last_count, last_change = -1, time.monotonic()
        reports = self.spec.session_dir / "services"
        expected = {f"distributor-node-{i}.json" for i in range(self.spec.nodes)}
        draining = False
        last_job_poll = 0.0
        while True:
            prog = self.progress()
            report_progress(prog)
            if on_progress is not None:
                on_progress(prog)
            if cancelled is not None and cancelled():
                raise SessionCancelled("cancelled by the user")
            done = expected <= {p.name for p in reports.glob("distributor-*.json")}
            if done:
                if set_state and not draining:  # every node saw every END: producers are done
                    self.coord.set_state(self.sid, SessionState.DRAINING)
                    self.timings["acquire_s"] = time.time() - t0
                break
            failed = [p for p in self.local if p.poll() not in (None, 0)]
            if failed:
                names = ", ".join(f"{p.name} (exit {p.poll()}): {p.log_tail(3)}" for p in failed)
                raise SessionError(f"service failed: {names}", fallback_reason=f"service failed: {names}")
            if set_state and not draining and all(p.poll() == 0 for p in self.local):
                draining = True
                self.coord.set_state(self.sid, SessionState.DRAINING)
                self.timings["acquire_s"] = time.time() - t0
            if self.reservation is not None and time.monotonic() - last_job_poll >= self.job_poll_s:
                last_job_poll = time.monotonic()
                try:
                    job = self.backend.poll(self.reservation)
                except ReservationError as err:  # state unknown for now (e.g. API hiccup), not failed
                    log.warning("could not poll job %s: %s", self.reservation.job_id, err)
                    job = self.reservation
                if job.state.finished and not done:
                    time.sleep(poll_s)  # a last report may be landing as the job ends
                    if not expected <= {p.name for p in reports.glob("distributor-*.json")}:
                        raise SessionError(f"compute job {job.job_id} ended ({job.state.value}) "
                                           "before every node reported")
            if prog.frames_received != last_count:
                last_count, last_change = prog.frames_received, time.monotonic()
            elif time.monotonic() - last_change > self.spec.stall_timeout_s + finish_timeout_s:
                raise SessionError(f"stream stalled at {prog.frames_received}/{prog.frames_expected} frames",
                                   fallback_reason="stalled")
            time.sleep(poll_s)
        self.timings["stream_s"] = time.time() - t0
        return self.progress()

    def node_reports(self) -> list[dict]:
        reports = self.spec.session_dir / "services"
        return [json.loads((reports / f"distributor-node-{i}.json").read_text())
                for i in range(self.spec.nodes)]

    # -- release -----------------------------------------------------------------------------
    def close(self, state: SessionState, reason: Optional[str] = None, result: Optional[dict] = None) -> None:
        """Stop everything this session holds, record the final state; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            if state != SessionState.COMPLETED:
                # Tell remote services to stop before their job is cancelled.
                self.coord.set_state(self.sid, state, reason)
            for p in self.local:
                p.stop()
            if self.reservation is not None:
                self.reservation = self.backend.release(self.reservation)
                self._record_job()
            if result is not None:
                self.coord.put_result(self.sid, result)
            self.coord.cleanup_session(self.sid)
            if state == SessionState.COMPLETED:
                self.coord.set_state(self.sid, state, reason)
        finally:
            try:
                self.coord.unlock_detector(self.spec.detector, self.sid)
            finally:
                if self.lock_lease is not None:
                    self.lock_lease.revoke()


def release_session(coord: Coordinator, sid: str, state: SessionState, reason: str,
                    backends: Optional[dict[str, Callable[[Reservation], None]]] = None) -> None:
    """Release a session from what etcd records, for hooks running outside the session's process.

    Kills the session's local service process groups, cancels its job through ``backends``
    (name -> cancel function), drops its leased keys and frees the detector lock.
    """
    current = coord.get_state(sid)
    if current in TERMINAL_STATES:
        return
    coord.set_state(sid, state, reason)
    host = socket.gethostname()
    for role in ("producer", "aggregator", "distributor"):
        for info in coord.services(sid, role).values():
            if info.get("host") == host and info.get("pid"):
                try:
                    os.killpg(int(info["pid"]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    job = coord.get_job(sid)
    if job:
        res = Reservation.model_validate(job)
        if not res.state.finished:
            cancel = (backends or {}).get(res.backend)
            if cancel is not None:
                cancel(res)
                res = res.model_copy(update={"state": JobState.CANCELLED})
                coord.put_job(sid, json.loads(res.model_dump_json()))
    spec = coord.get_spec(sid) or {}
    coord.cleanup_session(sid)
    if spec.get("detector"):
        coord.unlock_detector(spec["detector"], sid)


class coordination:
    """Context manager giving (endpoint, Coordinator): the given etcd, or a private one for the session."""

    def __init__(self, endpoint: Optional[str], prefix: str, **client_kwargs):
        self.endpoint = endpoint
        self.prefix = prefix
        self.client_kwargs = client_kwargs
        self.server = None

    def __enter__(self) -> tuple[str, Coordinator]:
        if not self.endpoint:
            from .etcd_server import EmbeddedEtcd

            self.server = EmbeddedEtcd()
            self.server.start()
            self.endpoint = self.server.endpoint
        return self.endpoint, Coordinator(self.endpoint, prefix=self.prefix, **self.client_kwargs)

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()


def make_spec(*, scan_width: Optional[int], scan_height: Optional[int], profile, source: str = "simulated",
              replay_dir: Optional[str] = None, output_dir: str = "runs", session_id: Optional[str] = None,
              counting: Optional[dict] = None, **fields) -> SessionSpec:
    """Build and validate a SessionSpec from flow or CLI parameters (replay: scan size from the files)."""
    from .config import CountingParams

    scan_number = fields.pop("scan_number", None)
    if source == "replay":
        if not replay_dir:
            raise ValueError("source 'replay' needs a replay directory")
        w, h, n = replay_scan_shape(profile, replay_dir)
        if (scan_width or w, scan_height or h) != (w, h):
            raise ValueError(f"replay data in {replay_dir} is a {w}x{h} scan, not {scan_width}x{scan_height}")
        scan_width, scan_height = w, h
        scan_number = n if scan_number is None else scan_number
    if scan_number is not None:
        fields["scan_number"] = scan_number
    if session_id:
        fields["session_id"] = session_id
    spec = SessionSpec(
        detector_profile=profile, scan_width=scan_width or 0, scan_height=scan_height or 0,
        source=source, replay_dir=Path(replay_dir).resolve() if replay_dir else None,
        output_dir=Path(output_dir).resolve(), counting=CountingParams(**(counting or {})), **fields)
    validate_spec(spec)
    return spec


def with_simulator_dark(spec: SessionSpec) -> SessionSpec:
    """A simulated scan without a dark reference uses the simulator's own (saved in the session dir)."""
    if spec.source != "simulated" or spec.counting.dark_reference is not None or not spec.counting.enabled:
        return spec
    from .sources.simulator import simulated_dark_reference

    path = spec.session_dir / "dark_reference.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, simulated_dark_reference(spec.profile, spec.seed))
    counting = spec.counting.model_copy(update={"dark_reference": path})
    return spec.model_copy(update={"counting": counting})
