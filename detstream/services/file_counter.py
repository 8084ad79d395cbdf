"""The count stage of the file workflow: one node counts its share of a transferred scan.

The file-transfer baseline writes each sector to raw v5 files, moves them to the compute
site, and a batch job counts them there. This is that batch job's per-node work: read this
node's scan positions (``position % nodes == node_index``, the streaming path's routing rule)
from the four sector files, assemble each frame straight into a shared-memory slot of the
same ``CountingPool`` the streaming distributor uses, and write the events to a part file.
Its result is a ``DistributorResult`` and its report is written where a distributor's is,
so ``detstream.results.collect`` merges either workflow's output unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ..memory import peak_rss_mib
from ..config import SessionSpec
from ..sources.rawv5 import FILE_RE, RAW_HEADER, RAW_HEADER_SIZE, ReplayError, ReplaySource
from ..transfer import evict, storage_read_bytes
from .aggregator import route
from .counting_pool import CountingPool
from .distributor import DistributorResult

log = logging.getLogger("detstream.file_counter")

ROLE = "file-counter"

__all__ = ["FileCounterResult", "ROLE", "count_files", "default_data_dir",
           "open_scan", "serve_file_counter"]


@dataclass
class FileCounterResult(DistributorResult):
    """A distributor's result, plus what reading files adds: where from, and how much of the
    reading storage served (so a run shows it did not count from the page cache)."""

    workflow: str = "file"
    data_dir: Optional[str] = None
    read_seconds: float = 0.0  # time in pread (storage) filling slots; also in assemble_seconds
    storage_read_bytes: Optional[int] = None  # /proc/self/io read_bytes over the read loop
    started_at: Optional[float] = None  # count_files called
    finished_at: Optional[float] = None  # part closed


def default_data_dir(spec: SessionSpec) -> Path:
    """Where the transfer stage puts a session's raw files for counting."""
    return spec.paths.transferred


def open_scan(spec: SessionSpec, data_dir: Union[str, Path]) -> ReplaySource:
    """The raw v5 scan in ``data_dir``, validated by ReplaySource and checked against the spec.

    A directory holding several scans is read for ``spec.scan_number``.
    """
    data_dir = Path(data_dir)
    scan_number = None
    try:
        scans = {int(m.group(1)) for m in map(FILE_RE.match, os.listdir(data_dir)) if m}
    except OSError:
        scans = set()  # ReplaySource names the directory and the problem
    if len(scans) > 1:
        scan_number = spec.scan_number
    src = ReplaySource(spec.profile, data_dir, scan_number=scan_number)
    if (src.scan_width, src.scan_height) != (spec.scan_width, spec.scan_height):
        raise ReplayError(f"{data_dir} holds a {src.scan_width}x{src.scan_height} scan, but session "
                          f"{spec.session_id} expects {spec.scan_width}x{spec.scan_height}")
    return src


class _SectorReader:
    """Reads one record's block of each sector file into a frame slot, with one preadv each."""

    def __init__(self, src: ReplaySource, evict_files: bool):
        self.profile = src.profile
        self.scan_number = src.scan_number
        self.width = src.scan_width
        self.record = RAW_HEADER_SIZE + self.profile.sector_nbytes
        self.paths = src.files
        self.fds: list[int] = []
        self.index: list[np.ndarray] = []  # per sector: record number of each position
        self._header = bytearray(RAW_HEADER_SIZE)
        try:
            for s, path in enumerate(self.paths):
                # ReplaySource validated each file's records; position -> record is its map.
                sf = src._sector_file(s)
                inv = np.empty(src.frames, dtype=np.int64)
                inv[sf.positions] = np.arange(sf.records)
                self.index.append(inv)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise ReplayError(f"{path}: cannot be read: {e.strerror or e}") from None
                self.fds.append(fd)
                size = os.fstat(fd).st_size
                if size != sf.size:
                    raise ReplayError(f"{path}: changed since validation ({sf.size} -> {size} bytes)")
                # Read exactly this node's records: no readahead into other nodes' records.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                if evict_files:  # validation read the headers; read everything else from storage
                    evict(fd)
        except BaseException:
            self.close()
            raise

    def read_frame(self, position: int, frame: np.ndarray) -> int:
        """Fill ``frame`` (a pool slot) with ``position``'s sectors; returns bytes read."""
        flat = frame.reshape(-1).view(np.uint8)
        n = self.profile.sector_nbytes
        header = self._header
        for s, fd in enumerate(self.fds):
            offset = int(self.index[s][position]) * self.record
            got = os.preadv(fd, [header, flat[s * n:(s + 1) * n]], offset)
            if got != self.record:
                raise ReplayError(f"{self.paths[s]}: short read at byte offset {offset} "
                                  f"({got} of {self.record} bytes); file changed while counting")
            scan, _, width, _, x, y = RAW_HEADER.unpack(header)
            if scan != self.scan_number or y * width + x != position:
                raise ReplayError(f"{self.paths[s]}: record at byte offset {offset} is scan {scan} "
                                  f"position {y * width + x}, expected scan {self.scan_number} "
                                  f"position {position}; file changed while counting")
        return n * len(self.fds)

    def close(self, evict_files: bool = False) -> None:
        for fd in self.fds:
            if evict_files:
                evict(fd)
            os.close(fd)
        self.fds = []


def count_files(spec: SessionSpec, data_dir: Union[str, Path], node_index: int, nodes: int,
                part_path: Union[str, Path], workers: Optional[int] = None, *,
                evict_files: bool = True,
                should_stop: Optional[Callable[[], Optional[str]]] = None,
                on_progress: Optional[Callable[[DistributorResult], None]] = None,
                progress_interval_s: float = 0.5, overwrite: bool = False) -> FileCounterResult:
    """Count node ``node_index`` of ``nodes``'s share of the raw v5 scan in ``data_dir``.

    Events go to a part file at ``part_path`` (with counting disabled, frames are read and
    assembled only, and no part is written). ``should_stop`` returns a reason to stop early,
    or None; positions not read by then are listed in ``missing``. Files lacking positions
    are refused up front by ReplaySource (naming the file and the first missing position).
    ``workers`` defaults to ``spec.workers_per_node``. ``evict_files`` drops the files' pages
    before and after, so the reads come from storage, as they would on a compute node.
    """
    from ..output.parts import PartWriter

    started = time.time()
    if nodes <= 0 or not 0 <= node_index < nodes:
        raise ValueError(f"node index {node_index} outside 0..{nodes - 1}")
    workers = spec.workers_per_node if workers is None else workers
    if workers <= 0:
        raise ValueError(f"workers must be > 0, got {workers}")
    part_path = Path(part_path)
    src = open_scan(spec, data_dir)
    frames = src.frames
    positions = np.arange(frames, dtype=np.int64)
    mine = positions[route(positions, nodes) == node_index]  # the streaming path's rule
    del positions
    result = FileCounterResult(node_index=node_index, frames_expected=len(mine),
                               data_dir=str(data_dir), started_at=started)
    reader = _SectorReader(src, evict_files)
    pool: Optional[CountingPool] = None
    writer = None
    try:
        if spec.counting.enabled:
            part_path.parent.mkdir(parents=True, exist_ok=True)
            writer = PartWriter(part_path, spec.profile.frame_shape, overwrite=overwrite)
        pool = CountingPool(spec.profile, spec.counting, workers)
        reason = _run(spec, reader, pool, writer, mine, result, should_stop, on_progress,
                      progress_interval_s)
        result.finish_reason = reason or "complete"
        result.missing = mine[result.frames_received:].tolist()
        result.counting_seconds = pool.counting_seconds
        pool.close()
        result.worker_peak_rss_mib = pool.worker_peak_rss_mib
        if writer is not None:
            writer.close(extra={"node_index": node_index, "workflow": "file",
                                "data_dir": str(data_dir)})
            result.part_path = str(part_path)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.close()  # idempotent once closed
        reader.close(evict_files)
    if spec.counting.enabled and result.frames_counted != result.frames_received:
        log.error("node %d: %d frames read but %d counted", node_index, result.frames_received,
                  result.frames_counted)
    result.peak_rss_mib = peak_rss_mib()
    result.finished_at = time.time()
    log.info("node %d counted %d/%d frames from %s (%s): %d events", node_index,
             result.frames_counted, result.frames_expected, data_dir, result.finish_reason,
             result.events)
    return result


def _run(spec: SessionSpec, reader: _SectorReader, pool: CountingPool, writer, mine: np.ndarray,
         result: FileCounterResult, should_stop, on_progress, progress_interval_s: float) -> str:
    """Read frames into free slots and collect counted ones until done; returns a stop reason."""
    def collect() -> None:
        for pos, events in pool.collect():
            result.frames_counted += 1
            result.events += len(events)
            if writer is not None:
                writer.add(pos, events)

    io0 = storage_read_bytes()
    next_i = 0
    last_result = time.monotonic()
    last_tick = time.monotonic()
    reason = ""
    try:
        while next_i < len(mine) or not pool.idle:
            while next_i < len(mine) and pool.has_free_slot():
                slot = pool.acquire()
                t0 = time.perf_counter()
                if result.first_recv is None:
                    result.first_recv = time.time()
                result.bytes_received += reader.read_frame(int(mine[next_i]), pool.ring[slot])
                result.last_recv = time.time()
                result.read_seconds += time.perf_counter() - t0
                pool.submit(slot, int(mine[next_i]))
                next_i += 1
                result.frames_received = next_i
                if pool.results.poll(0):
                    collect()
                    last_result = time.monotonic()
                if time.monotonic() - last_tick >= progress_interval_s:
                    break
            pool.flush()  # tasks go in batches: hand on what this turn read
            if not pool.idle:
                if pool.results.poll(100):
                    collect()
                    last_result = time.monotonic()
                elif time.monotonic() - last_result > spec.stall_timeout_s:
                    reason = (f"stalled: no frame counted for {spec.stall_timeout_s:g} s "
                              f"({pool.in_flight} in flight)")
                    log.warning(reason)
                    return reason
            now = time.monotonic()
            if now - last_tick >= progress_interval_s:
                last_tick = now
                if on_progress is not None:
                    on_progress(result)
                if should_stop is not None:
                    reason = should_stop() or ""
                    if reason:
                        break
        # Count what is already read before leaving (a stop request ends the reading only).
        pool.flush()
        deadline = time.monotonic() + 30
        while not pool.idle and time.monotonic() < deadline:
            if pool.results.poll(100):
                collect()
        return reason
    finally:
        result.assemble_seconds = result.read_seconds
        io1 = storage_read_bytes()
        if io0 is not None and io1 is not None:
            result.storage_read_bytes = io1 - io0


def serve_file_counter(coord, sid: str, node_index: int,
                       data_dir: Optional[Union[str, Path]] = None) -> dict:
    """Run node ``node_index``'s count stage for session ``sid``, as serve_distributor runs a
    streaming node: spec from etcd, registered (leased) as role ``file-counter``, received
    counts kept up to date, report written as ``services/distributor-node-<i>.json``."""
    from .serve import SERVICE_LEASE_TTL_S, EtcdLink, finish_node, service_info

    spec = SessionSpec.model_validate(coord.get_spec(sid))
    if not 0 <= node_index < spec.nodes:
        raise ValueError(f"node index {node_index} outside 0..{spec.nodes - 1} for session {sid}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(spec)
    name = f"node-{node_index}"
    part_path = spec.paths.part(name)
    with coord.lease(SERVICE_LEASE_TTL_S) as lease:
        coord.register_service(sid, ROLE, name,
                               service_info(None, node_index=node_index, data_dir=str(data_dir)), lease)
        link = EtcdLink(coord, sid, spec.scan_number, name)
        try:
            result = count_files(spec, data_dir, node_index, spec.nodes, part_path,
                                 should_stop=link.should_stop, on_progress=lambda r: link.progress(r.frames_received))
        finally:
            link.close()
        report = result.as_dict()
        # Reported as a distributor's, so the session and results.collect() read both workflows alike.
        finish_node(coord, spec, name, report, result.frames_received)
        return report
