"""`twistd rtunnel-server`: options and the server service."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from rtunnel import DEFAULT_CONTROL_PORT
from rtunnel.config import ServerConfig, parse_port_ranges
from rtunnel.errors import RtunnelError
from rtunnel.mux import SessionSettings
from rtunnel.server import TunnelServer
from rtunnel.tap import exit_process, keepalive_from
from rtunnel.tls import format_fingerprint, load_or_create_token, load_server_identity, server_context

DEFAULT_STATE_DIR = "~/.local/state/rtunnel"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Accept rtunnel clients on the control port and open the public ports they "
        "ask for. On first start it creates a key, a self-signed certificate and a "
        "token in the state directory and prints the client command to run."
    )
    optParameters = [
        ["port", "p", DEFAULT_CONTROL_PORT, "Control port.", int],
        ["interface", "i", "", "Address to listen on for clients (default: all IPv4 addresses)."],
        ["listen", "l", None, "Twisted server endpoint string for the control port; overrides --port/--interface (e.g. tcp:19050:interface=::, systemd:domain=INET:index=0)."],
        ["state-dir", "s", DEFAULT_STATE_DIR, "Directory for the key, certificate and token."],
        ["token", None, None, "Shared secret clients must present (default: $RTUNNEL_TOKEN, else the state dir's 'token' file, made on first start)."],
        ["cert", None, None, "PEM certificate to use instead of the generated one (with --key)."],
        ["key", None, None, "PEM private key for --cert."],
        ["allow-ports", None, "1024-65535", "Ports clients may open, e.g. 4000-4099,8080."],
        ["resume-grace", None, 120.0, "Seconds a dropped client's session (ports, open connections) is kept for it to resume.", float],
        ["handshake-timeout", None, 10.0, "Seconds a new connection has to complete TLS and authenticate.", float],
        ["ping-interval", None, 10.0, "Seconds between keepalive pings.", float],
        ["dead-after", None, 30.0, "Seconds of silence after which a client link is declared dead.", float],
        ["max-streams", None, 4096, "Maximum open tunnelled connections per session.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.extra_clients: list[tuple[str, str]] = []

    def opt_client(self, value: str) -> None:
        """NAME=TOKEN: another client credential with its own token (repeatable).
        Ports belong to the credential that bound them."""
        name, sep, token = value.partition("=")
        if not sep or not name or not token or name == "default":
            raise usage.UsageError(f"--client {value!r}: expected NAME=TOKEN (NAME not 'default')")
        self.extra_clients.append((name, token))

    def postOptions(self) -> None:
        if not 0 < self["port"] < 65536:
            raise usage.UsageError(f"--port {self['port']} is not a port number (1-65535)")
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key go together: give both or neither")
        if self["resume-grace"] < 0 or self["handshake-timeout"] <= 0:
            raise usage.UsageError("--resume-grace must be >= 0 and --handshake-timeout > 0")
        if self["max-streams"] < 1:
            raise usage.UsageError("--max-streams must be at least 1")
        try:
            allow = parse_port_ranges(self["allow-ports"])
        except RtunnelError as e:
            raise usage.UsageError(str(e)) from None
        listen = self["listen"]
        if listen is None:
            iface = self["interface"].replace(":", r"\:")
            listen = f"tcp:{self['port']}" + (f":interface={iface}" if iface else "")
        token = self["token"] or os.environ.get("RTUNNEL_TOKEN") or None
        self.config = ServerConfig(
            listen=listen,
            state_dir=Path(os.path.expanduser(self["state-dir"])),
            token=token,
            extra_clients=tuple(self.extra_clients),
            cert=Path(self["cert"]) if self["cert"] else None,
            key=Path(self["key"]) if self["key"] else None,
            allow_ports=allow,
            resume_grace=self["resume-grace"],
            handshake_timeout=self["handshake-timeout"],
            keepalive=keepalive_from(self),
            session=SessionSettings(max_streams=self["max-streams"]),
        )


class ServerService(service.Service):
    """Loads key material, listens on the control port, runs TunnelServer."""

    log = Logger()

    def __init__(self, config: ServerConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.server: TunnelServer | None = None
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = defer.maybeDeferred(self._start)
        d.addCallbacks(self.ready.callback, self._failed)

    def _failed(self, failure: Any) -> None:
        if failure.check(RtunnelError):
            self.log.critical("cannot start: {why}", why=failure.getErrorMessage())
        elif failure.check(Exception):
            self.log.critical(
                "cannot listen on {listen}: {why}. Choose another --port/--listen or stop the "
                "program using it.",
                listen=self.config.listen,
                why=failure.getErrorMessage(),
            )
        self.ready.errback(failure)
        exit_process(self.reactor, 1)

    @defer.inlineCallbacks
    def _start(self) -> Any:
        config = self.config
        identity = load_server_identity(config.state_dir, config.cert, config.key)
        if config.token:
            token, token_created = config.token, False
        else:
            token, token_created = load_or_create_token(config.state_dir)
        self.server = TunnelServer(self.reactor, config, token)
        endpoint = serverFromString(self.reactor, config.listen)
        factory = TLSMemoryBIOFactory(server_context(identity), False, self.server.link_factory())
        self.port = yield endpoint.listen(factory)
        address = self.port.getHost()
        host = socket.getfqdn()
        if token_created:
            token_arg = token
        elif config.token:
            token_arg = "$RTUNNEL_TOKEN"
        else:
            token_arg = f"$(cat {config.state_dir / 'token'})"
        self.log.info(
            "rtunnel server listening on {listen} (port {port}); certificate fingerprint "
            "{fp}{created}\n  Run on the client machine:\n"
            "    rtunnel_client -c {host}:{port} -f 4000 -t 3000 --token {token} --fingerprint {fp}",
            listen=config.listen,
            port=getattr(address, "port", DEFAULT_CONTROL_PORT),
            fp=format_fingerprint(identity.fingerprint),
            created=f" (new key and certificate in {config.state_dir})" if identity.created else "",
            host=host,
            token=token_arg,
        )
        return self.port

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        waits = []
        if self.port is not None:
            waits.append(defer.maybeDeferred(self.port.stopListening))
        if self.server is not None:
            waits.append(self.server.shutdown())
        return defer.gatherResults(waits).addCallback(lambda _: None)


def makeService(options: Options) -> service.IService:
    return ServerService(options.config)
