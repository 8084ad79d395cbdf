"""Prefix waits: read a prefix, then follow it with an etcd watch until a condition holds or time runs out.

The watch starts right after the read's revision, so nothing is missed; periodic re-reads catch a dead stream.
"""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

from etcd3gw.watch import Watcher

from .encoding import KeyValue, _prefix_end

if TYPE_CHECKING:
    from .client import EtcdClient

_RESYNC_S = 2.0  # while waiting on a watch, re-read this often in case the stream dropped

T = TypeVar("T")


def wait_prefix(
    client: EtcdClient, prefix: str, done: Callable[[dict[str, bytes]], Optional[T]], timeout_s: float
) -> tuple[Optional[T], dict[str, bytes]]:
    """Watch `prefix` until `done(current keys->values)` returns non-None, or the deadline.

    An initial read fixes the revision; the watch starts right after it, so nothing is
    missed. Every _RESYNC_S without events we re-read (through `EtcdClient.call`, so through outages);
    if that read finds what the watch missed, or an outage came meanwhile, the watch is
    opened again from the read's revision. Returns (done's value or None on timeout, the
    last view of the keys); an outage beyond the budget raises CoordinationError.
    """
    deadline = time.monotonic() + timeout_s
    view = _PrefixView()
    outages = client.outages

    def reread() -> bool:
        return view.reset(*client.range(prefix, prefix=True))

    reread()
    outcome = done(view.current)
    if outcome is not None:
        return outcome, view.current
    events: "queue.Queue[dict]" = queue.Queue()
    watcher: Optional[Watcher] = _watch(client, prefix, events.put, view.revision + 1)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, view.current
            try:
                event = events.get(timeout=min(remaining, _RESYNC_S))
            except queue.Empty:
                if reread() or client.outages != outages:  # the stream may have died: open a new one
                    outages = client.outages
                    watcher.stop()
                    watcher = None
                    watcher = _watch(client, prefix, events.put, view.revision + 1)
            else:
                view.apply(event)
                if not events.empty():
                    continue  # apply a burst before judging
            outcome = done(view.current)
            if outcome is not None:
                return outcome, view.current
    finally:
        if watcher is not None:
            watcher.stop()


def _watch(client: EtcdClient, prefix: str, callback: Callable[[dict], None], start_revision: int) -> Watcher:
    """Open an etcd3gw watch on `prefix` from `start_revision`, under the outage policy of `EtcdClient.call`."""
    raw = prefix.encode("utf-8")
    return client._retrying(
        lambda: Watcher(client._gateway, raw, callback, range_end=_prefix_end(raw), start_revision=start_revision),
        f"watch {prefix}",
    )


class _PrefixView:
    """A prefix wait's view: keys->values as read at `revision`, plus the watch events after it."""

    def __init__(self) -> None:
        self.current: dict[str, bytes] = {}
        self.revision = 0
        self._seen: dict[str, int] = {}  # key -> revision of the last event applied

    def reset(self, kvs: list[KeyValue], revision: int) -> bool:
        """Take a fresh read; True if it differs from the view it replaces."""
        fresh = {kv.key: kv.value for kv in kvs}
        changed = fresh != self.current
        self.current, self.revision, self._seen = fresh, revision, {}
        return changed

    def apply(self, event: dict) -> None:
        """Apply one watch event, unless the read or a later event covers it (a re-opened watch repeats some)."""
        kv = event.get("kv", {})
        key = bytes(kv.get("key", b"")).decode("utf-8", "replace")
        revision = int(kv.get("mod_revision", 0))
        if revision and revision <= max(self.revision, self._seen.get(key, 0)):
            return
        self._seen[key] = revision
        if event.get("type") == "DELETE":
            self.current.pop(key, None)
        else:
            self.current[key] = bytes(kv.get("value", b""))
