"""Per-run TLS material for the private etcd: a CA, a server certificate and a client certificate.

Made with `cryptography` (EC P-256, valid one day) in a 0700 directory the caller owns; the
private keys are 0600 files there and never leave it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsFiles", "make_tls_files"]


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files: the CA, the server's pair and a client's pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(ca_key, ca_name: x509.Name, subject: str, usage, hosts: tuple[str, ...] = ()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False))
    if hosts:
        names = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() else x509.DNSName(h)
                 for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_tls_files(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Make a fresh CA and a server (for `hosts`) and client certificate signed by it, in `directory` (made 0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("detstream private etcd CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(*(directory / n for n in ("ca.pem", "server.pem", "server-key.pem", "client.pem",
                                               "client-key.pem")))
    pem = serialization.Encoding.PEM
    _write(files.ca, ca_cert.public_bytes(pem), 0o644)
    # etcd's gateway dials etcd itself with the server's certificate: its name is no etcd user.
    server_key, server_cert = _issue(ca_key, ca_name, "detstream etcd server",
                                       (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH), hosts)
    _write(files.server_key, _key_pem(server_key), 0o600)
    _write(files.server_cert, server_cert.public_bytes(pem), 0o644)
    # No common name: with auth on, etcd's gateway refuses (HTTP 400) a client certificate that has one.
    client_key, client_cert = _issue(ca_key, ca_name, "", (ExtendedKeyUsageOID.CLIENT_AUTH,))
    _write(files.client_key, _key_pem(client_key), 0o600)
    _write(files.client_cert, client_cert.public_bytes(pem), 0o644)
    return files
