"""A session's spec from flow or CLI parameters, validated before any process starts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..config import CountingParams, SessionSpec


def validate_spec(spec: SessionSpec) -> None:
    """Checks that need files (dark, gain, replay data): all before any process starts."""
    shape = spec.profile.frame_shape
    for what, path in (("dark reference", spec.counting.dark_reference), ("gain", spec.counting.gain)):
        if path is None:
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {what} {path}: {err}") from None
        if arr.shape != shape:
            raise ValueError(f"{what} {path} has shape {arr.shape}; detector "
                             f"{spec.detector} frames are {shape}")
    if spec.source == "replay":
        w, h, _ = replay_scan_shape(spec.profile, spec.replay_dir)
        if (w, h) != (spec.scan_width, spec.scan_height):
            raise ValueError(f"replay data in {spec.replay_dir} is a {w}x{h} scan, the session asks "
                             f"for {spec.scan_width}x{spec.scan_height}")


def replay_scan_shape(profile, directory) -> tuple[int, int, int]:
    """(width, height, scan number) of a recorded scan, read from its headers."""
    from ..sources.rawv5 import ReplaySource

    src = ReplaySource(profile, directory)
    return src.scan_width, src.scan_height, src.scan_number


def make_spec(*, scan_width: Optional[int], scan_height: Optional[int], profile, source: str = "simulated",
              replay_dir: Optional[str] = None, output_dir: str = "runs", session_id: Optional[str] = None,
              counting: Optional[dict] = None, **fields) -> SessionSpec:
    """Build and validate a SessionSpec from flow or CLI parameters (replay: scan size from the files)."""
    scan_number = fields.pop("scan_number", None)
    if source == "replay":
        if not replay_dir:
            raise ValueError("source 'replay' needs a replay directory")
        w, h, n = replay_scan_shape(profile, replay_dir)
        if (scan_width or w, scan_height or h) != (w, h):
            raise ValueError(f"replay data in {replay_dir} is a {w}x{h} scan, not {scan_width}x{scan_height}")
        scan_width, scan_height = w, h
        scan_number = n if scan_number is None else scan_number
    if scan_number is not None:
        fields["scan_number"] = scan_number
    if session_id:
        fields["session_id"] = session_id
    spec = SessionSpec(
        detector_profile=profile, scan_width=scan_width or 0, scan_height=scan_height or 0,
        source=source, replay_dir=Path(replay_dir).resolve() if replay_dir else None,
        output_dir=Path(output_dir).resolve(), counting=CountingParams(**(counting or {})), **fields)
    validate_spec(spec)
    return spec


def with_simulator_dark(spec: SessionSpec) -> SessionSpec:
    """A simulated scan without a dark reference uses the simulator's own (saved in the session dir)."""
    if spec.source != "simulated" or spec.counting.dark_reference is not None or not spec.counting.enabled:
        return spec
    from ..sources.simulator import simulated_dark_reference

    path = spec.paths.dark_reference
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, simulated_dark_reference(spec.profile, spec.seed))
    counting = spec.counting.model_copy(update={"dark_reference": path})
    return spec.model_copy(update={"counting": counting})
