"""Task that writes the session's outputs and publishes the summary as Prefect artifacts."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from detstream import results
from detstream.session import StreamingSession

_TABLE_KEYS = ("workflow", "frames_expected", "frames_received", "frames_missing", "events",
               "bytes_moved", "throughput_gb_s", "frames_per_s", "time_to_result_s")


def summary_rows(summary: dict) -> list[dict]:
    rows = [{"metric": k, "value": summary.get(k)} for k in _TABLE_KEYS]
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


@task(name="collect-results", cache_policy=NO_CACHE)
def collect_results(session: StreamingSession, overwrite: bool = False, extra: dict | None = None) -> dict:
    """Merge the nodes' parts into the HDF5, write the image and summary, publish them."""
    summary = results.collect(session.spec, session.workflow, session.timings, overwrite=overwrite,
                              extra={"backend": session.backend.name,
                                     "job": session.reservation.model_dump(mode="json")
                                     if session.reservation else None, **(extra or {})})
    publish_summary(summary)
    return summary
