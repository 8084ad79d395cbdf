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
from pydantic import Field

from detstream import compare
from detstream.config import DEFAULT_PREFIX
from detstream.output.summary import write_summary
from detstream.session import coordination

from . import _params as P
from .file_transfer_session import file_transfer_session
from .streaming_session import streaming_session


@flow(name="compare-workflows", log_prints=True)
def compare_workflows(
    scan_width: P.ScanSide = 64,
    scan_height: P.ScanSide = 64,
    repeat: Annotated[int, Field(gt=0, le=50, description="Runs of each workflow (alternating).")] = 3,
    detector: P.Detector = "4dcamera",
    nodes: P.Nodes = 2,
    workers_per_node: P.Workers = 1,
    seed: P.Seed = 0,
    output_dir: P.OutputDir = "runs/compare",
    backend: P.BackendName = "local",
    etcd_url: P.EtcdUrl = None,
    etcd_prefix: P.EtcdPrefix = DEFAULT_PREFIX,
    json_path: Annotated[Optional[str], Field(description="Also write the report here.")] = None,
    keep_raw_files: Annotated[bool, Field(description="Keep the file path's raw files after each run (they are the size of the scan).")] = False,
) -> dict:
    """Time to counted result, throughput and stages of streaming vs file transfer, same scan."""
    logger = get_run_logger()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = dict(scan_width=scan_width, scan_height=scan_height, detector=detector, nodes=nodes,
                  workers_per_node=workers_per_node, seed=seed, output_dir=output_dir, backend=backend,
                  etcd_prefix=etcd_prefix)
    runs = []
    with coordination(etcd_url, etcd_prefix) as (endpoint, _):
        for i in range(repeat):
            order = (streaming_session, file_transfer_session)
            for fl in order if i % 2 == 0 else order[::-1]:
                tag = "st" if fl is streaming_session else "ft"
                summary = fl(**common, etcd_url=endpoint, session_id=f"cmp-{stamp}-{tag}{i}")
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
