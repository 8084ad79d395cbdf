"""Task that follows the scan while it streams, with progress and live-image artifacts in the Prefect UI."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext

from detstream.session import ScanProgress, StreamingSession
from detstream.tasks.results import png_markdown, publish_guide


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


def live_artifact_key(sid: str) -> str:
    return f"live-images-{sid}".lower()


def publish_live(session: StreamingSession, shown: dict) -> None:
    """A new version of the live-images artifact (same key) whenever live.png was redrawn."""
    live = session.live
    if live is None or live.png is None or live.version == shown.get("live"):
        return
    shown["live"] = live.version
    create_markdown_artifact(
        markdown=f"# Live virtual images, session `{session.sid}`\n\n"
                 f"{live.drawn_frames}/{session.spec.frames_expected} frames counted "
                 f"(redrawn every {session.spec.virtual.redraw_s:g} s while the scan streams).\n\n"
                 f"{png_markdown('live bright field, dark field and centre of mass', live.png)}\n\n"
                 f"Also on disk, rewritten in place: `{live.path}`",
        key=live_artifact_key(session.sid),
        description="Bright field, dark field and centre of mass as the nodes count them")


@task(name="stream-scan", cache_policy=NO_CACHE)
def stream_scan(session: StreamingSession) -> dict:
    """Wait for every node to finish its share; the progress artifact advances as frames land."""
    logger = get_run_logger()
    if session.spec.virtual.live and session.spec.counting.enabled:
        publish_guide(session.sid, session.paths.root)
    artifact_id = create_progress_artifact(
        progress=0.0, key=f"scan-progress-{session.sid}".lower(),
        description=f"Frames received, session {session.sid}")
    shown = {"pct": -1}

    def on_progress(p: ScanProgress) -> None:
        publish_live(session, shown)
        pct = round(100.0 * p.fraction, 1)
        if pct != shown["pct"]:
            shown["pct"] = pct
            update_progress_artifact(artifact_id=artifact_id, progress=pct)
            logger.info("received %d/%d frames (%.1f%%)", p.frames_received, p.frames_expected, pct)

    final = session.stream(on_progress=on_progress, cancelled=_cancel_check())
    publish_live(session, shown)
    update_progress_artifact(artifact_id=artifact_id, progress=100.0 * final.fraction)
    return {"frames_received": final.frames_received, "per_node": final.per_node}
