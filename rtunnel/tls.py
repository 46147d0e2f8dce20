"""Key material and TLS settings: generated identity, pinning, CA checks.

The server's identity is a P-256 key and a self-signed certificate made on
first start in the state directory. Clients check it either by its pinned
SHA-256 fingerprint (hex of the SHA-256 of the DER certificate) or by a CA
and the hostname (service_identity).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from rtunnel.errors import ConfigError, StateDirError

MIN_TLS = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class ServerIdentity:
    cert_pem: bytes
    key_pem: bytes
    fingerprint: str
    created: bool


def fingerprint_of_pem(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def format_fingerprint(fp: str) -> str:
    return "sha256:" + fp


_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_fingerprint(text: str) -> str:
    """Normalise a fingerprint: any case, optional colons, optional `sha256:`."""
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    value = value.replace(":", "")
    if not _HEX64.fullmatch(value):
        raise ConfigError(
            f"--fingerprint {text!r} is not a SHA-256 fingerprint: expected 64 hex "
            "digits (colons and a 'sha256:' prefix are allowed). The server prints "
            "it on start; or run: openssl x509 -in server.crt -outform DER | sha256sum"
        )
    return value


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (0600), failing clearly."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
    except OSError as e:
        raise StateDirError(
            f"cannot write {path}: {e.strerror}. Free some space or fix the "
            "permissions, or choose another --state-dir."
        ) from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def _make_self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.getfqdn() or "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rtunnel server " + hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if hostname != "localhost":
        alt.insert(0, x509.DNSName(hostname))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def load_server_identity(
    state_dir: Path, cert_path: Path | None = None, key_path: Path | None = None
) -> ServerIdentity:
    """Use the given certificate, or the one in the state dir (made if absent)."""
    if (cert_path is None) != (key_path is None):
        raise ConfigError("--cert and --key go together: give both or neither")
    created = False
    if cert_path is None or key_path is None:
        cert_path, key_path = state_dir / "server.crt", state_dir / "server.key"
        if not cert_path.exists() or not key_path.exists():
            cert_pem, key_pem = _make_self_signed()
            write_private(key_path, key_pem)
            write_private(cert_path, cert_pem)
            os.chmod(cert_path, 0o644)
            created = True
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private key")
    try:
        fingerprint = fingerprint_of_pem(cert_pem)
        cert_public = x509.load_pem_x509_certificate(cert_pem).public_key()
        key_public = serialization.load_pem_private_key(key_pem, None).public_key()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{cert_path} / {key_path} is not a PEM certificate and key: {e}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert_public.public_bytes(serialization.Encoding.DER, spki) != key_public.public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise ConfigError(f"the key {key_path} does not belong to the certificate {cert_path}")
    return ServerIdentity(cert_pem, key_pem, fingerprint, created)


def load_or_create_token(state_dir: Path) -> tuple[str, bool]:
    """The server's shared token from `state_dir/token`, made if absent."""
    path = state_dir / "token"
    if path.exists():
        token = _read(path, "token file").decode().strip()
        if token:
            return token, False
    token = secrets.token_urlsafe(24)
    write_private(path, (token + "\n").encode())
    return token, True


def server_context(identity: ServerIdentity) -> ssl.CertificateOptions:
    """TLS 1.2+, Twisted's modern cipher list, no compression, no renegotiation."""
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, identity.cert_pem)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, identity.key_pem)
    return ssl.CertificateOptions(
        privateKey=key,
        certificate=cert,
        raiseMinimumTo=MIN_TLS,
    )


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificateCreator:
    """Client TLS that accepts exactly one server certificate, by fingerprint.

    The chain and hostname are not checked: the pin is the trust. A mismatch
    is remembered in `mismatch` (the fingerprint seen) so the client can say
    what went wrong instead of a bare handshake failure.
    """

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.mismatch: str | None = None
        options = ssl.CertificateOptions(raiseMinimumTo=MIN_TLS)
        self._context = options.getContext()
        self._context.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        seen = hashlib.sha256(der).hexdigest()
        if secrets.compare_digest(seen, self.fingerprint):
            self.mismatch = None
            return True
        self.mismatch = seen
        return False

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def ca_creator(hostname: str, ca_file: Path) -> IOpenSSLClientConnectionCreator:
    """Client TLS that checks the chain against `ca_file` and the hostname."""
    try:
        authority = ssl.Certificate.loadPEM(_read(ca_file, "CA file"))
    except crypto.Error as e:
        raise ConfigError(f"--ca {ca_file} is not a PEM certificate: {e}") from None
    return ssl.optionsForClientTLS(
        hostname, trustRoot=authority, extraCertificateOptions={"raiseMinimumTo": MIN_TLS}
    )
