"""Runs a session's steps inside a flow and always releases what it holds."""

from __future__ import annotations

from typing import Callable

from prefect import get_run_logger
from prefect.context import FlowRunContext

from detstream.session import SessionCancelled, SessionError, StreamingSession, coordination
from detstream.states import SessionState
from detstream.tasks.nodes import release_nodes

from ._hooks import ACTIVE_SESSIONS


def run_key(fallback: str) -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else fallback


def run_session(make_session: Callable[[str, object], StreamingSession], spec, etcd_url,
                steps: Callable[[StreamingSession], dict],
                on_error: Callable[[StreamingSession, SessionError, str], dict] | None = None) -> dict:
    """Open etcd (private if no URL), build the session, run ``steps``, release on every exit.

    ``on_error`` may turn a SessionError into a result (the streaming flow's fallback): it is
    called with the released session, the error, and the etcd endpoint still running.
    """
    logger = get_run_logger()
    key = run_key(spec.session_id)
    with coordination(etcd_url, spec.etcd_prefix) as (endpoint, coord):
        session = make_session(endpoint, coord)
        ACTIVE_SESSIONS[key] = session
        try:
            summary = steps(session)
            if summary["frames_received"] == 0:
                raise SessionError(f"no frame of the {spec.frames_expected} expected arrived",
                                   fallback_reason="no frames arrived")
            if not summary["complete"]:
                logger.warning("session %s: %d frames missing, listed in %s", spec.session_id,
                               summary["frames_missing"], summary["outputs"]["summary"])
            release_nodes(session, SessionState.COMPLETED, result=summary)
            logger.info("session %s (%s) completed: %d/%d frames, %d events -> %s", spec.session_id,
                        session.workflow, summary["frames_received"], summary["frames_expected"],
                        summary["events"], summary["outputs"]["hdf5"])
            return summary
        except SessionError as err:
            session.close(SessionState.FAILED, str(err))
            if on_error is not None and err.fallback_reason:
                return on_error(session, err, endpoint)
            raise
        except BaseException as err:
            cancelled = isinstance(err, (SessionCancelled, KeyboardInterrupt))
            session.close(SessionState.CANCELLED if cancelled else SessionState.FAILED, f"{type(err).__name__}: {err}")
            raise
        finally:
            ACTIVE_SESSIONS.pop(key, None)
