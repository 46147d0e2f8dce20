"""TLS to etcd's client port (`--fleet-etcd https://…`): the CA that signed
etcd's server certificate (`--fleet-etcd-ca`), and the client certificate
etcd asks for with `--client-cert-auth` (`--fleet-etcd-cert`/`--fleet-etcd-key`;
with etcd's auth enabled, its common name is the etcd user). Without these,
https:// URLs are checked against the system's trusted CAs and no client
certificate is sent (docs/fleet.md "etcd over TLS")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

from rtunnel.errors import ConfigError
from rtunnel.tls import same_public_key


@dataclass(frozen=True)
class EtcdTls:
    """What a member presents to and trusts of etcd over https://."""

    ca: Certificate | None = None
    client: PrivateCertificate | None = None

    def creator(self, host: str) -> Any:
        """The client TLS connection creator for one etcd host (its name or
        address is checked against etcd's certificate)."""
        kwargs: dict[str, Any] = {}
        if self.ca is not None:
            kwargs["trustRoot"] = self.ca
        if self.client is not None:
            kwargs["clientCertificate"] = self.client
        return optionsForClientTLS(host, **kwargs)


def _read(path: Path, option: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot read the {what} ({e.strerror}); check the path and its permissions") from e


def load_etcd_tls(
    urls: tuple[str, ...], ca: Path | None, cert: Path | None, key: Path | None,
) -> EtcdTls | None:
    """The TLS settings the options name, checked: None when none is given.
    ConfigError (saying what to change) for a key without its certificate,
    files that are not PEM of the right kind, or TLS options with only
    http:// URLs (they would be ignored)."""
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        given, missing = ("--fleet-etcd-cert", "--fleet-etcd-key") if key is None else ("--fleet-etcd-key", "--fleet-etcd-cert")
        raise ConfigError(f"{given} needs {missing} too: the client certificate etcd asks for and its private key")
    if not any(url.startswith("https://") for url in urls):
        raise ConfigError(
            "--fleet-etcd-ca/--fleet-etcd-cert apply to https:// etcd URLs only; --fleet-etcd names "
            f"{', '.join(urls) or 'none'}: give etcd's https:// client URLs, or drop the TLS options"
        )
    trust = None
    if ca is not None:
        ca_pem = _read(ca, "--fleet-etcd-ca", "CA certificate")
        try:
            trust = Certificate.loadPEM(ca_pem)
        except Exception as e:
            raise ConfigError(f"--fleet-etcd-ca {ca}: not a PEM certificate ({e}); give the CA that signed etcd's server certificate") from e
    client = None
    if cert is not None and key is not None:
        cert_pem = _read(cert, "--fleet-etcd-cert", "client certificate")
        key_pem = _read(key, "--fleet-etcd-key", "client key")
        try:
            public = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise ConfigError(f"--fleet-etcd-cert {cert}: not a PEM certificate ({e})") from e
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--fleet-etcd-key {key}: not a PEM private key ({e})") from e
        if not same_public_key(public.public_key(), private.public_key()):
            raise ConfigError(f"--fleet-etcd-key {key} is not the private key of --fleet-etcd-cert {cert}")
        client = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return EtcdTls(trust, client)
