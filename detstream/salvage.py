"""Salvage after the fact: the account of a session whose orchestrator died, from its folder.

Merges the parts its nodes made durable into counted.h5, lists what is missing, and marks
the session ``abandoned`` in etcd when etcd still says it is running.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from . import results
from .config import SessionSpec
from .coordination import Coordinator
from .etcd import CoordinationError
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


def salvage_session(session_dir: Path, coord: Optional[Coordinator] = None,
                    reason: str = "orchestrator gone; salvaged from the session folder") -> dict:
    """Merge ``session_dir``'s durable parts and write its summary; mark it abandoned in etcd."""
    spec = load_spec(session_dir)
    spec = spec.model_copy(update={"output_dir": Path(session_dir).resolve().parent})
    etcd_note = None
    if coord is not None:
        try:
            before = mark_abandoned(coord, spec.session_id, reason)
            etcd_note = f"etcd state was {before.value if before else 'absent'}"
        except CoordinationError as err:
            etcd_note = f"etcd not updated: {err}"
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
