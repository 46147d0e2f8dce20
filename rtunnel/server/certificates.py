"""Where the HTTPS port's certificates come from: the seam between the
HTTP edge (rtunnel.server.httpedge) and a certificate source.

The edge asks `context_for(sni)` for each TLS connection it terminates and
`challenge_response(token)` for each /.well-known/acme-challenge/ request
on the HTTP port, and tells the source which names connected, authorised
clients claim (`name_claimed`, `name_released`): a source that obtains
certificates (ACME) asks only for those. `StaticCertificates` serves one
PEM certificate (e.g. a wildcard) for the names it covers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from rtunnel.errors import ConfigError
from rtunnel.httpconfig import BadHostname, normalise


class CertificateSource(Protocol):
    def context_for(self, hostname: str) -> SSL.Context | None:
        """The TLS context serving `hostname` (SNI, normalised), or None: no certificate
        for it (the handshake then fails with an unrecognized_name alert — never another
        tenant's certificate)."""

    def challenge_response(self, token: str) -> bytes | None:
        """The HTTP-01 key authorization for /.well-known/acme-challenge/<token>, if one
        is pending (served on --http before any routing)."""

    def name_claimed(self, hostname: str) -> None:
        """A connected, authorised client claimed `hostname` (called on its BOUND):
        a source that obtains certificates may start doing so now."""

    def name_released(self, hostname: str) -> None: ...


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is for, normalised: its subjectAltName
    DNS entries; only without any, its subject's common name (RFC 6125 6.4.4)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        raw = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        raw = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names = []
    for name in raw:
        try:
            names.append(normalise(name, wildcard=True))
        except BadHostname:
            continue  # not a name we could ever be asked for
    return tuple(names)


def name_matches(pattern: str, hostname: str) -> bool:
    """RFC 6125 6.4.3, as browsers apply it: equal names match; a wildcard
    matches only as the whole left-most label and for exactly one label
    ("*.example.com" matches "a.example.com", not "example.com" or "a.b.example.com")."""
    if pattern == hostname:
        return True
    if not pattern.startswith("*."):
        return False
    head, _, rest = hostname.partition(".")
    return bool(head) and head != "*" and rest == pattern[2:]


def tls_server_context(cert_file: Path, key_file: Path) -> SSL.Context:
    """A TLS 1.2+ server context for a PEM chain and key, offering HTTP/1.1 by ALPN."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    context.use_certificate_chain_file(str(cert_file))
    context.use_privatekey_file(str(key_file), crypto.FILETYPE_PEM)
    context.check_privatekey()
    offer_http11(context)
    return context


def offer_http11(context: SSL.Context) -> None:
    """Answer ALPN with HTTP/1.1, the edge's one protocol. (Also replaces the
    callback Twisted's CertificateOptions installs, which asks the wrapped
    factory for its protocols and fails the handshake with an internal_error
    alert when that factory has none: the edge's contexts are used outside
    Twisted's own TLS factories.)"""
    context.set_alpn_select_callback(lambda conn, offered: b"http/1.1")


class StaticCertificates:
    """One certificate (and key) from files, for every name it covers
    (--https-cert/--https-key). It obtains nothing, so it has no challenges."""

    def __init__(self, cert_file: str | Path, key_file: str | Path) -> None:
        cert_path, key_path = Path(cert_file), Path(key_file)
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            self.context = tls_server_context(cert_path, key_path)
        except OSError as e:
            raise ConfigError(f"--https-cert/--https-key: cannot read {e.filename}: {e.strerror}") from None
        except (ValueError, SSL.Error) as e:
            raise ConfigError(
                f"--https-cert {cert_path} / --https-key {key_path}: not a PEM certificate and its matching "
                f"key ({e}); give the certificate chain and the private key it was issued for"
            ) from None
        self.names = certificate_names(cert)
        self.not_after = cert.not_valid_after_utc.timestamp()
        if not self.names:
            raise ConfigError(f"--https-cert {cert_path}: the certificate names no DNS name (no subjectAltName)")

    def covers(self, hostname: str) -> bool:
        return any(name_matches(pattern, hostname) for pattern in self.names)

    def context_for(self, hostname: str) -> SSL.Context | None:
        return self.context if self.covers(hostname) else None

    def challenge_response(self, token: str) -> bytes | None:
        return None

    def name_claimed(self, hostname: str) -> None:
        pass

    def name_released(self, hostname: str) -> None:
        pass

    def expiry(self) -> dict[str, float]:
        """Certificate expiry (Unix time) by the names it covers, for metrics."""
        return dict.fromkeys(self.names, self.not_after)
