"""Task that writes the session's outputs and publishes the summary as Prefect artifacts."""

from __future__ import annotations

import base64
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
        publish_images(sid, out)
    if out.get("hdf5"):
        publish_guide(sid, Path(out["hdf5"]).parent, out)


def artifact_link(key: str) -> str:
    """Where the Prefect UI shows the latest version of an artifact (relative to the UI unless
    PREFECT_UI_URL is set)."""
    from prefect.settings import PREFECT_UI_URL

    base = (PREFECT_UI_URL.value() or "").rstrip("/")
    return f"{base}/artifacts/key/{key}"


def guide_markdown(sid: str, session_dir: Path, outputs: dict | None = None) -> str:
    """The flow run's way in for the microscopist: the live and final images and a py4DSTEM snippet."""
    from detstream.session_dir import SessionDir
    from detstream.tasks.stream import live_artifact_key

    paths = SessionDir(Path(session_dir))
    lines = [f"# Session `{sid}`: images and analysis", "",
             f"- Live images while the scan streams: [artifact {live_artifact_key(sid)}]"
             f"({artifact_link(live_artifact_key(sid))}), file `{paths.live_image}`"]
    if outputs and outputs.get("image"):
        key = f"bright-field-{sid}".lower()
        lines.append(f"- Final images (bright field, dark field, summed pattern): [artifact {key}]"
                     f"({artifact_link(key)})")
        lines += [f"  - `{outputs[k]}`" for k, _ in _FIGURES if outputs.get(k)]
        lines.append(f"- Counted data (stempy's layout, with `stem/images`): `{outputs['hdf5']}`")
    else:
        lines.append(f"- Final images and counted data, once the scan is counted: in `{paths.root}`")
    lines += ["", "## Open it in py4DSTEM", "", "```python",
              "import detstream.analysis as dsa  # pip install 'detstream[analysis]'", "",
              f"dc = dsa.open_datacube({str(paths.root)!r}, bin=4)  # a py4DSTEM DataCube, detector binned 4x4",
              "geometry = dsa.py4dstem_geometry(dc)  # detstream's disk and ring, in py4DSTEM's terms",
              "bf = dc.get_virtual_image(mode='circle', geometry=geometry['bright_field'], name='bright_field')",
              "adf = dc.get_virtual_image(mode='annular', geometry=geometry['annular_dark_field'], name='dark_field')",
              "```"]
    return "\n".join(lines)


def publish_guide(sid: str, session_dir: Path, outputs: dict | None = None) -> None:
    """The guide as a markdown artifact on the flow run (a new version once the images are final)."""
    create_markdown_artifact(markdown=guide_markdown(sid, session_dir, outputs), key=f"analysis-{sid}".lower(),
                             description="Live and final images, and the py4DSTEM snippet for this session")


def png_markdown(alt: str, png: bytes) -> str:
    """A PNG embedded in markdown as a data URI: the Prefect server does not serve the session's
    files, and its image artifact takes only a URL (a data URI there shows as link text)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


_FIGURES = (("image", "virtual bright field"), ("dark_field_image", "virtual annular dark field"),
            ("pattern_image", "summed diffraction pattern"))


def publish_images(sid: str, outputs: dict) -> None:
    """The final figures (bright field, dark field, summed pattern) as one markdown artifact."""
    lines = [f"# Virtual images, session `{sid}`", ""]
    for key, alt in _FIGURES:
        if outputs.get(key):
            lines += [f"## {alt.capitalize()}", "", png_markdown(alt, Path(outputs[key]).read_bytes()), "",
                      f"Full file: `{outputs[key]}`", ""]
    create_markdown_artifact(markdown="\n".join(lines), key=f"bright-field-{sid}".lower(),
                             description="Virtual bright field, dark field and summed pattern")


@task(name="collect-results", cache_policy=NO_CACHE)
def collect_results(session: StreamingSession, overwrite: bool = False, extra: dict | None = None) -> dict:
    """Merge the nodes' parts into the HDF5, write the image and summary, publish them."""
    summary = results.collect(session.spec_for_merge(), session.workflow, session.timings, overwrite=overwrite,
                              extra={"backend": session.backend.name,
                                     "job": session.reservation.model_dump(mode="json")
                                     if session.reservation else None, **(extra or {})})
    publish_summary(summary)
    return summary
