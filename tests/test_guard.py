"""Admission control: rtunnel.guard on a task.Clock, and the server's limits
(unauthenticated cap, sessions per client, --max-frame) end to end."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel import wire
from rtunnel.guard import MOST_HELD, PER_ADDRESS, AdmissionGuard, address_key
from rtunnel.server import SessionState
from rtunnel.tap.server import Options
from rtunnel.tls import PinnedCertificateCreator
from rtunnel.wire import ErrorCode, FrameType
from tests.harness import TOKEN, Tunnel, wait_until, with_timeout


class GuardTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.guard = AdmissionGuard(self.clock, max_unauthenticated=3, failure_burst=3, failure_refill=6.0, max_addresses=4)

    def test_unauthenticated_cap_refuses_the_newcomer_from_the_address_holding_the_most(self) -> None:
        g = self.guard
        admitted = [g.admit("192.0.2.1", i) for i in range(5)]
        self.assertEqual([a.admitted for a in admitted], [True, True, True, False, False])
        self.assertEqual([a.refused for a in admitted[3:]], [MOST_HELD, MOST_HELD])
        self.assertEqual((g.unauthenticated, g.refused_connections, g.evicted), (3, 2, 0))
        g.release(0)
        self.assertTrue(g.admit("192.0.2.1", 5).admitted)
        self.assertFalse(g.admit("192.0.2.1", 6).admitted)
        self.assertEqual(g.refused_connections, 3)

    def test_at_the_cap_a_newcomer_takes_the_slot_of_the_oldest_connection_of_the_busiest_address(self) -> None:
        g = self.guard
        for i in range(3):
            self.assertTrue(g.admit("192.0.2.1", f"flood{i}").admitted)
        honest = g.admit("198.51.100.7", "honest")
        self.assertEqual((honest.admitted, honest.evicted), (True, "flood0"))
        self.assertEqual((g.unauthenticated, g.evicted, g.refused_connections), (3, 1, 0))
        self.assertEqual((g.waiting_from("192.0.2.1"), g.waiting_from("198.51.100.7")), (2, 1))
        g.release("flood0")  # the evicted connection closing later changes nothing
        self.assertEqual(g.unauthenticated, 3)
        # the flood's next connection finds its address still the busiest: refused
        self.assertEqual(g.admit("192.0.2.1", "flood3").refused, MOST_HELD)
        # an address holding as many as the busiest is one of the busiest: refused
        self.assertEqual(g.admit("198.51.100.7", "second").evicted, "flood1")
        self.assertEqual(g.admit("198.51.100.7", "third").refused, MOST_HELD)
        self.assertEqual((g.waiting_from("192.0.2.1"), g.waiting_from("198.51.100.7")), (1, 2))

    def test_among_equally_busy_addresses_the_first_to_get_there_gives_up_its_oldest(self) -> None:
        g = AdmissionGuard(self.clock, max_unauthenticated=4)
        for conn, host in [("a1", "192.0.2.1"), ("b1", "192.0.2.2"), ("b2", "192.0.2.2"), ("a2", "192.0.2.1")]:
            self.assertTrue(g.admit(host, conn).admitted)
        self.assertEqual(g.most_held, 2)
        self.assertEqual(g.admit("192.0.2.3", "c1").evicted, "b1", "192.0.2.2 held two first")
        self.assertEqual(g.admit("192.0.2.4", "d1").evicted, "a1")
        self.assertEqual(g.most_held, 1)
        self.assertEqual(g.admit("192.0.2.5", "e1").evicted, "b2", "then the oldest address at one")

    def test_one_address_gets_at_most_its_share_and_others_still_get_in(self) -> None:
        g = AdmissionGuard(self.clock, max_unauthenticated=10, max_per_address=4)
        flood = [g.admit("192.0.2.1", i) for i in range(1000)]
        self.assertEqual(sum(a.admitted for a in flood), 4)
        self.assertEqual(g.refused_per_address, 996)
        self.assertEqual({a.refused for a in flood[4:]}, {PER_ADDRESS})
        for i in range(6):
            self.assertTrue(g.admit(f"198.51.100.{i}", f"honest{i}").admitted)
        self.assertEqual((g.unauthenticated, g.evicted), (10, 0))
        self.assertEqual(g.admit("203.0.113.1", "late").evicted, 0, "the flood's oldest makes room")

    def test_per_address_share_groups_ipv6_by_prefix_and_mapped_ipv4_as_ipv4(self) -> None:
        g = AdmissionGuard(self.clock, max_per_address=2)
        self.assertTrue(g.admit("2001:db8::1", 1).admitted)
        self.assertTrue(g.admit("2001:db8::ffff:2", 2).admitted)
        self.assertEqual(g.admit("2001:db8::3", 3).refused, PER_ADDRESS)
        self.assertTrue(g.admit("2001:db8:0:1::1", 4).admitted, "another /64")
        self.assertTrue(g.admit("192.0.2.1", 5).admitted)
        self.assertTrue(g.admit("::ffff:192.0.2.1", 6).admitted)
        self.assertEqual(g.admit("::ffff:192.0.2.1", 7).refused, PER_ADDRESS)

    def test_the_bookkeeping_matches_a_plain_model_over_random_traffic(self) -> None:
        """Admit and release at random from a few addresses; after each step
        the counts match a recount, no address exceeds its share, and every
        eviction took the oldest connection of an address holding the most."""
        rng = random.Random(12)
        g = AdmissionGuard(self.clock, max_unauthenticated=12, max_per_address=5)
        model: dict[str, list[int]] = {}  # key -> its waiting connections, oldest first
        for conn in range(5000):
            if rng.random() < 0.45 and g.unauthenticated:
                key = rng.choice(sorted(k for k in model if model[k]))
                victim = model[key].pop(rng.randrange(len(model[key])))
                g.release(victim)
            else:
                host = f"192.0.2.{rng.randrange(8)}"
                before = {k: list(v) for k, v in model.items()}
                busiest = max((len(v) for v in before.values()), default=0)
                result = g.admit(host, conn)
                if result.evicted is not None:
                    owner = next(k for k, v in before.items() if v and v[0] == result.evicted)
                    self.assertEqual(len(before[owner]), busiest)
                    self.assertLess(len(before.get(host, [])), busiest)
                    model[owner].pop(0)
                if result.refused == MOST_HELD:
                    self.assertEqual(len(before.get(host, [])), busiest)
                if result.admitted:
                    model.setdefault(host, []).append(conn)
            counts = [len(v) for v in model.values()]
            self.assertEqual(g.unauthenticated, sum(counts))
            self.assertLessEqual(g.unauthenticated, 12)
            self.assertEqual(g.most_held, max(counts, default=0))
            self.assertLessEqual(g.most_held, 5)
        self.assertGreater(g.evicted, 100)
        self.assertGreater(g.refused_per_address + g.refused_connections, 100)

    def test_burst_then_refill(self) -> None:
        g = self.guard
        for _ in range(3):
            self.assertIsNone(g.retry_after("192.0.2.1"))
            g.record_failure("192.0.2.1")
        self.assertAlmostEqual(g.retry_after("192.0.2.1"), 6.0)
        self.assertEqual(g.refused_attempts, 1)
        self.assertIsNone(g.retry_after("192.0.2.2"), "other addresses are not affected")
        self.clock.advance(4)
        self.assertAlmostEqual(g.retry_after("192.0.2.1"), 2.0)
        self.clock.advance(2)
        self.assertIsNone(g.retry_after("192.0.2.1"), "one more attempt after 6 s")
        g.record_failure("192.0.2.1")
        self.assertAlmostEqual(g.retry_after("192.0.2.1"), 6.0, msg="and only one")
        self.clock.advance(18)
        self.assertEqual(g.tracked_addresses, 1)
        self.assertIsNone(g.retry_after("192.0.2.1"))
        self.assertEqual(g.tracked_addresses, 0, "a full bucket is forgotten")

    def test_refused_attempts_do_not_drain_further(self) -> None:
        g = self.guard
        for _ in range(3):
            g.record_failure("192.0.2.1")
        for _ in range(100):
            g.retry_after("192.0.2.1")
        self.clock.advance(6)
        self.assertIsNone(g.retry_after("192.0.2.1"))

    def test_rate_is_bounded_over_time(self) -> None:
        """An attacker retrying every second for 10 minutes gets burst +
        600 / refill token checks, no more."""
        g = self.guard
        checked = 0
        for _ in range(600):
            if g.retry_after("192.0.2.9") is None:
                checked += 1
                g.record_failure("192.0.2.9")
            self.clock.advance(1)
        self.assertLessEqual(checked, 3 + 600 / 6)

    def test_table_is_bounded(self) -> None:
        g = self.guard
        for _ in range(3):
            g.record_failure("192.0.2.1")
            self.clock.advance(1)
        for i in range(10):
            g.record_failure(f"198.51.100.{i}")
        self.assertEqual(g.tracked_addresses, 4)
        # the least recently failing entries went first
        self.assertIsNone(g.retry_after("192.0.2.1"))
        self.assertEqual(g.tracked_addresses, 4)

    def test_table_keeps_the_newest(self) -> None:
        g = AdmissionGuard(self.clock, failure_burst=1, max_addresses=2)
        g.record_failure("192.0.2.1")
        g.record_failure("192.0.2.2")
        g.record_failure("192.0.2.3")
        self.assertIsNone(g.retry_after("192.0.2.1"), "evicted")
        self.assertIsNotNone(g.retry_after("192.0.2.2"))
        self.assertIsNotNone(g.retry_after("192.0.2.3"))

    def test_ipv6_by_prefix(self) -> None:
        self.assertEqual(address_key("2001:db8::1"), address_key("2001:db8::ffff:1"))
        self.assertNotEqual(address_key("2001:db8::1"), address_key("2001:db8:0:1::1"))
        self.assertEqual(address_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(address_key("192.0.2.1"), "192.0.2.1")
        g = AdmissionGuard(self.clock, failure_burst=1)
        g.record_failure("2001:db8::1")
        self.assertIsNotNone(g.retry_after("2001:db8::2"))

    def test_bad_limits(self) -> None:
        for kwargs in ({"max_unauthenticated": 0}, {"max_per_address": 0}, {"failure_burst": 0}, {"failure_refill": 0}):
            self.assertRaises(ValueError, AdmissionGuard, self.clock, **kwargs)


class IPv6AddressTests(unittest.SynchronousTestCase):
    """IPv4-mapped peers count as their IPv4 address; IPv6 peers per /64."""

    def test_ipv4_mapped_failures_count_against_the_ipv4_address(self) -> None:
        guard = AdmissionGuard(task.Clock(), failure_burst=2, failure_refill=60)
        guard.record_failure("::ffff:127.0.0.5")
        guard.record_failure("::ffff:127.0.0.5")
        self.assertIsNotNone(guard.retry_after("127.0.0.5"))  # the same address
        self.assertIsNotNone(guard.retry_after("::ffff:127.0.0.5"))
        self.assertIsNone(guard.retry_after("127.0.0.6"))  # not its neighbour
        self.assertEqual(address_key("::ffff:127.0.0.5"), "127.0.0.5")
        self.assertEqual(guard.tracked_addresses, 1)

    def test_ipv4_failures_count_against_the_mapped_form_too(self) -> None:
        guard = AdmissionGuard(task.Clock(), failure_burst=1, failure_refill=60)
        guard.record_failure("127.0.0.7")
        self.assertIsNotNone(guard.retry_after("::ffff:127.0.0.7"))

    def test_ipv6_counts_per_64(self) -> None:
        guard = AdmissionGuard(task.Clock(), failure_burst=1, failure_refill=60)
        guard.record_failure("2001:db8:1:2::1")
        self.assertIsNotNone(guard.retry_after("2001:db8:1:2:ffff::9"))
        self.assertIsNone(guard.retry_after("2001:db8:1:3::1"))


class OptionTests(unittest.TestCase):
    def parse(self, *argv: str) -> Any:
        options = Options()
        options.parseOptions(list(argv))
        return options.config

    def test_defaults(self) -> None:
        config = self.parse()
        self.assertEqual(config.max_unauthenticated, 256)
        self.assertEqual(config.max_unauthenticated_per_address, 32)
        self.assertEqual((config.auth_failure_burst, config.auth_failure_refill), (10, 6.0))
        self.assertEqual(config.max_sessions_per_client, 8)
        self.assertEqual(config.session.max_frame, 1 << 20)

    def test_values(self) -> None:
        config = self.parse(
            "--max-unauthenticated", "50", "--auth-failures", "3", "--auth-failure-window", "60",
            "--max-sessions-per-client", "2", "--max-frame", "65536", "--max-unauthenticated-per-address", "7",
        )
        self.assertEqual(config.max_unauthenticated, 50)
        self.assertEqual(config.max_unauthenticated_per_address, 7)
        self.assertEqual((config.auth_failure_burst, config.auth_failure_refill), (3, 60.0))
        self.assertEqual(config.max_sessions_per_client, 2)
        self.assertEqual(config.session.max_frame, 65536)

    def test_bad_values(self) -> None:
        for argv in (
            ["--max-frame", "16383"], ["--max-frame", str(16 * 1024 * 1024 + 1)],
            ["--max-unauthenticated", "0"], ["--max-unauthenticated-per-address", "0"], ["--auth-failures", "0"],
            ["--auth-failure-window", "0"], ["--max-sessions-per-client", "0"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)


class Hello(Protocol):
    """TLS (pinned), then one HELLO; `reply` fires with the first frame."""

    def __init__(self, token: str, resume: dict[str, str] | None = None) -> None:
        self.hello = {"protocol": "rtunnel", "versions": [1], "token": token, "max_frame": 1 << 20}
        if resume:
            self.hello["resume"] = resume
        self.decoder = wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME)
        self.reply: defer.Deferred[wire.Frame | None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(wire.encode_json(FrameType.HELLO, self.hello))

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if not self.reply.called:
                self.reply.callback(frame)

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.reply.called:
            self.reply.callback(None)


class Raw(Protocol):
    def __init__(self) -> None:
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed.callback(None)


class ServerLimitTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def hello(self, tunnel: Tunnel, token: str = TOKEN, resume: Any = None) -> Any:
        proto = Hello(token, resume)
        endpoint = wrapClientTLS(
            PinnedCertificateCreator(tunnel.fingerprint),
            TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel.control_port, timeout=5),
        )
        yield connectProtocol(endpoint, proto)
        self.addCleanup(lambda: proto.transport.connected and proto.transport.abortConnection())
        frame = yield with_timeout(proto.reply, 10)
        return proto, frame

    @defer.inlineCallbacks
    def test_sessions_per_client(self) -> Any:
        tunnel = Tunnel(self)
        yield tunnel.start_server(max_sessions_per_client=1)
        server = tunnel.server
        first, frame = yield self.hello(tunnel)
        self.assertEqual(frame.type, FrameType.WELCOME)
        welcome = wire.decode_json(frame)

        _, frame = yield self.hello(tunnel)
        self.assertEqual(frame.type, FrameType.ERROR)
        code, reason = wire.decode_coded(frame)
        self.assertEqual(code, ErrorCode.LIMIT_EXCEEDED)
        self.assertIn("--max-sessions-per-client", reason)
        self.assertEqual(len(server.sessions), 1)

        # a resume is not a new session
        resume = {"session": welcome["session"], "secret": welcome["secret"]}
        second, frame = yield self.hello(tunnel, resume=resume)
        self.assertEqual(frame.type, FrameType.WELCOME)
        self.assertTrue(wire.decode_json(frame)["resumed"])

        # a detached session (its client restarted) makes room for a new one
        second.transport.abortConnection()
        [session] = server.sessions.values()
        yield wait_until(lambda: session.state is SessionState.DETACHED, 5)
        _, frame = yield self.hello(tunnel)
        self.assertEqual(frame.type, FrameType.WELCOME)
        self.assertEqual(session.state, SessionState.EXPIRED)
        self.assertEqual(len(server.sessions), 1)
        yield wait_until(lambda: server.guard.unauthenticated == 0, 5)

    @defer.inlineCallbacks
    def test_unauthenticated_cap(self) -> Any:
        tunnel = Tunnel(self)
        yield tunnel.start_server(max_unauthenticated=3)
        server = tunnel.server
        raws = [Raw() for _ in range(5)]
        for proto in raws:
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel.control_port), proto)
            self.addCleanup(lambda p=proto: p.transport.connected and p.transport.abortConnection())
        yield with_timeout(defer.gatherResults([p.closed for p in raws[3:]]), 5)
        self.assertEqual(server.guard.refused_connections, 2)
        self.assertEqual(server.guard.unauthenticated, 3)
        self.assertFalse(any(p.closed.called for p in raws[:3]))
        for proto in raws[:3]:
            proto.transport.abortConnection()
        yield wait_until(lambda: server.guard.unauthenticated == 0, 5)
        _, frame = yield self.hello(tunnel)
        self.assertEqual(frame.type, FrameType.WELCOME)
        self.assertEqual(server.guard.unauthenticated, 0)

    @defer.inlineCallbacks
    def test_wrong_tokens_are_rate_limited(self) -> Any:
        tunnel = Tunnel(self)
        yield tunnel.start_server(auth_failure_burst=2, auth_failure_refill=60.0)
        reasons, codes = [], []
        for _ in range(4):
            _, frame = yield self.hello(tunnel, token="wrong")
            code, reason = wire.decode_coded(frame)
            codes.append(code)
            reasons.append(reason)
        # a wrong token is fatal for a client; a rate limit is to retry later
        self.assertEqual(codes, [ErrorCode.AUTH_FAILED] * 2 + [ErrorCode.LIMIT_EXCEEDED] * 2)
        self.assertTrue(all(r.startswith("wrong token") for r in reasons[:2]), reasons)
        self.assertTrue(all("too many failed attempts from 127.0.0.1; wait" in r for r in reasons[2:]), reasons)
        # while limited, even the right token is not looked at
        _, frame = yield self.hello(tunnel)
        self.assertEqual(frame.type, FrameType.ERROR)
        self.assertEqual(tunnel.server.guard.failures, 2)

    @defer.inlineCallbacks
    def test_max_frame_is_announced_and_enforced(self) -> Any:
        from rtunnel.mux import SessionSettings

        tunnel = Tunnel(self)
        yield tunnel.start_server(session=SessionSettings(max_frame=32768))
        proto, frame = yield self.hello(tunnel)
        self.assertEqual(wire.decode_json(frame)["max_frame"], 32768)
        # a header announcing a longer body ends the link at once
        proto.transport.write(wire.encode_json(FrameType.BIND, {"tunnel": 1, "port": 0, "pad": "x" * 40000}))
        yield with_timeout(_closed(proto), 5)
        yield wait_until(lambda: not tunnel.server.sessions, 5)


def _closed(proto: Hello) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    original = proto.connectionLost

    def lost(reason: Failure = None) -> None:
        original(reason)
        d.callback(None)

    if not proto.transport.connected:
        return defer.succeed(None)
    proto.connectionLost = lost  # type: ignore[method-assign]
    return d


class TunnelLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_token_credential_gets_at_most_max_tunnels(self):
        from tests.harness import Echo, Tunnel, listen_target, with_timeout

        tunnel = Tunnel(self)
        yield tunnel.start_server(max_tunnels=2)
        _, target = listen_target(self, Echo)
        service = tunnel.start_client(tunnel.client_config([(0, target)] * 3))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("at most 2 tunnels per session", message)
        self.assertEqual(len(service.client.bound), 2)
