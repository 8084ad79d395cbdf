"""The streaming session: nodes' distributors, then the aggregator and producers, then follow the scan."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from ..live import LiveView
from ..states import SessionState
from .base import ScanProgress, Session

log = logging.getLogger("detstream.session")


class StreamingSession(Session):
    """open -> reserve -> start_services -> stream -> collect -> close."""

    workflow = "streaming"
    node_service = "distributor"
    node_role = "distributor"
    live: Optional[LiveView] = None  # the live images while the scan streams

    def progress(self) -> ScanProgress:
        """Frames received, and the live images redrawn when due."""
        prog = super().progress()
        prog.live_image = self._refresh_live()
        return prog

    def _refresh_live(self, force: bool = False) -> Optional[Path]:
        """Redraw live.png when due; its path once drawn. A view: its failure (a full disk, say)
        ends the live images, never the session."""
        if self.live is None:
            return None
        try:
            self.live.refresh(force)
        except Exception:
            log.exception("session %s: live images stopped", self.sid)
            self.live = None
            return None
        return self.live.path if self.live.version else None

    def start_services(self) -> dict:
        """Wait for every node's distributor, then start the aggregator and the producers."""
        self.coord.set_state(self.sid, SessionState.STARTING)
        t0 = time.time()
        nodes = self._await_nodes(self.spec.register_timeout_s)
        self.timings["register_s"] = time.time() - t0
        self.aggregators = [self._start_local("aggregator", str(k), "--shard", str(k))
                            for k in range(self.spec.aggregators)]
        self.aggregator = self.aggregators[0]
        self.coord.wait_for_services(self.sid, "aggregator", self.spec.aggregators, self.spec.register_timeout_s)
        self.producers = [self._start_local("producer", str(s), "--sector", str(s))
                          for s in range(self.spec.profile.sectors)]
        return nodes

    def stream(self, on_progress: Optional[Callable[[ScanProgress], None]] = None,
               cancelled: Optional[Callable[[], bool]] = None, poll_s: float = 0.5,
               finish_timeout_s: float = 120.0) -> ScanProgress:
        """Watch the scan until every distributor has reported; raise on stall or failure."""
        self.coord.set_state(self.sid, SessionState.STREAMING)
        if self.spec.virtual.live and self.spec.counting.enabled:
            self.live = LiveView(self.coord, self.spec, self.spec.virtual.redraw_s, background=True)
        t0 = time.time()

        def draining() -> None:  # the producers are done: what is left is in flight
            if "acquire_s" not in self.timings:
                self.note_state(SessionState.DRAINING)
                self.timings["acquire_s"] = time.time() - t0

        try:
            final = self.follow_nodes(on_progress, cancelled, poll_s, finish_timeout_s, on_local_done=draining)
            # Every node published its last counts before its done record: the last drawing is whole.
            final.live_image = self._refresh_live(force=True)
            if self.live is not None:
                self.live.wait_drawn()
        finally:
            if self.live is not None:
                self.live.close()
        draining()
        self.timings["stream_s"] = time.time() - t0
        return final
