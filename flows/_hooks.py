"""State hooks that release whatever a session holds when its flow run fails, crashes or is cancelled."""

from __future__ import annotations

import logging

from detstream.states import SessionState

log = logging.getLogger("detstream.flows")

# flow run id -> Session, for hooks running in the flow's own process.
ACTIVE_SESSIONS: dict = {}


def release_on_failure(flow, flow_run, state) -> None:
    """Close the session in this process; otherwise release it from what etcd records."""
    reason = f"flow run {state.type.value.lower()}: {state.message or ''}".strip()
    final = SessionState.CANCELLED if state.is_cancelled() or state.is_cancelling() else SessionState.FAILED
    session = ACTIVE_SESSIONS.pop(str(flow_run.id), None)
    if session is not None:
        session.close(final, reason)
        return
    sid = (flow_run.parameters or {}).get("session_id")
    if not sid:
        return  # a generated id was never recorded with the run: nothing to find it by
    try:
        params = run_parameters(flow, flow_run.parameters)
        from . import _params as P

        etcd = P.etcd_of(params)
        if not etcd.endpoints:
            return  # a private etcd died with the run; its services stop when their leases fail
        from detstream.backends.local import kill_local_job
        from detstream.session import release_session

        backends = {"local": kill_local_job}
        if params["backend"] == "sfapi" and params.get("sfapi_credentials") is not None:
            from detstream.backends.sfapi import cancel_sfapi_job

            settings = params["sfapi_credentials"].settings()
            backends["sfapi"] = lambda reservation: cancel_sfapi_job(settings, reservation)
        if params["backend"] == "slurm":
            from detstream.backends.slurm import cancel_slurm_job

            slurm = params.get("slurm_compute")
            settings = slurm.settings() if slurm is not None else None
            backends["slurm"] = lambda reservation: cancel_slurm_job(settings, reservation)
        with etcd.get_coordinator() as coord:
            release_session(coord, sid, final, reason, backends=backends)
    except Exception:  # a hook must not mask the run's own failure
        log.exception("could not release session %s", sid)


def run_parameters(flow, recorded: dict) -> dict:
    """A run's recorded parameters as the flow takes them: saved blocks are loaded again (with their secrets)."""
    refs = {name: {"$ref": {"block_document_id": value["_block_document_id"]}}
            if isinstance(value, dict) and value.get("_block_document_id") else value
            for name, value in recorded.items()}
    return flow.validate_parameters(refs)
