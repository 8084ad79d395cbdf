"""The streaming-session flow: reserve nodes, start the services, stream and count, write, release."""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger

from detstream.session import StreamingSession
from detstream.states import SessionState
from detstream.tasks.nodes import open_session, reserve_nodes
from detstream.tasks.results import collect_results
from detstream.tasks.services import start_services
from detstream.tasks.stream import stream_scan

from . import _params as P
from ._hooks import release_on_failure
from ._run import run_session

Fallback = Annotated[Literal["file-transfer", "none"], P.Doc(
    "If reservation fails, no node registers, or the stream stalls: run the file-transfer workflow on the "
    "same scan.")]
FallbackBackend = Annotated[Literal[P.BACKENDS], P.Doc("Backend for the fallback's count job.")]
Aggregators = Annotated[int, P.Doc("Aggregator shards, each routing a share of the sectors to every node.",
                                   gt=0)]


@flow(name="streaming-session", on_failure=[release_on_failure], on_crashed=[release_on_failure],
      on_cancellation=[release_on_failure], log_prints=True)
@P.shared_parameters(after="backend")
def streaming_session(*, fallback: Fallback = "none", fallback_backend: FallbackBackend = "local",
                      aggregators: Aggregators = 1, **params) -> dict:
    """Stream one scan from the detector into the nodes' memory, count it, write the counted HDF5."""
    etcd = P.etcd_of(params)
    spec = P.spec_from(params, etcd, aggregators=aggregators)
    get_run_logger().info("session %s: %dx%d scan, %d nodes on %s, output %s", spec.session_id,
                          spec.scan_width, spec.scan_height, spec.nodes, params["backend"], spec.session_dir)

    def steps(session):
        open_session(session)
        reserve_nodes(session, params["reserve_timeout_s"])
        start_services(session)
        stream_scan(session)
        return collect_results(session)

    def fall_back(session, err, endpoint):
        from .file_transfer import file_transfer_session

        reason = err.fallback_reason
        session.coord.set_state(session.sid, SessionState.FAILED, f"falling back to file-transfer: {reason}")
        get_run_logger().warning("session %s: %s; falling back to the file-transfer workflow",
                                 session.sid, reason)
        same = {k: v for k, v in params.items() if k not in ("backend", "session_id", "etcd", "etcd_url")}
        return file_transfer_session(**same, backend=fallback_backend, etcd=P.running_etcd(etcd, endpoint),
                                     session_id=f"{session.sid}-ft", fallback_reason=reason,
                                     fell_back_from=session.sid)

    return run_session(StreamingSession, params, spec, etcd, steps,
                       fall_back if fallback == "file-transfer" else None)
