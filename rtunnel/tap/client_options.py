"""The client's option table: every `rtunnel_client` option (and config-file
key), declared once (see rtunnel.tap.options for what each entry gives)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rtunnel import proxyproto
from rtunnel.config import Keepalive
from rtunnel.endpoints import local_endpoint
from rtunnel.mux import SessionSettings
from rtunnel.tap.options import (
    CONFIG,
    DEAD_AFTER,
    LOG_FORMAT,
    MAX_STREAM_WINDOW,
    METRICS,
    PING_INTERVAL,
    SESSION_BUFFER,
    Kind,
    Option,
    OptionTable,
)
from rtunnel.tls import DEFAULT_KNOWN_SERVERS, parse_fingerprint

CLIENT_OPTIONS = OptionTable("client", [
    replace(
        CONFIG,
        doc="TOML file with the server, credentials, trust settings, other options and `[[tunnel]]` tables; "
        "flags override it, `-f`/`-t` add tunnels; SIGHUP re-reads its tunnels; see "
        "[docs/configuration.md](docs/configuration.md)",
    ),
    Option(
        "connect", Kind.REPEAT,
        "Server control address HOST[:PORT] (default port 19050); several (a,b or repeated -c) are tried in order.",
        short="c", key="server", field="server_host", computed=True, metavar="HOST[:PORT]",
        doc_default="(required)",
        doc="the server's control address; port 19050 by default; several servers of one fleet "
        "(`-c a,b` or `-c a -c b`) are tried in order (docs/fleet.md)",
        file_default="(required, here or `-c`)",
        file_doc="the server's control address `HOST[:PORT]`, port 19050 by default (`-c`/`--connect`); "
        'an array (`server = ["a:19050", "b:19050"]`) for several members of a fleet, tried in order',
    ),
    Option(
        "forward", Kind.COMMAND,
        "[BIND:]PORT to open on the server (repeatable; 0 = server picks; udp:[BIND:]PORT for UDP).",
        short="f", key=None, reload=True, field="tunnels", computed=True, metavar="[BIND:]PORT",
        doc_default="(required)",
        doc="port to open on the server; 0 = the server picks; `udp:PORT` a UDP port; repeatable",
    ),
    Option(
        "http", Kind.COMMAND,
        "NAME or HOSTNAME to serve over the server's HTTP(S) ports (NAME: NAME.DOMAIN of the server's "
        "--domain); pairs with the next -t, like -f (repeatable).",
        key=None, reload=True, field="tunnels", computed=True, metavar="NAME_OR_HOSTNAME",
        doc_default="none",
        doc="a hostname (or a label of the server's `--domain`) routed by the server's `--http`/`--https` "
        "ports to the next `-t`; repeatable (see [docs/http.md](docs/http.md))",
    ),
    Option(
        "tls", Kind.COMMAND,
        "HOSTNAME whose TLS connections the server's --https port passes through, undecrypted, to the "
        "next -t (the local service terminates TLS; repeatable).",
        key=None, reload=True, field="tunnels", computed=True, metavar="HOSTNAME", doc_default="none",
        doc="a hostname whose TLS connections the server's `--https` port passes through by SNI, "
        "undecrypted, to the next `-t` (the local service holds the certificate); repeatable",
    ),
    Option(
        "to", Kind.COMMAND, "[HOST:]PORT of the local target for the preceding -f (repeatable).",
        short="t", key=None, reload=True, field="tunnels", computed=True, metavar="[HOST:]PORT",
        doc_default="(required)",
        doc="local target for the preceding `-f`; host `localhost` by default; repeatable",
    ),
    Option(
        "token", Kind.STR, "Token from the server (default: $RTUNNEL_TOKEN; optional with --client-cert).",
        field="token", computed=True, metavar="TOKEN", doc_default="`$RTUNNEL_TOKEN`",
        doc="the server's token (optional with `--client-cert`)", file_doc="the server's token (`--token`)",
    ),
    Option(
        "token-file", Kind.STR, "File holding the token (instead of --token; '~' is expanded).",
        field="token", computed=True, path=True, metavar="FILE",
        doc="a file holding the token (`~` expanded; must exist and not be empty); instead of `--token`",
        file_doc="a file holding the token (`--token-file`): `~` is expanded; the file must exist and hold "
        "the token (surrounding whitespace and the final newline are ignored)",
    ),
    Option(
        "client-cert", Kind.STR,
        "PEM TLS client certificate to present (with --client-key); the server's clients file lists its "
        "SHA-256 as cert_sha256.", path=True, metavar="FILE",
        doc="PEM TLS client certificate and its key to present (both or neither); the server's clients "
        "file lists its SHA-256 as `cert_sha256`",
        file_doc="PEM TLS client certificate and key (both or neither)",
    ),
    Option(
        "client-key", Kind.STR, "PEM private key of --client-cert (unencrypted).", path=True, metavar="FILE",
        doc_with="client-cert",
    ),
    Option(
        "fingerprint", Kind.STR, "SHA-256 fingerprint of the server's certificate (printed by the server).",
        field="fingerprint", convert=lambda value: parse_fingerprint(value) if value else None, metavar="FP",
        doc="SHA-256 fingerprint of the server's certificate",
        file_doc="SHA-256 fingerprint of the server's certificate (`--fingerprint`)",
    ),
    Option(
        "ca", Kind.STR,
        "PEM CA file: verify the server's certificate and host name against it instead of a fingerprint.",
        field="ca_file", convert=lambda value: Path(value) if value else None, path=True, metavar="FILE",
        doc="PEM CA file: check the server's certificate and host name against it instead of a fingerprint",
        file_doc="PEM CA file to check the server's certificate against (`--ca`)",
    ),
    Option(
        "trust-on-first-use", Kind.FLAG,
        "Instead of --fingerprint/--ca: trust the server's certificate on the first connection, store its "
        "fingerprint in --known-servers and pin it from then on (like ssh's known_hosts).",
        doc="instead of `--fingerprint`/`--ca`: trust the certificate seen on the first connection to "
        "`HOST:PORT`, record it in the known-servers file and pin it from then on",
        file_doc="trust and record the certificate seen first (`--trust-on-first-use`)",
    ),
    Option(
        "known-servers", Kind.STR,
        f"With --trust-on-first-use: the file of known servers' fingerprints (default {DEFAULT_KNOWN_SERVERS}).",
        path=True, metavar="FILE", doc_default=f"`{DEFAULT_KNOWN_SERVERS}`", file_default=f"`{DEFAULT_KNOWN_SERVERS}`",
        doc="with `--trust-on-first-use`: the file of known servers, one `HOST:PORT sha256:HEX` line each",
        file_doc="the known-servers file, with `trust_on_first_use`",
    ),
    Option(
        "max-retry-delay", Kind.FLOAT, "Longest wait between reconnection attempts, in seconds.", 30.0,
        field="max_retry_delay", low=0.5, error="--{name} must be at least {low} seconds", metavar="SECONDS",
        doc="longest wait between reconnection attempts (at least 0.5; the ±20% jitter stays at or below it)",
        file_doc="longest wait between reconnection attempts, seconds (at least 0.5)",
    ),
    PING_INTERVAL,
    replace(
        DEAD_AFTER,
        doc="silence after which the link is declared dead (must exceed `--ping-interval`)",
        file_doc="silence after which the link is dead, seconds (more than `ping_interval`)",
    ),
    Option(
        "connect-timeout", Kind.FLOAT, "Seconds to wait for a local target to accept.", 10.0,
        field="connect_timeout", metavar="SECONDS", doc="time to wait for a local target to accept a connection",
        file_doc="time a local target has to accept, seconds",
    ),
    Option(
        "proxy-protocol", Kind.STR,
        "Send a PROXY protocol header (v1 text or v2 binary) with the visitor's address and port to the "
        "targets of the -f/-t tunnels: off, v1 or v2 (the target must expect it; in a config file, each "
        "[[tunnel]] has its own proxy_protocol).", proxyproto.OFF, key=None, reload=True, field="tunnels",
        computed=True, choices=tuple(proxyproto.VERSIONS), error="--{name} {value}: write off, v1 or v2",
        metavar="off|v1|v2",
        doc="start each connection to the targets of the command line's `-f`/`-t` tunnels with a PROXY "
        "protocol header (v1 text, v2 binary) carrying the visitor's address and port, for services that "
        "expect it (nginx `listen … proxy_protocol`, HAProxy `accept-proxy`); in a config file set "
        "`proxy_protocol` in each `[[tunnel]]`. See [docs/protocol.md](docs/protocol.md#proxy-protocol)",
    ),
    Option(
        "udp-idle-timeout", Kind.FLOAT,
        "Seconds after which a UDP flow (one visitor) with no datagram either way has its local socket "
        "closed.", 60.0, field="udp_idle_timeout", above=0, error="--{name} must be more than 0 seconds",
        metavar="SECONDS",
        doc="a UDP tunnel's flow (one visitor address, one local socket to the target) with no datagram "
        "either way for this long is closed (see [docs/udp.md](docs/udp.md))",
        file_doc="seconds after which an idle UDP flow's local socket is closed (`--udp-idle-timeout`)",
    ),
    Option(
        "max-retries", Kind.INT,
        "Give up and exit with status 3 after this many failed connection attempts in a row (default: never "
        "give up; for supervisors that restart the client).", field="max_retries", low=1,
        error="--{name} must be at least {low} (leave it out to retry for ever)", metavar="N",
        doc_default="never give up", file_default="(never give up)",
        doc="exit with status 3 after N connection attempts in a row that made no session (for supervisors "
        "that restart the client); a session resets the count",
        file_doc="exit with status 3 after this many connection attempts in a row that made no session "
        "(`--max-retries`; docs/operations.md)",
    ),
    replace(
        SESSION_BUFFER,
        doc="most bytes this client's session may hold for the server: stream buffers, flow-control "
        "windows (512 KiB reserved per connection), unacknowledged reliable frames, unread replies (at "
        "least 1048576)",
        file_doc="most bytes the session may have buffered across its streams' flow-control windows (at "
        "least 1048576)",
    ),
    replace(
        MAX_STREAM_WINDOW,
        doc="largest flow-control window of one tunnelled connection (262144 to `--session-buffer`); a "
        "stream over a path of bandwidth B and round trip T needs B×T",
        file_doc="largest flow-control window of one tunnelled connection, bytes (262144 to `session_buffer`)",
    ),
    replace(
        METRICS,
        help="Serve Prometheus metrics at /metrics on this Twisted server endpoint (e.g. "
        "tcp:9121:interface=0.0.0.0; a bare port means 127.0.0.1). Off by default.",
        convert=lambda value: local_endpoint(value, "--metrics", 9120) if value else None,
        doc="serve Prometheus metrics at `/metrics`: a port (on 127.0.0.1) or a Twisted server endpoint "
        "string (see [docs/metrics.md](docs/metrics.md))",
        file_doc='serve Prometheus metrics (`--metrics`): `"9121"` (a port on 127.0.0.1; a string, in '
        "quotes) or a Twisted server endpoint string (docs/metrics.md)",
    ),
    replace(LOG_FORMAT, doc="as for the server"),
    Option(
        "tunnel", Kind.TABLES, "", reload=True, field="tunnels", computed=True,
        file_default="(at least one, here or `-f`/`-t`)", file_doc="one table per tunnel, below",
    ),
], groups={"keepalive": Keepalive, "session": SessionSettings})
