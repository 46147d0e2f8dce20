"""The rtunnel server with a client written only from docs/protocol.md
(tests/spec_peer.py: standard library, no rtunnel, no Twisted), on
loopback: bytes both ways, half-closes, resets, ACKs, PINGs, a deliberate
stop. If the document leaves out something a peer needs, these fail."""

from __future__ import annotations

import ast
import hashlib
import socket
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from rtunnel.link import Keepalive
from tests import spec_peer
from tests.harness import (
    TOKEN,
    Echo,
    HashReply,
    Source,
    Tunnel,
    Visitor,
    listen_target,
    pattern,
    sleep,
    visit,
    wait_until,
    with_timeout,
)

MB = 1 << 20


class SpecPeerTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, target_port: int, **server: Any) -> Any:
        """A real server and the spec peer with one tunnel to `target_port`;
        fires with the public port."""
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(**server)
        peer = spec_peer.SpecPeer(
            ("127.0.0.1", self.tunnel.control_port), TOKEN, self.tunnel.fingerprint,
            [("127.0.0.1", 0, "127.0.0.1", target_port)], log=lambda message: None,
        )
        self.peer = peer.start()
        self.addCleanup(peer.stop)
        yield wait_until(peer.ready.is_set, 10)
        self.assertIsNone(peer.error)
        port = peer.tunnels[1].bound_port
        self.assertIsNotNone(port, peer.tunnels[1].failed)
        return port

    def server_session(self) -> Any:
        (session,) = self.tunnel.server.sessions.values()
        return session.mux_session

    @defer.inlineCallbacks
    def test_a_megabyte_echoes_back_intact_and_both_ends_forget_the_stream(self):
        _, target = listen_target(self, Echo)
        port = yield self.start(target)
        payload = pattern(1, MB)
        reply, _ = yield with_timeout(visit(port, Visitor(payload)), 30)
        self.assertEqual(len(reply), MB)
        self.assertEqual(hashlib.sha256(reply).hexdigest(), hashlib.sha256(payload).hexdigest())
        # the final grants (WINDOW consumed == final_offset) let both ends forget it
        yield wait_until(lambda: not self.server_session().streams and not self.peer.streams, 5)
        self.assertGreater(self.peer.stats["windows_sent"], 1)  # 1 MB > the 256 KiB initial window

    @defer.inlineCallbacks
    def test_two_concurrent_visitors_each_get_the_digest_of_their_own_bytes(self):
        _, target = listen_target(self, HashReply)
        port = yield self.start(target)
        payloads = [pattern(2, 700_000), pattern(3, 900_000)]
        results = yield with_timeout(
            defer.gatherResults([visit(port, Visitor(p)) for p in payloads]), 30
        )
        for payload, (reply, _) in zip(payloads, results, strict=True):
            # the target answers only after the visitor's half-close (FIN) reached it
            self.assertEqual(reply.decode(), f"{len(payload)} {hashlib.sha256(payload).hexdigest()}")
        self.assertEqual(self.peer.stats["opens"], 2)

    @defer.inlineCallbacks
    def test_target_that_sends_and_closes_reaches_a_silent_visitor_whole(self):
        """Target -> visitor beyond the initial window needs the server's
        WINDOWs; the target's close becomes FIN and the visitor's EOF."""
        _, target = listen_target(self, Source, seed=4, size=3 * MB // 2)
        port = yield self.start(target)
        visitor = Visitor(b"", half_close=False)
        reply, _ = yield with_timeout(visit(port, visitor), 30)
        self.assertTrue(visitor.read_closed, "the visitor saw no EOF: FIN did not cross")
        self.assertEqual(hashlib.sha256(reply).digest(), hashlib.sha256(pattern(4, 3 * MB // 2)).digest())
        self.assertEqual(self.peer.stats["fins_sent"], 1)

    @defer.inlineCallbacks
    def test_refused_target_is_reset_and_the_session_goes_on(self):
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        port = yield self.start(closed_port)
        reply, _ = yield with_timeout(visit(port, Visitor(b"hello")), 10)
        self.assertEqual(reply, b"")
        self.assertEqual(self.peer.stats["rst_sent"], 1)
        yield wait_until(lambda: not self.server_session().streams, 5)
        self.assertIsNone(self.peer.error)
        self.assertFalse(self.peer.finished.is_set())

    @defer.inlineCallbacks
    def test_reliable_frames_from_the_server_are_acknowledged(self):
        _, target = listen_target(self, Echo)
        port = yield self.start(target)
        for i in range(20):  # each: OPEN and FIN from the server, FIN from the peer
            reply, _ = yield with_timeout(visit(port, Visitor(b"x%d" % i)), 10)
            self.assertEqual(reply, b"x%d" % i)
        yield wait_until(lambda: self.server_session().queued_reliable == 0, 5)
        self.assertGreaterEqual(self.peer.reliable_received, 41)  # BOUND + 20 × (OPEN, FIN)
        self.assertGreater(self.peer.stats["acks_sent"], 0)
        yield wait_until(lambda: self.peer.stats["acks_received"] > 0, 5)

    @defer.inlineCallbacks
    def test_answered_pings_keep_an_idle_link_alive(self):
        _, target = listen_target(self, Echo)
        port = yield self.start(target, keepalive=Keepalive(interval=0.2, dead_after=1.0))
        yield sleep(2.5)  # 2.5 × dead_after with no traffic but PINGs
        self.assertGreaterEqual(self.peer.stats["pongs_sent"], 5)
        self.assertEqual(self.tunnel.server.events.sessions_started["default"], 1)
        self.assertFalse(self.peer.finished.is_set(), self.peer.error)
        reply, _ = yield with_timeout(visit(port, Visitor(b"still there")), 10)
        self.assertEqual(reply, b"still there")

    @defer.inlineCallbacks
    def test_deliberate_stop_ends_the_session_at_once_without_grace(self):
        _, target = listen_target(self, Echo)
        yield self.start(target, resume_grace=60.0)
        self.peer.stop()  # RST shutdown, GOAWAY shutdown, close
        yield wait_until(lambda: not self.tunnel.server.sessions, 5)
        self.assertIsNone(self.peer.error)

    def test_spec_peer_imports_neither_rtunnel_nor_twisted(self):
        tree = ast.parse(Path(spec_peer.__file__).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        self.assertFalse(imported & {"rtunnel", "twisted", "zope", "OpenSSL", "tests"}, imported)
        self.assertIn("ssl", imported)

    @defer.inlineCallbacks
    def test_udp_visitors_each_get_their_own_answers_through_the_spec_peer(self):
        """DATAGRAM as docs/protocol.md "Datagrams" has it: the server names
        flows and tells the address once; the peer answers on the flow id."""
        echo = _UdpEcho()
        target = reactor.listenUDP(0, echo, interface="127.0.0.1")
        self.addCleanup(target.stopListening)
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server()
        peer = spec_peer.SpecPeer(
            ("127.0.0.1", self.tunnel.control_port), TOKEN, self.tunnel.fingerprint,
            [("127.0.0.1", 0, "127.0.0.1", target.getHost().port, "udp")], log=lambda message: None,
        )
        self.peer = peer.start()
        self.addCleanup(peer.stop)
        yield wait_until(peer.ready.is_set, 10)
        port = peer.tunnels[1].bound_port
        self.assertIsNotNone(port, peer.tunnels[1].failed)
        visitors = []
        for i in range(4):
            visitor = _UdpEcho(answer=False)
            listening = reactor.listenUDP(0, visitor, interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            visitors.append((visitor, listening.getHost().port))
            for n in range(2):
                visitor.transport.write(b"v%d n%d" % (i, n), ("127.0.0.1", port))
        yield wait_until(lambda: all(len(v.got) == 2 for v, _ in visitors), 10)
        for i, (visitor, _) in enumerate(visitors):
            self.assertEqual(sorted(visitor.got), [b"re:v%d n0" % i, b"re:v%d n1" % i])
        self.assertEqual(
            sorted(flow.address for flow in peer.flows.values()),
            sorted(("127.0.0.1", p) for _, p in visitors), "the peer learnt each visitor's address",
        )
        self.assertEqual(peer.stats["datagrams_sent"], 8)
        self.assertIsNone(peer.error)


class _UdpEcho(DatagramProtocol):
    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.got: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append(data)
        if self.answer:
            self.transport.write(b"re:" + data, addr)
