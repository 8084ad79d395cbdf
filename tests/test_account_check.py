"""The account checker (tests/account_check.py) itself: it passes a true account and fails a
counted.h5 with one position dropped, one position's events changed, or a summary that lies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from account_check import AccountMismatch, check_account, check_counted
from detstream.config import CountingParams, SessionSpec
from detstream.counting import count_frame
from detstream.output import write_counts
from detstream.profile import SMALL_TEST_CAMERA
from detstream.sources import Simulator

W, H, SEED = 12, 10, 3


@pytest.fixture
def session(tmp_path):
    """A session folder as a clean run leaves it: spec.json, counted.h5 (every position counted
    here, frame by frame, with the session's thresholds and the simulator's dark), summary.json."""
    spec = SessionSpec(session_id="acctcheck", detector_profile=SMALL_TEST_CAMERA, scan_width=W, scan_height=H,
                       seed=SEED, output_dir=tmp_path, counting=CountingParams(background_threshold=12.0))
    root = spec.paths.root
    root.mkdir(parents=True)
    sim = Simulator(SMALL_TEST_CAMERA, W, H, seed=SEED)
    np.save(spec.paths.dark_reference, sim.dark_reference())
    spec = spec.model_copy(update={"counting": spec.counting.model_copy(
        update={"dark_reference": spec.paths.dark_reference})})
    spec.paths.spec.write_text(spec.model_dump_json())
    events = [count_frame(sim.frame(p), sim.dark_reference(), None, 12.0, 2000.0) for p in range(W * H)]
    assert all(e.size for e in events)  # the checker's blind spot (no true event) is not in this scan

    def write(rows, listed=(), **summary):
        write_counts(spec.paths.counts, rows, W, H, SMALL_TEST_CAMERA.frame_shape, overwrite=True)
        base = {"frames_expected": W * H, "frames_counted": W * H - len(listed), "frames_missing": len(listed),
                "missing_positions": sorted(listed), "partial_positions": [], "conflicted_positions": [],
                "complete": not listed, "events": int(sum(np.asarray(r).size for r in rows))}
        spec.paths.summary.write_text(json.dumps({**base, **summary}))
        return root

    return spec, events, write


def test_a_true_account_passes(session):
    spec, events, write = session
    result = check_account(write(events), W * H)
    assert result.present == W * H and result.listed == [] and result.zero_event_positions == 0
    rows = list(events)
    rows[7] = np.zeros(0, np.uint32)
    assert check_account(write(rows, listed=[7]), W * H).listed == [7]  # a lost position, listed


def test_a_dropped_position_fails(session):
    spec, events, write = session
    rows = list(events)
    rows[41] = np.zeros(0, np.uint32)  # absent from counted.h5, yet the summary lists nothing
    with pytest.raises(AccountMismatch, match=r"absent from counted.h5 but not listed as lost: \[41\]"):
        check_account(write(rows), W * H)
    with pytest.raises(AccountMismatch, match=r"\[41\]"):
        check_counted(spec.paths.counts, spec)


def test_changed_events_fail(session):
    spec, events, write = session
    rows = list(events)
    rows[5] = np.sort(np.append(rows[5][1:], np.uint32(0)))  # one event moved
    with pytest.raises(AccountMismatch, match=r"1 positions with events other than their frame's, e.g. 5"):
        check_account(write(rows), W * H)


def test_a_summary_that_disagrees_with_counted_h5_fails(session):
    spec, events, write = session
    with pytest.raises(AccountMismatch, match="positions listed as lost have events"):
        check_account(write(events, listed=[3]), W * H)  # listed, but there
    rows = list(events)
    rows[3] = np.zeros(0, np.uint32)
    with pytest.raises(AccountMismatch, match=r"frames_counted 120, but 119 positions are present"):
        check_account(write(rows, listed=[3], frames_counted=W * H), W * H)
    with pytest.raises(AccountMismatch, match="both missing_positions and partial_positions"):
        check_account(write(rows, listed=[3], partial_positions=[3]), W * H)
    with pytest.raises(AccountMismatch, match="the test asked for 99"):
        check_account(write(events), 99)


def test_a_wrong_seed_in_the_spec_fails(session):
    """The recount follows the scan's parameters: another seed's frames do not match."""
    spec, events, write = session
    write(events)
    spec.paths.spec.write_text(spec.model_copy(update={"seed": SEED + 1}).model_dump_json())
    with pytest.raises(AccountMismatch, match="events other than their frame's"):
        check_account(spec.paths.root, W * H)
