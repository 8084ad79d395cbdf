"""The streaming-session flow: reserve nodes, start the services, stream and count, write, release."""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger
from pydantic import Field

from detstream.config import DEFAULT_PREFIX
from detstream.session import StreamingSession
from detstream.states import SessionState
from detstream.tasks.nodes import open_session, reserve_nodes
from detstream.tasks.results import collect_results
from detstream.tasks.services import start_services
from detstream.tasks.stream import stream_scan

from . import _params as P
from ._hooks import release_on_failure
from ._run import run_session

Fallback = Annotated[Literal["file-transfer", "none"], Field(
    description="If reservation fails, no node registers, or the stream stalls: run the file-transfer workflow on the same scan.")]


@flow(name="streaming-session", on_failure=[release_on_failure], on_crashed=[release_on_failure],
      on_cancellation=[release_on_failure], log_prints=True)
def streaming_session(
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
    fallback: Fallback = "none",
    fallback_backend: Annotated[Literal["local", "sfapi"], Field(description="Backend for the fallback's count job.")] = "local",
    sfapi: P.Sfapi = None,
    etcd_url: P.EtcdUrl = None,
    etcd_prefix: P.EtcdPrefix = DEFAULT_PREFIX,
    reserve_timeout_s: P.Seconds = 300.0,
    register_timeout_s: P.Seconds = 60.0,
    stall_timeout_s: P.Seconds = 30.0,
    session_id: P.SessionId = None,
    overwrite: P.Overwrite = False,
) -> dict:
    """Stream one scan from the detector into the nodes' memory, count it, write the counted HDF5."""
    params = dict(locals())
    spec = P.spec_from(params)
    get_run_logger().info("session %s: %dx%d scan, %d nodes on %s, output %s", spec.session_id,
                          spec.scan_width, spec.scan_height, spec.nodes, backend, spec.session_dir)

    def make(endpoint, coord):
        return StreamingSession(spec, coord, P.make_backend(backend, spec.session_dir, sfapi), endpoint,
                                overwrite=overwrite)

    def steps(session):
        open_session(session)
        reserve_nodes(session, reserve_timeout_s)
        start_services(session)
        stream_scan(session)
        return collect_results(session)

    def fall_back(session, err, endpoint):
        from .file_transfer_session import file_transfer_session

        reason = err.fallback_reason
        session.coord.set_state(session.sid, SessionState.FAILED, f"falling back to file-transfer: {reason}")
        get_run_logger().warning("session %s: %s; falling back to the file-transfer workflow",
                                 session.sid, reason)
        ft = {k: v for k, v in params.items()
              if k not in ("fallback", "fallback_backend", "backend", "session_id", "etcd_url")}
        return file_transfer_session(**ft, backend=fallback_backend, etcd_url=endpoint,
                                     session_id=f"{session.sid}-ft", fallback_reason=reason,
                                     fell_back_from=session.sid)

    return run_session(make, spec, etcd_url, steps, fall_back if fallback == "file-transfer" else None)
