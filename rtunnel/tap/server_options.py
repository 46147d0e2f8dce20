"""The server's option table: every `rtunnel_server` option, declared once
(see rtunnel.tap.options for what each entry gives)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from rtunnel import DEFAULT_CONTROL_PORT, wire
from rtunnel.config import Keepalive, check_ip, parse_port_ranges
from rtunnel.endpoints import local_endpoint
from rtunnel.errors import ConfigError
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
    replace(
        LOG_FORMAT,
        doc="`json`: one JSON object a line, each event with a stable `event` name and its fields "
        "(docs/operations.md); console script only, with `twistd` use `--logger rtunnel.logs.json_observer`",
    ),
], groups={"keepalive": Keepalive, "session": SessionSettings, "limits": Limits})
