"""State hooks that release whatever a session holds when its flow run fails, crashes or is cancelled."""

from __future__ import annotations

import logging

from detstream.config import DEFAULT_PREFIX
from detstream.states import SessionState

log = logging.getLogger("detstream.flows")

# flow run id -> StreamingSession, for hooks running in the flow's own process.
ACTIVE_SESSIONS: dict = {}


def release_on_failure(flow, flow_run, state) -> None:
    """Close the session in this process; otherwise release it from what etcd records."""
    reason = f"flow run {state.type.value.lower()}: {state.message or ''}".strip()
    final = SessionState.CANCELLED if state.is_cancelled() or state.is_cancelling() else SessionState.FAILED
    session = ACTIVE_SESSIONS.pop(str(flow_run.id), None)
    if session is not None:
        session.close(final, reason)
        return
    params = flow_run.parameters or {}
    etcd_url = params.get("etcd_url")
    sid = params.get("session_id")
    if not etcd_url or not sid:
        return  # a private etcd died with the run; its services stop when their leases fail
    from detstream.backends.local import kill_local_job
    from detstream.coordination import Coordinator
    from detstream.session import release_session

    backends = {"local": kill_local_job}
    if params.get("backend") == "sfapi":
        from .sfapi_backend import cancel_from_parameters

        try:
            backends["sfapi"] = cancel_from_parameters(params)
        except Exception:
            log.exception("cannot build the SFAPI client to cancel session %s's job", sid)
    try:
        coord = Coordinator(etcd_url, prefix=params.get("etcd_prefix") or DEFAULT_PREFIX)
        release_session(coord, sid, final, reason, backends=backends)
    except Exception:  # a hook must not mask the run's own failure
        log.exception("could not release session %s", sid)
