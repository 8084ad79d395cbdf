"""Task that writes the session's outputs and publishes the summary as Prefect artifacts."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from detstream import results
from detstream.session import StreamingSession

_TABLE_KEYS = ("workflow", "frames_expected", "frames_received", "frames_missing", "events",
               "bytes_moved", "throughput_gb_s", "frames_per_s", "time_to_result_s")


def _short(v):
    """Floats to 4 decimals, so the table in the UI reads 0.0735, not 0.07349297595139222."""
    return round(v, 4) if isinstance(v, float) else v


def summary_rows(summary: dict) -> list[dict]:
    rows = [{"metric": k, "value": _short(summary.get(k))} for k in _TABLE_KEYS]
    rows += [{"metric": f"timing: {k}", "value": round(v, 3)} for k, v in summary.get("timings", {}).items()]
    rows += [{"metric": f"rejected: {k}", "value": v} for k, v in summary.get("rejected", {}).items()]
    return rows


def publish_summary(summary: dict) -> None:
    """Summary table and a markdown report linking the outputs."""
    sid = summary["session_id"]
    create_table_artifact(table=summary_rows(summary), key=f"summary-{sid}".lower(),
                          description=f"detstream {summary['workflow']} session {sid}")
    out = summary.get("outputs", {})
    lines = [f"# detstream session `{sid}` ({summary['workflow']})", "",
             f"{summary['frames_received']}/{summary['frames_expected']} frames, "
             f"{summary['events']} electron events.", ""]
    if summary.get("fallback_reason"):
        lines += [f"**Fell back to the file-transfer workflow:** {summary['fallback_reason']}", ""]
    if summary.get("missing_positions"):
        lines += [f"Missing positions ({summary['frames_missing']}): "
                  f"{summary['missing_positions'][:50]}", ""]
    for name, path in out.items():
        if path:
            lines.append(f"- {name}: [`{path}`](file://{path})")
    create_markdown_artifact(markdown="\n".join(lines), key=f"report-{sid}".lower(),
                             description="Outputs of the session")
    if out.get("image"):
        publish_image(sid, Path(out["image"]))


# The image artifact's longer side: small scans are enlarged to at least this (a 16x16 scan is 16
# pixels wide), large ones thinned to at most the maximum (the PNG travels inside the artifact).
_PREVIEW_MIN_PX, _PREVIEW_MAX_PX = 384, 1024


def image_preview_png(path: Path) -> bytes:
    """The PNG at ``path`` at a size the UI shows well: whole pixels repeated (no smoothing) or
    every n-th kept, as PNG bytes."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(path)  # greyscale float in [0, 1], (rows, cols)
    if img.ndim == 3:
        img = img[..., 0]
    side = max(img.shape)
    if side > _PREVIEW_MAX_PX:
        step = math.ceil(side / _PREVIEW_MAX_PX)
        big = img[::step, ::step]
    else:
        k = max(1, math.ceil(_PREVIEW_MIN_PX / side))
        big = np.repeat(np.repeat(img, k, axis=0), k, axis=1)
    buf = io.BytesIO()
    mpimg.imsave(buf, big, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    return buf.getvalue()


def publish_image(sid: str, path: Path) -> None:
    """The virtual bright-field image as a markdown artifact with the PNG embedded (data URI).

    Prefect's image artifact takes a URL the browser can load; the session's PNG is a file on
    the flow run's machine that the Prefect server does not serve, and a data URI there is shown
    again as the link text, so the image goes into markdown instead.
    """
    png = base64.b64encode(image_preview_png(path)).decode()
    create_markdown_artifact(
        markdown=f"# Virtual bright field, session `{sid}`\n\n"
                 f"![virtual bright field](data:image/png;base64,{png})\n\n"
                 f"Events inside the bright-field disk per scan position; full resolution in `{path}`.",
        key=f"bright-field-{sid}".lower(), description="Virtual bright-field image")


@task(name="collect-results", cache_policy=NO_CACHE)
def collect_results(session: StreamingSession, overwrite: bool = False, extra: dict | None = None) -> dict:
    """Merge the nodes' parts into the HDF5, write the image and summary, publish them."""
    summary = results.collect(session.spec, session.workflow, session.timings, overwrite=overwrite,
                              extra={"backend": session.backend.name,
                                     "job": session.reservation.model_dump(mode="json")
                                     if session.reservation else None, **(extra or {})})
    publish_summary(summary)
    return summary
