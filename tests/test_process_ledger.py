"""The leak check itself (ProcessLedger in conftest): it finds what a test started by session and
process group, an orphan whose parent was killed with SIGKILL included, and reports a leak."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from conftest import ProcessLedger

# A parent in a session of its own that starts a child, prints the child's pid, then waits.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_an_orphan_of_a_killed_parent_is_found_and_reported_as_a_leak(wait_until):
    ledger = ProcessLedger()
    try:
        parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)
        child = int(parent.stdout.readline())
        assert {parent.pid, child} <= {p.pid for p in ledger.started()}
        os.kill(parent.pid, signal.SIGKILL)  # the child is orphaned, re-parented to this process
        parent.wait()
        parent.stdout.close()
        wait_until(lambda: psutil.Process(child).ppid() != parent.pid, what="the child to be re-parented")
        assert os.getsid(child) == parent.pid  # still in the killed parent's session
        assert [p.pid for p in ledger.started()] == [child]
        left = ledger.leaks(grace_s=0.5)
        assert len(left) == 1 and left[0].startswith(f"{child} (session {parent.pid}")
        wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
                   what="the leaked child to be killed")
    finally:
        ledger.close()
        if psutil.pid_exists(child):
            try:
                os.waitpid(child, 0)  # re-parented to this process: reap it
            except ChildProcessError:
                pass


def test_a_process_that_ends_within_the_grace_is_no_leak():
    ledger = ProcessLedger()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"], start_new_session=True)
    try:
        assert ledger.leaks(grace_s=30) == []
    finally:
        proc.wait()
