"""The streaming-session flow: reserve nodes, start the services, stream and count, write, release."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from pydantic import Field

from detstream.backends.local import LocalBackend
from detstream.profile import PROFILES, get_profile
from detstream.session import StreamingSession, SessionError, coordination, make_spec
from detstream.tasks.nodes import open_session, release_nodes, reserve_nodes
from detstream.tasks.results import collect_results
from detstream.tasks.services import start_services
from detstream.tasks.stream import stream_scan

from ._hooks import ACTIVE_SESSIONS, release_on_failure

Backend = Literal["local"]


def resolve_profile(detector: str):
    """A built-in profile by name, else a saved DetectorProfile block of that name."""
    if detector in PROFILES:
        return get_profile(detector)
    from detstream.blocks import DetectorProfile

    try:
        return DetectorProfile.load(detector).to_profile()
    except ValueError:
        get_profile(detector)  # raises with the list of built-in names
        raise


def make_backend(name: str, session_dir):
    if name == "local":
        return LocalBackend(log_dir=session_dir / "logs")
    raise ValueError(f"unknown backend {name!r}; known: local")


@flow(name="streaming-session", on_failure=[release_on_failure], on_crashed=[release_on_failure],
      on_cancellation=[release_on_failure], log_prints=True)
def streaming_session(
    scan_width: Annotated[Optional[int], Field(gt=0, le=65535, description="Scan width (positions); replay: from the files if empty.")] = 32,
    scan_height: Annotated[Optional[int], Field(gt=0, le=65535, description="Scan height (positions); replay: from the files if empty.")] = 32,
    detector: Annotated[str, Field(description="Detector profile: built-in name or a saved DetectorProfile block.")] = "4dcamera",
    nodes: Annotated[int, Field(gt=0, description="Compute nodes (one distributor each).")] = 2,
    workers_per_node: Annotated[int, Field(gt=0, description="Counting processes per node.")] = 1,
    source: Annotated[Literal["simulated", "replay"], Field(description="Where frames come from.")] = "simulated",
    replay_dir: Annotated[Optional[str], Field(description="Folder of raw v5 files, for source=replay.")] = None,
    seed: Annotated[int, Field(description="Simulator seed.")] = 0,
    output_dir: Annotated[str, Field(description="Each session writes into output_dir/<session id>.")] = "runs",
    counting: Annotated[bool, Field(description="Count electrons (off: stream and assemble only).")] = True,
    background_threshold: Annotated[float, Field(description="Background threshold (ADU after dark).")] = 12.0,
    xray_threshold: Annotated[float, Field(description="X-ray threshold (ADU).")] = 2000.0,
    dark_reference: Annotated[Optional[str], Field(description=".npy dark reference; simulator's own if empty.")] = None,
    gain: Annotated[Optional[str], Field(description=".npy gain map.")] = None,
    backend: Annotated[Backend, Field(description="Where the nodes come from.")] = "local",
    etcd_url: Annotated[Optional[str], Field(description="etcd endpoint; empty starts a private etcd.")] = None,
    etcd_prefix: Annotated[str, Field(description="etcd key prefix.")] = "/detstream",
    reserve_timeout_s: Annotated[float, Field(gt=0, description="Wait this long for the nodes.")] = 300.0,
    register_timeout_s: Annotated[float, Field(gt=0, description="Wait this long for services to register.")] = 60.0,
    stall_timeout_s: Annotated[float, Field(gt=0, description="No new frame for this long ends the scan.")] = 30.0,
    session_id: Annotated[Optional[str], Field(description="Session id (generated if empty).")] = None,
) -> dict:
    """Stream one scan from the detector into the nodes' memory, count it, write the counted HDF5."""
    logger = get_run_logger()
    spec = make_spec(
        scan_width=scan_width, scan_height=scan_height, profile=resolve_profile(detector),
        source=source, replay_dir=replay_dir, output_dir=output_dir, session_id=session_id,
        counting={"enabled": counting, "background_threshold": background_threshold,
                  "xray_threshold": xray_threshold, "dark_reference": dark_reference, "gain": gain},
        seed=seed, nodes=nodes, workers_per_node=workers_per_node, etcd_prefix=etcd_prefix,
        register_timeout_s=register_timeout_s, stall_timeout_s=stall_timeout_s)
    logger.info("session %s: %dx%d scan, %d nodes, output %s", spec.session_id, spec.scan_width,
                spec.scan_height, spec.nodes, spec.session_dir)
    run_ctx = FlowRunContext.get()
    run_key = str(run_ctx.flow_run.id) if run_ctx and run_ctx.flow_run else spec.session_id
    with coordination(etcd_url, spec.etcd_prefix) as (endpoint, coord):
        session = StreamingSession(spec, coord, make_backend(backend, spec.session_dir), endpoint)
        ACTIVE_SESSIONS[run_key] = session
        try:
            open_session(session)
            reserve_nodes(session, reserve_timeout_s)
            start_services(session)
            stream_scan(session)
            summary = collect_results(session)
            if summary["frames_received"] == 0:
                raise SessionError(f"no frame of the {spec.frames_expected} expected arrived",
                                   fallback_reason="no frames arrived")
            if not summary["complete"]:
                logger.warning("session %s: %d frames missing, listed in %s", spec.session_id,
                               summary["frames_missing"], summary["outputs"]["summary"])
            release_nodes(session, "completed", result=summary)
            logger.info("session %s completed: %d/%d frames, %d events -> %s", spec.session_id,
                        summary["frames_received"], summary["frames_expected"], summary["events"],
                        summary["outputs"]["hdf5"])
            return summary
        except SessionError as err:
            session.close("failed", str(err))
            raise
        except BaseException as err:
            session.close("cancelled" if _is_cancel(err) else "failed", f"{type(err).__name__}: {err}")
            raise
        finally:
            ACTIVE_SESSIONS.pop(run_key, None)


def _is_cancel(err: BaseException) -> bool:
    from detstream.session import SessionCancelled

    return isinstance(err, (SessionCancelled, KeyboardInterrupt))
