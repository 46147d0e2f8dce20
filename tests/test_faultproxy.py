"""Tests for tests.faultproxy against a real echo server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import cast

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tests.faultproxy import FaultProxy

clock = cast(IReactorTime, reactor)
tcp_reactor = cast(IReactorTCP, reactor)

MiB = 1024 * 1024


class Peer(Protocol):
    """A test connection end that records everything that happens to it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.made: defer.Deferred[None] = defer.Deferred()
        #: Fires with the exception passed to connectionLost.
        self.lost: defer.Deferred[BaseException] = defer.Deferred()
        self.reason: Failure | None = None
        self.saw_eof = False
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []

    @property
    def tcp(self) -> ITCPTransport:
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        ready = [w for w in self._waiters if len(self.received) >= w[0]]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, d in ready:
            d.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(reason)
        self.lost.callback(reason.value)

    def wait_for(self, n: int) -> defer.Deferred[None]:
        """Fire once at least C{n} bytes have been received in total."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.received) >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d


@implementer(IHalfCloseableProtocol)
class HalfClosePeer(Peer):
    """A client that half-closes: on EOF from the far end it closes fully."""

    def readConnectionLost(self) -> None:
        self.saw_eof = True
        self.tcp.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class EchoServer(Peer):
    """Echo everything; on EOF, append an end marker and close."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.tcp.write(data)

    def readConnectionLost(self) -> None:
        self.saw_eof = True
        self.tcp.write(b"<EOF after %d>" % len(self.received))
        self.tcp.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class EchoFactory(Factory):
    def __init__(self) -> None:
        self.protocols: list[EchoServer] = []

    def buildProtocol(self, addr: IAddress) -> EchoServer:
        p = EchoServer()
        self.protocols.append(p)
        return p


def wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.01
) -> defer.Deferred[None]:
    """Poll C{predicate} until it is true; fail after C{timeout} seconds."""

    @defer.inlineCallbacks
    def poll():  # type: ignore[no-untyped-def]
        deadline = clock.seconds() + timeout
        while not predicate():
            if clock.seconds() > deadline:
                raise AssertionError(f"condition not reached in {timeout:.1f}s")
            yield task.deferLater(clock, step, lambda: None)

    return cast("defer.Deferred[None]", poll())


class FaultProxyTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.echo = EchoFactory()
        self.echo_port: IListeningPort = tcp_reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        self.echo_port_number = cast(int, self.echo_port.getHost().port)  # type: ignore[attr-defined]
        self.proxies: list[FaultProxy] = []
        self.clients: list[Peer] = []
        self.proxy = self.make_proxy()

    @defer.inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        for proxy in self.proxies:
            yield proxy.stop()
        # Anything not closed by the proxy (e.g. refused before connect).
        pending = []
        for peer in self.clients + self.echo.protocols:
            if peer.reason is None:
                if peer.transport is not None:
                    peer.tcp.abortConnection()
                pending.append(peer.lost)
        yield defer.gatherResults(pending)
        yield self.echo_port.stopListening()
        for proxy in self.proxies:
            self.assertEqual(proxy.open_connections, 0)

    # -- helpers

    def make_proxy(self, **kwargs: float) -> FaultProxy:
        proxy = FaultProxy(reactor, "127.0.0.1", self.echo_port_number, **kwargs)  # type: ignore[arg-type]
        proxy.listen()
        self.proxies.append(proxy)
        return proxy

    @defer.inlineCallbacks
    def connect(self, proxy: FaultProxy | None = None, cls: type[Peer] = Peer):  # type: ignore[no-untyped-def]
        """Connect a client through C{proxy}; return the connected Peer."""
        proxy = proxy or self.proxy
        peer = cls()
        self.clients.append(peer)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
        yield connectProtocol(endpoint, peer)
        return peer

    @defer.inlineCallbacks
    def ping(self, client: Peer, payload: bytes = b"ping"):  # type: ignore[no-untyped-def]
        """Send C{payload} and wait for its echo."""
        want = len(client.received) + len(payload)
        client.tcp.write(payload)
        yield client.wait_for(want)
        self.assertEqual(bytes(client.received[-len(payload) :]), payload)

    # -- tests

    @defer.inlineCallbacks
    def test_bytes_both_ways(self):  # type: ignore[no-untyped-def]
        """1 MiB passes through to the echo server and back unchanged."""
        data = os.urandom(MiB)
        client = yield self.connect()
        client.tcp.write(data)
        yield client.wait_for(len(data))
        server = self.echo.protocols[0]
        self.assertEqual(hashlib.sha256(server.received).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertEqual(hashlib.sha256(client.received).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertEqual(self.proxy.bytes_forwarded, 2 * len(data))
        self.assertEqual(self.proxy.connections_accepted, 1)
        self.assertEqual(self.proxy.open_connections, 1)

    @defer.inlineCallbacks
    def test_backpressure_slow_reader(self):  # type: ignore[no-untyped-def]
        """A client that stops reading makes the proxy stop reading the
        server's replies (bounded buffering), without data loss."""
        client = yield self.connect()
        yield self.ping(client)
        client.tcp.pauseProducing()
        data = os.urandom(16 * MiB)
        client.tcp.write(data)
        yield wait_until(lambda: self.proxy.bytes_to_target == len(data) + 4)
        yield task.deferLater(clock, 0.2, lambda: None)
        first = self.proxy.bytes_to_client
        yield task.deferLater(clock, 0.2, lambda: None)
        # Stalled: only what fits in socket buffers went back to the client.
        self.assertEqual(self.proxy.bytes_to_client, first)
        self.assertLess(first, len(data))
        client.tcp.resumeProducing()
        yield client.wait_for(len(data) + 4)
        self.assertEqual(bytes(client.received[4:]), data)

    @defer.inlineCallbacks
    def test_half_close(self):  # type: ignore[no-untyped-def]
        """The client's FIN reaches the server, which can still reply."""
        data = os.urandom(256 * 1024)
        client = yield self.connect(cls=HalfClosePeer)
        client.tcp.write(data)
        client.tcp.loseWriteConnection()
        reason = yield client.lost
        self.assertIsInstance(reason, ConnectionDone)
        self.assertTrue(client.saw_eof)
        self.assertEqual(bytes(client.received), data + b"<EOF after %d>" % len(data))
        server = self.echo.protocols[0]
        self.assertTrue(server.saw_eof)
        server_reason = yield server.lost
        self.assertIsInstance(server_reason, ConnectionDone)
        yield wait_until(lambda: self.proxy.open_connections == 0)

    @defer.inlineCallbacks
    def test_client_close_closes_server(self):  # type: ignore[no-untyped-def]
        """A plain close by the client closes the server side cleanly."""
        client = yield self.connect()
        yield self.ping(client)
        client.tcp.loseConnection()
        yield client.lost
        server = self.echo.protocols[0]
        yield server.lost
        yield wait_until(lambda: self.proxy.open_connections == 0)

    @defer.inlineCallbacks
    def test_sever_rst(self):  # type: ignore[no-untyped-def]
        """sever_rst resets both ends (ConnectionLost, not ConnectionDone)."""
        client = yield self.connect()
        yield self.ping(client)
        self.proxy.sever_rst()
        reason = yield client.lost
        self.assertIsInstance(reason, ConnectionLost)
        self.assertNotIsInstance(reason, ConnectionDone)
        server_reason = yield self.echo.protocols[0].lost
        self.assertIsInstance(server_reason, ConnectionLost)
        yield wait_until(lambda: self.proxy.open_connections == 0)

    @defer.inlineCallbacks
    def test_sever_fin(self):  # type: ignore[no-untyped-def]
        """sever_fin closes both ends cleanly."""
        client = yield self.connect()
        yield self.ping(client)
        self.proxy.sever_fin()
        reason = yield client.lost
        self.assertIsInstance(reason, ConnectionDone)
        server = self.echo.protocols[0]
        yield server.lost
        self.assertTrue(server.saw_eof)
        yield wait_until(lambda: self.proxy.open_connections == 0)

    @defer.inlineCallbacks
    def test_blackhole(self):  # type: ignore[no-untyped-def]
        """After blackhole() bytes vanish both ways and nothing closes."""
        client = yield self.connect()
        yield self.ping(client)
        server = self.echo.protocols[0]
        forwarded = self.proxy.bytes_forwarded
        self.proxy.blackhole()
        client.tcp.write(b"into the void" * 1000)
        server.tcp.write(b"from the server")
        yield task.deferLater(clock, 0.3, lambda: None)
        self.assertEqual(bytes(client.received), b"ping")
        self.assertEqual(bytes(server.received), b"ping")
        self.assertIsNone(client.reason)
        self.assertIsNone(server.reason)
        self.assertEqual(self.proxy.open_connections, 1)
        self.assertEqual(self.proxy.bytes_forwarded, forwarded)

        # New connections are accepted but reach nothing.
        late = yield self.connect()
        late.tcp.write(b"hello?")
        yield task.deferLater(clock, 0.1, lambda: None)
        self.assertEqual(len(self.echo.protocols), 1)
        self.assertEqual(bytes(late.received), b"")
        self.assertIsNone(late.reason)

        # heal() helps new connections only.
        self.proxy.heal()
        fresh = yield self.connect()
        yield self.ping(fresh, b"alive")
        client.tcp.write(b"still dead")
        yield task.deferLater(clock, 0.1, lambda: None)
        self.assertEqual(bytes(client.received), b"ping")

        self.proxy.sever_rst()
        for peer in (client, late, fresh):
            reason = yield peer.lost
            self.assertIsInstance(reason, ConnectionLost)
        yield wait_until(lambda: self.proxy.open_connections == 0)

    @defer.inlineCallbacks
    def test_refuse_new(self):  # type: ignore[no-untyped-def]
        """refuse_new(True) closes new connections; open ones are kept."""
        old = yield self.connect()
        yield self.ping(old)
        self.proxy.refuse_new(True)
        refused = yield self.connect()
        reason = yield refused.lost
        self.assertIsInstance(reason, ConnectionDone)
        self.assertEqual(bytes(refused.received), b"")
        self.assertEqual(len(self.echo.protocols), 1)
        self.assertEqual(self.proxy.connections_refused, 1)
        yield self.ping(old, b"old still works")

        self.proxy.refuse_new(True, rst=True)
        reset = yield self.connect()
        reason = yield reset.lost
        self.assertIsInstance(reason, ConnectionLost)

        self.proxy.refuse_new(False)
        fresh = yield self.connect()
        yield self.ping(fresh)
        self.assertEqual(len(self.echo.protocols), 2)
        self.assertEqual(self.proxy.connections_accepted, 4)

    @defer.inlineCallbacks
    def test_target_unreachable(self):  # type: ignore[no-untyped-def]
        """If the target refuses, the client connection is reset."""
        yield self.echo_port.stopListening()
        self.echo_port = tcp_reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        client = yield self.connect()
        reason = yield client.lost
        self.assertIsInstance(reason, ConnectionLost)
        yield wait_until(lambda: self.proxy.open_connections == 0)

    @defer.inlineCallbacks
    def test_delay_ping_pong(self):  # type: ignore[no-untyped-def]
        """With delay d, a round trip takes at least 2*d."""
        delay = 0.05
        proxy = self.make_proxy(delay=delay)
        client = yield self.connect(proxy)
        for _ in range(3):
            start = clock.seconds()
            yield self.ping(client)
            elapsed = clock.seconds() - start
            self.assertGreaterEqual(elapsed, 2 * delay)
            self.assertLess(elapsed, 2 * delay + 1.0)

    @defer.inlineCallbacks
    def test_delay_keeps_order_and_half_close(self):  # type: ignore[no-untyped-def]
        """Delayed data arrives in order, and the FIN comes after it."""
        proxy = self.make_proxy(delay=0.02, max_queued=64 * 1024)
        client = yield self.connect(proxy, cls=HalfClosePeer)
        data = os.urandom(MiB)
        for i in range(0, len(data), 4096):
            client.tcp.write(data[i : i + 4096])
        client.tcp.loseWriteConnection()
        reason = yield client.lost
        self.assertIsInstance(reason, ConnectionDone)
        self.assertEqual(bytes(client.received), data + b"<EOF after %d>" % len(data))
        yield wait_until(lambda: proxy.open_connections == 0)

    @defer.inlineCallbacks
    def test_stop_with_open_connections(self):  # type: ignore[no-untyped-def]
        """stop() closes everything and fires when all sockets are gone."""
        clients = []
        for _ in range(3):
            c = yield self.connect()
            yield self.ping(c)
            clients.append(c)
        self.assertEqual(self.proxy.open_connections, 3)
        yield self.proxy.stop()
        self.assertEqual(self.proxy.open_connections, 0)
        for c in clients:
            yield c.lost
        # A second stop() is harmless.
        yield self.proxy.stop()
