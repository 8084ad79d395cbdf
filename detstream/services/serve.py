"""Service entry points: each reads its session from etcd, registers itself, runs, reports.

The producer, aggregator and distributor modules only move data over ZeroMQ; this module is
the glue between them and the session's coordination keys.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..atomic import write_atomically
from ..memory import peak_rss_mib
from ..config import SessionSpec
from ..sources import source_for_spec
from ..coordination import Coordinator
from ..etcd import CoordinationError
from ..live import LiveImages
from ..live import publish as live_publish
from ..states import TERMINAL_STATES
from .aggregator import Aggregator
from .distributor import Distributor
from . import security
from .endpoints import advertise, bind_base
from .producer import Pacer, run_producer
from .segments import SegmentedPart

log = logging.getLogger("detstream.serve")

SERVICE_LEASE_TTL_S = 5


def report_path(spec: SessionSpec, role: str, name: str) -> Path:
    path = spec.paths.report(role, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_report(path: Path, report: dict) -> None:
    report = {**report, "peak_rss_mib": max(report.get("peak_rss_mib") or 0.0,
                                            peak_rss_mib())}
    write_atomically(path, json.dumps(report, indent=2, default=str))


def stop_requested(coord: Coordinator, sid: str):
    """A check that says why to stop: the session ended, or its orchestrator is gone (the alive
    key it leased, once seen, has vanished)."""
    seen_alive = []

    def check() -> Optional[str]:
        state = coord.get_state(sid)
        if state in TERMINAL_STATES:
            return f"session {state}"
        if coord.orchestrator_alive(sid):
            seen_alive[:] = [True]
        elif seen_alive:
            return "orchestrator gone (its alive key expired)"
        return None
    return check


class EtcdLink:
    """A service's etcd traffic off its data loop: a thread publishes the latest frame count and
    reads the session's state, so an etcd outage never stalls the data, and an etcd gone for
    good only means no progress is shown (the scan still finishes and is written)."""

    def __init__(self, coord: Coordinator, sid: str, scan: int, name: Optional[str], interval_s: float = 0.5,
                 watch_nodes: bool = False, live=None):
        """``live``: a node's detstream.live.LiveImages, published every ``live.publish_s`` and once
        more on close."""
        self.coord, self.sid, self.scan, self.name, self.interval_s = coord, sid, scan, name, interval_s
        self.watch_nodes = watch_nodes
        self.live = live
        self._live_at = 0.0
        self.nodes: Optional[set] = None  # node indices still registered, as last read (None: unknown)
        self.received: Optional[int] = None
        self.stop_reason: Optional[str] = None
        self.rounds = 0  # completed exchanges with etcd
        self._published: Optional[int] = None
        self._failing = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="etcd-link", daemon=True)
        self._thread.start()

    def should_stop(self) -> Optional[str]:
        return self.stop_reason

    def registered_nodes(self) -> Optional[set]:
        return self.nodes

    def progress(self, n: int) -> None:
        self.received = n

    def _loop(self) -> None:
        check = stop_requested(self.coord, self.sid)
        while not self._done.wait(self.interval_s):
            try:
                if self.name is not None and self.received is not None and self.received != self._published:
                    self.coord.set_received(self.sid, self.scan, self.name, self.received)
                    self._published = self.received
                self.stop_reason = check() or self.stop_reason
                if self.watch_nodes:
                    self.nodes = {int(info["node_index"])
                                  for info in self.coord.services(self.sid, "distributor").values()}
                if self.live is not None and time.monotonic() - self._live_at >= self.live.publish_s:
                    self._live_at = time.monotonic()
                    self._publish_live()
                self.rounds += 1
                if self._failing:
                    log.warning("etcd reachable again; progress published again")
                self._failing = False
            except CoordinationError as err:
                if not self._failing:
                    log.warning("etcd unreachable (%s); the data plane goes on without it", err)
                self._failing = True

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        if self.live is not None:  # the node's last counts, so the live image ends complete
            try:
                self._publish_live(final=True)
            except CoordinationError as err:
                log.warning("last live images not published: %s", err)

    def _publish_live(self, final: bool = False) -> None:
        """The live images are a view: a fault in them stops them, never the node."""
        try:
            live_publish(self.coord, self.sid, self.name, self.live, final=final)
        except CoordinationError:
            raise
        except Exception:
            log.exception("live images stopped")
            self.live = None


def service_info(endpoint: Optional[str], **extra) -> dict:
    """A service's registration; under Slurm also its node name and job id (hostnames may repeat)."""
    info = {"endpoint": endpoint, "pid": os.getpid(), "host": socket.gethostname(), **extra}
    for key, var in (("slurm_node", "SLURMD_NODENAME"), ("slurm_job_id", "SLURM_JOB_ID")):
        if os.environ.get(var):
            info[key] = os.environ[var]
    return info


def partial_frames_bound(spec: SessionSpec) -> int:
    """How many partly received frames a node may hold before it evicts one.

    A partial frame the aggregators may still complete must never be evicted: with acks the
    node would never acknowledge it, and the aggregator would at last fence a live node. Each
    aggregator shard keeps its own window, and after a re-route one shard may have re-sent its
    sectors of a lost node's window while another is still ahead on its own positions, so a node
    holds partial frames from every shard's window at once: room for all of them. Without acks,
    sectors may run apart by their queues (in blocks) and a batch per node.
    """
    bound = max(256, 4 * spec.send_hwm + 2 * spec.batch_blocks * spec.nodes)
    if spec.acks:
        bound = max(bound, spec.aggregators * spec.delivery_window)
    return bound


def serve_distributor(coord: Coordinator, sid: str, node_index: int, bind_host: str = "127.0.0.1",
                      advertise_host: Optional[str] = None) -> dict:
    """Run this node's distributor for session ``sid`` until its share of the scan is done.

    With acks its part is written as segments (parts/node-<i>/seg-*.h5) acknowledged once in
    place, and at the end indexed as parts/node-<i>.h5; without, as parts/node-<i>.h5 directly.
    """
    from ..output.parts import PartWriter

    spec = SessionSpec.model_validate(coord.get_spec(sid))
    if not 0 <= node_index < spec.nodes:
        raise ValueError(f"node index {node_index} outside 0..{spec.nodes - 1} for session {sid}")
    name = f"node-{node_index}"
    parts_dir = spec.paths.parts
    part_path = spec.paths.part(name)
    part_path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    if spec.counting.enabled:
        writer = (SegmentedPart(parts_dir, name, spec.profile.frame_shape) if spec.acks
                  else PartWriter(part_path, spec.profile.frame_shape))
    max_partial = partial_frames_bound(spec)
    live = (LiveImages(spec.frames_expected, spec.profile.frame_shape, spec.virtual)
            if spec.virtual.live and spec.counting.enabled else None)
    dist = Distributor(spec.profile, spec.scan_width, spec.scan_height, node_index, spec.nodes,
                       spec.counting, workers=spec.workers_per_node, part_writer=writer,
                       bind=bind_base(spec.transport, sid, bind_host), hwm=spec.hwm_messages, shards=spec.aggregators,
                       max_partial_frames=max_partial,
                       stall_timeout_s=spec.stall_timeout_s, acks=spec.acks,
                       segment_frames=spec.segment_frames, segment_seconds=spec.segment_seconds,
                       counting_mode=spec.counting_mode, live=live,
                       curve=_curve(coord, spec, "distributor", bind_base(spec.transport, sid, bind_host)))
    dist.validator.expect_session(spec.scan_number, spec.session_token)
    info = service_info(advertise(dist.endpoint, bind_host, advertise_host), node_index=node_index,
                        curve=dist.guard is not None)
    if dist.ack_endpoint:
        info["ack_endpoint"] = advertise(dist.ack_endpoint, bind_host, advertise_host)
        info["ack_endpoints"] = [advertise(e, bind_host, advertise_host) for e in dist.ack_endpoints]
    try:
        with coord.lease(SERVICE_LEASE_TTL_S) as lease:
            coord.register_service(sid, "distributor", name, info, lease)
            link = EtcdLink(coord, sid, spec.scan_number, name, live=live)
            result = dist.run(
                should_stop=link.should_stop, on_progress=lambda r: link.progress(r.frames_received))
            link.close()
            dist.close()
            if isinstance(writer, SegmentedPart):
                writer.write_index(extra={"node_index": node_index, "finish_reason": result.finish_reason})
                result.part_path = str(part_path)
                result.segments = [str(p) for p in writer.segments]
            elif writer is not None:
                writer.close(extra={"node_index": node_index})
                result.part_path = str(part_path)
            report = result.as_dict()
            finish_node(coord, spec, name, report, result.frames_received)
            log.info("node %d done (%s): %d/%d frames, %d events", node_index, result.finish_reason,
                     result.frames_received, result.frames_expected, result.events)
            return report
    finally:
        dist.close()
        if writer is not None:
            writer.abort()  # the open segment (or part) only; nothing after a clean close


def finish_node(coord: Coordinator, spec: SessionSpec, name: str, report: dict, received: int) -> None:
    """A node's end: its full report in the session folder, its count and done record in etcd
    (what the session waits on). Without etcd the report file still tells salvage what was done."""
    write_report(report_path(spec, "distributor", name), report)
    try:
        coord.set_received(spec.session_id, spec.scan_number, name, received)
        coord.put_node_done(spec.session_id, name, {
            k: report.get(k) for k in ("node_index", "frames_received", "frames_counted", "events",
                                       "finish_reason", "part_path")}
            | {"missing": len(report.get("missing") or []), "partial": len(report.get("partial") or [])})
    except CoordinationError as err:
        log.error("node %s: done record not written to etcd (%s); its report is %s", name, err,
                  report_path(spec, "distributor", name))


def _curve(coord: Coordinator, spec: SessionSpec, role: str, bind: Optional[str],
           servers: list[tuple[str, dict]] = ()) -> Optional[security.Curve]:
    """This service's CURVE: a server if its mode and what it binds (``bind``, None: nothing) say
    so, a client of each server whose etcd record says it uses CURVE; None when neither."""
    serve = bind is not None and security.uses_curve(spec.security, bind)
    curve_roles = {r for r, info in servers if info.get("curve")}
    if any(r in curve_roles and not info.get("curve") for r, info in servers):
        raise ValueError(f"the {role}'s servers disagree on CURVE: some of them use it, some do not")
    if not (serve or curve_roles):
        return None
    return security.Curve(role, coord.public_keys(spec.session_id), serve=serve, servers=frozenset(curve_roles))


def serve_aggregator(coord: Coordinator, sid: str, bind_host: str = "127.0.0.1",
                     advertise_host: Optional[str] = None, shard: int = 0) -> dict:
    """Wait for every node's distributor, then route the producers' sectors to them: all sectors,
    or with ``spec.aggregators`` shards, shard ``shard``'s share of them."""
    spec = SessionSpec.model_validate(coord.get_spec(sid))
    if not 0 <= shard < spec.aggregators:
        raise ValueError(f"shard {shard} outside 0..{spec.aggregators - 1} for session {sid}")
    nodes = coord.wait_for_services(sid, "distributor", spec.nodes, spec.register_timeout_s)
    ordered = sorted(nodes.values(), key=lambda info: info["node_index"])
    acks = [info.get("ack_endpoints", [info.get("ack_endpoint")])[shard] for info in ordered] if spec.acks else None
    agg = Aggregator(spec.profile, spec.scan_width, spec.scan_height,
                     [info["endpoint"] for info in ordered],
                     bind=bind_base(spec.transport, sid, bind_host),
                     hwm=spec.hwm_messages, ack_endpoints=acks, window_frames=spec.delivery_window,
                     node_timeout_s=spec.node_timeout_s, sectors=spec.shard_sectors(shard), shard=shard,
                     curve=_curve(coord, spec, "aggregator", bind_base(spec.transport, sid, bind_host),
                                  [("distributor", i) for i in ordered]))
    agg.validator.expect_session(spec.scan_number, spec.session_token)
    info = service_info(advertise(agg.endpoint, bind_host, advertise_host), shard=shard, sectors=agg.own_sectors,
                        curve=agg.guard is not None,
                        sector_endpoints=[e and advertise(e, bind_host, advertise_host) for e in agg.sector_endpoints])
    try:
        with coord.lease(SERVICE_LEASE_TTL_S) as lease:
            coord.register_service(sid, "aggregator", str(shard), info, lease)
            link = EtcdLink(coord, sid, spec.scan_number, None, watch_nodes=True)
            try:
                stats = agg.run(should_stop=link.should_stop, stall_timeout_s=spec.stall_timeout_s,
                                node_check=link.registered_nodes)
            finally:
                link.close()
            report = {**stats.as_dict(), "shard": shard, "sectors": agg.own_sectors}
            write_report(report_path(spec, "aggregator", str(shard)), report)
            return report
    finally:
        agg.close()


def serve_producer(coord: Coordinator, sid: str, sector: int) -> dict:
    """Stream one sector of the session's scan to the aggregator."""
    spec = SessionSpec.model_validate(coord.get_spec(sid))
    if not 0 <= sector < spec.profile.sectors:
        raise ValueError(f"sector {sector} outside 0..{spec.profile.sectors - 1}")
    source = source_for_spec(spec)
    shards = coord.wait_for_services(sid, "aggregator", spec.aggregators, spec.register_timeout_s)
    # Its own socket at the aggregator shard routing its sector, so that the aggregator can hold
    # back the sectors ahead.
    agg = shards[str(spec.shard_of(sector))]
    sector_endpoints = agg.get("sector_endpoints")
    endpoint = sector_endpoints[sector] if sector_endpoints else agg["endpoint"]
    name = f"sector-{sector}"
    with coord.lease(SERVICE_LEASE_TTL_S) as lease:
        coord.register_service(sid, "producer", name, service_info(None, sector=sector, target=endpoint), lease)
        # Start together: a sector that starts late leaves every node holding partial frames.
        # Not the leased service keys: a fast sector may finish (and its key go) before a slow
        # one looks. cleanup_session removes the barrier with the session.
        coord.arrive(sid, "producers", name)
        coord.wait_barrier(sid, "producers", spec.profile.sectors, spec.register_timeout_s)
        log.info("sector %d: streaming %d frames to %s", sector, source.frames, endpoint)
        link = EtcdLink(coord, sid, spec.scan_number, None)  # stop checks off the send path
        try:
            stats = run_producer(source, sector, endpoint, hwm=spec.hwm_messages,
                                 batch_blocks=spec.batch_blocks, nodes=spec.nodes,
                                 should_stop=lambda: link.should_stop() is not None,
                                 send_timeout_s=spec.stall_timeout_s,
                                 curve=_curve(coord, spec, "producer", None, [("aggregator", agg)]),
                                 session_token=spec.session_token, frame_rate_hz=spec.frame_rate_hz)
        finally:
            link.close()
        report = stats.as_dict()
        write_report(report_path(spec, "producer", name), report)
        return report


def serve_acquire(coord: Coordinator, sid: str, sector: int, directory: Path) -> dict:
    """File-transfer path, acquire stage: write one sector as a raw v5 file, fsync'd and evicted."""
    from ..sources.rawv5 import SectorFileWriter

    spec = SessionSpec.model_validate(coord.get_spec(sid))
    if not 0 <= sector < spec.profile.sectors:
        raise ValueError(f"sector {sector} outside 0..{spec.profile.sectors - 1}")
    source = source_for_spec(spec)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"sector-{sector}"
    stats = {"sector": sector, "frames_sent": 0, "bytes_sent": 0, "first_send": None, "last_send": None}
    with coord.lease(SERVICE_LEASE_TTL_S) as lease:
        coord.register_service(sid, "producer", name, service_info(None, sector=sector, target=str(directory)), lease)
        stop = stop_requested(coord, sid)
        writer = SectorFileWriter(spec.profile, directory, source.scan_number, sector, fsync=True, evict=True)
        try:
            import time

            stats["first_send"] = time.time()
            pacer = Pacer(spec.frame_rate_hz)
            for i, (meta, block) in enumerate(source.iter_sector(sector)):
                if (i % 256 == 0 and stop()) or not pacer.wait(i, stop):
                    raise RuntimeError(f"acquisition of sector {sector} stopped: session ended")
                writer.write(meta, block)
                stats["frames_sent"] += 1
                stats["bytes_sent"] += spec.profile.sector_nbytes
        finally:
            path = writer.close()
        stats["last_send"] = time.time()
        stats["seconds"] = stats["last_send"] - stats["first_send"]
        stats["path"] = str(path)
        write_report(report_path(spec, "producer", name), stats)
        return stats
