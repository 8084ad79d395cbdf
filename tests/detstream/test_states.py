"""SessionState: the stored values are the etcd contract's, and the terminal set is the design's."""

from __future__ import annotations

import json

import pytest

from detstream.states import TERMINAL_STATES, SessionState


def test_values_are_the_strings_etcd_stores_in_their_usual_order():
    assert [s.value for s in SessionState] == [
        "requested", "reserving", "starting", "streaming", "draining",
        "completed", "failed", "cancelled", "incomplete", "abandoned",
    ]


def test_terminal_set():
    assert {s.value for s in TERMINAL_STATES} == {"completed", "failed", "cancelled", "incomplete", "abandoned"}
    assert [s for s in SessionState if s.terminal] == sorted(TERMINAL_STATES, key=list(SessionState).index)


def test_a_state_reads_and_prints_as_its_stored_string():
    state = SessionState("draining")
    assert state is SessionState.DRAINING
    assert state == "draining" and str(state) == "draining" and f"{state}" == "draining"
    assert json.dumps({"state": state}) == '{"state": "draining"}'
    assert "completed" in TERMINAL_STATES  # a raw value read elsewhere compares as the member
    with pytest.raises(ValueError):
        SessionState("exploded")
