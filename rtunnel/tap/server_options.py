"""The server's option table: every `rtunnel_server` option, declared once
(see rtunnel.tap.options for what each entry gives)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import replace
from pathlib import Path

from rtunnel import DEFAULT_CONTROL_PORT, wire
from rtunnel.config import LETS_ENCRYPT, Keepalive, check_ip, parse_port_ranges
from rtunnel.endpoints import local_endpoint
from rtunnel.errors import ConfigError
from rtunnel.httpconfig import BadHostname, HttpSettings, normalise, parse_networks
from rtunnel.limits import Limits
from rtunnel.mux import SessionSettings
from rtunnel.tap.options import (
    AT_LEAST,
    CONFIG,
    DEAD_AFTER,
    LOG_FORMAT,
    MAX_STREAM_WINDOW,
    METRICS,
    NOT_NEGATIVE,
    OUTSIDE_BYTES,
    PING_INTERVAL,
    SESSION_BUFFER,
    Kind,
    Option,
    OptionTable,
)
from rtunnel.tls import check_key_exchange_groups

DEFAULT_STATE_DIR = "~/.local/state/rtunnel"
MIN_MAX_FRAME = wire.MIN_MAX_FRAME  # 16 KiB
MAX_MAX_FRAME = 16 * 1024 * 1024
_SESSION = SessionSettings()
_GRACE = "--resume-grace must be >= 0 and --handshake-timeout > 0"


def _user_path(value: str) -> Path:
    return Path(os.path.expanduser(value))


def _bind_default(value: str) -> tuple[str, ...]:
    addresses = tuple(a.strip() for a in value.split(",") if a.strip())
    if not addresses:
        raise ConfigError("--bind-default: give at least one IP address")
    for address in addresses:
        check_ip(address, "--bind-default")
    return addresses


def _public_host(value: str) -> str:
    host = value.strip().strip("[]")
    check_ip(host, "--public-host")
    return host


def _acme_directory(value: str) -> str:
    url = value.strip()
    if not (url.startswith("https://") or url.startswith("http://")) or " " in url:
        raise ConfigError(f"--acme-directory {value!r} is not an http(s) URL; give the ACME server's directory URL")
    return url


def _acme_email(value: str | None) -> str | None:
    if not value:
        return None
    email = value.strip()
    local, _, domain = email.partition("@")
    if not local or "." not in domain or any(c in email for c in " ,;<>:\"\n"):
        raise ConfigError(f"--acme-email {value!r} is not an e-mail address (name@example.org)")
    return email
def _etcd_urls(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    urls = tuple(url.strip().rstrip("/") for url in value.split(",") if url.strip())
    if not urls:
        raise ConfigError("--fleet-etcd: give at least one etcd client URL, e.g. http://127.0.0.1:2379")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--fleet-etcd: {url!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:2379)")
    return urls


_MEMBER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _member_name(value: str) -> str:
    name = value.strip() or socket.gethostname().split(".")[0].lower()
    if not _MEMBER_NAME.fullmatch(name):
        raise ConfigError(
            f"--fleet-member: {name!r} is not a member name: 1-63 lower-case letters, digits and '-', "
            "not starting or ending with '-' (e.g. m1); it is also the member certificate's DNS name"
        )
    return name


def _fleet_prefix(value: str) -> str:
    prefix = value.strip()
    if not prefix:
        raise ConfigError("--fleet-prefix: give a key prefix, e.g. /rtunnel/")
    return prefix if prefix.endswith("/") else prefix + "/"
def _domain(value: str) -> str | None:
    if not value:
        return None
    try:
        return normalise(value)
    except BadHostname as e:
        raise ConfigError(f"--domain: {e}") from None


def _endpoint(value: str) -> str | None:
    """A bare port means every address (the shared ports are public)."""
    if not value:
        return None
    return f"tcp:{value}" if value.isdigit() else value


_HEAD = "--{name} {value} must be from {low} to {high} bytes"
_HTTP = "the shared HTTP/HTTPS ports (see [docs/http.md](docs/http.md))"


def _at_least_one(name: str, help: str, default: int, field: str, doc: str, **more: object) -> Option:
    return Option(name, Kind.INT, help, default, field=field, low=1, error=AT_LEAST, metavar="N", doc=doc, **more)  # type: ignore[arg-type]


def _no_limit(name: str, help: str, field: str | None, doc: str, **more: object) -> Option:
    return Option(
        name, Kind.INT, help, 0, field=field, none_if_zero=True, low=0, error=NOT_NEGATIVE,
        metavar="BYTES" if name.startswith("bandwidth") else "N", doc=doc, **more,  # type: ignore[arg-type]
    )


SERVER_OPTIONS = OptionTable("server", [
    replace(
        CONFIG,
        doc="TOML file of these options (keys: the long names with `_` for `-`); flags override it; see "
        "[docs/configuration.md](docs/configuration.md)",
    ),
    Option(
        "port", Kind.INT, "Control port.", DEFAULT_CONTROL_PORT, short="p", field="listen", computed=True,
        low=1, high=65535, error="--{name} {value} is not a port number (1-65535)",
        metavar="PORT", doc="control port (clients connect here)",
    ),
    Option(
        "interface", Kind.STR,
        "Address to listen on for clients (default: :: -- all IPv6 and, dual stack, IPv4 addresses; "
        "0.0.0.0 on hosts without IPv6).", "", short="i", field="listen", computed=True,
        metavar="ADDR", doc_default="`::` (IPv6 and IPv4), else `0.0.0.0`",
        doc='address to listen on for clients; see "IPv6"',
    ),
    Option(
        "listen", Kind.STR,
        "Twisted server endpoint string for the control port; overrides --port/--interface (e.g. "
        "tcp6:19050:interface=\\:\\:1 -- colons escaped -- or systemd:domain=INET:index=0).",
        short="l", field="listen", computed=True, metavar="ENDPOINT",
        doc="Twisted server endpoint string for the control port; overrides `--port`/`--interface`, e.g. "
        "`tcp6:19050:interface=\\:\\:1` (IPv6 loopback; colons escaped) or `systemd:domain=INET:index=0` "
        "(socket activation)",
    ),
    Option(
        "state-dir", Kind.STR, "Directory for the key, certificate and token.", DEFAULT_STATE_DIR, short="s",
        field="state_dir", convert=_user_path, path=True, metavar="DIR",
        doc="where the key, certificate and token live",
    ),
    Option(
        "token", Kind.STR,
        "Shared secret clients must present (default: $RTUNNEL_TOKEN, else the state dir's 'token' file, "
        "made on first start).",
        field="token", convert=lambda value: value or os.environ.get("RTUNNEL_TOKEN") or None,
        metavar="TOKEN", doc_default="`$RTUNNEL_TOKEN`, else the state dir's `token` file",
        doc='the shared secret clients must present (credential "default")',
    ),
    Option(
        "client", Kind.REPEAT,
        "NAME=TOKEN: another client credential with its own token (repeatable). "
        "Ports belong to the credential that bound them.",
        field="extra_clients", computed=True, metavar="NAME=TOKEN",
        doc="another credential with its own token (repeatable); ports belong to the credential that bound them",
    ),
    Option(
        "clients", Kind.STR,
        "TOML file of clients, each with its own token hash, ports, bind addresses and limits (see "
        "'rtunnel_server add-client'); SIGHUP reloads it.",
        field="clients_file", convert=lambda value: _user_path(value) if value else None, path=True,
        metavar="FILE",
        doc='TOML clients file: each client\'s token hash, ports, bind addresses and limits (see "Several '
        'clients"); `SIGHUP` reloads it. With it and no `--token`/`$RTUNNEL_TOKEN`, only the file\'s '
        "clients can connect",
    ),
    Option(
        "bind-default", Kind.STR, "Bind addresses allowed to clients-file clients that have no 'bind' list.",
        "0.0.0.0,::", field="bind_default", convert=_bind_default, metavar="ADDRS",
        doc="bind addresses allowed to clients-file clients that have no `bind` list",
    ),
    Option(
        "public-host", Kind.STR,
        "Address public ports are bound on when a client names none (default :: -- IPv6 and, dual "
        "stack, IPv4; 0.0.0.0 on hosts without IPv6).", "::", field="public_host",
        convert=_public_host, metavar="ADDR",
        doc="address public ports are bound on when a client names none (e.g. a fleet member's own address)",
    ),
    Option(
        "cert", Kind.STR, "PEM certificate to use instead of the generated one (with --key).",
        field="cert", convert=lambda value: Path(value) if value else None, path=True, metavar="FILE",
        doc="your own PEM certificate and key, instead of the generated ones (both or neither)",
    ),
    Option(
        "key", Kind.STR, "PEM private key for --cert.", field="key",
        convert=lambda value: Path(value) if value else None, path=True, metavar="FILE", doc_with="cert",
    ),
    Option(
        "acme-directory", Kind.STR,
        "ACME directory URL certificates for clients' hostnames are ordered from (default: Let's Encrypt "
        "production).", LETS_ENCRYPT, field="acme_directory", convert=_acme_directory, metavar="URL",
        doc="the ACME server that issues certificates for clients' hostnames (see [docs/http.md](docs/http.md#acme))",
    ),
    Option(
        "acme-email", Kind.STR, "Contact address of the ACME account (expiry warnings). Default: none.",
        field="acme_email", convert=_acme_email, metavar="ADDR", doc_default="none",
        doc="the ACME account's contact address: the ACME server writes to it about certificates that expire",
    ),
    Option(
        "acme-ca", Kind.STR,
        "PEM file of the CA that signed a private ACME server's HTTPS certificate (e.g. pebble's).",
        field="acme_ca", convert=lambda value: Path(value) if value else None, path=True, metavar="FILE",
        doc_default="the system's CAs",
        doc="trust a private ACME server: the CA of its directory's HTTPS certificate (not of the certificates "
        "it issues)",
    ),
    Option(
        "allow-ports", Kind.STR, "Ports clients may open, e.g. 4000-4099,8080.", "1024-65535",
        field="allow_ports", convert=parse_port_ranges, metavar="RANGES",
        doc='ports clients may open, e.g. `4000-4099,8080` (port 0, "pick one", is always allowed)',
    ),
    Option(
        "resume-grace", Kind.FLOAT,
        "Seconds a dropped client's session (ports, open connections) is kept for it to resume.", 120.0,
        field="resume_grace", low=0, error=_GRACE, metavar="SECONDS",
        doc="how long a dropped client's session — its ports and open connections — is kept for it to resume",
    ),
    Option(
        "handshake-timeout", Kind.FLOAT, "Seconds a new connection has to complete TLS and authenticate.", 10.0,
        field="handshake_timeout", above=0, error=_GRACE, metavar="SECONDS",
        doc="time a new connection has to complete TLS and authenticate",
    ),
    Option(
        "tls-groups", Kind.STR,
        "Key exchange groups of the control port, ':'-separated, preferred first (default: OpenSSL's, "
        "the post-quantum hybrid X25519MLKEM768 first). X25519 alone saves about 6 KB per session and "
        "gives up the hybrid's protection of recorded traffic.", field="tls_groups",
        convert=lambda value: check_key_exchange_groups(value.strip()) if value and value.strip() else None,
        metavar="LIST", doc_default="OpenSSL's (`X25519MLKEM768` first)",
        doc="key exchange groups of the control port, `:`-separated, preferred first; `X25519` alone saves "
        "about 6 KB per session (see [docs/performance.md](docs/performance.md)) and gives up the "
        "post-quantum hybrid's protection of recorded traffic",
    ),
    PING_INTERVAL,
    replace(
        DEAD_AFTER, help="Seconds of silence after which a client link is declared dead.",
        doc="silence after which a client link is declared dead (must exceed `--ping-interval`)",
    ),
    _at_least_one(
        "max-streams",
        "Maximum open tunnelled connections per session (clients-file clients: their max_streams).",
        _SESSION.max_streams, "session.max_streams",
        "open tunnelled connections per session; visitors beyond it are refused (clients-file clients: "
        "their `max_streams`, this by default)",
    ),
    _at_least_one(
        "max-unauthenticated",
        "Most control connections not yet authenticated at once; at it, the oldest waiting connection of "
        "the address holding the most is dropped for a newcomer (or the newcomer, if its address holds "
        "the most).", 256, "max_unauthenticated",
        "control connections that have not authenticated yet, at once; at it, a newcomer takes the slot "
        "of the oldest waiting connection of the address holding the most (a newcomer from that address "
        "is closed at once)",
    ),
    _at_least_one(
        "max-unauthenticated-per-address",
        "Most control connections not yet authenticated at once from one source address (IPv6: one /64); "
        "beyond it new ones from that address are closed at once.", 32, "max_unauthenticated_per_address",
        "of those, from one source address (IPv6: one /64); beyond it new ones from that address are "
        "closed at once",
    ),
    _at_least_one(
        "auth-failures",
        "Wrong tokens one source address (IPv6: one /64) may send in a burst before it is rate limited.",
        10, "auth_failure_burst",
        "wrong tokens one source address (IPv6: one /64) may send in a burst; after it, its connections "
        "get `too many failed attempts from ADDR; wait N s` and their token is not checked",
    ),
    Option(
        "auth-failure-window", Kind.FLOAT,
        "Seconds after which a rate-limited address may try one more token (default: 10 a minute).", 6.0,
        field="auth_failure_refill", above=0, error="--{name} must be more than 0 seconds", metavar="SECONDS",
        doc="the burst refills by one wrong token every this many seconds (10 a minute)",
    ),
    _at_least_one(
        "max-sessions-per-client", "Most concurrent sessions of one credential (resumes do not count).",
        8, "max_sessions_per_client",
        "concurrent sessions of one credential; more are refused with `limit_exceeded` (resumes do not "
        "count; a detached session of the credential is ended to make room)",
    ),
    _at_least_one(
        "max-tunnels",
        "Most tunnels (bound ports) per session for token credentials (--token, --client); clients-file "
        "clients have their own max_tunnels.", 64, "max_tunnels",
        "tunnels (bound ports) per session for token credentials (`--token`, `--client`); clients-file "
        "clients have their own `max_tunnels` (default 16)",
    ),
    Option(
        "udp-idle-timeout", Kind.FLOAT,
        "Seconds after which a UDP visitor (a flow) that sent nothing, and got nothing, is forgotten.", 60.0,
        field="udp_idle_timeout", above=0, error="--{name} must be more than 0 seconds", metavar="SECONDS",
        doc="a UDP tunnel's flow (one visitor address) with no datagram either way for this long is "
        "forgotten; its next datagram opens a new flow (see [docs/udp.md](docs/udp.md))",
    ),
    _at_least_one(
        "udp-max-flows", "Most flows (visitor addresses) per UDP tunnel; datagrams of more are dropped.",
        4096, "udp_max_flows",
        "flows (visitor addresses) per UDP tunnel at once; datagrams from further visitors are dropped "
        "and counted (`reason=\"flow_limit\"`)",
    ),
    Option(
        "max-frame", Kind.INT,
        "Largest frame the server accepts from a client, in bytes (16384 to 16777216).", _SESSION.max_frame,
        field="session.max_frame", low=MIN_MAX_FRAME, high=MAX_MAX_FRAME, error=OUTSIDE_BYTES,
        metavar="BYTES", doc_default=str(_SESSION.max_frame),
        doc="largest frame the server accepts from a client (16384 to 16777216)",
    ),
    replace(
        SESSION_BUFFER,
        doc="most bytes one session may hold for its client: stream buffers, flow-control windows (512 KiB "
        "reserved per connection, so 192 connections at once at the default), unacknowledged reliable "
        "frames, unread replies (at least 1048576; see [security.md](docs/security.md#memory-per-session))",
    ),
    replace(
        MAX_STREAM_WINDOW,
        doc="largest flow-control window of one tunnelled connection, and so the most bytes buffered for "
        "it (262144 to `--session-buffer`)",
    ),
    _no_limit(
        "bandwidth",
        "Bandwidth limit in bytes per second, each direction, per token credential (--token, --client; "
        "clients-file clients: their 'bandwidth'). 0: no limit.", None,
        "bandwidth limit per token credential (`--token`, `--client`), bytes per second in each direction; "
        "clients-file clients: their `bandwidth` (see [docs/security.md](docs/security.md), "
        '"Per-client limits")',
    ),
    _no_limit(
        "bandwidth-to-client",
        "Like --bandwidth, only for bytes towards the client's service (what visitors send). 0: --bandwidth.",
        "limits.to_client",
        "the same, only for bytes towards the client's service (what visitors send)", fallback="bandwidth",
    ),
    _no_limit(
        "bandwidth-from-client",
        "Like --bandwidth, only for bytes from the client's service (what visitors receive). 0: --bandwidth.",
        "limits.from_client",
        "the same, only for bytes from the client's service (what visitors receive)", fallback="bandwidth",
    ),
    _no_limit(
        "max-connections-per-tunnel",
        "Most visitor connections open at once on one tunnel of a token credential (clients-file clients: "
        "their max_connections_per_tunnel); beyond it a visitor is closed at once. 0: no limit.",
        "limits.max_connections_per_tunnel",
        "visitors connected at once on one tunnel of a token credential; one more is closed at once and "
        "counted (clients-file clients: their `max_connections_per_tunnel`)",
    ),
    Option(
        "http", Kind.STR,
        "Serve HTTP for clients' hostnames on this Twisted server endpoint (a bare port: every address), "
        "e.g. tcp:80. Off by default.", field="http.http", convert=_endpoint, metavar="ENDPOINT",
        doc_default="off",
        doc=f"serve HTTP for clients' hostnames here, routed by Host: a port or a Twisted server endpoint; {_HTTP}",
    ),
    Option(
        "https", Kind.STR,
        "Serve HTTPS for clients' hostnames on this Twisted server endpoint (TLS terminated with "
        "--https-cert, or passed through by SNI to --tls tunnels), e.g. tcp:443. Off by default.",
        field="http.https", convert=_endpoint, metavar="ENDPOINT", doc_default="off",
        doc="serve HTTPS for clients' hostnames here: TLS terminated (chosen by SNI) or passed through to "
        "`--tls` tunnels",
    ),
    Option(
        "domain", Kind.STR, "Token credentials may claim NAME.DOMAIN hostnames (client --http NAME).",
        field="http.domain", convert=_domain, metavar="DOMAIN", doc_default="none",
        doc="token credentials may claim `NAME.DOMAIN` (client `--http NAME`); clients-file clients their `hosts`",
    ),
    Option(
        "https-cert", Kind.STR, "PEM certificate (chain) for --https, e.g. a wildcard for *.DOMAIN (with --https-key).",
        field="http.https_cert", path=True, metavar="FILE",
        doc="PEM certificate chain and key the HTTPS port serves for the names it covers (e.g. `*.DOMAIN`)",
    ),
    Option(
        "https-key", Kind.STR, "PEM private key for --https-cert.", field="http.https_key", path=True,
        metavar="FILE", doc_with="https-cert",
    ),
    Option(
        "trusted-proxies", Kind.STR,
        "CIDR blocks of proxies in front of the HTTP ports whose X-Forwarded-For/Forwarded are kept "
        "(others' are dropped).", "", field="http.trusted_proxies", convert=parse_networks, metavar="CIDRS",
        doc_default="none",
        doc="proxies in front of the shared ports (e.g. `10.0.0.0/8,::1`) whose `X-Forwarded-*` and "
        "`Forwarded` headers are kept; everyone else's are dropped",
    ),
    Option(
        "max-request-head", Kind.INT, "Largest request line and headers, in bytes (431 beyond).", 16384,
        field="http.max_request_head", low=1024, high=1048576, error=_HEAD, metavar="BYTES",
        doc="largest request line plus headers on the shared ports; larger ones get 431",
    ),
    Option(
        "request-head-timeout", Kind.FLOAT, "Seconds a request head may take to arrive (408 after).", 10.0,
        field="http.request_head_timeout", above=0, error="--{name} must be more than 0 seconds",
        metavar="SECONDS", doc="time a request's head may take to arrive on the shared ports (slowloris); 408 after",
    ),
    Option(
        "offline-wait", Kind.FLOAT,
        "Seconds a request for a tunnel whose client is reconnecting waits for it (502 after).", 10.0,
        field="http.offline_wait", low=0, error=NOT_NEGATIVE, metavar="SECONDS",
        doc="how long a request waits for a tunnel whose client is reconnecting; then 502 \"tunnel offline\"",
    ),
    Option(
        "access-log", Kind.STR, "Append one line per HTTP request to this file.", field="http.access_log",
        path=True, metavar="FILE", doc_default="off",
        doc="one line per request on the shared ports, in `--access-log-format`",
    ),
    Option(
        "access-log-format", Kind.STR, "combined (Apache/nginx) or json.", "combined",
        field="http.access_log_format", choices=("combined", "json"), metavar="FORMAT",
        doc="`combined` (the Apache/nginx format, with the hostname last) or `json`",
    ),
    Option(
        "no-https-redirect", Kind.FLAG,
        "Serve plain HTTP on --http even for names that have a certificate (no redirect to https).",
        field="http.redirect_https", convert=lambda value: not value,
        doc="serve plain HTTP on `--http` even for names with a certificate (by default they get a 308 to https)",
    ),
    Option(
        "admin", Kind.STR,
        "Serve the status page and admin API here: a port (on 127.0.0.1) or a Twisted server endpoint "
        "string; its token is the state dir's 'admin-token' (see docs/admin.md). Off by default.",
        field="admin", convert=lambda value: None if value is None else local_endpoint(value, "--admin", 9119),
        metavar="ENDPOINT", doc_default="off",
        doc="serve the status page and admin API: a port (on 127.0.0.1) or a Twisted server endpoint "
        "string; every request needs the state dir's `admin-token` (see [docs/admin.md](docs/admin.md))",
    ),
    replace(
        METRICS,
        help="Serve Prometheus metrics at /metrics on this Twisted server endpoint (e.g. "
        "tcp:9120:interface=0.0.0.0; a bare port means 127.0.0.1). Off by default.",
        convert=lambda value: local_endpoint(value, "--metrics", 9120) if value else None,
        doc="serve Prometheus metrics at `/metrics`: a port (on 127.0.0.1) or a Twisted server endpoint "
        "string, e.g. `tcp:9120:interface=0.0.0.0` (see [docs/metrics.md](docs/metrics.md))",
    ),
    Option(
        "fleet-cert", Kind.STR,
        "This fleet member's certificate for member links (from 'rtunnel_server fleet-add-member'; with "
        "--fleet-key and --fleet-ca). Default: STATE_DIR/MEMBER.crt, MEMBER.key and fleet-ca.crt.",
        field="fleet_cert", convert=lambda value: _user_path(value) if value else None, path=True, metavar="FILE",
        doc_default="`<state dir>/<member>.crt`",
        doc="a fleet member's certificate, key and fleet CA for member links (from `rtunnel_server "
        "fleet-add-member`; see [docs/fleet.md](docs/fleet.md), \"Member certificates\")",
    ),
    Option(
        "fleet-key", Kind.STR, "Private key of --fleet-cert.", field="fleet_key",
        convert=lambda value: _user_path(value) if value else None, path=True, metavar="FILE", doc_with="fleet-cert",
    ),
    Option(
        "fleet-ca", Kind.STR, "The fleet CA certificate member links trust (and nothing else).", field="fleet_ca",
        convert=lambda value: _user_path(value) if value else None, path=True, metavar="FILE", doc_with="fleet-cert",
    ),
    replace(
        LOG_FORMAT,
        doc="`json`: one JSON object a line, each event with a stable `event` name and its fields "
        "(docs/operations.md); console script only, with `twistd` use `--logger rtunnel.logs.json_observer`",
    ),
    Option(
        "fleet-etcd", Kind.STR,
        "Join a fleet coordinated by this etcd cluster: its client URLs, comma-separated "
        "(e.g. http://127.0.0.1:2379). Off by default: one server, no etcd.",
        field="fleet_etcd", convert=_etcd_urls, metavar="URLS", doc_default="off",
        doc="join a fleet: the etcd cluster's client URLs, comma-separated (see [docs/fleet.md](docs/fleet.md)); "
        "without it the server is alone and needs no etcd",
    ),
    Option(
        "fleet-etcd-ca", Kind.STR,
        "The CA certificate etcd's https:// client URLs are checked against (default: the system's CAs).",
        field="fleet_etcd_ca", convert=lambda value: _user_path(value) if value else None, path=True, metavar="FILE",
        doc_default="the system's CAs",
        doc="etcd over TLS: the CA of etcd's server certificate, and the client certificate and key etcd asks "
        "for with `--client-cert-auth` (see [docs/fleet.md](docs/fleet.md), \"etcd over TLS\")",
    ),
    Option(
        "fleet-etcd-cert", Kind.STR, "Client certificate (PEM) this member presents to etcd (with --fleet-etcd-key).",
        field="fleet_etcd_cert", convert=lambda value: _user_path(value) if value else None, path=True,
        metavar="FILE", doc_with="fleet-etcd-ca",
    ),
    Option(
        "fleet-etcd-key", Kind.STR, "Private key (PEM) of --fleet-etcd-cert.", field="fleet_etcd_key",
        convert=lambda value: _user_path(value) if value else None, path=True, metavar="FILE",
        doc_with="fleet-etcd-ca",
    ),
    Option(
        "fleet-member", Kind.STR, "This member's name in the fleet (default: the host name).", "",
        field="fleet_member", convert=_member_name, metavar="NAME", doc_default="the host name",
        doc="this member's name in the fleet, unique in it",
    ),
    Option(
        "fleet-listen", Kind.STR,
        "Twisted server endpoint string of this member's member link (e.g. tcp:19060:interface=127.0.0.2).",
        field="fleet_listen", metavar="ENDPOINT", doc_default="none",
        doc="Twisted server endpoint string where this member's member link listens (other members "
        "carry visitors to it there)",
    ),
    Option(
        "fleet-prefix", Kind.STR, "etcd key prefix of the fleet.", "/rtunnel/", field="fleet_prefix",
        convert=_fleet_prefix, metavar="PREFIX", doc="etcd key prefix under which the fleet keeps its keys",
    ),
    Option(
        "fleet-lease-ttl", Kind.INT,
        "Seconds a member's lease (and its claims) outlives its last keepalive; it is fenced after 2/3 of it.",
        5, field="fleet_lease_ttl", low=2, high=3600, error="--{name} must be {low}-{high} seconds",
        metavar="SECONDS",
        doc="seconds a dead member's claims outlive it (its etcd lease TTL); a member cut off from etcd "
        "is fenced after 2/3 of it",
    ),
    Option(
        "fleet-drain-timeout", Kind.FLOAT,
        "Seconds a drained member (SIGUSR2, POST /api/fleet/drain) waits for its clients to move before it stops.",
        300.0, field="fleet_drain_timeout", low=1.0, high=86400.0, error="--{name} must be {low:g}-{high:g} seconds",
        metavar="SECONDS",
        doc="seconds a drained member waits for its clients' open connections to finish elsewhere before it "
        "stops anyway (see [docs/fleet.md](docs/fleet.md), \"Draining a member\")",
    ),
    Option(
        "workers", Kind.INT,
        "Run N server processes (fleet members NAME-1..NAME-N) sharing the control port, one per "
        "core; needs --fleet-etcd. Default 1: one process.",
        1, field="workers", low=1, high=256, error="--{name} must be {low}-{high}", metavar="N",
        doc="run N worker processes sharing the control port (SO_REUSEPORT), each a fleet member "
        "`NAME-1`..`NAME-N`; needs `--fleet-etcd` (see [docs/fleet.md](docs/fleet.md), \"Every core\")",
    ),
], groups={"keepalive": Keepalive, "session": SessionSettings, "limits": Limits, "http": HttpSettings})
