"""SFAPI blocks: the NERSC Superfacility API client credentials, and how a session's batch job looks."""

from __future__ import annotations

from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, model_validator

from detstream.backends.jobscript import NerscJobSettings
from detstream.backends.sfapi_settings import SFAPI_BASE_URL, SFAPI_TOKEN_URL, SfapiSettings

from . import _logos


class SfapiCredentials(Block):
    """An SFAPI client (id + private key) that may submit and cancel jobs at NERSC."""

    _block_type_name = "detstream SFAPI Credentials"
    _block_type_slug = "detstream-sfapi-credentials"
    _description = ("NERSC Superfacility API client id and private key (inline, or the path of an "
                    "sfapi_client key file with mode 600) used to reserve compute nodes.")
    _documentation_url = "https://docs.nersc.gov/services/sfapi/"
    _logo_url = _logos.CREDENTIALS

    client_id: Optional[str] = Field(
        default=None, description="SFAPI client id from Iris; read from the key file's first line if empty.")
    private_key: Optional[SecretStr] = Field(
        default=None, description="The client's PEM private key (or JWK JSON). Leave empty to use key_file.")
    key_file: Optional[str] = Field(
        default=None, description="Path of an sfapi_client key file (client id, then PEM), mode 600, "
                                  "on the machine where the flow runs.")
    api_base_url: str = Field(default=SFAPI_BASE_URL, description="SFAPI base URL.")
    token_url: str = Field(default=SFAPI_TOKEN_URL, description="OAuth2 token endpoint.")

    def settings(self) -> SfapiSettings:
        """The same credentials as detstream's plain settings (what SfapiBackend takes)."""
        return SfapiSettings(client_id=self.client_id, private_key=self.private_key, key_file=self.key_file,
                             api_base_url=self.api_base_url, token_url=self.token_url)

    def get_client(self, **kwargs):
        """A new synchronous ``sfapi_client.Client``; use it as a context manager."""
        return self.settings().client(**kwargs)

    def get_async_client(self, **kwargs):
        """A new ``sfapi_client.AsyncClient``; use it as an async context manager."""
        return self.settings().async_client(**kwargs)


class NerscCompute(Block):
    """The batch job a streaming session asks NERSC for, and how detstream starts on each node."""

    _block_type_name = "detstream NERSC Compute"
    _block_type_slug = "detstream-nersc-compute"
    _description = ("Machine, QOS, account, walltime and software environment of the Slurm job that "
                    "runs one detstream distributor per node; the node count comes from the session.")
    _documentation_url = "https://docs.nersc.gov/jobs/policy/"
    _logo_url = _logos.SETTINGS

    job: NerscJobSettings = Field(
        default_factory=NerscJobSettings, title="Job settings",
        description="Slurm options and node environment of the session's batch job.")

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_fields(cls, data):
        """Job fields given at the top level (documents saved before ``job`` was nested) go into ``job``."""
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in NerscJobSettings.model_fields if k in data}
        if not flat:
            return data
        rest = {k: v for k, v in data.items() if k not in flat}
        job = rest.get("job") or {}
        job = job.model_dump() if isinstance(job, NerscJobSettings) else dict(job)
        return {**rest, "job": {**flat, **job}}

    def job_settings(self) -> NerscJobSettings:
        """The validated job settings SfapiBackend and render_job_script take."""
        return self.job
