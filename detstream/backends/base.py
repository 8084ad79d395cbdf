"""The compute-backend interface: reserve nodes, start a distributor on each, report, release.

Local processes, a Superfacility API batch job and Slurm all fit it: ``reserve`` submits and
returns at once with a job id, ``wait_running`` waits for the allocation, ``release`` cancels.
"""

from __future__ import annotations

import abc
import enum
from typing import Literal, Optional

from pydantic import BaseModel, Field

from ..errors import DetstreamError


class JobState(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    ENDED = "ENDED"  # gone from the scheduler before its end state was seen (e.g. purged after MinJobAge)

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.ENDED)


class Reservation(BaseModel):
    """What a backend holds for a session; stored as JSON at sessions/<sid>/job."""

    backend: str
    job_id: str
    nodes: int
    node_names: list[str] = Field(default_factory=list)
    state: JobState = JobState.PENDING
    detail: Optional[str] = None
    pids: list[int] = Field(default_factory=list, description="Local process groups, if any.")
    host: Optional[str] = None
    submitted_at: Optional[float] = Field(default=None, description="Unix time the job was submitted.")
    started_at: Optional[float] = Field(default=None, description="Unix time the job was first seen running.")
    queue_wait_s: Optional[float] = Field(default=None, description="Seconds from submission to running.")
    scheduler_state: Optional[str] = Field(default=None, description="The scheduler's own state name, e.g. Slurm's.")
    failure: Optional[str] = Field(default=None, description="Why the job failed, as the scheduler says (exit code, output).")


class ReservationError(DetstreamError, RuntimeError):
    """Nodes could not be had (refused, outage, timed out); the session may fall back."""


class NodeLaunch(BaseModel):
    """What each reserved node runs: ``detstream <service>`` for this session.

    ``service`` is ``distributor`` for streaming and ``count-files`` for the file-transfer path.
    """

    service: Literal["distributor", "count-files"] = "distributor"
    session_id: str
    etcd_endpoint: str
    etcd_prefix: str
    env_file: Optional[str] = Field(default=None, description="A 0600 file of NAME=VALUE lines (the etcd login, "
                                    "CURVE keys) the node sources before it starts; never its argv.")

    def argv(self, node_index: Optional[int] = None) -> list[str]:
        args = [self.service, "--session", self.session_id, "--etcd", self.etcd_endpoint,
                "--prefix", self.etcd_prefix]
        if node_index is not None:
            args += ["--node-index", str(node_index)]
        return args


class ComputeBackend(abc.ABC):
    """Reserve ``nodes`` compute nodes and run the launch's service on each."""

    name: str = "abstract"
    #: False when the backend hands `env` to its processes itself; True: secrets go in `NodeLaunch.env_file`.
    needs_env_file: bool = True
    #: How the session's services reach its nodes' services: "ipc" only when every node runs
    #: on the orchestrator's host; across hosts "tcp".
    transport: str = "tcp"

    def check_request(self, nodes: int, workers_per_node: int) -> None:  # noqa: B027 (optional hook)
        """Refuse, with a plain message, a request this backend can never satisfy (ValueError)."""

    @abc.abstractmethod
    def reserve(self, nodes: int, launch: NodeLaunch) -> Reservation:
        """Submit the reservation and return at once (state PENDING or RUNNING)."""

    @abc.abstractmethod
    def wait_running(self, reservation: Reservation, timeout_s: float) -> Reservation:
        """Block until the job runs; raise ReservationError on timeout or failure (after cancelling)."""

    @abc.abstractmethod
    def poll(self, reservation: Reservation) -> Reservation:
        """Current state of the reservation."""

    @abc.abstractmethod
    def release(self, reservation: Reservation) -> Reservation:
        """Cancel or stop everything the reservation holds; safe to call twice."""
