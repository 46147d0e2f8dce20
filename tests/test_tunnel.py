"""End to end on loopback: real sockets, real TLS, server and client in-process."""

from __future__ import annotations

import hashlib
import time

from twisted.internet import defer, error
from twisted.trial import unittest

from rtunnel.errors import ConfigError
from rtunnel.twisted_private import tcp_held
from tests.harness import (
    Echo,
    HashReply,
    Source,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    pattern,
    sleep,
    visit,
    wait_until,
    with_timeout,
)

MiB = 1024 * 1024


class TunnelTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server()

    @defer.inlineCallbacks
    def test_request_reaches_target_and_reply_comes_back(self):
        _, target = listen_target(self, Echo)
        [public] = yield self.tunnel.connect([(0, target)])
        reply, reason = yield with_timeout(visit(public, Visitor(b"hello through the tunnel")), 10)
        self.assertEqual(reply, b"hello through the tunnel")
        reason.trap(error.ConnectionDone)

    @defer.inlineCallbacks
    def test_hundred_concurrent_connections_each_move_one_mib_both_ways(self):
        _, target = listen_target(self, Echo)
        [public] = yield self.tunnel.connect([(0, target)])
        payloads = [pattern(i, MiB) for i in range(100)]
        results = yield with_timeout(
            defer.gatherResults([visit(public, Visitor(p)) for p in payloads]), 100
        )
        for payload, (reply, reason) in zip(payloads, results, strict=True):
            self.assertEqual(hashlib.sha256(reply).hexdigest(), hashlib.sha256(payload).hexdigest())
            reason.trap(error.ConnectionDone)
        client_session = self.tunnel.client_service.client.session
        yield wait_until(lambda: not client_session.streams, 5)

    @defer.inlineCallbacks
    def test_two_hundred_mib_transfer_arrives_intact(self):
        _, target = listen_target(self, HashReply)
        [public] = yield self.tunnel.connect([(0, target)])
        payload = pattern(7, 200 * MiB)
        started = time.monotonic()
        reply, reason = yield with_timeout(visit(public, Visitor(payload)), 110)
        elapsed = time.monotonic() - started
        self.assertEqual(reply.decode(), f"{len(payload)} {hashlib.sha256(payload).hexdigest()}")
        reason.trap(error.ConnectionDone)
        print(f"\n200 MiB through the tunnel in {elapsed:.2f} s ({200 / elapsed:.0f} MiB/s)")

    @defer.inlineCallbacks
    def test_half_close_request_then_read_reply(self):
        """The visitor sends, shuts down writing, and still reads the reply."""
        _, target = listen_target(self, HashReply)
        [public] = yield self.tunnel.connect([(0, target)])
        payload = b"request body " * 1000
        reply, reason = yield with_timeout(visit(public, Visitor(payload)), 10)
        self.assertEqual(reply.decode(), f"{len(payload)} {hashlib.sha256(payload).hexdigest()}")

    @defer.inlineCallbacks
    def test_slow_reader_does_not_hold_back_fast_reader_and_stays_bounded(self):
        size = 24 * MiB
        _, target = listen_target(self, Source, seed=3, size=size)
        [public] = yield self.tunnel.connect([(0, target)])
        slow = Visitor(half_close=False, read_slowly=0.05)
        slow_done = visit(public, slow)
        yield sleep(0.5)
        fast_reply, _ = yield with_timeout(visit(public, Visitor(half_close=False)), 60)
        self.assertEqual(len(fast_reply), size)
        self.assertLess(slow.received, size // 2, "the slow reader was not slow")
        # What the server holds for the slow stream: the visitor socket's
        # write buffer, bounded by the stream's window plus one read.
        slow_port = slow.transport.getHost().port
        [stream] = [
            s
            for sess in self.tunnel.server.sessions.values()
            for s in sess.mux_session.streams.values()
            if s.local is not None and s.local.getPeer().port == slow_port
        ]
        held = tcp_held(stream.local.transport)
        self.assertLessEqual(held, stream.window + 2 * 65536)
        self.assertLessEqual(stream.received - stream.reported, stream.window)
        slow.read_slowly = 0
        slow.transport.resumeProducing()
        slow_reply, _ = yield with_timeout(slow_done, 60)
        self.assertEqual(slow_reply, pattern(3, size))

    @defer.inlineCallbacks
    def test_refused_target_closes_visitor_and_session_stays_up(self):
        _, target = listen_target(self, Echo)
        closed_port = free_port()
        public, public_ok = yield self.tunnel.connect([(0, closed_port), (0, target)])
        started = time.monotonic()
        reply, reason = yield with_timeout(visit(public, Visitor(b"x", half_close=False)), 10)
        self.assertEqual(reply, b"")
        self.assertLess(time.monotonic() - started, 2.0)
        reply, _ = yield with_timeout(visit(public_ok, Visitor(b"still up")), 10)
        self.assertEqual(reply, b"still up")

    @defer.inlineCallbacks
    def test_several_tunnels_in_one_session(self):
        _, target_a = listen_target(self, Echo)
        _, target_b = listen_target(self, HashReply)
        public_a, public_b = yield self.tunnel.connect([(0, target_a), (0, target_b)])
        self.assertNotEqual(public_a, public_b)
        self.assertEqual(len(self.tunnel.server.sessions), 1)
        (a, _), (b, _) = yield with_timeout(
            defer.gatherResults([visit(public_a, Visitor(b"aaa")), visit(public_b, Visitor(b"bbb"))]), 10
        )
        self.assertEqual(a, b"aaa")
        self.assertEqual(b.decode(), f"3 {hashlib.sha256(b'bbb').hexdigest()}")

    @defer.inlineCallbacks
    def test_fixed_public_port_is_bound_as_asked(self):
        _, target = listen_target(self, Echo)
        wanted = free_port()
        [public] = yield self.tunnel.connect([(wanted, target)])
        self.assertEqual(public, wanted)

    @defer.inlineCallbacks
    def test_wrong_token_is_fatal_with_clear_message(self):
        service = self.tunnel.start_client(self.tunnel.client_config([(0, 1)], token="wrong"))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("wrong token", message)
        self.assertEqual(self.tunnel.server.sessions, {})

    @defer.inlineCallbacks
    def test_wrong_fingerprint_is_fatal_with_both_fingerprints(self):
        bogus = "ab" * 32
        service = self.tunnel.start_client(self.tunnel.client_config([(0, 1)], fingerprint=bogus))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("sha256:" + bogus, message)
        self.assertIn("sha256:" + self.tunnel.fingerprint, message)

    @defer.inlineCallbacks
    def test_port_in_use_by_another_program_is_a_clear_retryable_error(self):
        _, busy = listen_target(self, Echo)  # "another program" holds the port
        service = self.tunnel.start_client(self.tunnel.client_config([(busy, 1)]))
        yield sleep(1.0)
        self.assertIsNone(service.fatal_error)
        self.assertEqual(service.client.bound, {})

    @defer.inlineCallbacks
    def test_port_not_permitted_is_fatal(self):
        yield self.tunnel.stop_server()
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(allow_ports=((20000, 20010),), allow_port_zero=False)
        service = self.tunnel.start_client(self.tunnel.client_config([(30000, 1)]))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("port 30000 is not permitted", message)
        self.assertIn("20000-20010", message)


class UnreachableServerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_client_keeps_retrying_while_server_is_down(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        fingerprint = tunnel.fingerprint
        yield tunnel.stop_server()
        config = tunnel.client_config([(0, 1)], fingerprint=fingerprint, server_port=free_port())
        service = tunnel.start_client(config)
        yield sleep(1.5)
        self.assertIsNone(service.fatal_error)
        self.assertFalse(service.client.bound)
        yield service.stopService()


class ConfigTests(unittest.SynchronousTestCase):
    def test_fingerprint_forms_are_accepted(self):
        from rtunnel.tls import parse_fingerprint

        hexfp = "AB" * 32
        colons = ":".join(["AB"] * 32)
        for form in (hexfp, hexfp.lower(), colons, "sha256:" + colons, "SHA256:" + hexfp):
            self.assertEqual(parse_fingerprint(form), "ab" * 32)
        self.assertRaises(ConfigError, parse_fingerprint, "abc")

    def test_host_port_forms(self):
        from rtunnel.config import parse_host_port

        self.assertEqual(parse_host_port("3000", "t", "localhost"), ("localhost", 3000))
        self.assertEqual(parse_host_port("h:1", "t", "localhost"), ("h", 1))
        self.assertEqual(parse_host_port("[::1]:3000", "t", "localhost"), ("::1", 3000))
        self.assertEqual(parse_host_port("srv", "c", None, 19050), ("srv", 19050))
        self.assertEqual(parse_host_port("0", "f", "0.0.0.0", allow_zero=True), ("0.0.0.0", 0))
        self.assertRaises(ConfigError, parse_host_port, "::1:3000", "t", "localhost")
        self.assertRaises(ConfigError, parse_host_port, "h:99999", "t", "localhost")
        self.assertRaises(ConfigError, parse_host_port, "0", "t", "localhost")


class ClientOptionTests(unittest.SynchronousTestCase):
    def parse(self, *argv: str):
        from rtunnel.tap.client import Options

        options = Options()
        options.parseOptions(["-c", "srv", "--token", "t", "--fingerprint", "ab" * 32, *argv])
        return options.config

    def test_pairs_of_forward_and_target_make_tunnels(self):
        config = self.parse("-f", "4000", "-t", "3000", "-f", "[::]:0", "-t", "[::1]:22")
        self.assertEqual(
            [(t.bind_host, t.bind_port, t.target_host, t.target_port) for t in config.tunnels],
            [("", 4000, "localhost", 3000), ("::", 0, "::1", 22)],
        )
        self.assertEqual((config.server_host, config.server_port), ("srv", 19050))

    def test_bad_forward_options_are_usage_errors(self):
        from twisted.python.usage import UsageError

        for argv in (
            ("-f", "4000"),
            ("-f", "4000", "-t", "3000", "-f", "4000", "-t", "3001"),
            ("-f", "myhost:4000", "-t", "3000"),
        ):
            self.assertRaises(UsageError, self.parse, *argv)
