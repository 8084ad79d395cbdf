"""Runs both workflows on the same scan several times, alternating, and reports them side by side."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from detstream import compare
from detstream.output.summary import write_summary

from . import _params as P
from .file_transfer import file_transfer_session
from .streaming import streaming_session

# The session parameters a comparison passes on to both workflows.
COMPARED = ("scan_width", "scan_height", "detector", "nodes", "workers_per_node", "seed", "frame_rate",
            "output_dir", "backend", "sfapi_credentials", "nersc_compute", "slurm_compute", "etcd", "etcd_url",
            "etcd_prefix")


@flow(name="compare-workflows", log_prints=True)
@P.shared_parameters(only=COMPARED, scan_width=64, scan_height=64, output_dir="runs/compare")
def compare_workflows(
    *,
    repeat: Annotated[int, P.Doc("Runs of each workflow (alternating).", gt=0, le=50)] = 3,
    json_path: Annotated[Optional[str], P.Doc("Also write the report here.")] = None,
    keep_raw_files: Annotated[bool, P.Doc(
        "Keep the file path's raw files after each run (they are the size of the scan).")] = False,
    **common,
) -> dict:
    """Time to counted result, throughput and stages of streaming vs file transfer, same scan."""
    logger = get_run_logger()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    scan_width, scan_height, output_dir = common["scan_width"], common["scan_height"], common["output_dir"]
    etcd = P.etcd_of(common)
    runs = []
    with etcd.coordination() as (endpoint, _):
        passed = {**{k: v for k, v in common.items() if k not in ("etcd", "etcd_url")},
                  "etcd": P.running_etcd(etcd, endpoint)}
        for i in range(repeat):
            order = (streaming_session, file_transfer_session)
            for fl in order if i % 2 == 0 else order[::-1]:
                tag = "st" if fl is streaming_session else "ft"
                summary = fl(**passed, session_id=f"cmp-{stamp}-{tag}{i}")
                logger.info("run %d %s: %.2f s to counted result", i, summary["workflow"],
                            summary["time_to_result_s"])
                runs.append(summary)
                if not keep_raw_files:
                    shutil.rmtree(Path(output_dir).resolve() / summary["session_id"] / "transferred",
                                  ignore_errors=True)
    report = compare.summarize(runs)
    first = {r["workflow"]: r["outputs"]["hdf5"] for r in reversed(runs)}
    identical, why = compare.same_events(first["streaming"], first["file-transfer"])
    scan = f"{scan_width}x{scan_height}"
    out = Path(output_dir).resolve() / f"compare-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    chart = compare.bar_chart(report, out / "comparison.png", f"streaming vs file transfer, {scan} scan")
    report.update(scan=scan, identical_events=identical, difference=why, chart=str(chart),
                  sessions=[{k: r[k] for k in ("session_id", "workflow", "time_to_result_s", "events")}
                            for r in runs])
    write_summary(out / "comparison.json", report)
    if json_path:
        write_summary(Path(json_path), report)
    create_table_artifact(table=compare.table_rows(report), key=f"comparison-{scan}".lower(),
                          description=f"Streaming vs file transfer, {scan}, {repeat} runs each")
    png = base64.b64encode(chart.read_bytes()).decode()
    create_markdown_artifact(
        markdown=compare.markdown(report, scan, identical, why) + f"\n\n![comparison](data:image/png;base64,{png})",
        key=f"comparison-report-{scan}".lower(), description="Comparison report")
    if not identical:
        raise RuntimeError(f"the two workflows produced different events: {why}")
    logger.info("%s", json.dumps({wf: d["time_to_result_s"] for wf, d in report["workflows"].items()}))
    return report
