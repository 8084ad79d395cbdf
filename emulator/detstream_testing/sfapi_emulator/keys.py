"""Test credentials for the emulator: an RSA key pair and a NERSC-style 13-character client id."""

from __future__ import annotations

import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class ClientCredentials:
    """An SFAPI client: its id, PEM private key (the ``secret`` sfapi_client signs with) and public key.

    The private key is kept out of ``repr`` so it never lands in a log or a test report.
    """

    client_id: str
    private_key_pem: str = field(repr=False)
    public_key_pem: str

    def write_key_file(self, path: Union[str, Path]) -> Path:
        """Write an sfapi_client key file (client id on the first line, then the PEM), mode 600."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{self.client_id}\n{self.private_key_pem}")
        os.chmod(path, 0o600)
        return path

    def write_public_key(self, path: Union[str, Path]) -> Path:
        """Write the public key PEM (what the emulator's ``--public-key`` reads)."""
        path = Path(path)
        path.write_text(self.public_key_pem)
        return path


def new_client_id() -> str:
    """A random id shaped like NERSC's (13 lowercase letters and digits; sfapi_client checks the length)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(13))


def generate_client_credentials(client_id: Optional[str] = None, key_size: int = 2048) -> ClientCredentials:
    """Make a fresh RSA key pair for a (new or given) client id."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return ClientCredentials(client_id or new_client_id(), private_pem, public_pem)
