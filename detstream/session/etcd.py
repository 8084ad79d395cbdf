"""The etcd a session talks to: the one it is given, or a private one started for it."""

from __future__ import annotations

from typing import Any, Optional

from ..config import etcd_login_env
from ..coordination import Coordinator


class coordination:  # noqa: N801 (used as a context manager, reads as a verb)
    """Context manager giving (endpoint, Coordinator): the given etcd, or a private one for the session.

    The private etcd is secure (TLS, auth): the orchestrator logs in as its root, and
    ``service_env`` holds the login of the session's own user (``session``: (id, detector)),
    which may touch only that session's keys. For a given etcd, both use the given login.
    """

    def __init__(self, endpoint: Optional[str], prefix: str, session: Optional[tuple[str, str]] = None,
                 **client_kwargs: Any):
        self.endpoint = endpoint
        self.prefix = prefix
        self.session = session
        self.client_kwargs = client_kwargs
        self.server = None
        #: The environment that gives a launched service its etcd login (never its argv).
        self.service_env: dict[str, str] = {}

    def __enter__(self) -> tuple[str, Coordinator]:
        from ..etcd_server import EmbeddedEtcd, running_secure

        if not self.endpoint:
            self.server = EmbeddedEtcd(secure=True)
            self.server.start()
            self.endpoint = self.server.endpoint
        private = running_secure(self.endpoint)
        login = {k: v for k, v in self.client_kwargs.items() if k in _LOGIN}
        options = {k: v for k, v in self.client_kwargs.items() if k not in _LOGIN}
        self.service_env = service_login_env(self.endpoint, self.prefix, self.session, login)
        if private is not None:  # an etcd this process started: its root for us, never for the services
            login = private.root_login()
        try:
            return self.endpoint, Coordinator(self.endpoint, prefix=self.prefix, **login, **options)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()


_LOGIN = ("username", "password", "ca_file", "cert_file", "key_file")


def service_login_env(endpoint: str, prefix: str, session: Optional[tuple[str, str]],
                      login: dict[str, Any]) -> dict[str, str]:
    """The environment giving a session's services their etcd login: on a private etcd this
    process started, the session's own user (``session``: (id, detector)); else ``login``."""
    from ..etcd_server import running_secure

    private = running_secure(endpoint)
    if private is not None:
        login = private.session_login(prefix, *session) if session else {}
    return etcd_login_env(**login)
