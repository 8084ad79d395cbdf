"""Salvage after the fact: the account of a session whose orchestrator died, from its folder.

Merges the parts its nodes made durable into counted.h5, lists what is missing, and marks
the session ``abandoned`` in etcd when etcd still says it is running.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from . import results
from .config import SessionSpec
from .coordination import Coordinator
from .etcd import CoordinationError
from .services.endpoints import remove_session_sockets
from .states import TERMINAL_STATES, SessionState

log = logging.getLogger("detstream.salvage")


def load_spec(session_dir: Path) -> SessionSpec:
    """The spec a session saved in its folder when it opened."""
    path = Path(session_dir) / "spec.json"
    try:
        return SessionSpec.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{session_dir} is not a session folder: it has no spec.json") from None


def mark_abandoned(coord: Coordinator, sid: str, reason: str) -> Optional[SessionState]:
    """Record a session whose orchestrator is gone as abandoned; return its state before, if it had one."""
    before = coord.get_state(sid)
    if before is not None and before not in TERMINAL_STATES:
        coord.set_state(sid, SessionState.ABANDONED, reason)
        coord.cleanup_session(sid)
    return before


def record_from_summary(coord: Coordinator, session_dir: Path) -> Optional[dict]:
    """A session that ended while etcd was gone wrote its end state only in summary.json:
    record that state and result in etcd now (nothing to salvage). None if it has no such summary."""
    path = Path(session_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
        state = SessionState(summary.get("state"))
    except (OSError, ValueError):
        return None
    if state not in TERMINAL_STATES or not summary.get("etcd_unrecorded"):
        return None
    sid = summary["session_id"]
    if coord.get_state(sid) not in TERMINAL_STATES:
        coord.set_state(sid, state, f"{summary.get('reason') or state.value} (recorded from {path} "
                                    "after an etcd outage)")
        coord.put_result(sid, summary)
        coord.cleanup_session(sid)
        log.info("session %s: its end state %s, kept in %s while etcd was gone, is recorded", sid,
                 state.value, path)
    return summary


def salvage_session(session_dir: Path, coord: Optional[Coordinator] = None,
                    reason: str = "orchestrator gone; salvaged from the session folder") -> dict:
    """Merge ``session_dir``'s durable parts and write its summary; mark it abandoned in etcd.

    A session that ended on its own while etcd was gone is not salvaged: its end state is recorded."""
    if coord is not None:
        try:
            if (ended := record_from_summary(coord, session_dir)) is not None:
                return ended
        except CoordinationError as err:
            log.warning("could not record the end state from summary.json: %s", err)
    spec = load_spec(session_dir)
    spec = spec.model_copy(update={"output_dir": Path(session_dir).resolve().parent})
    etcd_note = None
    if coord is not None:
        try:
            before = mark_abandoned(coord, spec.session_id, reason)
            etcd_note = f"etcd state was {before.value if before else 'absent'}"
        except CoordinationError as err:
            etcd_note = f"etcd not updated: {err}"
    remove_session_sockets(spec.session_id)  # its local services' ipc socket folder, if any was left
    state = SessionState.ABANDONED
    workflow = "file-transfer" if spec.paths.acquired.exists() or spec.paths.transferred.exists() else "streaming"
    summary = results.collect(spec, workflow, {}, overwrite=True, state=state, reason=reason,
                              extra={"salvaged_after_the_fact": True, "etcd": etcd_note})
    if coord is not None:
        try:
            coord.put_result(spec.session_id, summary)
        except CoordinationError as err:
            log.warning("result not recorded in etcd: %s", err)
    return summary
