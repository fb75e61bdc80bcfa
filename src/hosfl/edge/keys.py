"""Credentials of a network run, in one folder the server owns (default ``RUN/secrets``):

- ``client-<id>.token``: the token the server issued to client <id> (32 random bytes,
  URL-safe); the client presents it, the server binds it to that id;
- ``server.crt`` / ``server.key``: the server's TLS certificate (self-signed, naming
  localhost, 127.0.0.1 and the hosts given) and key. Put your own there before the first
  start to use a certificate from your CA.

Files are created once (mode 0600, the folder 0700) and never overwritten: a restarted or
resumed server keeps its clients' credentials.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from hosfl.config import ConfigError
from hosfl.packages import MissingPackage

CERT, KEY = "server.crt", "server.key"


def token_path(folder: str | Path, cid: int) -> Path:
    return Path(folder) / f"client-{cid}.token"


def _create(path: Path, data: bytes) -> None:
    """Write a new secret file, readable by its owner only; an existing one is kept."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def issue(folder: str | Path, clients: int, hosts: tuple[str, ...] = (), tls: bool = True) -> Path:
    """Make sure ``folder`` holds a token for each of ``clients`` (and, with ``tls``, the
    server's certificate); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for cid in range(clients):
        _create(token_path(folder, cid), secrets.token_urlsafe(32).encode())
    if tls and not (folder / CERT).exists():
        key, cert = _self_signed(hosts)
        _create(folder / KEY, key)
        _create(folder / CERT, cert)
    return folder


def read_token(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the token file {path}: {e.strerror}") from None
    if not token or not token.isascii() or not token.isprintable() or len(token) > 256:
        raise ConfigError(f"{path} does not hold a token")
    return token


def fingerprint(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The server's view: client id -> the SHA-256 of its token (the tokens stay on disk)."""

    def __init__(self, folder: str | Path, clients: int) -> None:
        read = [read_token(token_path(folder, cid)) for cid in range(clients)]
        self.hashes = {cid: fingerprint(token) for cid, token in enumerate(read)}

    def check(self, cid: int, token: str) -> bool:
        """True if ``token`` is the one issued to client ``cid`` (constant-time compare)."""
        want = self.hashes.get(cid)
        return want is not None and hmac.compare_digest(want, fingerprint(token))


def tls_pair(folder: str | Path) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) of the server."""
    folder = Path(folder)
    try:
        return (folder / KEY).read_bytes(), (folder / CERT).read_bytes()
    except OSError as e:
        raise ConfigError(f"TLS: cannot read {e.filename}: {e.strerror}") from None


def _self_signed(hosts: tuple[str, ...]) -> tuple[bytes, bytes]:
    """A P-256 key and a self-signed certificate (a year) for localhost, 127.0.0.1, ``hosts``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise MissingPackage(
            "making the server's TLS certificate needs cryptography: pip install 'hosfl[serve]' "
            "(or put your own server.crt and server.key in the secrets folder)"
        ) from None
    names: list[x509.GeneralName] = []
    for host in ("localhost", "127.0.0.1", *hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hosfl server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(names))), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)
