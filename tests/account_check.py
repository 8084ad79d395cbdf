"""An independent check of a session's account: counted.h5 against the simulator's frames.

``results.py`` derives ``frames_counted`` from what the merge wrote, so comparing the summary
with itself proves nothing. This module recounts instead. From the scan's parameters (the
``spec.json`` the session saved: detector, size, seed, scan number, thresholds, dark, gain) it
renders every position's frame with the simulator and counts it with the counting kernel,
without the data plane, the parts or the merge, then asserts:

(a) every position the summary does not list as lost (missing, partial or conflicted) is in
    counted.h5 with exactly the events its frame gives;
(b) every listed position is absent from counted.h5 (stempy's layout has one row per
    position, so an absent position is written as an empty row), and the listed positions are
    exactly the absent ones: an unlisted absent position fails (a);
(c) ``frames_counted`` (and ``frames_missing``, ``events``) agree with the positions actually
    present.

The whole scan is recounted, not a sample: every position's frame is rendered
(``Simulator.frame``) and counted, about a millisecond each for the tests' scans.

One blind spot, by the layout: a position whose true frame has no event cannot be told from an
absent one. ``AccountCheck.zero_event_positions`` says how many there were (none for the
simulator's profiles, whose frames have tens to hundreds of events).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np

from detstream.config import SessionSpec
from detstream.counting import Counter
from detstream.sources.simulator import Simulator


class AccountMismatch(AssertionError):
    """counted.h5, summary.json and the simulator's frames disagree."""


@dataclass
class AccountCheck:
    """What the check found: positions present and listed, and the blind spot's size."""

    present: int
    listed: list[int]
    events: int
    zero_event_positions: int
    problems: list[str] = field(default_factory=list)


class ExpectedEvents:
    """Each position's events as the counting rule gives them for the simulator's frame."""

    def __init__(self, spec: SessionSpec):
        if spec.source != "simulated":
            raise ValueError(f"the account check recounts simulated scans, not {spec.source!r}")
        self.sim = Simulator(spec.profile, spec.scan_width, spec.scan_height, seed=spec.seed,
                             scan_number=spec.scan_number)
        c = spec.counting
        dark = None
        if c.dark_reference is not None:
            # The session's own copy of the simulator's dark is not trusted: it is made again here.
            own = spec.paths.dark_reference.resolve() == Path(c.dark_reference).resolve()
            dark = self.sim.dark_reference() if own else np.load(c.dark_reference)
        gain = None if c.gain is None else np.load(c.gain)
        self.counter = Counter(spec.profile.frame_shape, dark, gain, c.background_threshold, c.xray_threshold)
        self._done: dict[int, np.ndarray] = {}

    def __call__(self, position: int) -> np.ndarray:
        if position not in self._done:
            self._done[position] = self.counter.count(self.sim.frame(position))
        return self._done[position]


def read_rows(h5_path: Path) -> np.ndarray:
    """counted.h5's rows (one events array per position), checked to be stempy's layout."""
    with h5py.File(h5_path, "r") as f:
        frames = f["electron_events/frames"]
        positions = f["electron_events/scan_positions"]
        w, h = int(positions.attrs["Nx"]), int(positions.attrs["Ny"])
        rows = frames[()]
        in_order = np.array_equal(positions[()], np.arange(w * h))
    if len(rows) != w * h or not in_order:
        raise AccountMismatch(f"{h5_path}: {len(rows)} rows for a {w}x{h} scan (scan_positions in order: {in_order})")
    return rows


def check_rows(rows: Sequence[np.ndarray], spec: SessionSpec, listed: set[int],
               expected: Optional[ExpectedEvents] = None) -> AccountCheck:
    """(a) and (b) over every position: unlisted ones hold their frame's events, listed ones none."""
    expected = expected or ExpectedEvents(spec)
    n = spec.scan_width * spec.scan_height
    problems: list[str] = []
    if len(rows) != n:
        problems.append(f"{len(rows)} rows for {n} positions")
    outside = sorted(p for p in listed if not 0 <= p < n)
    if outside:
        problems.append(f"listed positions outside the scan: {outside[:10]}")
    wrong, dropped, listed_but_present, zero = [], [], [], 0
    events = 0
    for p in range(min(n, len(rows))):
        row = np.asarray(rows[p])
        events += row.size
        want = expected(p)
        if not want.size:
            zero += 1
        if p in listed:
            if row.size:
                listed_but_present.append(p)
        elif not np.array_equal(row, want):
            (dropped if not row.size else wrong).append(p)
    if dropped:
        problems.append(f"{len(dropped)} positions absent from counted.h5 but not listed as lost: {dropped[:10]}")
    if wrong:
        p = wrong[0]
        problems.append(f"{len(wrong)} positions with events other than their frame's, e.g. {p}: "
                        f"{np.asarray(rows[p]).size} events, the frame gives {expected(p).size}")
    if listed_but_present:
        problems.append(f"{len(listed_but_present)} positions listed as lost have events in counted.h5: "
                        f"{listed_but_present[:10]}")
    return AccountCheck(present=n - len(listed & set(range(n))), listed=sorted(listed), events=events,
                        zero_event_positions=zero, problems=problems)


def check_counted(h5_path: Path, spec: SessionSpec, absent: Sequence[int] = ()) -> AccountCheck:
    """A counted.h5 outside a session's account (a test's own merge): every position but
    ``absent`` holds its frame's events, and those hold none. Raises AccountMismatch."""
    result = check_rows(read_rows(Path(h5_path)), spec, set(absent))
    if result.problems:
        raise AccountMismatch(f"{h5_path}: " + "; ".join(result.problems))
    return result


def check_account(session_dir: Path, frames_expected: Optional[int] = None) -> AccountCheck:
    """The session's account against an independent recount: (a), (b) and (c) above.

    ``frames_expected`` is the scan size the test asked for (checked against the spec the session
    saved, so a wrong spec cannot make a wrong recount agree). Raises AccountMismatch."""
    session_dir = Path(session_dir)
    spec = SessionSpec.model_validate_json((session_dir / "spec.json").read_text())
    summary = json.loads((session_dir / "summary.json").read_text())
    n = spec.scan_width * spec.scan_height
    problems: list[str] = []
    if frames_expected is not None and frames_expected != n:
        problems.append(f"the spec is a {n}-position scan, the test asked for {frames_expected}")
    if summary["frames_expected"] != n:
        problems.append(f"summary expects {summary['frames_expected']} frames, the scan has {n}")
    kinds = {k: set(summary.get(k) or []) for k in ("missing_positions", "partial_positions", "conflicted_positions")}
    for a, b in (("missing_positions", "partial_positions"), ("missing_positions", "conflicted_positions"),
                 ("partial_positions", "conflicted_positions")):
        if kinds[a] & kinds[b]:
            problems.append(f"positions both {a} and {b}: {sorted(kinds[a] & kinds[b])[:10]}")
    listed = set().union(*kinds.values())
    h5_path = session_dir / "counted.h5"
    if not h5_path.exists():
        raise AccountMismatch(f"{session_dir}: no counted.h5 to check ({'; '.join(problems)})")
    result = check_rows(read_rows(h5_path), spec, listed)
    problems += result.problems
    # (c) the counts the summary gives are those of the positions actually present.
    if summary["frames_counted"] != result.present:
        problems.append(f"frames_counted {summary['frames_counted']}, but {result.present} positions are present")
    if summary["frames_missing"] != len(listed):
        problems.append(f"frames_missing {summary['frames_missing']}, but {len(listed)} positions are listed")
    if summary.get("events") is not None and summary["events"] != result.events:
        problems.append(f"summary counts {summary['events']} events, counted.h5 holds {result.events}")
    if summary["complete"] != (not listed):
        problems.append(f"complete is {summary['complete']} with {len(listed)} positions listed as lost")
    if problems:
        raise AccountMismatch(f"{session_dir}: " + "; ".join(problems))
    return result
