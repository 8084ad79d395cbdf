"""The account of every frame: merges the durable parts into the session's outputs and writes
summary.json, whatever way the session ended."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Optional

import numpy as np

from .config import SessionSpec
from .errors import DetstreamError
from .output.hdf5 import DiskFull, disk_full
from .states import SessionState

__all__ = ["DiskFull", "MergeFailed", "collect", "merge_session", "run_merge"]

log = logging.getLogger("detstream.results")

#: Held in the session folder while the merge runs and given back just before summary.json is
#: written, so that a disk the merge (or anyone) filled still takes the account.
_SUMMARY_RESERVE = ".summary.json.reserve"
_SUMMARY_RESERVE_BYTES = 1 << 20


class MergeFailed(DetstreamError, RuntimeError):
    """The merge's own process (``detstream merge``) ended without a result: killed or crashed.
    counted.h5 was not written (or not whole); the parts are kept for ``detstream salvage``."""


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
        _release_summary_reserve(spec)
        write_summary(spec.paths.summary, summary)
        summary["outputs"]["summary"] = str(spec.paths.summary)
    except OSError as err:
        summary["outputs"]["summary"] = None
        summary["summary_error"] = str(err)
    return summary


def collect(spec: SessionSpec, workflow: str, timings: dict, overwrite: bool = False,
            extra: Optional[dict] = None, *, state: Optional[SessionState] = None,
            reason: Optional[str] = None) -> dict:
    """Merge every durable part into the HDF5 (``detstream merge``, a child process), draw the
    virtual bright field, write and return the summary. ``state`` is the session's end state
    when already known (failed, cancelled); otherwise it is completed or incomplete by what was
    counted."""
    paths = spec.paths
    paths.root.mkdir(parents=True, exist_ok=True)
    with _summary_reserve(spec):
        return _collect(spec, workflow, timings, overwrite, extra, state, reason)


def _collect(spec: SessionSpec, workflow: str, timings: dict, overwrite: bool, extra: Optional[dict],
             state: Optional[SessionState], reason: Optional[str]) -> dict:
    nodes = _load_reports(spec, "distributor")
    producers = _load_reports(spec, "producer")
    aggregators = _load_reports(spec, "aggregator")
    discarded = discard_unfinished_parts(spec)
    t0 = time.time()
    outputs: dict[str, Optional[str]] = {"hdf5": None, "image": None}
    events_total = 0
    parts = durable_parts(spec) if spec.counting.enabled else []
    # Two differing copies of a sector arrived: neither can be trusted, the position is left out.
    conflicted = sorted({p for n in nodes for p in n.get("conflicted", [])})
    if spec.counting.enabled:
        # In its own process: whatever the merge meets (a full disk, a crash inside HDF5) ends
        # that process, never this one.
        merged = run_merge(spec, overwrite=overwrite)
        outputs["hdf5"] = merged["hdf5"]
        events_total = merged["total_events"]
        hdf5_closed = merged["hdf5_closed"]
        outputs.update(merged["figures"])
        not_counted = merged["missing"]
        duplicates = merged["duplicates"]
        conflicted = sorted(set(conflicted) | set(merged["conflicted"]))  # two nodes' copies differ
    else:
        hdf5_closed = time.time()
        not_counted = sorted(set(_uncounted(spec, nodes, aggregators)) | set(conflicted))
        duplicates = 0
    timings = dict(timings)
    timings["merge_s"] = hdf5_closed - t0
    first_sent = min((p["first_send"] for p in producers if p.get("first_send")), default=None)
    received = sum(n["frames_received"] for n in nodes)
    partial_seen = {p for n in nodes for p in n.get("partial", [])}
    partial = sorted(p for p in not_counted if p in partial_seen)
    missing = sorted(p for p in not_counted if p not in partial_seen and p not in conflicted)
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
        "conflicted_positions": conflicted,
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
    """The merge's images as figures a person can read: bright field, dark field, summed pattern.
    A full disk is a DiskFull naming the figure, its bytes and the bytes free."""
    from .output.images import draw_figure, pattern_panel, scan_panel, write_png_bytes

    paths, sid = spec.paths, spec.session_id
    d = report.detectors

    def write_figure(path, panels, title):
        png = draw_figure(panels, title)
        try:
            write_png_bytes(path, png)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(path, len(png), what="the figure") from err
            raise

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

    _release_summary_reserve(spec)
    write_summary(spec.paths.summary, {**summary, "outputs": {
        k: v for k, v in summary["outputs"].items() if k != "summary"}})
    summary["outputs"]["summary"] = str(spec.paths.summary)
    return summary


# --- the summary's reserve -----------------------------------------------------------------

class _summary_reserve:
    """Hold room for summary.json while the merge runs (best effort: a disk already too full
    to hold it is left as it is); given back just before the summary is written, or at the end."""

    def __init__(self, spec: SessionSpec):
        self.path = spec.paths.root / _SUMMARY_RESERVE
        # The summary lists positions: room for every one of them, besides the rest.
        self.nbytes = _SUMMARY_RESERVE_BYTES + 12 * spec.frames_expected

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.nbytes)
            finally:
                os.close(fd)
        except OSError:
            with suppress(OSError):
                self.path.unlink()
        return self

    def __exit__(self, *exc):
        with suppress(OSError):
            self.path.unlink()


def _release_summary_reserve(spec: SessionSpec) -> None:
    with suppress(OSError):
        (spec.paths.root / _SUMMARY_RESERVE).unlink()


# --- the merge, in its own process ----------------------------------------------------------

#: Errors the merge's process reports that are raised here as themselves (others: MergeFailed).
_ERRORS = {"DiskFull": DiskFull, "FileExistsError": FileExistsError,
           "FileNotFoundError": FileNotFoundError, "OSError": OSError, "ValueError": ValueError}


def run_merge(spec: SessionSpec, overwrite: bool = False) -> dict:
    """Run ``detstream merge`` on the session's folder as a child process and return what it
    wrote (see :func:`merge_session`). Its errors are raised here as they were there (a full
    disk is a :class:`DiskFull` naming the file, the bytes needed and the bytes free); a merge
    killed or crashed (a signal) is a :class:`MergeFailed` naming the signal. Nothing it meets
    can take this process down."""
    from . import reaper
    from .processes import ManagedProcess, detstream_argv

    # Its spec, result and log live off the session's disk, which may be the full one; the
    # reaper (if this is `detstream run`) removes them, and stops the merge, if we are killed.
    work = Path(tempfile.mkdtemp(prefix="detstream-merge-"))
    reaper.track_dir(work)
    try:
        spec_file = work / "spec.json"
        spec_file.write_text(spec.model_dump_json())
        result_file = work / "result.json"
        argv = ["merge", str(spec.paths.root), "--spec", str(spec_file), "--result", str(result_file)]
        if overwrite:
            argv.append("--overwrite")
        proc = ManagedProcess(detstream_argv(*argv), work / "merge.log", name=f"merge-{spec.session_id}")
        proc.start()
        try:
            code = proc.wait()
        finally:
            proc.stop()  # only if this process is interrupted while it runs: then it goes too
            code = proc.proc.returncode
        tail = proc.log_tail(15)
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            result = None
        if not (result is not None and result.get("ok") and code == 0):
            _keep_log(spec, work / "merge.log")
        if result is not None and result.get("ok"):
            if code != 0:
                raise MergeFailed(f"the merge of {spec.paths.root} wrote its result but exited {code}")
            return result
        if result is not None:
            err = result["error"]
            cls = _ERRORS.get(err["type"])
            if cls is None:
                raise MergeFailed(f"the merge of {spec.paths.root} failed: {err['type']}: {err['message']}")
            if issubclass(cls, OSError):
                exc = cls(err["errno"], err["message"]) if err.get("errno") else cls(err["message"])
                exc.path, exc.needed, exc.free = err.get("path"), err.get("needed"), err.get("free")
                raise exc
            raise cls(err["message"])
        how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited {code} without a result")
        raise MergeFailed(f"the merge of {spec.paths.root} (detstream merge, pid {proc.pid}) {how}; "
                          f"{spec.paths.counts} was not written, the parts are kept in {spec.paths.parts} "
                          f"(`detstream salvage {spec.paths.root}` merges them again). Its log ends:\n{tail}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keep_log(spec: SessionSpec, log_file: Path) -> None:
    """A failed merge's log into the session folder, if there is room (not worth failing for)."""
    with suppress(OSError):
        if log_file.stat().st_size:
            shutil.copyfile(log_file, spec.paths.root / "merge.log")


def merge_session(session_dir: Path, spec_file: Optional[Path] = None, *, overwrite: bool = False) -> dict:
    """What ``detstream merge`` does: merge the folder's durable parts into counted.h5 and draw
    the figures; return what the summary needs (JSON-able)."""
    from .output.merge import merge_parts
    from .salvage import load_spec

    session_dir = Path(session_dir)
    if spec_file is not None:
        spec = SessionSpec.model_validate_json(Path(spec_file).read_text())
    else:
        spec = load_spec(session_dir)
    spec = spec.model_copy(update={"output_dir": session_dir.resolve().parent})
    nodes = _load_reports(spec, "distributor")
    conflicted = sorted({p for n in nodes for p in n.get("conflicted", [])})
    parts = durable_parts(spec)
    v = spec.virtual
    # After a re-route two nodes may both have counted a position: the first copy is kept.
    report = merge_parts(parts, spec.paths.counts, spec.scan_width, spec.scan_height,
                         spec.profile.frame_shape, overwrite=overwrite, on_duplicate="first",
                         center=v.center, radius=v.bf_radius, adf_inner=v.adf_inner,
                         adf_outer=v.adf_outer, exclude=conflicted)
    hdf5_closed = time.time()
    try:
        figures = write_figures(spec, report)
    except BaseException:
        # counted.h5 without its figures is not the session's output (the account will say it
        # failed, with no HDF5): nothing of this merge is left; the parts are, for salvage.
        for path in (spec.paths.counts, spec.paths.image, spec.paths.dark_field_image,
                     spec.paths.pattern_image):
            with suppress(OSError):
                path.unlink()
        raise
    return {"ok": True, "hdf5": str(spec.paths.counts), "hdf5_closed": hdf5_closed,
            "total_events": int(report.total_events), "missing": [int(p) for p in report.missing],
            "duplicates": int(report.duplicates), "conflicted": [int(p) for p in report.conflicted],
            "parts": [str(p) for p in parts], "figures": figures}


def merge_error(err: BaseException) -> dict:
    """An exception as the merge's result records it."""
    out = {"type": type(err).__name__, "message": str(err)}
    if isinstance(err, OSError):
        out.update(message=err.strerror if err.errno and err.strerror else str(err), errno=err.errno,
                   path=getattr(err, "path", None) or err.filename, needed=getattr(err, "needed", None),
                   free=getattr(err, "free", None))
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, DiskFull):
            out["type"] = "DiskFull"  # a full disk met outside the reservations: still a full disk
    return {"ok": False, "error": out}
