"""Key material and TLS settings: generated identity, pinning, CA checks.

The server's identity is a P-256 key and a self-signed certificate made on
first start in the state directory. Clients check it either by its pinned
SHA-256 fingerprint (hex of the SHA-256 of the DER certificate), by a CA
and the hostname (service_identity), or by trust on first use: the
fingerprint seen on the first connection is stored in a known-servers file
and pinned from then on.
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
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from rtunnel.errors import ConfigError, StateDirError
from rtunnel.files import load_or_create_secret, replace_private, write_private
from rtunnel.openssl_private import set_key_exchange_groups

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


def _normalise_fingerprint(text: str) -> str | None:
    value = text.strip().lower()
    if value.startswith("sha256:"):
        value = value[len("sha256:") :]
    value = value.replace(":", "")
    return value if _HEX64.fullmatch(value) else None


def parse_fingerprint(text: str) -> str:
    """Normalise a fingerprint: any case, optional colons, optional `sha256:`."""
    value = _normalise_fingerprint(text)
    if value is None:
        raise ConfigError(
            f"--fingerprint {text!r} is not a SHA-256 fingerprint: expected 64 hex "
            "digits (colons and a 'sha256:' prefix are allowed). The server prints "
            "it on start; or run: openssl x509 -in server.crt -outform DER | sha256sum"
        )
    return value


def read_file(path: Path, what: str) -> bytes:
    """The bytes of key material at `path`; ConfigError naming `what` if unreadable."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


_read = read_file


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """`key` as unencrypted PKCS#8 PEM (written 0600 by the caller)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def same_public_key(a: Any, b: Any) -> bool:
    """True if two public keys (of a certificate, of a private key) are one key."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(a.public_bytes(serialization.Encoding.DER, spki) == b.public_bytes(serialization.Encoding.DER, spki))


def load_server_identity(
    state_dir: Path, cert_path: Path | None = None, key_path: Path | None = None
) -> ServerIdentity:
    """Use the given certificate, or the one in the state dir (made if absent)."""
    if (cert_path is None) != (key_path is None):
        raise ConfigError("--cert and --key go together: give both or neither")
    created = False
    if cert_path is None or key_path is None:
        cert_path, key_path = state_dir / "server.crt", state_dir / "server.key"
        try:
            missing = not cert_path.exists() or not key_path.exists()
        except OSError as e:  # e.g. a directory this user may not enter
            raise StateDirError(
                f"cannot read the state directory {state_dir}: {e.strerror or e}. Fix its permissions "
                "for the user the server runs as, or choose another --state-dir."
            ) from None
        if missing:
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
    if not same_public_key(cert_public, key_public):
        raise ConfigError(f"the key {key_path} does not belong to the certificate {cert_path}")
    return ServerIdentity(cert_pem, key_pem, fingerprint, created)


def load_or_create_token(state_dir: Path) -> tuple[str, bool]:
    """The server's shared token from `state_dir/token`, made if absent."""
    return load_or_create_secret(state_dir / "token", "token", 24)


class _ServerOptions(ssl.CertificateOptions):
    """CertificateOptions that ask for (but never require) a client certificate.

    Any certificate is accepted at the TLS level, self-signed included: it
    proves possession of its key, and the server trusts it only if its
    SHA-256 is a client's cert_sha256 in the clients file. A client without
    a certificate connects exactly as before.
    """

    groups: str | None = None  # key exchange groups (--tls-groups); None: OpenSSL's default

    def getContext(self) -> SSL.Context:
        ctx = super().getContext()  # made once, then shared by every connection
        if ctx.get_verify_mode() != SSL.VERIFY_PEER:
            ctx.set_verify(SSL.VERIFY_PEER, _accept_any_certificate)  # not FAIL_IF_NO_PEER_CERT
            if self.groups is not None:
                set_key_exchange_groups(ctx, self.groups)
        return ctx


def _accept_any_certificate(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    return True


def server_context(identity: ServerIdentity, groups: str | None = None) -> ssl.CertificateOptions:
    """TLS 1.2+, Twisted's modern cipher list, no compression, no renegotiation;
    a client certificate is requested but optional (see _ServerOptions).
    `groups` (--tls-groups) replaces OpenSSL's key exchange groups."""
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, identity.cert_pem)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, identity.key_pem)
    options = _ServerOptions(
        privateKey=key,
        certificate=cert,
        raiseMinimumTo=MIN_TLS,
    )
    options.groups = groups
    return options


def check_key_exchange_groups(groups: str) -> str:
    """`groups` if this OpenSSL accepts it as a key exchange group list,
    else ConfigError saying what to give."""
    try:
        set_key_exchange_groups(SSL.Context(SSL.TLS_METHOD), groups)
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(
            f"--tls-groups {groups!r}: this OpenSSL accepts none of these key exchange groups or the list is "
            "malformed; give names joined by ':', e.g. X25519MLKEM768:X25519 or X25519"
        ) from None
    return groups


@dataclass(frozen=True)
class ClientIdentity:
    """A TLS client certificate and its key (--client-cert / --client-key)."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint_of_pem(self.cert_pem)

    def apply(self, ctx: SSL.Context) -> None:
        ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, self.cert_pem))
        ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, self.key_pem))
        ctx.check_privatekey()

    def private_certificate(self) -> ssl.PrivateCertificate:
        return ssl.PrivateCertificate.loadPEM(self.key_pem + b"\n" + self.cert_pem)


def load_client_identity(cert_path: Path, key_path: Path) -> ClientIdentity:
    """Read and check --client-cert / --client-key (ConfigError says what is wrong)."""
    cert_pem = _read(cert_path, "client certificate")
    key_pem = _read(key_path, "client private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise ConfigError(f"--client-cert {cert_path} is not a PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"--client-key {key_path} is not an unencrypted PEM private key: {e}"
        ) from None
    if not same_public_key(cert.public_key(), key.public_key()):
        raise ConfigError(f"--client-key {key_path} does not belong to --client-cert {cert_path}")
    return ClientIdentity(cert_pem, key_pem, cert_path, key_path)


def _leaf_fingerprint(cert: crypto.X509) -> str:
    return hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)).hexdigest()


@implementer(IOpenSSLClientConnectionCreator)
class PinnedCertificateCreator:
    """Client TLS that accepts exactly one server certificate, by fingerprint.

    The chain and hostname are not checked: the pin is the trust. A mismatch
    is remembered in `mismatch` (the fingerprint seen) so the client can say
    what went wrong instead of a bare handshake failure.
    """

    def __init__(self, fingerprint: str | None, client_identity: ClientIdentity | None = None) -> None:
        self.fingerprint = fingerprint
        self.mismatch: str | None = None
        options = ssl.CertificateOptions(raiseMinimumTo=MIN_TLS)
        self._context = options.getContext()
        self._context.set_verify(SSL.VERIFY_PEER, self._verify)
        if client_identity is not None:
            client_identity.apply(self._context)

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if depth != 0:
            return True
        return self._check_pin(_leaf_fingerprint(cert))

    def _check_pin(self, seen: str) -> bool:
        assert self.fingerprint is not None
        if secrets.compare_digest(seen, self.fingerprint):
            self.mismatch = None
            return True
        self.mismatch = seen
        return False

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def ca_creator(
    hostname: str, ca_file: Path, client_identity: ClientIdentity | None = None
) -> IOpenSSLClientConnectionCreator:
    """Client TLS that checks the chain against `ca_file` and the hostname."""
    try:
        authority = ssl.Certificate.loadPEM(_read(ca_file, "CA file"))
    except crypto.Error as e:
        raise ConfigError(f"--ca {ca_file} is not a PEM certificate: {e}") from None
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=authority,
        clientCertificate=client_identity.private_certificate() if client_identity is not None else None,
        extraCertificateOptions={"raiseMinimumTo": MIN_TLS},
    )


# ---------------------------------------------------------------- trust on first use

DEFAULT_KNOWN_SERVERS = "~/.config/rtunnel/known_servers"
KNOWN_SERVERS_HEADER = (
    "# rtunnel known servers (rtunnel_client --trust-on-first-use): one line per server,\n"
    "# HOST:PORT sha256:FINGERPRINT. Remove a server's line to trust a new key for it.\n"
)


class KnownServersError(ConfigError):
    """The known-servers file cannot be read, parsed or written."""


def server_key(host: str, port: int) -> str:
    """How a server is named in the known-servers file: `host:port`, IPv6 in brackets."""
    host = host.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_server_key(text: str) -> str | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return None
        host = host[1:-1]
    elif ":" in host or "]" in host:
        return None
    return server_key(host, int(port))


def parse_known_servers(text: str, path: Path) -> dict[str, str]:
    """`{HOST:PORT: fingerprint hex}` from the file's text; `#` comments and
    blank lines are ignored; a malformed or repeated server is an error that
    names the line."""
    known: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        key = _parse_server_key(fields[0]) if len(fields) == 2 else None
        fingerprint = _normalise_fingerprint(fields[1]) if key is not None else None
        if key is None or fingerprint is None:
            raise KnownServersError(
                f"{path} line {number}: expected 'HOST:PORT sha256:<64 hex digits>', got "
                f"{line!r}. Fix or delete that line."
            )
        if key in known:
            raise KnownServersError(
                f"{path} line {number}: {key} is already on line {lines[key]}. Keep one of the two lines."
            )
        known[key], lines[key] = fingerprint, number
    return known


def _read_known_servers_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return ""  # not there (yet): storing the first server says why if it cannot be
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise KnownServersError(
            f"cannot read the known-servers file {path}: {why}. Fix it or choose another --known-servers FILE."
        ) from None


def load_known_servers(path: Path) -> dict[str, str]:
    """The known-servers file as `{HOST:PORT: fingerprint hex}` ({} if absent)."""
    return parse_known_servers(_read_known_servers_text(path), path)


def store_known_server(path: Path, key: str, fingerprint: str) -> None:
    """Record (or replace) `key`'s fingerprint, atomically: a temporary file
    in the same directory, mode 0600, renamed over the old one. The parent
    directory is created 0700 if missing. Other lines are kept as they are."""
    text = _read_known_servers_text(path)
    parse_known_servers(text, path)  # never rewrite a file we cannot read back
    kept = [line for line in text.splitlines() if _line_key(line) != key]
    if not text:
        kept = KNOWN_SERVERS_HEADER.splitlines()
    kept.append(f"{key} {format_fingerprint(fingerprint)}")
    data = ("\n".join(kept) + "\n").encode("utf-8")
    try:
        replace_private(path, data)
    except OSError as e:
        raise KnownServersError(
            f"cannot write the known-servers file {path}: {e.strerror or e}. Fix the permissions "
            "or choose another --known-servers FILE."
        ) from None


def _line_key(line: str) -> str | None:
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    return _parse_server_key(fields[0])


class TrustOnFirstUseCreator(PinnedCertificateCreator):
    """Client TLS that learns the server's certificate on first use.

    A server already in the known-servers file is pinned exactly like
    --fingerprint. On the first connection to a server not in it, the
    certificate's fingerprint is stored (and only then trusted): `learned` is
    that fingerprint. If storing fails the handshake is refused and
    `store_error` says why. A certificate other than the stored one is
    refused and remembered in `mismatch`, as with PinnedCertificateCreator.
    """

    log = Logger()

    def __init__(
        self, host: str, port: int, known_servers: Path, client_identity: ClientIdentity | None = None
    ) -> None:
        self.key = server_key(host, port)
        self.path = known_servers
        self.learned: str | None = None
        self.store_error: str | None = None
        super().__init__(load_known_servers(known_servers).get(self.key), client_identity)

    def _check_pin(self, seen: str) -> bool:
        if self.fingerprint is None and not self._learn(seen):
            return False
        return super()._check_pin(seen)

    def _learn(self, seen: str) -> bool:
        """First use: store `seen` (unless another client just did), then pin it."""
        try:
            stored = load_known_servers(self.path).get(self.key)
            if stored is None:
                store_known_server(self.path, self.key, seen)
        except KnownServersError as e:
            self.store_error = (
                f"first connection to {self.key}, but its certificate {format_fingerprint(seen)} "
                f"cannot be recorded, so it is not trusted: {e}"
            )
            return False
        self.store_error = None
        if stored is not None:
            self.fingerprint = stored
            return True
        self.fingerprint = self.learned = seen
        self.log.warn(
            "first connection to {key}: trusting certificate {fp} (stored in {path}); compare it "
            "with the fingerprint the server printed",
            key=self.key, fp=format_fingerprint(seen), path=str(self.path),
            event="server_trusted", fingerprint=format_fingerprint(seen),
        )
        return True
