"""Task that follows the scan while it streams, with a progress artifact in the Prefect UI."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from detstream.session import ScanProgress, StreamingSession


def _cancel_check():
    """A callable that says whether this flow run has been asked to cancel (checked at most 1/s)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return lambda: False
    flow_run_id = ctx.flow_run.id
    last = {"t": 0.0, "cancel": False}

    def check() -> bool:
        now = time.monotonic()
        if now - last["t"] < 1.0:
            return last["cancel"]
        last["t"] = now
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        last["cancel"] = state is not None and (state.is_cancelling() or state.is_cancelled())
        return last["cancel"]

    return check


@task(name="stream-scan", cache_policy=NO_CACHE)
def stream_scan(session: StreamingSession) -> dict:
    """Wait for every node to finish its share; the progress artifact advances as frames land."""
    logger = get_run_logger()
    artifact_id = create_progress_artifact(
        progress=0.0, key=f"scan-progress-{session.sid}".lower(),
        description=f"Frames received, session {session.sid}")
    shown = {"pct": -1}

    def on_progress(p: ScanProgress) -> None:
        pct = round(100.0 * p.fraction, 1)
        if pct != shown["pct"]:
            shown["pct"] = pct
            update_progress_artifact(artifact_id=artifact_id, progress=pct)
            logger.info("received %d/%d frames (%.1f%%)", p.frames_received, p.frames_expected, pct)

    final = session.stream(on_progress=on_progress, cancelled=_cancel_check())
    update_progress_artifact(artifact_id=artifact_id, progress=100.0 * final.fraction)
    return {"frames_received": final.frames_received, "per_node": final.per_node}
