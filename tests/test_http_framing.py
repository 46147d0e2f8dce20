"""The HTTP edge's own framing (#15, performance): the service's responses
are framed by rtunnel.server.httpmessages without h11 events, the request
head is checked by one search before the line by line rules, and every
connection's deadline sits behind one timer (rtunnel.server.deadlines).

The values are tested without a reactor; the framing end to end with a
real server and client in this process and a scripted service on loopback."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from rtunnel.config import TunnelSpec
from rtunnel.httpconfig import HttpSettings
from rtunnel.server.deadlines import Deadlines
from rtunnel.server.httpmessages import (
    BadResponse,
    ChunkedReader,
    EdgeError,
    _check_lines,
    check_head,
    parse_response_head,
)
from tests.harness import Tunnel, Visitor, visit, wait_until, with_timeout

DOMAIN = "tunnel.test"


class ResponseHeads(unittest.SynchronousTestCase):
    def test_header_lines_pass_as_written_without_hop_by_hop_ones(self) -> None:
        """The service's lines reach the visitor as it wrote them; framing,
        hop-by-hop and Connection-named headers are the edge's."""
        head = parse_response_head(
            b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\nConnection: keep-alive, X-Private\r\n"
            b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nETag: \"a:b\"\r\n\r\n"
        )
        self.assertEqual((head.status, head.length, head.chunked), (200, 5, False))
        self.assertEqual(head.to_visitor([b"content-length: 5"]),
                         b"HTTP/1.1 200 OK\r\nServer: x\r\nETag: \"a:b\"\r\ncontent-length: 5\r\n\r\n")

    def test_framing_by_length_chunked_or_until_close(self) -> None:
        self.assertTrue(parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").chunked)
        until_close = parse_response_head(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\n")
        self.assertEqual((until_close.length, until_close.chunked), (None, False))
        same_twice = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n")
        self.assertEqual(same_twice.length, 7)

    def test_bare_lf_heads_are_written_again_with_crlf(self) -> None:
        """A bare LF ends a line (the head is rewritten with CRLF, so the visitor reads the lines the edge read)."""
        head = parse_response_head(b"HTTP/1.1 404 Not Found\nContent-Length: 0\nX-A: 1\n\n")
        self.assertEqual(head.to_visitor([]), b"HTTP/1.1 404 Not Found\r\nX-A: 1\r\n\r\n")

    def test_heads_the_edge_cannot_frame_exactly_are_refused(self) -> None:
        for what, raw in [
            ("Transfer-Encoding with Content-Length",
             b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ("a coding other than chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            ("disagreeing lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            ("a length that is no number", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\n\r\n"),
            ("a bare CR", b"HTTP/1.1 200 OK\r\nX-A: one\rContent-Length: 0\r\n\r\n"),
            ("a name that is no token", b"HTTP/1.1 200 OK\r\nX A: one\r\n\r\n"),
            ("space before the colon", b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n"),
            ("a control character", b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n\r\n"),
            ("not HTTP/1.x", b"HTTP/2 200 OK\r\n\r\n"),
        ]:
            with self.assertRaises(BadResponse, msg=what):
                parse_response_head(raw)


CHUNKED = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-A: x\r\n\r\nNEXT"


class ChunkedBodies(unittest.SynchronousTestCase):
    def test_any_split_of_a_chunked_body_gives_its_data_and_what_follows(self) -> None:
        for cut in range(len(CHUNKED) + 1):
            reader = ChunkedReader()
            data, rest = reader.feed(CHUNKED[:cut])
            if rest is None:
                more, rest = reader.feed(CHUNKED[cut:])
                data += more
            else:
                rest += CHUNKED[cut:]
            self.assertEqual((b"".join(data), rest), (b"hello world", b"NEXT"), cut)

    def test_bad_chunks_are_refused(self) -> None:
        for raw in [b"zz\r\nhello\r\n", b"5\r\nhelloXX", b"5" * 70000]:
            with self.assertRaises(BadResponse, msg=raw[:20]):
                ChunkedReader().feed(raw)


HEADER_LINES = [
    b"Host: a.example", b"Host: b.example", b"host:c", b"Content-Length: 5", b"content-length: 5, 5",
    b"Transfer-Encoding: chunked", b"X-A: one", b" folded", b"\tfolded", b"X-B : two", b": empty",
    b"User-Agent: x :y", b"X-C: a\rb", b"X-D: a\nb", b"Accept: */*",
]


class RequestHeadChecks(unittest.SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.sampled_from(HEADER_LINES), max_size=6))
    def test_the_fast_check_refuses_exactly_what_the_line_rules_refuse(self, lines: list[bytes]) -> None:
        """check_head's one search lets through only heads the line by line
        rules (and the bare CR/LF rules) let through too."""
        head = b"\r\n".join([b"GET / HTTP/1.1", *lines]) + b"\r\n\r\n"
        try:
            _check_lines(head)
            expected = None
        except EdgeError as e:
            expected = e.text
        try:
            check_head(head)
            got = None
        except EdgeError as e:
            got = e.text
        self.assertEqual(got, expected, head)


class Item:
    def __init__(self) -> None:
        self.deadline: float | None = None
        self.deadline_watched = False
        self.passed: list[float] = []
        self.clock: task.Clock | None = None

    def deadline_passed(self) -> None:
        assert self.clock is not None
        self.passed.append(self.clock.seconds())
        self.deadline = None


class OneTimerForManyDeadlines(unittest.SynchronousTestCase):
    def test_each_deadline_passes_at_its_time_with_one_reactor_timer(self) -> None:
        """Items whose deadlines are set, moved later and cleared: each
        `deadline_passed` comes at its (last) deadline, never before, and
        the reactor holds one timer however many items wait."""
        clock = task.Clock()
        deadlines = Deadlines(clock)
        items = [Item() for _ in range(100)]
        for i, item in enumerate(items):
            item.clock = clock
            item.deadline = 10.0 + i * 0.01
            deadlines.watch(item)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(5)
        items[0].deadline = 25.0  # moved later (a keep-alive connection's next request): no call needed
        items[1].deadline = None  # its head arrived
        clock.advance(4.99)
        self.assertFalse(any(item.passed for item in items))
        clock.advance(1.0)
        self.assertEqual([len(item.passed) for item in items], [0, 0] + [1] * 98)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(14.0)
        self.assertEqual(items[0].passed, [])
        clock.advance(0.02)
        self.assertEqual(len(items[0].passed), 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class Scripted(Protocol):
    """A service answering each request (a head, no body) with the next of
    `factory.script`; every connection is counted."""

    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            script: list[bytes] = self.factory.script  # type: ignore[attr-defined]
            answer = script.pop(0) if script else b"HTTP/1.1 500 Out Of Script\r\nContent-Length: 0\r\n\r\n"
            if answer.endswith(b"<close>"):
                self.transport.write(answer[:-7])
                self.transport.loseConnection()
            else:
                self.transport.write(answer)


class ResponsesThroughTheEdge(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.service = Factory.forProtocol(Scripted)
        self.service.noisy = False
        self.service.script = []  # type: ignore[attr-defined]
        self.service.connections = 0  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, self.service, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(http=HttpSettings(http="tcp:0:interface=127.0.0.1", domain=DOMAIN))
        self.http_port = self.tunnel.server_service.shared_ports["http"].getHost().port
        spec = TunnelSpec(1, "", 0, "127.0.0.1", port.getHost().port, "off", "http", "app")
        client = self.tunnel.start_client(replace(self.tunnel.client_config([]), tunnels=(spec,)))
        yield with_timeout(client.client.when_bound(), 10)

    def exchange(self, *requests: str) -> defer.Deferred[tuple[bytes, Any]]:
        """The requests (paths; the last one closes), sent at once on one connection."""
        raw = b"".join(
            f"GET {path} HTTP/1.1\r\nHost: app.{DOMAIN}\r\n{'Connection: close' if i == len(requests) - 1 else 'X: y'}"
            f"\r\n\r\n".encode()
            for i, path in enumerate(requests)
        )
        return with_timeout(visit(self.http_port, Visitor(raw, half_close=False)), 10)

    @defer.inlineCallbacks
    def test_bytes_after_a_response_are_never_the_next_requests_answer(self) -> Any:
        """A service that writes more than its Content-Length (a forged second
        response): the visitor's next request is not answered by those bytes
        but by the service on a new connection."""
        self.service.script += [  # type: ignore[attr-defined]
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngenuine",
        ]
        reply, _ = yield self.exchange("/1", "/2")
        self.assertNotIn(b"forged", reply)
        self.assertTrue(reply.endswith(b"genuine"), reply)
        self.assertEqual(self.service.connections, 2)  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_chunked_until_close_bodiless_and_interim_responses_reach_the_visitor(self) -> Any:
        """Chunked (with extensions and trailers), 204, 100 then 200, and a
        body until the service closes: each framed for the HTTP/1.1 visitor
        on one connection, in order."""
        self.service.script += [  # type: ignore[attr-defined]
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmore",
            b"HTTP/1.0 200 OK\r\nX-Last: 1\r\n\r\nuntil close<close>",
        ]
        reply, _ = yield self.exchange("/chunked", "/empty", "/continue", "/close")
        self.assertEqual(reply.count(b"HTTP/1.1 "), 5, reply)
        self.assertIn(b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nHTTP/1.1 204 No Content\r\n", reply)
        self.assertIn(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nmore", reply)
        self.assertTrue(reply.endswith(b"X-Last: 1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                                       b"b\r\nuntil close\r\n0\r\n\r\n"), reply)

    @defer.inlineCallbacks
    def test_a_response_the_edge_cannot_frame_exactly_gets_502(self) -> Any:
        """Transfer-Encoding with Content-Length (response splitting's shape):
        502 with a page saying why; nothing of the service's body."""
        self.service.script.append(  # type: ignore[attr-defined]
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        reply, _ = yield self.exchange("/split")
        self.assertTrue(reply.startswith(b"HTTP/1.1 502 "), reply)
        self.assertIn(b"both Transfer-Encoding and Content-Length", reply)
        self.assertNotIn(b"hello", reply)

    @defer.inlineCallbacks
    def test_idle_visitor_connections_share_one_timer(self) -> Any:
        """Fifty idle connections on the HTTP port, each with its head
        deadline: the reactor holds one timer for them, not fifty."""
        edge = self.tunnel.server_service.edge
        before = len(reactor.getDelayedCalls())
        visitors = [Visitor(b"", half_close=False) for _ in range(50)]
        for visitor in visitors:
            visit(self.http_port, visitor)
        yield wait_until(lambda: len(edge.visitors) == 50, 10)
        self.assertLessEqual(len(reactor.getDelayedCalls()) - before, 2)
        for visitor in visitors:
            visitor.transport.loseConnection()
        yield wait_until(lambda: not edge.visitors, 10)


class TerminatedTlsFactories(unittest.SynchronousTestCase):
    def test_one_tls_factory_per_name_and_context_bounded(self) -> None:
        """The --https port builds a name's TLS factory once (not per
        connection), a new one when the name's context changes (a renewed
        certificate), and holds at most MAX of them."""
        from OpenSSL import SSL

        from rtunnel.server.httpsport import EdgeTLSFactory, TerminatedFactories

        built: list[str] = []

        def terminated(name: str) -> Factory:
            built.append(name)
            return Factory.forProtocol(Protocol)

        factories = TerminatedFactories(terminated)
        first, renewed = SSL.Context(SSL.TLS_SERVER_METHOD), SSL.Context(SSL.TLS_SERVER_METHOD)
        factory = factories.factory("a.example", first)
        self.assertIsInstance(factory, EdgeTLSFactory)
        self.assertIs(factories.factory("a.example", first), factory)
        self.assertIsNot(factories.factory("a.example", renewed), factory)
        self.assertEqual(built, ["a.example", "a.example"])
        for i in range(TerminatedFactories.MAX + 10):
            factories.factory(f"n{i}.example", first)
        self.assertLessEqual(len(factories.factories), TerminatedFactories.MAX)
