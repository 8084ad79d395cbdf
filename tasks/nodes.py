"""Tasks that take and give back compute nodes."""

from __future__ import annotations

from typing import Optional

from prefect import task
from prefect.cache_policies import NO_CACHE

from detstream.backends.base import Reservation
from detstream.session import StreamingSession
from detstream.states import SessionState


@task(name="open-session", cache_policy=NO_CACHE)
def open_session(session: StreamingSession) -> None:
    """Validate inputs, take the detector lock and record the session in etcd."""
    session.open()


@task(name="reserve-nodes", cache_policy=NO_CACHE)
def reserve_nodes(session: StreamingSession, timeout_s: float) -> Reservation:
    """Reserve the session's nodes; each starts its node service, which registers in etcd."""
    return session.reserve(timeout_s)


@task(name="release-nodes", cache_policy=NO_CACHE)
def release_nodes(session: StreamingSession, state: SessionState, reason: Optional[str] = None,
                  result: Optional[dict] = None) -> None:
    """Stop the services, release the nodes, drop leases and endpoints, free the detector."""
    session.close(state, reason, result)
