"""Counting in the distributor's own threads: the numba kernel releases the GIL, so threads count
frames in parallel with the receiving loop, straight from the assembly ring (no shared memory,
no task or result messages; an inproc socket only wakes the loop when a batch is done).

Same interface as CountingPool (acquire, submit, flush, collect, results, idle, close), so the
distributor takes either; ``benchmarks/bench_dataplane.py --parts counting`` compares them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Optional

import numpy as np
import zmq

from ..config import CountingParams
from ..memory import peak_rss_mib
from ..profile import DetectorProfile
from .counting_pool import TASK_BATCH, SlotPool, build_counter


class ThreadCountingPool(SlotPool):
    """``workers`` counting threads over ``slots`` frame buffers of this process."""

    def __init__(self, profile: DetectorProfile, counting: CountingParams, workers: int,
                 slots: Optional[int] = None, ctx: Optional[zmq.Context] = None, task_batch: int = TASK_BATCH):
        self.profile = profile
        self.enabled = counting.enabled
        self.workers = workers if self.enabled else 0
        self.task_batch = task_batch
        self.slots = slots or max(4, (2 * self.workers + 1) * task_batch)
        self.counter = build_counter(profile, counting) if self.enabled else None
        self.ring = np.empty((self.slots, *profile.frame_shape), dtype=profile.np_dtype)
        self.free = list(range(self.slots - 1, -1, -1))
        self.in_flight = 0
        self.counting_seconds = 0.0
        self.worker_peak_rss_mib: list[float] = []
        self.ctx = ctx or zmq.Context.instance()
        self._pending: list[tuple[int, int]] = []
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._done: deque = deque()
        endpoint = f"inproc://detstream-counting-{id(self)}"
        self.results = self.ctx.socket(zmq.PULL)  # only wakes the distributor's poller
        self.results.bind(endpoint)
        self._threads = [threading.Thread(target=self._work, args=(endpoint,), name=f"counting-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def _work(self, endpoint: str) -> None:
        wake = self.ctx.socket(zmq.PUSH)
        wake.connect(endpoint)
        try:
            while True:
                batch = self._tasks.get()
                if batch is None:
                    return
                t0 = time.perf_counter()
                found = [(slot, pos, self.counter.count(self.ring[slot])) for slot, pos in batch]
                self._done.append((found, time.perf_counter() - t0))
                wake.send(b"", zmq.NOBLOCK)
        finally:
            wake.close(0)

    def _send_tasks(self, pending: list[tuple[int, int]]) -> None:
        self._tasks.put(pending)

    def collect(self) -> list[tuple[int, np.ndarray]]:
        """Every finished (position, events) waiting now; frees their slots."""
        while True:
            try:
                self.results.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        out = []
        while self._done:
            found, seconds = self._done.popleft()
            self.counting_seconds += seconds
            for slot, pos, events in found:
                self.free.append(slot)
                out.append((pos, events))
            self.in_flight -= len(found)
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join(timeout_s)
        if self._threads:
            self.worker_peak_rss_mib = [peak_rss_mib()]
        self._threads = []
        self.results.close(0)
