"""A microscopist who retries right after a crash is not told that a dead session is busy."""

from __future__ import annotations

import json
import time

import psutil
import pytest

from account_check import check_account
from detstream.states import EXIT_CODES, SessionState
from test_cli_run import run  # noqa: F401  (the fixture: `detstream run` processes and their ledger)


@pytest.mark.chaos
def test_a_retry_within_a_second_of_a_kill_waits_out_the_lease_salvages_and_runs(run, wait_until):  # noqa: F811
    """`detstream run --etcd URL` killed with SIGKILL mid-scan; the same command again within a
    second waits out the dead session's lock lease (saying so), marks the dead session abandoned,
    salvages it, and runs. Every process of the killed run is gone within 30 s."""
    first = run("--scan", "48x48", "--frame-rate", "400")
    first.wait_frames(256)
    first.proc.kill()
    first.proc.wait()
    killed_at = time.time()
    retry = run("--scan", "16x16")
    started_after = psutil.Process(retry.proc.pid).create_time() - killed_at
    assert started_after < 1.0, f"the retry started {started_after:.2f} s after the kill"
    assert retry.proc.wait(timeout=240) == EXIT_CODES[SessionState.COMPLETED], retry.output()
    said = retry.output()
    assert f"held by session {first.sid}" in said and "ran out" in said, said
    assert "is busy" not in said
    assert "Warning" not in said, said  # no third-party warning a user cannot act on
    # The dead session: abandoned in etcd, its frames accounted for in its folder.
    assert first.prefix_coord.get_state(first.sid) == "abandoned"
    summary = json.loads((first.out / first.sid / "summary.json").read_text())
    assert summary["state"] == "abandoned"
    check_account(first.out / first.sid, 48 * 48)
    check_account(retry.out / retry.sid, 16 * 16)
    assert first.prefix_coord.lock_holder("4dcamera") is None
