"""Producer: one per sector. Sends its sector blocks in batches to the aggregator.

A batch (wire version 2: ``[headers, payloads]``) holds up to ``batch_blocks`` blocks, all of
positions owned by one node (``position % nodes``), so the aggregator forwards it whole. The
payloads are copied once into a reusable batch buffer, which goes zero-copy (pyzmq ``copy=False``)
and is reused once ZeroMQ is done with it; a PUSH socket with a send high-water mark
holds the producer back when the aggregator falls behind, which is the backpressure that
bounds memory. A held-back send waits in slices of ``stop_check_s`` (SNDTIMEO), checking
``should_stop`` between them, and gives up after ``send_timeout_s``: no send blocks forever.
At end of scan it sends an END marker carrying how many blocks it sent.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import wire
from . import security

log = logging.getLogger("detstream.producer")

# A paced producer this far ahead of its next frame sends its open batches before it waits.
FLUSH_AHEAD_S = 0.002


@dataclass
class ProducerStats:
    sector: int
    frames_sent: int = 0
    bytes_sent: int = 0
    first_send: Optional[float] = None
    last_send: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "sector": self.sector, "frames_sent": self.frames_sent, "bytes_sent": self.bytes_sent,
            "first_send": self.first_send, "last_send": self.last_send,
            "seconds": (self.last_send - self.first_send) if self.first_send and self.last_send else 0.0,
            **self.extra,
        }


class BatchBuffers:
    """A fixed pool of ``count`` buffers a batch's payloads are joined into, each reused once
    ZeroMQ has sent it (its MessageTracker is done): a fresh buffer per batch would page-fault
    every byte anew, and a pool that grew whenever every buffer was still in flight would grow
    with the scan. When none is free, joining waits for the oldest (ZeroMQ's own backpressure
    bounds how long)."""

    def __init__(self, count: int, wait_slice_s: float = 0.5):
        self.count, self.wait_slice_s = max(1, count), wait_slice_s
        self._free: list[np.ndarray] = []
        self._busy: deque = deque()
        self._made = 0

    def join(self, blocks: list, should_stop: Optional[Callable[[], bool]] = None,
             timeout_s: Optional[float] = None) -> Optional[memoryview]:
        """The blocks back to back in a free buffer (a view of exactly their bytes); None if told
        to stop while waiting for one."""
        n = sum(b.nbytes if hasattr(b, "nbytes") else len(b) for b in blocks)
        buf = self._take(n, should_stop, timeout_s)
        if buf is None:
            return None
        off = 0
        for b in blocks:
            raw = np.frombuffer(b, np.uint8) if not hasattr(b, "view") else b.reshape(-1).view(np.uint8)
            buf[off:off + raw.nbytes] = raw
            off += raw.nbytes
        self._pending = buf
        return memoryview(buf)[:n]

    def sent(self, tracker) -> None:
        """The last joined buffer went out with ``tracker``; reusable once it is done."""
        self._busy.append((self._pending, tracker))

    def _take(self, n: int, should_stop, timeout_s) -> Optional[np.ndarray]:
        while self._busy and self._busy[0][1].done:
            self._free.append(self._busy.popleft()[0])
        if not self._free and self._made < self.count:
            self._made += 1
            return np.empty(n, np.uint8)
        waited = 0.0
        while not self._free:
            try:
                self._busy[0][1].wait(self.wait_slice_s)
                self._free.append(self._busy.popleft()[0])
            except zmq.NotDone:
                waited += self.wait_slice_s
                if should_stop is not None and should_stop():
                    return None
                if timeout_s is not None and waited > timeout_s:
                    raise TimeoutError(f"ZeroMQ sent nothing for {timeout_s:g} s") from None
        buf = self._free.pop()
        return buf if buf.nbytes >= n else np.empty(n, np.uint8)  # a bigger batch: the small one goes


def _send(sock: zmq.Socket, parts, should_stop: Optional[Callable[[], bool]],
          send_timeout_s: Optional[float], track: bool = False):
    """Send, waiting out backpressure one SNDTIMEO slice at a time; False if told to stop (with
    ``track``, the message's tracker once sent)."""
    blocked_since = None
    while True:
        try:
            tracker = sock.send_multipart(parts, copy=False, track=track)
            return tracker if track else True
        except zmq.Again:
            now = time.monotonic()
            blocked_since = blocked_since or now
            if should_stop is not None and should_stop():
                return False
            if send_timeout_s is not None and now - blocked_since > send_timeout_s:
                raise TimeoutError(f"the aggregator took nothing for {send_timeout_s:g} s") from None


class Pacer:
    """Holds a sender to ``rate_hz`` items per second from its first item, as a camera acquires:
    item ``n`` goes no earlier than ``n / rate_hz`` seconds after item 0. Waits in slices of at
    most ``slice_s`` so that a stop is still seen."""

    def __init__(self, rate_hz: Optional[float], slice_s: float = 0.5):
        self.rate_hz, self.slice_s = rate_hz, slice_s
        self._t0: Optional[float] = None

    def ahead(self, n: int) -> float:
        """Seconds until item ``n`` is due (0 when unpaced or late); the first item starts the clock."""
        if not self.rate_hz:
            return 0.0
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        return max(0.0, self._t0 + n / self.rate_hz - now)

    def wait(self, n: int, should_stop: Optional[Callable[[], bool]] = None) -> bool:
        """Wait until item ``n`` is due; False if told to stop meanwhile (asked between slices
        only: a wait shorter than a slice asks nothing, so fast pacing makes no etcd reads)."""
        left = self.ahead(n)
        if not left:
            return True
        now = time.monotonic()
        due = now + left
        while True:
            time.sleep(min(due - now, self.slice_s))
            now = time.monotonic()
            if now >= due:
                return True
            if should_stop is not None and should_stop():
                return False


def _await_hangup(monitor: zmq.Socket, timeout_s: float, stop_check_s: float,
                  should_stop: Optional[Callable[[], bool]]) -> bool:
    """Wait (bounded) until the aggregator hangs up, which it does once it has read our END: only
    then is closing safe (libzmq can drop what a closing socket still had queued,
    zeromq/libzmq#4660). True if it did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if monitor.poll(int(stop_check_s * 1000)):
            if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                return True
        elif should_stop is not None and should_stop():
            return False
    log.warning("the aggregator did not hang up within %g s of our END", timeout_s)
    return False


def run_producer(source, sector: int, endpoint: str, hwm: int = 64,
                 ctx: Optional[zmq.Context] = None, tee=None,
                 on_progress: Optional[Callable[[int], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 linger_s: float = 60.0, stop_check_s: float = 0.5,
                 send_timeout_s: Optional[float] = None, curve: Optional[security.Curve] = None,
                 session_token: int = 0, batch_blocks: int = 1, nodes: int = 1,
                 frame_rate_hz: Optional[float] = None) -> ProducerStats:
    """Stream ``source``'s sector ``sector`` to the aggregator at ``endpoint``, ``batch_blocks``
    blocks per message, each message for one of ``nodes`` nodes.

    ``tee``, if given, receives ``write(meta, block)`` for every block (the file path's writer).
    ``should_stop`` is checked between blocks, at most every ``stop_check_s``, and while a send
    is held back; when it returns True between blocks the END marker still goes out.
    ``frame_rate_hz`` paces the sector as the camera acquires it (none: as fast as it is taken).
    """
    own_ctx = ctx is None
    ctx = ctx or zmq.Context()
    sock = security.client(curve, ctx.socket(zmq.PUSH), "aggregator")
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(stop_check_s * 1000)))
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    stats = ProducerStats(sector=sector, extra={"batch_blocks": batch_blocks})
    next_check = 0.0
    stopped = False
    open_batches: list[tuple[list, list]] = [([], []) for _ in range(nodes)]  # per node: headers, blocks
    buffers = BatchBuffers(hwm + 2, stop_check_s)  # what the queue holds, the one being sent, the next
    last_progress = 0
    pacer = Pacer(frame_rate_hz, stop_check_s)

    def send_batch(node: int) -> bool:
        nonlocal last_progress
        headers, blocks = open_batches[node]
        if not blocks:
            return True
        if stats.first_send is None:
            stats.first_send = time.time()
        if len(blocks) == 1:
            if not _send(sock, wire.batch_message(headers, blocks), should_stop, send_timeout_s):
                return False
        else:
            joined = buffers.join(blocks, should_stop, send_timeout_s)
            tracker = joined is not None and _send(sock, [b"".join(headers), joined], should_stop, send_timeout_s,
                                                   track=True)
            if tracker is False:
                return False
            buffers.sent(tracker)
        stats.frames_sent += len(blocks)
        stats.bytes_sent += sum(b.nbytes if hasattr(b, "nbytes") else len(b) for b in blocks)
        open_batches[node] = ([], [])
        if on_progress is not None and stats.frames_sent - last_progress >= 256:
            last_progress = stats.frames_sent
            on_progress(stats.frames_sent)
        return True

    try:
        for seq, (meta, block) in enumerate(source.iter_sector(sector)):
            if should_stop is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + stop_check_s  # an etcd read: not for every block
                if should_stop():
                    log.warning("stop requested after %d blocks of sector %d", seq, sector)
                    break
            # Waiting for the frame anyway: what is batched goes now, not a whole batch later.
            if pacer.ahead(seq) > FLUSH_AHEAD_S and not all(send_batch(n) for n in range(nodes)):
                log.warning("stop requested after %d blocks of sector %d (held back)", seq, sector)
                stopped = True
                break
            if not pacer.wait(seq, should_stop):
                log.warning("stop requested after %d blocks of sector %d (paced)", seq, sector)
                break
            node = (meta.y * meta.scan_width + meta.x) % nodes
            headers, blocks = open_batches[node]
            headers.append(wire.data_header(sector, meta.scan_number, meta.frame_number, meta.scan_width,
                                            meta.scan_height, meta.x, meta.y, seq, session_token))
            blocks.append(block)
            if tee is not None:
                tee.write(meta, block)
            if len(blocks) >= batch_blocks and not send_batch(node):
                log.warning("stop requested after %d blocks of sector %d (held back)", seq, sector)
                stopped = True
                break
        for node in range(nodes):  # what is left, then the END marker
            if stopped or not send_batch(node):
                stopped = True
                break
        if not stopped:
            end = wire.end_header(sector, source.scan_number, source.scan_width, source.scan_height,
                                  stats.frames_sent, session_token)
            stopped = not _send(sock, [end, b""], should_stop, send_timeout_s)
        stats.last_send = time.time()
        if not stopped:
            _await_hangup(monitor, linger_s, stop_check_s, should_stop)
    except BaseException:
        stopped = True
        raise
    finally:
        if stopped:
            sock.setsockopt(zmq.LINGER, 0)  # nobody is reading: do not wait for them
        sock.disable_monitor()
        monitor.close(0)
        sock.close()
        if own_ctx:
            # Waits until queued blocks are delivered (LINGER, bounded): zero-copy payloads point
            # into the source's memory, which must outlive them.
            ctx.term()
    if on_progress is not None:
        on_progress(stats.frames_sent)
    return stats
