"""Who may touch which keys in the private etcd: root for the orchestrator, one user per session.

A session's user may read and write only ``<prefix>/sessions/<sid>/`` and its detector's lock
(and the lock's ``last`` record); it cannot see another session's keys. Passwords are random,
made here, and handed back only to the caller (never logged).
"""

from __future__ import annotations

import secrets
from typing import Mapping, Sequence

from .client import EtcdClient, add_user, enable_auth

__all__ = ["enable_root", "add_session_user", "session_user"]


def session_user(session_id: str) -> str:
    """The etcd user name of a session."""
    return f"session-{session_id}"


def enable_root(endpoint: str, tls: Mapping[str, str]) -> str:
    """Turn auth on with a fresh random root password; return it."""
    password = secrets.token_urlsafe(24)
    enable_auth(endpoint, password, **tls)
    return password


def add_session_user(endpoint: str, root: Mapping[str, str], session_id: str, prefixes: Sequence[str],
                     keys: Sequence[str]) -> tuple[str, str]:
    """Make the session's user (a new password each call) with read-write on ``prefixes`` and
    ``keys`` only (the caller takes them from the key schema: the transport does not know it)."""
    user, password = session_user(session_id), secrets.token_urlsafe(24)
    with EtcdClient(endpoint, **root) as admin:
        add_user(admin, user, password, role=user, prefixes=list(prefixes), keys=list(keys))
        admin.call("auth/user/changepw", {"name": user, "password": password}, what=f"set the password of {user}")
    return user, password
