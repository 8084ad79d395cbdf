"""What an etcd failure means: the error types, their messages, and whether a failure is an outage worth retrying."""

from __future__ import annotations

import json

import requests
from etcd3gw import exceptions as etcd_exc

from ..errors import DetstreamError


class CoordinationError(DetstreamError, RuntimeError):
    """etcd could not be reached or refused a request; the message names the endpoint."""


class AuthenticationError(CoordinationError):
    """etcd rejected the credentials (or auth is required and none were given)."""


def _error_message(exc: etcd_exc.Etcd3Exception) -> str:
    """The server's message from an etcd3gw exception (gateway JSON), else its text."""
    detail = exc.detail_text or ""
    try:
        body = json.loads(detail)
        return str(body.get("message") or body.get("error") or detail)
    except (ValueError, AttributeError):
        pass
    text = detail or " ".join(str(a) for a in exc.args) or type(exc).__name__
    return text[:500]


def _describe(exc: BaseException) -> str:
    """The message of an etcd3gw or requests failure."""
    return _error_message(exc) if isinstance(exc, etcd_exc.Etcd3Exception) else str(exc)


_KNOWN_REASONS = (
    "Connection refused",
    "timed out",
    "Name or service not known",
    "Temporary failure in name resolution",
    "No route to host",
    "Network is unreachable",
    "CERTIFICATE_VERIFY_FAILED",
    "Connection reset",
    "Connection aborted",
    "Remote end closed connection",
)

# Connection failures that are set-up errors, not an outage: retrying cannot fix them.
_NOT_OUTAGE = ("certificate", "ssl", "name or service not known", "nodename nor servname")
# etcd's answers while it has no quorum, no leader, or is shutting down (gRPC Unavailable and kin).
_OUTAGE_MESSAGES = (
    "no leader",
    "not leader",
    "leader changed",
    "request timed out",
    "server stopped",
    "unhealthy cluster",
    "too many requests",
)


def _is_outage(exc: BaseException) -> bool:
    """True for what an etcd outage causes (no connection, timeouts, 5xx, leader elections): worth retrying.

    Auth, permission and bad-request errors are not: they would fail the same way again.
    """
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):  # raw, from opening a watch
        return not any(p in str(exc).lower() for p in _NOT_OUTAGE)
    if not isinstance(exc, etcd_exc.Etcd3Exception):
        return False
    text = _error_message(exc).lower()
    # etcd3gw's types for no connection, a timeout, or HTTP 408/500/503/504
    if isinstance(exc, (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError, etcd_exc.InternalServerError)):
        return not any(p in text for p in _NOT_OUTAGE)
    http_reason = str(exc.args[0]) if exc.args else ""  # etcd3gw keeps the HTTP reason phrase there
    return http_reason == "Bad Gateway" or any(p in text for p in _OUTAGE_MESSAGES)


def _short_reason(text: str) -> str:
    """A connection failure's cause in a few words, not urllib3's nested repr."""
    for phrase in _KNOWN_REASONS:
        if phrase.lower() in text.lower():
            return phrase.lower()
    return text[:300]
