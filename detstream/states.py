"""A session's states, as stored at sessions/<sid>/state: the one place their names and the terminal set live."""

from __future__ import annotations

from enum import Enum

__all__ = ["EXIT_CODES", "SessionState", "TERMINAL_STATES"]


class SessionState(str, Enum):
    """In their usual order; the value is what etcd stores (DESIGN.md, "etcd keys")."""

    REQUESTED = "requested"
    RESERVING = "reserving"
    STARTING = "starting"
    STREAMING = "streaming"
    DRAINING = "draining"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"
    ABANDONED = "abandoned"

    def __str__(self) -> str:
        # Python 3.11+ formats mixed-in enums as "SessionState.X"; logs and reasons want the value.
        return self.value

    @property
    def terminal(self) -> bool:
        """The session is over and holds nothing (no lock, lease, service or job)."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({
    SessionState.COMPLETED,
    SessionState.FAILED,
    SessionState.CANCELLED,
    SessionState.INCOMPLETE,
    SessionState.ABANDONED,
})

#: How ``detstream run`` and ``detstream salvage`` exit, by the session's end state.
EXIT_CODES = {
    SessionState.COMPLETED: 0,
    SessionState.FAILED: 1,
    SessionState.INCOMPLETE: 3,
    SessionState.ABANDONED: 4,
    SessionState.CANCELLED: 130,
}
