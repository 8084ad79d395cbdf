"""Turns the nodes' parts and the services' reports into the session's outputs and summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from .config import SessionSpec

def _load_reports(spec: SessionSpec, role: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in spec.paths.reports(role)]


def _sum_counters(dicts) -> dict:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def collect(spec: SessionSpec, workflow: str, timings: dict, overwrite: bool = False,
            extra: Optional[dict] = None) -> dict:
    """Merge the parts into the HDF5, draw the virtual bright field, write and return the summary."""
    from .output.images import write_png
    from .output.merge import merge_parts
    from .output.summary import write_summary

    paths = spec.paths
    nodes = _load_reports(spec, "distributor")
    producers = _load_reports(spec, "producer")
    aggregators = _load_reports(spec, "aggregator")
    t0 = time.time()
    outputs: dict[str, Optional[str]] = {"hdf5": None, "image": None}
    events_total = 0
    if spec.counting.enabled:
        parts = [Path(n["part_path"]) for n in nodes if n.get("part_path")]
        report = merge_parts(parts, paths.counts, spec.scan_width, spec.scan_height,
                             spec.profile.frame_shape, overwrite=overwrite)
        outputs["hdf5"] = str(paths.counts)
        events_total = report.total_events
        hdf5_closed = time.time()
        write_png(paths.image, report.bright_field)
        outputs["image"] = str(paths.image)
    else:
        hdf5_closed = time.time()
    timings = dict(timings)
    timings["merge_s"] = hdf5_closed - t0
    first_sent = min((p["first_send"] for p in producers if p.get("first_send")), default=None)
    received = sum(n["frames_received"] for n in nodes)
    missing = sorted(p for n in nodes for p in n["missing"])
    partial = sorted(p for n in nodes for p in n["partial"])
    bytes_moved = sum(n["bytes_received"] for n in nodes)
    stream_s = max((n["stream_seconds"] for n in nodes), default=0.0)
    summary = {
        "session_id": spec.session_id,
        "workflow": workflow,
        "detector": spec.detector,
        "scan": {"width": spec.scan_width, "height": spec.scan_height, "number": spec.scan_number},
        "nodes": spec.nodes,
        "frames_expected": spec.frames_expected,
        "frames_received": received,
        "frames_missing": len(missing),
        "complete": not missing,
        "missing_positions": missing,
        "partial_positions": partial,
        "events": events_total,
        "bytes_moved": bytes_moved,
        "stream_seconds": stream_s,
        "throughput_gb_s": bytes_moved / stream_s / 1e9 if stream_s else 0.0,
        "frames_per_s": received / stream_s if stream_s else 0.0,
        "time_to_result_s": (hdf5_closed - first_sent) if first_sent else None,
        "timings": timings,
        "rejected": _sum_counters([a.get("rejected") for a in aggregators] +
                                  [n.get("rejected") for n in nodes]),
        "finish_reasons": {f"node-{n['node_index']}": n["finish_reason"] for n in nodes},
        "peak_rss_mib": {
            "distributors": [n.get("peak_rss_mib") for n in nodes],
            "counting_workers": [w for n in nodes for w in n.get("worker_peak_rss_mib", [])],
        },
        "outputs": outputs,
        "counting": json.loads(spec.counting.model_dump_json()),
        **(extra or {}),
    }
    write_summary(paths.summary, summary)
    summary["outputs"]["summary"] = str(paths.summary)
    return summary

