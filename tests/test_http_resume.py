"""A hostname tunnel across a link drop (#15), in this process: a request
that arrives while the tunnel's client is away waits for the resume and is
answered by the owner's service; with the client away longer than
--offline-wait, it gets 502 "offline"."""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import replace
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.protocols.basic import FileSender
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from rtunnel.admin import RateMeter, describe_session
from rtunnel.config import TunnelSpec
from rtunnel.httpconfig import HttpSettings
from tests.faultproxy import FaultProxy
from tests.harness import Tunnel, Visitor, pattern, sleep, visit, wait_until, with_timeout

DOMAIN = "tunnel.test"


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from the service"


class AcrossALinkDrop(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        site = server.Site(Hello())
        site.noisy = False
        self.service = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.service.stopListening)
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(
            http=HttpSettings(http="tcp:0:interface=127.0.0.1", domain=DOMAIN, offline_wait=3.0),
        )
        self.http_port = self.tunnel.server_service.shared_ports["http"].getHost().port
        self.proxy = FaultProxy(reactor, "127.0.0.1", self.tunnel.control_port)
        proxy_port = self.proxy.listen()
        self.addCleanup(self.proxy.stop)
        spec = TunnelSpec(1, "", 0, "127.0.0.1", self.service.getHost().port, "off", "http", "app")
        config = self.tunnel.client_config([], server_port=proxy_port)
        client = self.tunnel.start_client(replace(config, tunnels=(spec,)))
        yield with_timeout(client.client.when_bound(), 10)

    def request(self) -> defer.Deferred[tuple[bytes, Any]]:
        return visit(self.http_port, Visitor(
            f"GET / HTTP/1.1\r\nHost: app.{DOMAIN}\r\nConnection: close\r\n\r\n".encode(), half_close=False,
        ))

    def session(self) -> Any:
        return next(iter(self.tunnel.server.sessions.values()))

    @defer.inlineCallbacks
    def test_a_request_during_a_drop_waits_for_the_resume(self) -> Any:
        reply, _ = yield with_timeout(self.request(), 10)
        self.assertIn(b"hello from the service", reply)
        self.proxy.refuse_new(True)
        self.proxy.sever_rst()
        yield wait_until(lambda: self.session().detached, 10)
        started = time.monotonic()
        answer = self.request()
        yield sleep(1.0)
        self.assertFalse(answer.called, "answered while the tunnel's client was away")
        self.proxy.refuse_new(False)
        reply, _ = yield with_timeout(answer, 10)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertIn(b"hello from the service", reply)
        self.assertGreaterEqual(time.monotonic() - started, 1.0)

    @defer.inlineCallbacks
    def test_the_admin_api_lists_the_hostname_with_its_counters(self) -> Any:
        """The status page's data shows a session's hostname tunnel: URL,
        requests, status classes, bytes."""
        for _ in range(2):
            yield with_timeout(self.request(), 10)
        [tunnel] = describe_session(self.session(), reactor.seconds(), RateMeter())["tunnels"]
        self.assertEqual((tunnel["kind"], tunnel["hostname"]), ("http", f"app.{DOMAIN}"))
        self.assertEqual(tunnel["address"], f"http://app.{DOMAIN}:{self.http_port}")
        self.assertEqual((tunnel["requests"], tunnel["responses"]), (2, {"2xx": 2}))
        self.assertGreater(tunnel["bytes_out"], 2 * len(b"hello from the service"))

    @defer.inlineCallbacks
    def test_a_request_gets_502_offline_when_the_client_stays_away(self) -> Any:
        self.proxy.refuse_new(True)
        self.proxy.sever_rst()
        yield wait_until(lambda: self.session().detached, 10)
        started = time.monotonic()
        reply, _ = yield with_timeout(self.request(), 10)
        self.assertTrue(reply.startswith(b"HTTP/1.1 502 "), reply)
        self.assertIn(b"offline", reply)
        self.assertNotIn(b"hello", reply)
        self.assertGreaterEqual(time.monotonic() - started, 2.9)


@implementer(IHalfCloseableProtocol)
class BigResponse(Protocol):
    """A service that answers any request with `size` bytes of pattern(1),
    sent through a pull producer: it writes only as fast as its socket
    drains, so `sent` says how far the visitor's reading let it get."""

    size = 64 * 1024 * 1024

    def connectionMade(self) -> None:
        self.factory.services.append(self)
        self.body = io.BytesIO(pattern(1, self.size))

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self.body.tell() == 0:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
            FileSender().beginFileTransfer(self.body, self.transport)

    def readConnectionLost(self) -> None:
        pass

    @property
    def sent(self) -> int:
        return self.body.tell()


class SlowReader(Protocol):
    """Sends one request, reads nothing until `read()`, then everything."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(self.request)

    def read(self) -> None:
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.chunks))


class FlowControl(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_a_visitor_that_does_not_read_holds_the_service_back(self) -> Any:
        """The response is sent only as fast as the visitor reads: while it
        reads nothing, the service gets at most a few windows and socket
        buffers out of 64 MiB; then every byte arrives, intact."""
        factory = Factory.forProtocol(BigResponse)
        factory.services = []
        factory.noisy = False
        service = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(service.stopListening)
        tunnel = Tunnel(self)
        yield tunnel.start_server(http=HttpSettings(http="tcp:0:interface=127.0.0.1", domain=DOMAIN))
        http_port = tunnel.server_service.shared_ports["http"].getHost().port
        spec = TunnelSpec(1, "", 0, "127.0.0.1", service.getHost().port, "off", "http", "big")
        client = tunnel.start_client(replace(tunnel.client_config([]), tunnels=(spec,)))
        yield with_timeout(client.client.when_bound(), 10)
        reader = SlowReader(f"GET / HTTP/1.1\r\nHost: big.{DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        yield ClientCreator(reactor, lambda: reader).connectTCP("127.0.0.1", http_port)
        yield wait_until(lambda: factory.services and factory.services[0].sent > 0, 10)
        yield sleep(1.5)
        held_back = factory.services[0].sent
        self.assertLess(held_back, 24 * 1024 * 1024, "the service was not held back by the visitor")
        reader.read()
        body = yield with_timeout(reader.done, 60)
        head, _, received = body.partition(b"\r\n\r\n")
        self.assertIn(b"content-length: %d" % BigResponse.size, head.lower())
        self.assertEqual(hashlib.sha256(received).hexdigest(), hashlib.sha256(pattern(1, BigResponse.size)).hexdigest())


@implementer(IHalfCloseableProtocol)
class AnswersOnceThenCloses(Protocol):
    """Answers a request keep-alive (Content-Length, no Connection: close),
    then closes the idle connection (as nginx does after keepalive_timeout)."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.closing = reactor.callLater(0.2, self.transport.loseConnection)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        closing = getattr(self, "closing", None)
        if closing is not None and closing.active():
            closing.cancel()


class IdleServiceConnections(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_service_closing_an_idle_connection_leaves_no_stream_behind(self) -> Any:
        """The service closes its keep-alive connection between two requests
        of one visitor connection: the stream is ended on the server too
        (none is left open), and the next request gets a new one."""
        factory = Factory.forProtocol(AnswersOnceThenCloses)
        factory.noisy = False
        service = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(service.stopListening)
        tunnel = Tunnel(self)
        yield tunnel.start_server(http=HttpSettings(http="tcp:0:interface=127.0.0.1", domain=DOMAIN))
        http_port = tunnel.server_service.shared_ports["http"].getHost().port
        spec = TunnelSpec(1, "", 0, "127.0.0.1", service.getHost().port, "off", "http", "idle")
        client = tunnel.start_client(replace(tunnel.client_config([]), tunnels=(spec,)))
        yield with_timeout(client.client.when_bound(), 10)
        session = next(iter(tunnel.server.sessions.values()))
        visitor = SlowReader(f"GET /1 HTTP/1.1\r\nHost: idle.{DOMAIN}\r\n\r\n".encode())
        yield ClientCreator(reactor, lambda: visitor).connectTCP("127.0.0.1", http_port)
        visitor.read()
        yield wait_until(lambda: b"ok" in b"".join(visitor.chunks), 10)
        yield wait_until(lambda: not session.mux_session.streams, 10)  # the service closed: the stream is gone
        visitor.transport.write(f"GET /2 HTTP/1.1\r\nHost: idle.{DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        reply = yield with_timeout(visitor.done, 10)
        self.assertEqual(reply.count(b"HTTP/1.1 200 OK"), 2, reply)
        yield wait_until(lambda: not session.mux_session.streams, 10)
