"""The account of every frame: merges the durable parts into the session's outputs and writes
summary.json, whatever way the session ended."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .config import SessionSpec
from .states import SessionState

# Room the merge needs beyond the parts' own bytes: the variable-length heap's per-position
# overhead and the file's metadata.
_BYTES_PER_POSITION = 32
_MERGE_SLACK_BYTES = 1 << 20


class DiskFull(OSError):
    """The output's disk has less room than the merge needs; nothing was written, the parts are kept."""


def _load_reports(spec: SessionSpec, role: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in spec.paths.reports(role)]


def _sum_counters(dicts) -> dict:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def durable_parts(spec: SessionSpec) -> list[Path]:
    """Every part a merge should read: each node's index, and the durable segments of a node that
    died before writing one (parts and segments are renamed into place only when whole)."""
    from .services.segments import part_files

    return part_files(spec.paths.parts) if spec.paths.parts.exists() else []


def discard_unfinished_parts(spec: SessionSpec) -> list[str]:
    """Remove parts a killed writer left under their temporary name; they hold nothing durable."""
    if not spec.paths.parts.exists():
        return []
    gone = sorted(spec.paths.parts.rglob("*.partial"))
    for p in gone:
        p.unlink(missing_ok=True)
    return [p.name for p in gone]


def check_room(out: Path, parts: list[Path], positions: int) -> None:
    """Refuse a merge the disk cannot hold, naming the path, what it needs and what is free."""
    needed = sum(p.stat().st_size for p in parts) + positions * _BYTES_PER_POSITION + _MERGE_SLACK_BYTES
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        import errno

        raise DiskFull(errno.ENOSPC, f"not enough space to write {out}: the merge needs about "
                                     f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free "
                                     f"(the parts are kept in {parts[0].parent if parts else out.parent})")


def _node_positions(spec: SessionSpec, node_index: int) -> np.ndarray:
    return np.arange(node_index, spec.frames_expected, spec.nodes)


def _uncounted(spec: SessionSpec, nodes: list[dict], aggregators: list[dict]) -> list[int]:
    """Without counting nothing is merged. With acknowledged delivery the aggregator knows every
    position no node took (a lost node's share was re-routed); else a position is missing if its
    node said so or never reported."""
    acked = [a for a in aggregators if "lost_positions" in a]
    if acked:
        return sorted({int(p) for a in acked for p in a["lost_positions"]})
    reported = {n["node_index"] for n in nodes}
    lost = [p for n in nodes for p in n.get("missing", [])]
    for i in range(spec.nodes):
        if i not in reported:
            lost.extend(_node_positions(spec, i).tolist())
    return sorted(set(lost))


def _delivery(aggregators: list[dict]) -> dict:
    """What acknowledged delivery did: nodes lost, positions re-routed, and why positions were lost."""
    return {"nodes_lost": [n for a in aggregators for n in a.get("nodes_lost", [])],
            "positions_rerouted": sum(len(a.get("rerouted_positions", [])) for a in aggregators),
            "lost_reasons": _sum_counters(a.get("lost_reasons") for a in aggregators)}


def account_without_outputs(spec: SessionSpec, workflow: str, state: SessionState, reason: str,
                            error: str, extra: Optional[dict] = None) -> dict:
    """The summary when even the salvage failed (e.g. the disk is full): what is known, and why."""
    from .output.summary import write_summary

    summary = {"session_id": spec.session_id, "workflow": workflow, "state": SessionState(state).value,
               "reason": reason, "frames_expected": spec.frames_expected, "frames_counted": None,
               "complete": False, "salvage_error": error,
               "salvaged": {"parts": [str(p) for p in durable_parts(spec)]},
               "outputs": {"hdf5": None, "image": None}, **(extra or {})}
    try:
        write_summary(spec.paths.summary, summary)
        summary["outputs"]["summary"] = str(spec.paths.summary)
    except OSError as err:
        summary["outputs"]["summary"] = None
        summary["summary_error"] = str(err)
    return summary


def collect(spec: SessionSpec, workflow: str, timings: dict, overwrite: bool = False,
            extra: Optional[dict] = None, *, state: Optional[SessionState] = None,
            reason: Optional[str] = None) -> dict:
    """Merge every durable part into the HDF5, draw the virtual bright field, write and return
    the summary. ``state`` is the session's end state when already known (failed, cancelled);
    otherwise it is completed or incomplete by what was counted."""
    from .output.merge import merge_parts

    paths = spec.paths
    paths.root.mkdir(parents=True, exist_ok=True)
    nodes = _load_reports(spec, "distributor")
    producers = _load_reports(spec, "producer")
    aggregators = _load_reports(spec, "aggregator")
    discarded = discard_unfinished_parts(spec)
    t0 = time.time()
    outputs: dict[str, Optional[str]] = {"hdf5": None, "image": None}
    events_total = 0
    parts = durable_parts(spec) if spec.counting.enabled else []
    if spec.counting.enabled:
        check_room(paths.counts, parts, spec.frames_expected)
        # After a re-route two nodes may both have counted a position: the first copy is kept.
        v = spec.virtual
        report = merge_parts(parts, paths.counts, spec.scan_width, spec.scan_height,
                             spec.profile.frame_shape, overwrite=overwrite, on_duplicate="first",
                             center=v.center, radius=v.bf_radius, adf_inner=v.adf_inner,
                             adf_outer=v.adf_outer)
        outputs["hdf5"] = str(paths.counts)
        events_total = report.total_events
        hdf5_closed = time.time()
        outputs.update(write_figures(spec, report))
        not_counted = report.missing
        duplicates = report.duplicates
    else:
        hdf5_closed = time.time()
        not_counted = _uncounted(spec, nodes, aggregators)
        duplicates = 0
    timings = dict(timings)
    timings["merge_s"] = hdf5_closed - t0
    first_sent = min((p["first_send"] for p in producers if p.get("first_send")), default=None)
    received = sum(n["frames_received"] for n in nodes)
    partial_seen = {p for n in nodes for p in n.get("partial", [])}
    partial = sorted(p for p in not_counted if p in partial_seen)
    missing = sorted(p for p in not_counted if p not in partial_seen)
    counted = spec.frames_expected - len(not_counted)
    if state is None:
        state = SessionState.COMPLETED if not not_counted else SessionState.INCOMPLETE
    bytes_moved = sum(n["bytes_received"] for n in nodes)
    stream_s = max((n["stream_seconds"] for n in nodes), default=0.0)
    summary = {
        "session_id": spec.session_id,
        "workflow": workflow,
        "state": SessionState(state).value,
        "reason": reason,
        "detector": spec.detector,
        "scan": {"width": spec.scan_width, "height": spec.scan_height, "number": spec.scan_number},
        "nodes": spec.nodes,
        "frames_expected": spec.frames_expected,
        "frames_received": received,
        "frames_counted": counted,
        "frames_missing": len(not_counted),
        "complete": not not_counted,
        "missing_positions": missing,
        "partial_positions": partial,
        "duplicates_dropped": duplicates,
        "delivery": _delivery(aggregators),
        "salvaged": {"parts": [str(p) for p in parts], "nodes_reported": len(nodes),
                     "unfinished_part_files_removed": discarded},
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
    return write_account(spec, summary)


def write_figures(spec: SessionSpec, report) -> dict[str, str]:
    """The merge's images as figures a person can read: bright field, dark field, summed pattern."""
    from .output.images import pattern_panel, scan_panel, write_figure

    paths, sid = spec.paths, spec.session_id
    d = report.detectors
    write_figure(paths.image, [scan_panel(report.bright_field, "Virtual bright field")],
                 f"session {sid}: disk at ({d.center[0]:.1f}, {d.center[1]:.1f}), radius {d.bf_radius:.1f} px")
    write_figure(paths.dark_field_image, [scan_panel(report.dark_field, "Virtual annular dark field")],
                 f"session {sid}: ring {d.adf_inner:.1f}-{d.adf_outer:.1f} px")
    write_figure(paths.pattern_image, [pattern_panel(report.summed_pattern)],
                 f"session {sid}: {report.positions_written} frames")
    return {"image": str(paths.image), "dark_field_image": str(paths.dark_field_image),
            "pattern_image": str(paths.pattern_image)}


def write_account(spec: SessionSpec, summary: dict) -> dict:
    """(Re)write summary.json atomically; the summary gains its own path among the outputs."""
    from .output.summary import write_summary

    write_summary(spec.paths.summary, {**summary, "outputs": {
        k: v for k, v in summary["outputs"].items() if k != "summary"}})
    summary["outputs"]["summary"] = str(spec.paths.summary)
    return summary
