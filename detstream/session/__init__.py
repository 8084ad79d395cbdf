"""A session's steps without Prefect: the flows' tasks call them in order.

:class:`Session` holds what every workflow shares (lock, reservation, node wait, release);
:class:`StreamingSession` and :class:`FileTransferSession` are its two workflows.
"""

from .base import ScanProgress, Session, SessionCancelled, SessionError, SessionIncomplete
from .etcd import coordination
from .file_transfer import FileTransferSession, transfer_summary
from .release import release_session
from .spec import make_spec, replay_scan_shape, validate_spec, with_simulator_dark
from .streaming import StreamingSession

__all__ = [
    "FileTransferSession", "ScanProgress", "Session", "SessionCancelled", "SessionError", "SessionIncomplete",
    "StreamingSession", "coordination", "make_spec", "release_session", "replay_scan_shape",
    "transfer_summary", "validate_spec", "with_simulator_dark",
]
