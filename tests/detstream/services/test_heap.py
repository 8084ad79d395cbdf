"""Freed message buffers stay in the heap: the next ones of their size fault in no fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# In a fresh process, as the aggregator's window does it: a thread of its own (libzmq's I/O
# thread allocates what it receives) takes batch-sized buffers while a window of 24 is held, and
# they are released a dozen at a time (an ACK releases many). Prints the minor page faults per
# page written once the window is full.
_WINDOW = """
import collections, resource, sys, threading
import numpy as np
from detstream.services import heap
if sys.argv[1] == "keep":
    assert heap.keep_freed_buffers()
size = 64 * 165_888
def run():
    held = collections.deque()
    for _ in range(24):
        held.append(np.empty(size, np.uint8))
        held[-1].fill(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(96):
        if i % 12 == 0:
            for _ in range(12):
                held.popleft()
        held.append(np.empty(size, np.uint8))
        held[-1].fill(1)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (96 * size / 4096))
t = threading.Thread(target=run)
t.start()
t.join()
"""


def _faults_per_page(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _WINDOW, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_batches_are_reused_without_fresh_page_faults():
    assert _faults_per_page("default") > 0.05   # glibc's defaults: released batches go back to the system
    assert _faults_per_page("keep") < 0.01
