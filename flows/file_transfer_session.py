"""The file-transfer flow: acquire raw files, transfer them, count them from storage, write, release."""

from __future__ import annotations

from typing import Annotated, Optional

from prefect import flow, get_run_logger
from pydantic import Field

from detstream.config import DEFAULT_PREFIX
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
def file_transfer_session(
    scan_width: P.ScanSide = 32,
    scan_height: P.ScanSide = 32,
    detector: P.Detector = "4dcamera",
    nodes: P.Nodes = 2,
    workers_per_node: P.Workers = 1,
    source: P.Source = "simulated",
    replay_dir: P.ReplayDir = None,
    seed: P.Seed = 0,
    output_dir: P.OutputDir = "runs",
    counting: P.Counting = True,
    background_threshold: P.Background = 12.0,
    xray_threshold: P.Xray = 2000.0,
    dark_reference: P.NpyPath = None,
    gain: P.NpyPath = None,
    backend: P.BackendName = "local",
    sfapi: P.Sfapi = None,
    etcd_url: P.EtcdUrl = None,
    etcd_prefix: P.EtcdPrefix = DEFAULT_PREFIX,
    reserve_timeout_s: P.Seconds = 300.0,
    register_timeout_s: P.Seconds = 60.0,
    stall_timeout_s: P.Seconds = 30.0,
    session_id: P.SessionId = None,
    overwrite: P.Overwrite = False,
    keep_raw_files: Annotated[bool, Field(description="Keep the acquired files after a verified transfer.")] = False,
    fallback_reason: Annotated[Optional[str], Field(description="Set when a streaming session fell back to this flow.")] = None,
    fell_back_from: Annotated[Optional[str], Field(description="The streaming session that fell back.")] = None,
) -> dict:
    """Acquire to raw files, move them to the compute site, count them there: the classic path."""
    params = dict(locals())
    spec = P.spec_from(params)
    logger = get_run_logger()
    logger.info("file-transfer session %s: %dx%d scan, %d nodes%s", spec.session_id, spec.scan_width,
                spec.scan_height, spec.nodes, f" (fallback: {fallback_reason})" if fallback_reason else "")

    def make(endpoint, coord):
        return FileTransferSession(spec, coord, P.make_backend(backend, spec.session_dir, sfapi),
                                   endpoint, remove_source=not keep_raw_files, overwrite=overwrite)

    def steps(session):
        open_session(session)
        if fallback_reason:
            session.coord.set_state(session.sid, SessionState.REQUESTED,
                                    f"fallback from streaming session {fell_back_from}: {fallback_reason}")
        files = acquire_files(session)
        transfer_files(session, files)
        reserve_nodes(session, reserve_timeout_s)
        count_from_files(session)
        extra = transfer_summary(session.transfer_report)
        if fallback_reason:
            extra.update(fallback_reason=fallback_reason, fell_back_from=fell_back_from)
        return collect_results(session, extra=extra)

    return run_session(make, spec, etcd_url, steps)
