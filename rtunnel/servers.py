"""The client's servers: several `-c` addresses (members of one fleet),
tried in order, and a MOVED hint followed first (docs/fleet.md "Clients and
resume").

One `connect()` of ServerListEndpoint is one *round*: it tries each server
in order and fails only when every one failed (then the client's back-off
runs, as with one server). Each server's name goes to HostnameEndpoint,
which tries every address the name resolves to (happy eyeballs: the next
address 0.3 s after the previous one, or at once when it failed). A MOVED
hint (the member holding the session) is tried first in the next round,
once, with the TLS trust of the server that gave it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.addresses import format_host_port
from rtunnel.config import parse_host_port
from rtunnel.errors import ConfigError
from rtunnel.tlslink import LinkTLSEndpoint

Server = tuple[str, int]


def parse_servers(values: Sequence[str], default_port: int, what: str = "-c/--connect") -> tuple[Server, ...]:
    """Every `HOST[:PORT]` of `values`, each of which may hold several
    separated by commas (`a:19050,b:19050`), in order, duplicates dropped.
    Raises ConfigError naming the bad one."""
    servers: list[Server] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                raise ConfigError(f"{what} {value!r}: an empty server between commas; write HOST[:PORT],HOST[:PORT]")
            host, port = parse_host_port(part, what, None, default_port)
            if not host:
                raise ConfigError(f"{what} {part.strip()!r}: give the server's HOST[:PORT], not just a port")
            if (host, port) not in servers:
                servers.append((host, port))
    return tuple(servers)


@implementer(IStreamClientEndpoint)
class ServerListEndpoint:
    """Connects to the first of `servers` that answers (see the module).

    `creator_for(host, port)` gives the TLS connection creator of a server;
    `on_attempt(host, port, creator)` is told which server an attempt goes
    to (the client explains a failed TLS handshake with that creator)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[Server],
        creator_for: Callable[[str, int], Any],
        on_attempt: Callable[[str, int, Any], None] | None = None,
        timeout: float = 10,
    ) -> None:
        if not servers:
            raise ValueError("no servers")
        self.reactor = reactor
        self.servers = tuple(servers)
        self.timeout = timeout
        self._creators = {server: creator_for(*server) for server in self.servers}
        self.on_attempt = on_attempt
        self._moved: tuple[str, int, Any] | None = None  # the next round's first server (a MOVED hint)
        self.current: Server | None = None  # the server of the attempt in progress or the link up
        self.current_is_hint = False

    def move_to(self, host: str, port: int, via: Server | None) -> None:
        """Try `host:port` first in the next round, with `via`'s TLS trust
        (the member that sent the hint: a fleet shares one server identity)."""
        creator = self._creators.get(via) if via is not None else None
        self._moved = (host, port, creator if creator is not None else self._creators[self.servers[0]])

    @property
    def has_hint(self) -> bool:
        return self._moved is not None

    def _attempts(self) -> list[tuple[str, int, Any, bool]]:
        attempts = [(host, port, self._creators[host, port], False) for host, port in self.servers]
        if self._moved is not None:
            host, port, creator = self._moved
            self._moved = None  # followed once: a hint that fails is not tried again
            attempts.insert(0, (host, port, creator, True))
        return attempts

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        attempts = self._attempts()
        failures: list[str] = []
        pending: defer.Deferred[Any] | None = None
        cancelled = False

        def cancel(_: defer.Deferred[Any]) -> None:
            nonlocal cancelled
            cancelled = True  # first: the attempt's errback (ConnectingCancelledError) must not start the next
            if pending is not None:
                pending.cancel()

        result: defer.Deferred[Any] = defer.Deferred(cancel)

        def next_attempt() -> None:
            nonlocal pending
            if not attempts:
                pending = None
                result.errback(ConnectionError("; ".join(failures)))
                return
            host, port, creator, hint = attempts.pop(0)
            self.current, self.current_is_hint = (host, port), hint
            if self.on_attempt is not None:
                self.on_attempt(host, port, creator)
            endpoint = LinkTLSEndpoint(
                creator, HostnameEndpoint(self.reactor, host, port, timeout=self.timeout), self.reactor
            )
            pending = endpoint.connect(factory)
            pending.addCallbacks(connected, failed, errbackArgs=(host, port))

        def connected(protocol: Any) -> None:
            if result.called:  # cancelled meanwhile (the service stopped): nobody wants this link
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abortConnection()
                return
            result.callback(protocol)

        def failed(failure: Failure, host: str, port: int) -> None:
            if cancelled or result.called:
                return
            where = format_host_port(host, port)
            failures.append(f"{where}: {failure.getErrorMessage()}")
            if attempts:
                self.log.info(
                    "cannot reach the rtunnel server at {where}: {why}; trying the next one",
                    where=where, why=failure.getErrorMessage(), event="server_unreachable",
                    server=where, reason=failure.getErrorMessage(),
                )
            next_attempt()

        next_attempt()
        return result

    def __repr__(self) -> str:
        return ",".join(format_host_port(*s) for s in self.servers)
