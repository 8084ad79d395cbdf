"""How to reach and log in to SFAPI: its URLs, a client id and key (``SfapiSettings``), and SFAPI's errors.

Apart from the backend so blocks and the CLI can hold settings without the job logic; the key is never logged.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, Field, SecretStr, model_validator
from sfapi_client import Client

from .base import ReservationError

SFAPI_BASE_URL = "https://api.nersc.gov/api/v1.2"
SFAPI_TOKEN_URL = "https://oidc.nersc.gov/c2id/token"


class SfapiError(ReservationError):
    """SFAPI could not do what the backend asked (base of the errors below)."""


class SfapiAuthError(SfapiError):
    """The SFAPI client's key is unusable or was rejected; the message names the client id or key file."""


class SfapiUnavailableError(SfapiError):
    """SFAPI or the machine is down or kept failing; the job itself may be fine."""


class SfapiSettings(BaseModel):
    """How to log in to SFAPI: a client id and its private key (inline, or an sfapi_client key file).

    A key file holds the client id on its first line, then the PEM (or is ``*.json`` with
    ``client_id`` and ``secret``), and must not be readable by group or others.
    """

    client_id: Optional[str] = Field(default=None, description="SFAPI client id (read from key_file if not given).")
    private_key: Optional[SecretStr] = Field(default=None, description="PEM private key or JWK JSON of the client.")
    key_file: Optional[Path] = Field(default=None, description="sfapi_client key file (mode 600).")
    api_base_url: str = Field(default=SFAPI_BASE_URL, description="SFAPI base URL.")
    token_url: str = Field(default=SFAPI_TOKEN_URL, description="OAuth2 token endpoint.")

    @model_validator(mode="after")
    def _one_key(self) -> "SfapiSettings":
        if (self.private_key is None) == (self.key_file is None):
            raise ValueError("give exactly one of private_key and key_file")
        if self.private_key is not None and not self.client_id:
            raise ValueError("client_id is required with an inline private_key")
        return self

    def credentials(self) -> tuple[str, Union[str, dict]]:
        """(client id, secret) for ``sfapi_client.Client``; SfapiAuthError names what is wrong."""
        if self.key_file is not None:
            file_id, secret = _read_key_file(self.key_file)
            if file_id and self.client_id and file_id != self.client_id:
                raise SfapiAuthError(f"SFAPI key file {self.key_file} is for client id {file_id}, "
                                     f"not the configured {self.client_id}")
            client_id = self.client_id or file_id
            if not client_id:
                raise SfapiAuthError(f"SFAPI key file {self.key_file} has no client id on its first "
                                     "line; set client_id")
            where = f"key file {self.key_file}"
        else:
            client_id, secret = self.client_id, self.private_key.get_secret_value()
            where = f"private key of client id {client_id}"
        return client_id, _parse_secret(secret, where)

    def client(self, **kwargs) -> Client:
        """A new synchronous ``sfapi_client.Client`` (use it as a context manager)."""
        client_id, secret = self.credentials()
        return Client(client_id, secret, api_base_url=self.api_base_url, token_url=self.token_url, **kwargs)

    def async_client(self, **kwargs):
        """A new ``sfapi_client.AsyncClient`` (use it as an async context manager)."""
        from sfapi_client import AsyncClient

        client_id, secret = self.credentials()
        return AsyncClient(client_id, secret, api_base_url=self.api_base_url, token_url=self.token_url, **kwargs)


def _read_key_file(path: Path) -> tuple[Optional[str], Union[str, dict]]:
    """(client id or None, secret) from an sfapi_client key file, refusing loose permissions."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError as err:
        raise SfapiAuthError(f"SFAPI key file {path} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SfapiAuthError(f"SFAPI key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SfapiAuthError(f"SFAPI key file {path} has mode {stat.S_IMODE(st.st_mode):03o}: it must "
                             f"not be readable by group or others; run: chmod 600 {path}")
    try:
        text = path.read_text()
    except OSError as err:
        raise SfapiAuthError(f"SFAPI key file {path} cannot be read: {err.strerror}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
            return str(data["client_id"]).strip(), data["secret"]
        except (ValueError, KeyError, TypeError):
            raise SfapiAuthError(f"SFAPI key file {path} is not JSON with client_id and secret") from None
    first, _, rest = text.partition("\n")
    if first.strip().startswith("-----BEGIN"):
        return None, text
    return first.strip() or None, rest


def _parse_secret(secret: Union[str, dict], where: str) -> Union[str, dict]:
    """A PEM string or a JWK dict; anything else is refused without showing it."""
    if isinstance(secret, dict):
        return secret
    text = str(secret).strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            raise SfapiAuthError(f"the {where} looks like JSON but does not parse as a JWK") from None
    if "-----BEGIN" not in text or "PRIVATE KEY-----" not in text:
        raise SfapiAuthError(f"the {where} is not a PEM private key or a JWK")
    return text + "\n"
