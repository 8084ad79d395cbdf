"""Counting worker processes fed through a shared-memory ring of frame slots.

The distributor assembles each frame once, straight into a free slot of a shared-memory
ring; a worker counts it in place and sends back only the sparse events. Slots are the
bound on memory: no free slot, no more frames read from the network (backpressure).
Processes rather than threads because the GIL would serialise the counting.
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

_TASK = struct.Struct("<II")          # slot, position
_RESULT = struct.Struct("<IIdd")      # slot, position, seconds counting, worker peak RSS (MiB)
_STOP = b"stop"


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
            slot, position = _TASK.unpack(msg)
            t0 = time.perf_counter()
            events = counter.count(ring[slot])
            dt = time.perf_counter() - t0
            results.send_multipart([_RESULT.pack(slot, position, dt, 0.0),
                                    np.ascontiguousarray(events, dtype=np.uint32)], copy=False)
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


class CountingPool:
    """``workers`` counting processes over ``slots`` shared frame buffers.

    With counting disabled there are no workers: a slot is freed as soon as it is filled, so
    the distributor still assembles every frame (the work a counting-off run measures).
    """

    def __init__(self, profile: DetectorProfile, counting: CountingParams, workers: int,
                 slots: Optional[int] = None, ctx: Optional[zmq.Context] = None,
                 start_timeout_s: float = 60.0):
        self.profile = profile
        self.counting = counting
        self.enabled = counting.enabled
        self.workers = workers if self.enabled else 0
        self.slots = slots or max(4, 2 * self.workers + 2)
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

    def has_free_slot(self) -> bool:
        return bool(self.free)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0

    def acquire(self) -> int:
        return self.free.pop()

    def submit(self, slot: int, position: int) -> Optional[tuple[int, np.ndarray]]:
        """Hand a filled slot to the workers; with counting off, free it and return nothing."""
        if not self.workers:
            self.free.append(slot)
            return None
        self.tasks.send(_TASK.pack(slot, position))
        self.in_flight += 1
        return None

    def collect(self) -> list[tuple[int, np.ndarray]]:
        """Every finished (position, events) waiting now; frees their slots."""
        out = []
        while True:
            try:
                head, payload = self.results.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            slot, position, seconds, _ = _RESULT.unpack(head.bytes)
            self.free.append(slot)
            self.in_flight -= 1
            self.counting_seconds += seconds
            # A view: it keeps the received message alive; the part writer copies what it keeps.
            out.append((position, np.frombuffer(payload.buffer, dtype=np.uint32)))

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
