"""The file-transfer flow: acquire raw files, transfer them, count them from storage, write, release."""

from __future__ import annotations

from typing import Annotated, Optional

from prefect import flow, get_run_logger

from detstream.session import FileTransferSession, transfer_summary
from detstream.states import SessionState
from detstream.tasks.files import acquire_files, count_from_files, transfer_files
from detstream.tasks.nodes import open_session, reserve_nodes
from detstream.tasks.results import collect_results

from . import _params as P
from ._hooks import release_on_failure
from ._run import run_session


@flow(name="file-transfer-session", on_failure=[release_on_failure], on_crashed=[release_on_failure],
      on_cancellation=[release_on_failure], log_prints=True)
@P.shared_parameters()
def file_transfer_session(
    *,
    keep_raw_files: Annotated[bool, P.Doc("Keep the acquired files after a verified transfer.")] = False,
    fallback_reason: Annotated[Optional[str], P.Doc("Set when a streaming session fell back to this flow.")] = None,
    fell_back_from: Annotated[Optional[str], P.Doc("The streaming session that fell back.")] = None,
    **params,
) -> dict:
    """Acquire to raw files, move them to the compute site, count them there: the classic path."""
    etcd = P.etcd_of(params)
    spec = P.spec_from(params, etcd)
    logger = get_run_logger()
    logger.info("file-transfer session %s: %dx%d scan, %d nodes%s", spec.session_id, spec.scan_width,
                spec.scan_height, spec.nodes, f" (fallback: {fallback_reason})" if fallback_reason else "")

    def steps(session):
        open_session(session)
        if fallback_reason:
            session.coord.set_state(session.sid, SessionState.REQUESTED,
                                    f"fallback from streaming session {fell_back_from}: {fallback_reason}")
        files = acquire_files(session)
        transfer_files(session, files)
        reserve_nodes(session, params["reserve_timeout_s"])
        count_from_files(session)
        extra = transfer_summary(session.transfer_report)
        if fallback_reason:
            extra.update(fallback_reason=fallback_reason, fell_back_from=fell_back_from)
        return collect_results(session, extra=extra)

    return run_session(FileTransferSession, params, spec, etcd, steps, remove_source=not keep_raw_files)
