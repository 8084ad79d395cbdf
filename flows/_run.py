"""Runs a session's steps inside a flow, always releases what it holds, and always leaves the
account of every frame (summary.json), however the session ended."""

from __future__ import annotations

from typing import Callable

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Failed

from detstream import results
from detstream.services.security import session_env
from detstream.session import Session, SessionCancelled, SessionError, SessionIncomplete
from detstream.states import SessionState
from detstream.tasks.nodes import release_nodes
from detstream.tasks.results import publish_summary

from . import _params as P
from ._hooks import ACTIVE_SESSIONS


def run_key(fallback: str) -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else fallback


def salvage(session: Session, state: SessionState, reason: str) -> dict | None:
    """After a failure or cancellation: merge what the nodes made durable, list what is missing."""
    if not session.opened:  # refused before it started: the folder may be another session's
        return None
    logger = get_run_logger()
    extra = {"backend": session.backend.name}
    if session.etcd_unrecorded:
        extra["etcd_unrecorded"] = f"the end state is not in etcd: {session.etcd_unrecorded}"
    try:
        summary = results.collect(session.spec_for_merge(), session.workflow, session.timings, overwrite=True,
                                  extra=extra, state=state, reason=reason)
        if state is SessionState.FAILED and 0 < summary["frames_counted"] < summary["frames_expected"]:
            # The scan ran but a service failed: what the nodes made durable is the result.
            summary["state"] = SessionState.INCOMPLETE.value
            results.write_account(session.spec, summary)
            session.coord.set_state(session.sid, SessionState.INCOMPLETE,
                                    f"{summary['frames_counted']}/{summary['frames_expected']} frames "
                                    f"counted and salvaged after: {reason}")
    except Exception as err:  # the account must still be written, whatever stopped the merge
        logger.error("session %s: could not salvage the counted frames: %s", session.sid, err)
        summary = results.account_without_outputs(session.spec, session.workflow, state, reason,
                                                  f"{type(err).__name__}: {err}", extra)
    try:
        session.coord.put_result(session.sid, summary)
        publish_summary(summary)
    except Exception as err:  # etcd or the API gone: the summary file still stands
        logger.warning("session %s: summary not published: %s", session.sid, err)
    logger.warning("session %s %s: %s/%s frames counted, salvaged into %s", session.sid, state.value,
                   summary.get("frames_counted"), summary["frames_expected"], summary["outputs"].get("summary"))
    return summary


def run_session(session_cls: type[Session], params: dict, spec, etcd, steps: Callable[[Session], dict],
                on_error: Callable[[Session, SessionError, str], dict] | None = None, **session_kwargs):
    """Open ``etcd`` (private if it has no endpoint), build the session, run ``steps``, release on every
    exit.

    Returns the summary when every frame was counted, and a Failed state named Incomplete
    (carrying :class:`SessionIncomplete` with the summary) when frames are missing.
    ``on_error`` may turn a SessionError into a result (the streaming flow's fallback): it is
    called with the released session, the error, and the etcd endpoint still running.
    """
    logger = get_run_logger()
    key = run_key(spec.session_id)
    etcd_context = etcd.coordination((spec.session_id, spec.detector))
    with etcd_context as (endpoint, coord):
        env = {**etcd.service_env(), **etcd_context.service_env, **session_env(spec)}  # budget, login, CURVE
        session = session_cls(spec, coord, P.make_backend(params, spec.session_dir, env), endpoint,
                              overwrite=params["overwrite"], service_env=env, **session_kwargs)
        ACTIVE_SESSIONS[key] = session
        try:
            summary = steps(session)
            if summary["frames_received"] == 0:
                raise SessionError(f"no frame of the {spec.frames_expected} expected arrived",
                                   fallback_reason="no frames arrived")
            state = SessionState(summary["state"])
            release_nodes(session, state, result=summary)
            if session.etcd_unrecorded:
                summary["etcd_unrecorded"] = f"the end state is not in etcd: {session.etcd_unrecorded}"
                results.write_account(spec, summary)
            if state is SessionState.INCOMPLETE:
                message = (f"session {spec.session_id} incomplete: {summary['frames_missing']} of "
                           f"{summary['frames_expected']} frames missing, listed in {summary['outputs']['summary']}")
                logger.error(message)
                return Failed(name="Incomplete", message=message, data=SessionIncomplete(message, summary))
            logger.info("session %s (%s) completed: %d/%d frames, %d events -> %s", spec.session_id,
                        session.workflow, summary["frames_counted"], summary["frames_expected"],
                        summary["events"], summary["outputs"]["hdf5"])
            return summary
        except SessionError as err:
            session.close(SessionState.FAILED, str(err))
            summary = salvage(session, SessionState.FAILED, str(err))
            if on_error is not None and err.fallback_reason:
                return on_error(session, err, endpoint)
            if summary and summary["state"] == SessionState.INCOMPLETE.value:
                message = (f"session {spec.session_id} incomplete: {summary['frames_counted']} of "
                           f"{summary['frames_expected']} frames counted ({err})")
                return Failed(name="Incomplete", message=message, data=SessionIncomplete(message, summary))
            raise
        except BaseException as err:
            cancelled = isinstance(err, (SessionCancelled, KeyboardInterrupt))
            state = SessionState.CANCELLED if cancelled else SessionState.FAILED
            reason = f"{type(err).__name__}: {err}"
            session.close(state, reason)
            salvage(session, state, reason)
            raise
        finally:
            ACTIVE_SESSIONS.pop(key, None)
