"""Typed, already-validated configuration of the two ends.

Options are parsed and checked at the edge (rtunnel.tap); the core receives
these frozen values and never re-validates them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rtunnel import DEFAULT_CONTROL_PORT
from rtunnel.addresses import format_host_port, is_ip_literal
from rtunnel.errors import ConfigError
from rtunnel.httpconfig import HttpSettings
from rtunnel.limits import Limits
from rtunnel.mux import SessionSettings


@dataclass(frozen=True)
class Keepalive:
    """Ping every `interval` seconds; the link is dead after `dead_after`
    seconds without any frame from the peer."""

    interval: float = 10.0
    dead_after: float = 30.0


def parse_port(text: str, what: str, allow_zero: bool = False) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a port number") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        low = 0 if allow_zero else 1
        raise ConfigError(f"{what}: port {port} is outside {low}-65535")
    return port


def parse_host_port(
    text: str, what: str, default_host: str | None, default_port: int | None = None,
    allow_zero: bool = False,
) -> tuple[str, int]:
    """Parse `PORT`, `HOST:PORT`, `[V6]:PORT` (and `HOST` when a default port exists)."""
    text = text.strip()
    host: str | None
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{what}: {text!r} has '[' without ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{what}: expected ':PORT' after ']' in {text!r}")
        port_text = rest[1:] or None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        if is_ip_literal(text) or is_ip_literal(text.rsplit(":", 1)[0]):  # ::1 or ::1:3000
            raise ConfigError(f"{what}: write IPv6 addresses in brackets, e.g. [::1]:3000 (not {text!r})")
        raise ConfigError(f"{what}: {text!r} has more than one ':'; write HOST:PORT or PORT, e.g. localhost:3000")
    elif text.isdigit():
        host, port_text = None, text
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{what}: {text!r} has no port")
        port = default_port
    else:
        port = parse_port(port_text, what, allow_zero)
    if not host:
        if default_host is None:
            raise ConfigError(f"{what}: {text!r} has no host")
        host = default_host
    return host, port


# TunnelSpec.bind_host of `-f PORT` (no address): the server picks, `::`
# (dual stack) if it can, else 0.0.0.0; sent as BIND host "" (docs/protocol.md)
SERVER_DEFAULT_BIND = ""


def check_bind(host: str, what: str) -> None:
    """A -f/forward bind address: an IP literal, or the server's default."""
    if host != SERVER_DEFAULT_BIND:
        check_ip(host, what)


def check_ip(host: str, what: str) -> None:
    """Bind addresses must be IP literals (the server never resolves names)."""
    if not is_ip_literal(host):
        raise ConfigError(f"{what}: {host!r} is not an IP address (e.g. 0.0.0.0, 127.0.0.1, [::])")


def parse_port_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """`1024-65535,80` -> ((1024, 65535), (80, 80))."""
    ranges = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        lo = parse_port(low, "--allow-ports")
        hi = parse_port(high, "--allow-ports") if high else lo
        if hi < lo:
            raise ConfigError(f"--allow-ports: range {part!r} is backwards")
        ranges.append((lo, hi))
    if not ranges:
        raise ConfigError("--allow-ports: no ports given")
    return tuple(ranges)


@dataclass(frozen=True)
class TunnelSpec:
    """One forwarded port: server bind_host:bind_port -> client target."""

    tunnel_id: int
    bind_host: str
    bind_port: int
    target_host: str
    target_port: int
    proxy_protocol: str = "off"
    kind: str = "tcp"  # "udp": -f udp:PORT -t udp:PORT; "http" or "tls": a hostname on the server's shared ports (#15)
    hostname: str = ""  # of an "http"/"tls" tunnel: a label of the server's --domain, or a full name

    @property
    def target(self) -> str:
        """The target as HOST:PORT (IPv6 in brackets)."""
        return format_host_port(self.target_host, self.target_port)


def tunnel_spec(
    tunnel_id: int, forward: str, to: str, proxy_protocol: str, forward_what: str, to_what: str
) -> TunnelSpec:
    """One tunnel from its -f/-t pair (or a [[tunnel]]'s forward and to):
    forward is [BIND:]PORT (BIND an IP address, else the server picks; port
    0: the server picks), to is [HOST:]PORT (host localhost). `*_what`
    start the error messages ("-f/--forward"). A UDP tunnel has `udp:` in
    front of both (`udp:5353`, `udp:127.0.0.1:53`)."""
    forward_udp, forward = _strip_udp(forward)
    to_udp, to = _strip_udp(to)
    if forward_udp != to_udp:
        raise ConfigError(
            f"{forward_what} {'udp:' if forward_udp else ''}{forward} and {to_what} {'udp:' if to_udp else ''}{to}: "
            "a UDP tunnel has udp: on both sides (e.g. -f udp:5353 -t udp:127.0.0.1:53)"
        )
    kind = "udp" if forward_udp else "tcp"
    if kind == "udp" and proxy_protocol == "v1":
        raise ConfigError(
            f"{forward_what} udp:{forward}: PROXY protocol v1 is for TCP only; UDP tunnels take "
            "proxy_protocol v2 (a header in front of each datagram) or off"
        )
    bind_host, bind_port = parse_host_port(forward, forward_what, SERVER_DEFAULT_BIND, allow_zero=True)
    check_bind(bind_host, forward_what)
    target_host, target_port = parse_host_port(to, to_what, "localhost")
    return TunnelSpec(tunnel_id, bind_host, bind_port, target_host, target_port, proxy_protocol, kind)


def _strip_udp(text: str) -> tuple[bool, str]:
    """(True, rest) for `udp:rest`, else (False, text); `tcp:` is accepted too."""
    head, sep, rest = text.partition(":")
    if sep and head.lower() in ("udp", "tcp"):
        return head.lower() == "udp", rest
    return False, text


def hostname_spec(tunnel_id: int, kind: str, hostname: str, to: str, proxy_protocol: str, what: str) -> TunnelSpec:
    """A hostname tunnel (`--http NAME -t PORT`, `--tls NAME -t PORT`): the
    server routes requests (or TLS connections by SNI) for `hostname` to `to`."""
    name = hostname.strip()
    if not name or any(c.isspace() or c in "/:@" for c in name):
        raise ConfigError(f"{what}: {hostname[:100]!r} is not a hostname; give a name such as myapp or app.example.com")
    target_host, target_port = parse_host_port(to, f"-t/--to (for {what} {name})", "localhost")
    return TunnelSpec(tunnel_id, "", 0, target_host, target_port, proxy_protocol, kind, name)


def same_forward(tunnels: Iterable[TunnelSpec], spec: TunnelSpec) -> TunnelSpec | None:
    """The tunnel among `tunnels` that forwards the same fixed [BIND:]PORT
    as `spec` (a port can be forwarded once; port 0 may repeat)."""
    if spec.kind in ("http", "tls"):
        return next((t for t in tunnels if (t.kind, t.hostname) == (spec.kind, spec.hostname)), None)
    if not spec.bind_port:
        return None
    key = (spec.kind, spec.bind_host, spec.bind_port)
    return next((t for t in tunnels if (t.kind, t.bind_host, t.bind_port) == key), None)


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"  # the default --acme-directory


@dataclass(frozen=True)
class ServerConfig:
    listen: str
    state_dir: Path
    listen_fallback: str | None = None  # tried when `listen` (the default ::) fails for want of IPv6
    token: str | None = None
    extra_clients: tuple[tuple[str, str], ...] = ()  # (credential name, token)
    clients_file: Path | None = None  # TOML file of per-client tokens and policy (rtunnel.auth)
    bind_default: tuple[str, ...] = ("0.0.0.0", "::")  # bind list of clients-file clients without one
    cert: Path | None = None
    key: Path | None = None
    allow_ports: tuple[tuple[int, int], ...] = ((1024, 65535),)
    allow_port_zero: bool = True
    resume_grace: float = 120.0
    handshake_timeout: float = 10.0
    keepalive: Keepalive = field(default_factory=Keepalive)
    session: SessionSettings = field(default_factory=SessionSettings)
    # admission control (rtunnel.guard) and per-credential limits; see docs/security.md
    max_unauthenticated: int = 256  # connections not yet authenticated, at once
    max_unauthenticated_per_address: int = 32  # ...of them from one address (IPv6: one /64)
    auth_failure_burst: int = 10  # wrong tokens one address may send at once...
    auth_failure_refill: float = 6.0  # ...then one more per this many seconds
    max_sessions_per_client: int = 8  # concurrent sessions of one credential
    max_tunnels: int = 64  # tunnels per session, for token credentials
    public_host: str = "::"  # bound for BINDs without a host; 0.0.0.0 when the host has no IPv6
    admin: str | None = None  # server endpoint of the status page and admin API (rtunnel.admin)
    metrics: str | None = None  # endpoint serving /metrics (rtunnel.metrics), off when None
    limits: Limits = field(default_factory=Limits)  # bandwidth and connections, token credentials (rtunnel.limits)
    # a fleet member's certificate, key and CA for member links (rtunnel.fleet.ca); None: in the state dir
    fleet_cert: Path | None = None
    fleet_key: Path | None = None
    fleet_ca: Path | None = None
    # certificates for clients' hostnames from ACME (rtunnel.server.acme, docs/http.md "ACME")
    acme_directory: str = LETS_ENCRYPT
    acme_email: str | None = None
    acme_ca: Path | None = None  # CA of a private ACME server's HTTPS certificate
    # a fleet (rtunnel.fleet, docs/fleet.md): off without etcd URLs
    fleet_etcd: tuple[str, ...] = ()
    fleet_etcd_ca: Path | None = None  # CA of etcd's server certificate (https:// URLs)
    fleet_etcd_cert: Path | None = None  # client certificate etcd asks for (--client-cert-auth)
    fleet_etcd_key: Path | None = None
    fleet_member: str = ""
    fleet_listen: str | None = None
    fleet_prefix: str = "/rtunnel/"
    fleet_lease_ttl: int = 5
    fleet_drain_timeout: float = 300.0  # a drained member stops after this even with clients left
    # --workers N (rtunnel.fleet.workers): N member processes on one control port
    workers: int = 1
    reuse_port: bool = False  # a worker: its control port is bound with SO_REUSEPORT
    http: HttpSettings = field(default_factory=HttpSettings)  # the shared HTTP/HTTPS ports (#15)
    udp_idle_timeout: float = 60.0  # a UDP flow (one visitor address) silent this long is forgotten
    udp_max_flows: int = 4096  # flows per UDP tunnel; datagrams of further visitors are dropped
    tls_groups: str | None = None  # the control port's key exchange groups (rtunnel.tls); None: OpenSSL's

    def port_allowed(self, port: int) -> bool:
        if port == 0:
            return self.allow_port_zero
        return any(lo <= port <= hi for lo, hi in self.allow_ports)


@dataclass(frozen=True)
class ClientConfig:
    server_host: str
    server_port: int
    tunnels: tuple[TunnelSpec, ...]
    token: str
    fingerprint: str | None = None
    ca_file: Path | None = None
    keepalive: Keepalive = field(default_factory=Keepalive)
    session: SessionSettings = field(default_factory=SessionSettings)
    initial_retry_delay: float = 0.5
    max_retry_delay: float = 30.0
    connect_timeout: float = 10.0
    metrics: str | None = None  # endpoint serving /metrics (rtunnel.metrics), off when None
    max_retries: int | None = None  # give up after this many failed attempts in a row; None: never
    udp_idle_timeout: float = 60.0  # a UDP flow's local socket is closed after this long without a datagram
    udp_max_flows: int = 4096  # local UDP sockets per UDP tunnel; datagrams of further flows are dropped
    # every server of -c in order (members of one fleet; rtunnel.servers); () means (server_host, server_port)
    servers: tuple[tuple[str, int], ...] = ()

    @property
    def server_list(self) -> tuple[tuple[str, int], ...]:
        return self.servers or ((self.server_host, self.server_port),)


__all__ = [
    "DEFAULT_CONTROL_PORT",
    "ClientConfig",
    "Keepalive",
    "ServerConfig",
    "TunnelSpec",
    "parse_host_port",
    "parse_port",
    "parse_port_ranges",
    "same_forward",
    "tunnel_spec",
]
