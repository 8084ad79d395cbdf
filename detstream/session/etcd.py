"""The etcd a session talks to: the one it is given, or a private one started for it."""

from __future__ import annotations

from typing import Optional

from ..coordination import Coordinator


class coordination:  # noqa: N801 (used as a context manager, reads as a verb)
    """Context manager giving (endpoint, Coordinator): the given etcd, or a private one for the session."""

    def __init__(self, endpoint: Optional[str], prefix: str, **client_kwargs):
        self.endpoint = endpoint
        self.prefix = prefix
        self.client_kwargs = client_kwargs
        self.server = None

    def __enter__(self) -> tuple[str, Coordinator]:
        if not self.endpoint:
            from ..etcd_server import EmbeddedEtcd

            self.server = EmbeddedEtcd()
            self.server.start()
            self.endpoint = self.server.endpoint
        return self.endpoint, Coordinator(self.endpoint, prefix=self.prefix, **self.client_kwargs)

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()
