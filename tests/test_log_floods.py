"""End to end: a flood of refusals writes a bounded number of log lines.

A real server (and, where a tunnel is needed, a real client) run in this
process on loopback. Each test provokes a few hundred refusals of one kind
for one session within about a second and counts the server's log lines of
that kind: the first refusal is logged at once, the rest are summed up in at
most one line a second (rtunnel.limits.RefusalLog), and the counts of those
lines add up to every refusal.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel import wire
from rtunnel.mux import SessionSettings
from rtunnel.tls import PinnedCertificateCreator
from rtunnel.wire import FrameType, ResetCode
from tests.harness import TOKEN, LogCapture, Target, Tunnel, listen_target, sleep, wait_until, with_timeout

FLOOD = 300  # refusals provoked by each test
INTERVAL = 1.0  # RefusalLog's default: at most one line a second per kind and session
MAX_LINES = 4  # the first, and one a second while the flood (well under 2 s) lasts, and the rest


class RawClient(Protocol):
    """A client that authenticates, then sends only what the test tells it
    to and keeps every frame it gets (TLS pinned to the test server).
    With `reset_opens` it answers every OPEN with RST (and never ACKs)."""

    def __init__(self) -> None:
        self.decoder = wire.FrameDecoder(1 << 20)
        self.frames: list[wire.Frame] = []
        self.reset_opens = False
        self.welcomed: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        hello = {"protocol": "rtunnel", "versions": [1], "token": TOKEN, "max_frame": 1 << 20}
        self.transport.write(wire.encode_json(FrameType.HELLO, hello))

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            if frame.type is FrameType.WELCOME and not self.welcomed.called:
                self.welcomed.callback(None)
            elif frame.type is FrameType.OPEN and self.reset_opens:
                self.transport.write(wire.encode_coded(FrameType.RST, frame.stream_id, ResetCode.REFUSED, "no"))

    def bind(self, tunnel: int, port: int) -> None:
        body = {"tunnel": tunnel, "host": "127.0.0.1", "port": port}
        self.transport.write(wire.encode_json(FrameType.BIND, body))

    def replies(self, ftype: FrameType) -> list[wire.Frame]:
        return [f for f in self.frames if f.type is ftype]

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost.callback(None)


@defer.inlineCallbacks
def connect_raw(test: unittest.TestCase, tunnel: Tunnel) -> Any:
    """A RawClient with a new session on `tunnel`'s server."""
    client = RawClient()
    endpoint = wrapClientTLS(
        PinnedCertificateCreator(tunnel.fingerprint),
        TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel.control_port, timeout=5),
    )
    yield connectProtocol(endpoint, client)

    def close() -> defer.Deferred[None]:
        if client.transport.connected:
            client.transport.abortConnection()
        return client.lost

    test.addCleanup(close)
    yield with_timeout(client.welcomed, 10)
    return client


class RefusalFloodTests(unittest.TestCase):
    timeout = 60

    def assertSummedUp(self, events: LogCapture, event: str, **fields: Any) -> None:
        lines = events.named(event, **fields)
        counts = [e.get("count", 1) for e in lines]
        self.assertEqual(sum(counts), FLOOD, counts)
        self.assertEqual(counts[0], 1, "the first refusal is logged at once, alone")
        self.assertLessEqual(len(lines), MAX_LINES, f"{len(lines)} lines for {FLOOD} refusals")

    @defer.inlineCallbacks
    def test_visitors_over_max_streams_are_summed_up_in_a_few_lines(self) -> Any:
        events = LogCapture(self)
        tunnel = Tunnel(self)
        yield tunnel.start_server(session=SessionSettings(max_streams=2))
        held, target = listen_target(self, Target)  # keeps every connection open
        [public] = yield tunnel.connect([(0, target)])
        for _ in range(2):
            self.addCleanup(socket.create_connection(("127.0.0.1", public)).close)
        yield wait_until(lambda: len(held.connections) == 2)
        for _ in range(FLOOD):  # each is accepted and closed at once by the server
            with socket.create_connection(("127.0.0.1", public)):
                yield sleep(0)
        yield wait_until(lambda: events.refusals("visitor_refused", reason="max_streams") >= FLOOD, 10)
        self.assertSummedUp(events, "visitor_refused", reason="max_streams")
        lines = len(events.named("visitor_refused", reason="max_streams"))
        yield sleep(INTERVAL * 1.5)
        self.assertEqual(len(events.named("visitor_refused", reason="max_streams")), lines, "nothing left to report")

    @defer.inlineCallbacks
    def test_forbidden_binds_from_one_client_are_summed_up_in_a_few_lines(self) -> Any:
        events = LogCapture(self)
        tunnel = Tunnel(self)
        yield tunnel.start_server(allow_ports=((20000, 20001),))
        client = yield connect_raw(self, tunnel)
        for i in range(FLOOD):
            client.bind(2 * i + 2, 80)  # below 1024: not permitted
        yield wait_until(lambda: len(client.replies(FrameType.BIND_FAILED)) == FLOOD, 10)
        yield wait_until(lambda: events.refusals("bind_refused") >= FLOOD, INTERVAL * 3)
        self.assertSummedUp(events, "bind_refused", code="not_permitted")

    @defer.inlineCallbacks
    def test_visitors_of_a_detached_session_over_its_queue_are_summed_up_in_a_few_lines(self) -> Any:
        events = LogCapture(self)
        tunnel = Tunnel(self)
        max_streams = 4
        yield tunnel.start_server(session=SessionSettings(max_streams=max_streams))
        client = yield connect_raw(self, tunnel)
        client.reset_opens = True
        client.bind(2, 0)
        yield wait_until(lambda: len(client.replies(FrameType.BOUND)) == 1)
        public = wire.decode_json(client.replies(FrameType.BOUND)[0])["port"]
        [owner] = tunnel.server.sessions.values()
        for n in range(1, 2 * max_streams + 1):  # OPENs the client resets and never acknowledges
            with socket.create_connection(("127.0.0.1", public)):
                yield wait_until(lambda n=n: len(client.replies(FrameType.OPEN)) == n and not owner.mux_session.streams)
        client.transport.abortConnection()  # the session waits for a resume, its queue full
        yield client.lost
        for _ in range(FLOOD):
            with socket.create_connection(("127.0.0.1", public)):
                yield sleep(0)
        yield wait_until(lambda: events.refusals("visitor_refused", reason="detached_queue_full") >= FLOOD, 10)
        self.assertSummedUp(events, "visitor_refused", reason="detached_queue_full")

    @defer.inlineCallbacks
    def test_idle_connections_from_one_address_timing_out_are_summed_up_in_a_few_lines(self) -> Any:
        events = LogCapture(self)
        tunnel = Tunnel(self)
        yield tunnel.start_server(
            handshake_timeout=0.5, max_unauthenticated=FLOOD, max_unauthenticated_per_address=FLOOD,
        )
        for _ in range(FLOOD):  # connected without blocking the reactor that accepts them
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", tunnel.control_port))
            self.addCleanup(sock.close)
            yield sleep(0)
        yield wait_until(lambda: events.refusals("handshake_timeout") >= FLOOD, 20)
        self.assertSummedUp(events, "handshake_timeout")
