"""The --https port: read each connection's ClientHello server name (SNI,
rtunnel.server.sni), then either pass the raw bytes to a "tls" tunnel of
that name, or terminate TLS with the name's certificate and serve the
HTTP edge (rtunnel.server.httpedge) over it; with neither, answer an
unrecognized_name alert (never another tenant's certificate)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.interfaces import IHalfCloseableProtocol, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.addresses import host_port
from rtunnel.httpconfig import host_of
from rtunnel.localsocket import StreamProtocol
from rtunnel.server.sni import UNRECOGNIZED_NAME_ALERT, NotClientHello, parse_client_hello
from rtunnel.transports import set_nodelay, write_now
from rtunnel.twisted_private import TLSProtocolBase

if TYPE_CHECKING:
    from rtunnel.server.hostnames import HostTunnel
    from rtunnel.server.httpedge import HttpEdge


@implementer(IOpenSSLServerConnectionCreator)
class _ServerConnections:
    """Server-side TLS connections of one (shared) context, as TLSMemoryBIOFactory
    takes them: no per-connection conversion of an old-style context factory."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.context, None)


class EdgeTLSProtocol(TLSProtocolBase):
    """A terminated visitor connection's TLS: Twisted's, but its ciphertext
    (the handshake flight, the responses, the close_notify) is sent at once
    when the socket has nothing queued, as the link's TLS does, not a
    reactor turn later with an epoll_ctl each way."""

    def tls_send_ciphertext(self, data: bytes) -> None:
        write_now(self.transport, data)


class EdgeTLSFactory(TLSMemoryBIOFactory):
    protocol = EdgeTLSProtocol


class TerminatedFactories:
    """The TLS factory for each server name the port terminates, built once
    per name and context (a renewed certificate's new context gets a new
    one), not per connection; at most MAX entries (then it starts over)."""

    MAX = 1024

    def __init__(self, terminated: Callable[[str], Factory]) -> None:
        self.terminated = terminated
        self.factories: dict[str, tuple[SSL.Context, EdgeTLSFactory]] = {}

    def factory(self, name: str, context: SSL.Context) -> EdgeTLSFactory:
        known = self.factories.get(name)
        if known is not None and known[0] is context:
            return known[1]
        if len(self.factories) >= self.MAX:
            self.factories.clear()
        factory = EdgeTLSFactory(_ServerConnections(context), False, self.terminated(name))
        self.factories[name] = (context, factory)
        return factory


@implementer(IHalfCloseableProtocol)
class SniRouter(Protocol):
    """A connection on the --https port: read its ClientHello's SNI
    (bounded in size and time), then pass the raw bytes to a "tls" tunnel of
    that name, or terminate TLS with the name's certificate and serve HTTP;
    with neither, answer an unrecognized_name alert."""

    log = Logger()

    def __init__(self, edge: HttpEdge, terminated: TerminatedFactories) -> None:
        self.edge = edge
        self.terminated = terminated
        self.buffer = b""
        self.inner: Protocol | None = None
        self.deadline: float | None = None  # the ClientHello's (the edge's Deadlines)
        self.deadline_watched = False

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.deadline = self.edge.reactor.seconds() + self.edge.settings.request_head_timeout
        self.edge.deadlines.watch(self)

    def deadline_passed(self) -> None:
        self.deadline = None
        if self.inner is None:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        try:
            hello = parse_client_hello(self.buffer)
        except NotClientHello as e:
            self.log.debug("not TLS on the https port: {why}", why=str(e), event="https_refused")
            self._stop_timer()
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if hello is None:
            return
        self._stop_timer()
        name = host_of(hello.server_name) if hello.server_name else None
        tunnel = self.edge.route(name)
        if name is not None and tunnel is not None and tunnel.kind == "tls":
            self._pass_through(tunnel)
            return
        certificates = self.edge.certificates
        context = certificates.context_for(name) if certificates is not None and name else None
        if context is None:
            self.transport.write(UNRECOGNIZED_NAME_ALERT)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        assert name is not None
        factory = self.terminated.factory(name, context)
        self._hand_to(factory.buildProtocol(self.transport.getPeer()))  # type: ignore[union-attr]

    def _pass_through(self, tunnel: HostTunnel) -> None:
        self.edge.stats(tunnel.name).tls_passthrough += 1
        carry = getattr(tunnel, "carry", None)  # held at another fleet member: its edge carries the bytes
        if carry is not None:
            self._hand_to(carry())
            return
        why = tunnel.room()
        peer = list(host_port(self.transport.getPeer()))  # type: ignore[union-attr]
        local = list(host_port(self.transport.getHost()))  # type: ignore[union-attr]
        stream = tunnel.open_stream(peer, local) if why is None else None
        if stream is None:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._hand_to(StreamProtocol(stream))

    def _hand_to(self, inner: Protocol) -> None:
        data, self.buffer = self.buffer, b""
        self.inner = inner
        inner.makeConnection(self.transport)
        if data:
            inner.dataReceived(data)

    def _stop_timer(self) -> None:
        self.deadline = None

    def readConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self._stop_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)


class HttpsFactory(Factory):
    """The --https port: `terminated(name)` is the HTTP factory behind a terminated TLS connection."""

    noisy = False

    def __init__(self, edge: HttpEdge, terminated: Callable[[str], Factory]) -> None:
        self.edge = edge
        self.terminated = TerminatedFactories(terminated)

    def buildProtocol(self, addr: Any) -> Protocol:
        return SniRouter(self.edge, self.terminated)
