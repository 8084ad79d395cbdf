"""Release a session from what etcd records, for hooks running outside the session's process."""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Callable, Optional

from ..backends.base import JobState, Reservation
from ..coordination import Coordinator
from ..services.endpoints import remove_session_sockets
from ..states import TERMINAL_STATES, SessionState


def release_session(coord: Coordinator, sid: str, state: SessionState, reason: str,
                    backends: Optional[dict[str, Callable[[Reservation], None]]] = None) -> None:
    """Kill the session's local service process groups, cancel its job through ``backends``
    (name -> cancel function), drop its leased keys and free the detector lock."""
    current = coord.get_state(sid)
    if current in TERMINAL_STATES:
        return
    coord.set_state(sid, state, reason)
    host = socket.gethostname()
    for role in ("producer", "aggregator", "distributor"):
        for info in coord.services(sid, role).values():
            if info.get("host") == host and info.get("pid"):
                try:
                    os.killpg(int(info["pid"]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    job = coord.get_job(sid)
    if job:
        res = Reservation.model_validate(job)
        if not res.state.finished:
            cancel = (backends or {}).get(res.backend)
            if cancel is not None:
                cancel(res)
                res = res.model_copy(update={"state": JobState.CANCELLED})
                coord.put_job(sid, json.loads(res.model_dump_json()))
    spec = coord.get_spec(sid) or {}
    coord.cleanup_session(sid)
    remove_session_sockets(sid)  # the local services' ipc socket folder, if this host had one
    if spec.get("detector"):
        coord.unlock_detector(spec["detector"], sid)
