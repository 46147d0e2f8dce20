"""Settings of the HTTP(S) edge (hostname routing on shared ports, #15):
plain values, read by rtunnel.server.httpedge and set from the server's
option table (`--http`, `--https`, `--domain`, ...)."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from rtunnel.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class HttpSettings:
    """Where the shared ports listen and the edge's limits (docs/http.md)."""

    http: str | None = None  # Twisted server endpoint of the plain HTTP port; None: off
    https: str | None = None  # ... of the TLS port (terminated or passed through by SNI)
    domain: str | None = None  # token credentials may take NAME.DOMAIN
    https_cert: str | None = None  # PEM certificate (chain) for StaticCertificates
    https_key: str | None = None
    trusted_proxies: tuple[Network, ...] = ()  # their X-Forwarded-*/Forwarded are kept
    max_request_head: int = 16 * 1024  # bytes of request line + headers (431 beyond)
    request_head_timeout: float = 10.0  # seconds for a request head to arrive (408 after)
    offline_wait: float = 10.0  # seconds a request waits for a detached tunnel to resume (502 after)
    access_log: str | None = None  # file of one line per request
    access_log_format: str = "combined"  # or "json"
    redirect_https: bool = True  # --http answers 308 to https:// for a name with a certificate

    @property
    def enabled(self) -> bool:
        return bool(self.http or self.https)


def parse_networks(value: str, option: str = "--trusted-proxies") -> tuple[Network, ...]:
    """CIDR blocks separated by commas or spaces (a bare address is a /32 or /128)."""
    networks = []
    for part in value.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{option}: {part!r} is not an IP address or CIDR block (e.g. 10.0.0.0/8, ::1)") from None
    return tuple(networks)


_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
MAX_NAME = 253


class BadHostname(ValueError):
    """Not a DNS name rtunnel serves; the message says why."""


def normalise(name: str, wildcard: bool = False) -> str:
    """`name` lower case, in IDNA A-labels, without a trailing dot; raise
    BadHostname if it is no valid DNS name (a leading "*." only with
    `wildcard`). Every comparison of names is between normalised names."""
    text = name.strip().rstrip(".")
    if not text:
        raise BadHostname("the hostname is empty")
    star = text.startswith("*.")
    if star:
        if not wildcard:
            raise BadHostname(f"{name[:80]!r}: a wildcard is not a hostname here")
        text = text[2:]
    labels = []
    for label in text.split("."):
        try:
            ascii_label = label.encode("idna").decode("ascii").lower() if label else ""
        except UnicodeError:
            raise BadHostname(f"{name[:80]!r}: label {label[:63]!r} is not a valid IDNA label") from None
        if not _LABEL.match(ascii_label):
            raise BadHostname(
                f"{name[:80]!r}: label {label[:63]!r} must be 1-63 letters, digits or '-' (not first or last)"
            )
        labels.append(ascii_label)
    result = ("*." if star else "") + ".".join(labels)
    if len(result) > MAX_NAME:
        raise BadHostname(f"{name[:80]!r}... is longer than {MAX_NAME} characters")
    return result


@functools.lru_cache(maxsize=4096)
def host_of(authority: str) -> str | None:
    """The normalised name of a Host header or SNI value (port dropped), or
    None if it is no DNS name (an IP literal, garbage). Cached (bounded):
    each new connection to the edge names one of a few hosts."""
    text = authority.strip()
    if text.startswith("["):
        return None  # an IPv6 literal: no tunnel has it
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if port and not port.isdigit():
        return None
    try:
        return normalise(host)
    except BadHostname:
        return None
