"""Builds the SFAPI compute backend from a flow's ``sfapi`` options (saved blocks or a key file)."""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from detstream.backends.jobscript import NerscJobSettings
from detstream.backends.sfapi import SFAPI_BASE_URL, SFAPI_TOKEN_URL, SfapiSettings


class SfapiOptions(BaseModel):
    """How a flow reaches NERSC: saved blocks (production) or a key file and URL (e.g. an emulator)."""

    credentials_block: Optional[str] = Field(None, description="Name of a saved SfapiCredentials block.")
    compute_block: Optional[str] = Field(None, description="Name of a saved NerscCompute block.")
    key_file: Optional[str] = Field(None, description="sfapi_client key file (client id, then PEM; mode 600).")
    api_url: Optional[str] = Field(None, description="Superfacility API base URL (default NERSC's).")
    token_url: Optional[str] = Field(None, description="Token URL (default NERSC's; <api host>/c2id/token for a custom api_url).")
    job: dict = Field(default_factory=dict, description="NerscCompute fields to override, e.g. walltime_minutes.")

    def settings(self) -> SfapiSettings:
        if self.credentials_block:
            from detstream.blocks import SfapiCredentials

            return SfapiCredentials.load(self.credentials_block).settings()
        if not self.key_file:
            raise ValueError("backend 'sfapi' needs sfapi.credentials_block or sfapi.key_file")
        api = self.api_url or SFAPI_BASE_URL
        token = self.token_url
        if token is None:
            parts = urlsplit(api)
            token = SFAPI_TOKEN_URL if self.api_url is None else f"{parts.scheme}://{parts.netloc}/c2id/token"
        return SfapiSettings(key_file=self.key_file, api_base_url=api, token_url=token)

    def job_settings(self) -> NerscJobSettings:
        base = {}
        if self.compute_block:
            from detstream.blocks import NerscCompute

            base = NerscCompute.load(self.compute_block).job_settings().model_dump()
        return NerscJobSettings(**{**base, **self.job})


def sfapi_backend(options: Optional[SfapiOptions], logger=None):
    from detstream.backends.sfapi import SfapiBackend

    options = options or SfapiOptions()
    return SfapiBackend(options.settings(), options.job_settings(), logger=logger)


def cancel_from_parameters(params: dict):
    """A cancel function for release_session, rebuilt from a flow run's parameters."""
    from detstream.backends.sfapi import cancel_sfapi_job

    options = SfapiOptions.model_validate(params.get("sfapi") or {})
    settings = options.settings()
    return lambda reservation: cancel_sfapi_job(settings, reservation)
