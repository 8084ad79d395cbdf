"""EtcdCoordinator block: where a session's coordination keys live, and how to log in."""

from __future__ import annotations

from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from detstream.config import DEFAULT_PREFIX, etcd_login_env
from detstream.etcd import DEFAULT_OUTAGE_BUDGET_S

from . import _logos


class EtcdCoordinator(Block):
    """Connection to the etcd cluster that holds detstream's session keys."""

    _block_type_name = "detstream etcd Coordinator"
    _block_type_slug = "detstream-etcd-coordinator"
    _description = "etcd endpoints, key prefix and credentials for detstream streaming sessions."
    _documentation_url = "https://etcd.io/docs/v3.5/dev-guide/api_grpc_gateway/"
    _logo_url = _logos.CREDENTIALS

    endpoints: list[str] = Field(
        default_factory=list,
        description="etcd client URLs, e.g. https://etcd.example.org:2379. Empty: start a private etcd.")
    prefix: str = Field(default=DEFAULT_PREFIX, description="Key prefix for every detstream key.")
    username: Optional[str] = Field(default=None, description="etcd user, if auth is enabled.")
    password: Optional[SecretStr] = Field(default=None, description="etcd password.")
    ca_file: Optional[str] = Field(default=None, description="CA bundle for https endpoints.")
    timeout_s: float = Field(default=10.0, description="Per-request timeout.")
    outage_budget_s: float = Field(
        default=DEFAULT_OUTAGE_BUDGET_S, ge=0,
        description="How long every etcd request (the flow's and the services') keeps retrying "
                    "while etcd is unreachable before it is an error.")

    def _login(self) -> dict:
        return {"username": self.username, "ca_file": self.ca_file,
                "password": self.password.get_secret_value() if self.password else None,
                "outage_budget_s": self.outage_budget_s}

    def get_coordinator(self, endpoint: Optional[str] = None):
        """A detstream Coordinator for the first endpoint (or ``endpoint``)."""
        from detstream.coordination import Coordinator

        ep = endpoint or (self.endpoints[0] if self.endpoints else None)
        if ep is None:
            raise ValueError("EtcdCoordinator has no endpoints; leave it out to use a private etcd")
        return Coordinator(ep, prefix=self.prefix, timeout=self.timeout_s, **self._login())

    def coordination(self):
        """Context manager giving (endpoint, Coordinator): the first endpoint, or a private etcd if none."""
        from detstream.session import coordination

        if not self.endpoints:
            return coordination(None, self.prefix, outage_budget_s=self.outage_budget_s)
        return coordination(self.endpoints[0], self.prefix, timeout=self.timeout_s, **self._login())

    def service_env(self) -> dict[str, str]:
        """The login for the services a session starts, as environment variables (never their argv)."""
        budget = None if self.outage_budget_s == DEFAULT_OUTAGE_BUDGET_S else self.outage_budget_s
        if self.endpoints:
            return etcd_login_env(**{**self._login(), "outage_budget_s": budget})
        return etcd_login_env(None, None, None, outage_budget_s=budget)
