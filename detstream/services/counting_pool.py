"""Counting worker processes fed through a shared-memory ring of frame slots.

The distributor assembles each frame once, straight into a free slot of a shared-memory
ring; a worker counts it in place and sends back only the sparse events. Slots are the
bound on memory: no free slot, no more frames read from the network (backpressure).
Tasks and results travel in batches (up to ``task_batch`` frames per message, one message of
results per task message): per-frame messages cost the workers 29 % of their time.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import struct
import tempfile
import time
from multiprocessing import shared_memory
from typing import Optional

import numpy as np
import zmq

from ..memory import peak_rss_mib
from ..config import CountingParams
from ..profile import DetectorProfile

log = logging.getLogger("detstream.counting_pool")

# A task message: uint32 pairs (slot, position). A result message: [head, the task's pairs,
# uint64 offsets (n + 1) into the events, uint32 events of every frame back to back].
_RESULT_HEAD = struct.Struct("<Id")    # frames, seconds counting
_STOP = b"stop"
TASK_BATCH = 4


def _load_map(path, shape, what):
    if path is None:
        return None
    arr = np.load(path)
    if arr.shape != tuple(shape):
        raise ValueError(f"{what} {path} has shape {arr.shape}, the detector's frames are {tuple(shape)}")
    return arr


def build_counter(profile: DetectorProfile, counting: CountingParams):
    """The counting kernel for this profile and these parameters (loads dark and gain maps)."""
    from ..counting import Counter

    return Counter(
        profile.frame_shape,
        dark_reference=_load_map(counting.dark_reference, profile.frame_shape, "dark reference"),
        gain=_load_map(counting.gain, profile.frame_shape, "gain"),
        background_threshold=counting.background_threshold,
        xray_threshold=counting.xray_threshold,
    )


def _worker_main(shm_name: str, slots: int, profile_json: str, counting_json: str,
                 task_ep: str, result_ep: str, parent_pid: int) -> None:
    profile = DetectorProfile.model_validate_json(profile_json)
    counting = CountingParams.model_validate_json(counting_json)
    shm = shared_memory.SharedMemory(name=shm_name)
    ring = np.ndarray((slots, *profile.frame_shape), dtype=profile.np_dtype, buffer=shm.buf)
    counter = build_counter(profile, counting)
    ctx = zmq.Context()
    tasks = ctx.socket(zmq.PULL)
    tasks.connect(task_ep)
    results = ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 2000)
    results.connect(result_ep)
    results.send_multipart([b"ready", b""])
    try:
        while True:
            if not tasks.poll(1000):
                if os.getppid() != parent_pid:  # the distributor is gone (killed): so are we,
                    _remove_ipc_dir(task_ep)    # and its socket folder with us
                    return
                continue
            msg = tasks.recv()
            if msg == _STOP:
                results.send_multipart([b"bye", struct.pack("<d", peak_rss_mib())])
                return
            pairs = np.frombuffer(msg, dtype="<u4").reshape(-1, 2)
            t0 = time.perf_counter()
            found = [counter.count(ring[slot]) for slot in pairs[:, 0].tolist()]
            dt = time.perf_counter() - t0
            offsets = np.zeros(len(found) + 1, dtype=np.uint64)
            np.cumsum([len(e) for e in found], out=offsets[1:])
            events = np.concatenate(found) if found else np.zeros(0, np.uint32)
            results.send_multipart([_RESULT_HEAD.pack(len(found), dt), msg, offsets, events], copy=False)
    finally:
        del ring
        tasks.close()
        results.close()
        ctx.term()
        shm.close()


def _remove_ipc_dir(endpoint: str) -> None:
    """Remove an ``ipc://`` endpoint's folder and its socket files (other workers may race us)."""
    folder = os.path.dirname(endpoint[len("ipc://"):])
    for name in ("tasks", "results"):
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass
    try:
        os.rmdir(folder)
    except OSError:
        pass


class SlotPool:
    """What both counting pools share: free frame slots, and filled ones handed on in batches."""

    free: list[int]
    in_flight: int
    workers: int
    task_batch: int
    _pending: list[tuple[int, int]]

    def has_free_slot(self) -> bool:
        return bool(self.free)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def acquire(self) -> int:
        return self.free.pop()

    def submit(self, slot: int, position: int) -> None:
        """Queue a filled slot for counting (handed on by ``flush``, or once a batch is full);
        with counting off, free it at once."""
        if not self.workers:
            self.free.append(slot)
            return
        self._pending.append((slot, position))
        self.in_flight += 1
        if len(self._pending) >= self.task_batch:
            self.flush()

    def flush(self) -> None:
        """Hand the queued slots on as one task."""
        if self._pending:
            self._send_tasks(self._pending)
            self._pending = []

    def _send_tasks(self, pending: list[tuple[int, int]]) -> None:
        raise NotImplementedError


class CountingPool(SlotPool):
    """``workers`` counting processes over ``slots`` shared frame buffers.

    With counting disabled there are no workers: a slot is freed as soon as it is filled, so
    the distributor still assembles every frame (the work a counting-off run measures).
    """

    def __init__(self, profile: DetectorProfile, counting: CountingParams, workers: int,
                 slots: Optional[int] = None, ctx: Optional[zmq.Context] = None,
                 start_timeout_s: float = 60.0, task_batch: int = TASK_BATCH):
        self.profile = profile
        self.counting = counting
        self.enabled = counting.enabled
        self.workers = workers if self.enabled else 0
        self.task_batch = task_batch
        # Every worker busy on a batch with another batch queued, and one being filled.
        self.slots = slots or max(4, (2 * self.workers + 1) * task_batch)
        self._pending: list[tuple[int, int]] = []
        if self.enabled:
            # Fail here, in the distributor, with the file named, rather than in every worker.
            build_counter(profile, counting)
        self.shm = shared_memory.SharedMemory(create=True, size=self.slots * profile.frame_nbytes)
        self.ring = np.ndarray((self.slots, *profile.frame_shape), dtype=profile.np_dtype,
                               buffer=self.shm.buf)
        self.free = list(range(self.slots - 1, -1, -1))
        self.in_flight = 0
        self.counting_seconds = 0.0
        self.worker_peak_rss_mib: list[float] = []
        self.ctx = ctx or zmq.Context.instance()
        self._procs: list[mp.Process] = []
        self._ipc_dir = tempfile.mkdtemp(prefix="detstream-pool-")
        self.tasks = self.ctx.socket(zmq.PUSH)
        self.tasks.setsockopt(zmq.LINGER, 0)
        self.results = self.ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.LINGER, 0)
        if self.workers:
            task_ep = f"ipc://{self._ipc_dir}/tasks"
            result_ep = f"ipc://{self._ipc_dir}/results"
            self.tasks.bind(task_ep)
            self.results.bind(result_ep)
            spawn = mp.get_context("spawn")
            for i in range(self.workers):
                p = spawn.Process(
                    target=_worker_main, name=f"detstream-counter-{i}", daemon=True,
                    args=(self.shm.name, self.slots, profile.model_dump_json(),
                          counting.model_dump_json(), task_ep, result_ep, os.getpid()))
                p.start()
                self._procs.append(p)
            self._await_ready(start_timeout_s)
        # Every process that needs the segment has it mapped: remove its name now, so nothing
        # is left in /dev/shm even if this process is killed.
        self.shm.unlink()

    def _await_ready(self, timeout_s: float) -> None:
        ready = 0
        deadline = time.monotonic() + timeout_s
        while ready < self.workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.results.poll(int(remaining * 1000)):
                dead = [p.name for p in self._procs if not p.is_alive()]
                self.shm.unlink()  # not left in /dev/shm by a pool that never started
                self.close()
                raise RuntimeError(f"{ready} of {self.workers} counting workers started "
                                   f"(exited: {dead or 'none'})")
            kind, _ = self.results.recv_multipart()
            ready += kind == b"ready"

    def _send_tasks(self, pending: list[tuple[int, int]]) -> None:
        self.tasks.send(np.asarray(pending, dtype="<u4").tobytes())

    def collect(self) -> list[tuple[int, np.ndarray]]:
        """Every finished (position, events) waiting now; frees their slots."""
        out = []
        while True:
            try:
                head, pairs, offsets, events = self.results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            _, seconds = _RESULT_HEAD.unpack(head.bytes)
            pairs = np.frombuffer(pairs.buffer, dtype="<u4").reshape(-1, 2)
            offsets = np.frombuffer(offsets.buffer, dtype=np.uint64).tolist()
            # Views: they keep the received message alive; the part writer copies what it keeps.
            events = np.frombuffer(events.buffer, dtype=np.uint32)
            for i, (slot, position) in enumerate(pairs.tolist()):
                self.free.append(slot)
                out.append((position, events[offsets[i]:offsets[i + 1]]))
            self.in_flight -= len(pairs)
            self.counting_seconds += seconds

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (collecting their peak RSS) and free the shared memory."""
        if self._procs:
            for _ in self._procs:
                try:
                    self.tasks.send(_STOP, zmq.NOBLOCK)
                except zmq.Again:
                    break
            deadline = time.monotonic() + timeout_s
            while len(self.worker_peak_rss_mib) < len(self._procs) and time.monotonic() < deadline:
                if not self.results.poll(100):
                    if not any(p.is_alive() for p in self._procs):
                        break
                    continue
                kind, payload = self.results.recv_multipart()
                if kind == b"bye":
                    self.worker_peak_rss_mib.append(struct.unpack("<d", payload)[0])
            for p in self._procs:
                p.join(max(0.1, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(5)
            self._procs = []
        self.tasks.close()
        self.results.close()
        if self.shm is not None:
            del self.ring
            self.shm.close()
            self.shm = None
        _remove_ipc_dir(f"ipc://{self._ipc_dir}/tasks")
