"""Per-client limits (rtunnel.limits): the token bucket and the paced mux on
a fake clock, the clients-file keys and server flags, and end to end on
loopback: 1 MB/s held within 10% over 5 s in each direction, and the
connection limit per tunnel."""

from __future__ import annotations

import io
import random
import time

from prometheus_client import generate_latest
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from rtunnel.auth import parse_clients
from rtunnel.errors import ConfigError
from rtunnel.limits import (
    BURST_SECONDS,
    MAX_KINDS,
    MIN_BURST,
    VISITORS_OVER_LIMIT,
    Limits,
    Pacer,
    RefusalLog,
    TokenBucket,
    burst_for,
)
from rtunnel.metrics import ServerCollector, registry_for
from rtunnel.tap.server import Options
from tests.harness import (
    Echo,
    LogCapture,
    Source,
    Tunnel,
    Visitor,
    listen_target,
    metric_value,
    parse_metrics,
    pattern,
    sleep,
    visit,
    wait_until,
)
from tests.memory import Pair

MB = 1_000_000
RATE = MB
HASH = "ab" * 32


class NearMixin:
    def assertNear(self, ratio: float, tolerance: float, msg: str = "") -> None:
        """`ratio` is within `tolerance` of 1 (e.g. measured / expected)."""
        if abs(ratio - 1.0) > tolerance:
            raise self.failureException(f"{ratio:.4f} is not within {tolerance:.0%} of 1 {msg}")


class TokenBucketTests(NearMixin, unittest.TestCase):
    def test_starts_full_refills_at_the_rate_and_stops_at_the_burst(self):
        clock = Clock()
        bucket = TokenBucket(clock, RATE)
        self.assertEqual(bucket.burst, int(RATE * BURST_SECONDS))
        self.assertEqual(bucket.available(), bucket.burst)
        bucket.take(bucket.burst)
        self.assertEqual(bucket.available(), 0)
        clock.advance(0.05)
        self.assertEqual(bucket.available(), RATE // 20)
        clock.advance(10)
        self.assertEqual(bucket.available(), bucket.burst)

    def test_debt_is_paid_off_before_tokens_return(self):
        clock = Clock()
        bucket = TokenBucket(clock, RATE)
        bucket.take(bucket.burst + 300_000)
        self.assertEqual(bucket.available(), -300_000)
        self.assertAlmostEqual(bucket.seconds_until(1000), 0.301)
        clock.advance(0.3)
        self.assertEqual(bucket.available(), 0)

    def test_small_rates_get_at_least_one_minimum_frame_of_burst(self):
        self.assertEqual(burst_for(10_000), MIN_BURST)
        self.assertEqual(burst_for(10 * MB), MB)

    def test_rate_must_be_positive(self):
        self.assertRaises(ValueError, TokenBucket, Clock(), 0)


def run(pair: Pair, seconds: float, step: float = 0.005) -> None:
    for _ in range(round(seconds / step)):
        pair.advance(step)


class PacedMuxTests(NearMixin, unittest.TestCase):
    """A bandwidth-limited session on memory transports and a fake clock."""

    def paced(self, to_client: bool) -> tuple[Pair, Pacer]:
        pair = Pair()
        pacer = Pacer(pair.clock, RATE, "paced_flush" if to_client else "paced_grant")
        if to_client:
            pair.server.send_pacer = pacer
        else:
            pair.server.recv_pacer = pacer
        return pair, pacer

    def test_to_client_holds_the_rate(self):
        pair, pacer = self.paced(to_client=True)
        server_end, client_end = pair.open()
        server_end.send(pattern(1, 8 * MB))
        run(pair, 1.0)  # warm-up: the burst goes at once
        start = len(client_end.received)
        peak_pending = 0
        for _ in range(600):  # 3 s
            pair.advance(0.005)
            peak_pending = max(peak_pending, sum(map(len, server_end.stream._pending)))
        rate = (len(client_end.received) - start) / 3.0
        self.assertNear(rate / RATE, 0.02)
        # a stream held by the limit keeps at most the one read it made
        self.assertLessEqual(peak_pending, server_end.chunk)
        self.assertEqual(client_end.received, pattern(1, 8 * MB)[: len(client_end.received)])
        self.assertGreater(pacer.held_seconds_at(pair.clock.seconds()), 3.0)
        self.assertEqual(pacer.bytes, len(client_end.received))

    def test_from_client_holds_the_rate_by_pacing_window_grants(self):
        pair, pacer = self.paced(to_client=False)
        server_end, client_end = pair.open()
        client_end.send(pattern(2, 8 * MB))
        run(pair, 1.0)
        start = len(server_end.received)
        peak_outstanding = 0
        for _ in range(600):
            pair.advance(0.005)
            stream = server_end.stream
            peak_outstanding = max(peak_outstanding, stream.recv_limit - stream.received)
        rate = (len(server_end.received) - start) / 3.0
        self.assertNear(rate / RATE, 0.03)
        # the credit the client holds never exceeds the stream's window
        self.assertLessEqual(peak_outstanding, server_end.stream.window)
        self.assertLessEqual(client_end.stream.buffered_out, client_end.stream.window)
        self.assertEqual(server_end.received, pattern(2, 8 * MB)[: len(server_end.received)])

    def test_streams_of_one_client_share_the_rate_fairly(self):
        for to_client in (True, False):
            pair, pacer = self.paced(to_client)
            ends = [pair.open() for _ in range(4)]
            for i, (server_end, client_end) in enumerate(ends):
                (server_end if to_client else client_end).send(pattern(i, 4 * MB))
            run(pair, 1.0)
            starts = [len((c if to_client else s).received) for s, c in ends]
            run(pair, 3.0)
            got = [len((c if to_client else s).received) - a for (s, c), a in zip(ends, starts, strict=True)]
            total = sum(got) / 3.0
            self.assertNear(total / RATE, 0.03, f"to_client={to_client}")
            for n in got:
                self.assertNear(n / (sum(got) / 4), 0.15, f"{got} to_client={to_client}")

    def test_one_bucket_is_shared_by_both_sessions_of_a_client(self):
        pair_a, pair_b = Pair(), Pair()
        pair_b.clock = pair_a.clock
        pacer = Pacer(pair_a.clock, RATE, "paced_flush")
        for pair in (pair_a, pair_b):
            pair.server.clock = pair.client.clock = pair_a.clock
            pair.server.send_pacer = pacer
        (sa, ca), (sb, cb) = pair_a.open(), pair_b.open()
        sa.send(pattern(1, 4 * MB))
        sb.send(pattern(2, 4 * MB))
        for _ in range(400):  # 2 s
            pair_a.clock.advance(0.005)
            pair_a.pump()
            pair_b.pump()
        total = len(ca.received) + len(cb.received)
        self.assertNear(total / (2 * RATE + pacer.bucket.burst), 0.03)

    def test_a_closed_stream_stops_waiting_and_returns_its_unused_credit(self):
        pair, pacer = self.paced(to_client=True)
        server_end, _ = pair.open()
        server_end.send(pattern(3, MB))
        pair.pump()
        self.assertEqual(pacer.waiting, 1)
        server_end.lose()
        pair.pump()
        self.assertEqual(pacer.waiting, 0)
        held = pacer.held_seconds
        pair.advance(1)
        self.assertEqual(pacer.held_seconds, held)

        pair, pacer = self.paced(to_client=False)
        server_end, client_end = pair.open()
        client_end.send(pattern(4, 300_000))
        run(pair, 0.3)
        pair.advance(0.2)  # the tokens refill while no more bytes come
        before = pacer.bucket.available()
        paid_ahead = server_end.stream.paid_limit - server_end.stream.received
        self.assertGreater(paid_ahead, 0)
        server_end.lose()
        pair.pump()
        self.assertEqual(pacer.waiting, 0)
        self.assertEqual(pacer.bucket.available(), min(pacer.bucket.burst, before + paid_ahead))

    def test_returned_credit_never_lowers_the_paced_bytes(self):
        # rtunnel_bandwidth_paced_bytes_total is a counter: refunds go to the bucket only
        pair, pacer = self.paced(to_client=False)
        server_end, client_end = pair.open()
        client_end.send(pattern(4, 300_000))
        run(pair, 0.3)
        pair.advance(0.2)
        self.assertGreater(server_end.stream.paid_limit, server_end.stream.received)
        paced = pacer.bytes
        server_end.lose()
        pair.pump()
        self.assertEqual(pacer.bytes, paced)

    def test_paced_streams_survive_a_resume(self):
        pair, pacer = self.paced(to_client=True)
        server_end, client_end = pair.open()
        payload = pattern(5, 2 * MB)
        server_end.send(payload)
        run(pair, 0.5)
        pair.reconnect(deliver_s2c=1000)
        pair.pump()
        run(pair, 2.0)
        self.assertEqual(client_end.received, payload)


    def test_many_short_streams_both_ways_arrive_intact_and_leave_nothing_waiting(self):
        pair = Pair()
        up = Pacer(pair.clock, 200_000, "paced_flush")
        down = Pacer(pair.clock, 200_000, "paced_grant")
        pair.server.send_pacer, pair.server.recv_pacer = up, down
        rng = random.Random(7)
        sizes = [rng.choice([0, 1, 5000, 70_000, 300_000]) for _ in range(24)]
        streams = []
        for i, size in enumerate(sizes):
            server_end, client_end = pair.open()
            server_end.send(pattern(i, size))
            client_end.send(pattern(100 + i, size))
            server_end.shutdown_write()
            client_end.shutdown_write()
            streams.append((server_end, client_end))
            run(pair, 0.05)
        total = 2 * sum(sizes)
        for _ in range(100):  # bounded: about (total / rate) s of fake time, twice over
            if not pair.server.streams and not pair.client.streams:
                break
            run(pair, 0.2)
        for i, ((server_end, client_end), size) in enumerate(zip(streams, sizes, strict=True)):
            self.assertEqual(client_end.received, pattern(i, size))
            self.assertEqual(server_end.received, pattern(100 + i, size))
        self.assertEqual((pair.server.streams, pair.client.streams), ({}, {}))
        self.assertEqual((up.waiting, down.waiting), (0, 0))
        self.assertEqual(up.bytes, sum(sizes))
        self.assertEqual((up._timer, down._timer), (None, None))  # no refill timer left behind
        self.assertGreater(total, 0)


class RefusalLogTests(NearMixin, unittest.TestCase):
    def refusal_log(self, clock: Clock, events: list[dict], times: list[float] | None = None) -> RefusalLog:
        def observe(event: dict) -> None:
            events.append(event)
            if times is not None:
                times.append(clock.seconds())

        return RefusalLog(clock, log=Logger(observer=observe))

    def refuse(self, refusals: RefusalLog, key: object = "tunnel") -> None:
        refusals.refused(
            key, VISITORS_OVER_LIMIT, tunnel="127.0.0.1:4000", limit=2,
            event="visitor_refused", reason="max_connections_per_tunnel",
        )

    def test_at_most_one_line_a_second_with_the_count(self):
        clock = Clock()
        events: list[dict] = []
        times: list[float] = []
        refusals = self.refusal_log(clock, events, times)
        for _ in range(1000):
            self.refuse(refusals)
            clock.advance(0.002)  # 1000 visitors in 2 s
        clock.advance(1)
        self.assertEqual(len(events), 3)  # at 0 s, 1 s and 2 s
        self.assertEqual([round(t, 6) for t in times], [0, 1, 2])
        self.assertEqual(events[0]["count"], 1)
        self.assertEqual(sum(e["count"] for e in events), 1000)
        self.assertEqual(events[1]["event"], "visitor_refused")
        self.assertEqual(events[1]["reason"], "max_connections_per_tunnel")

    def test_the_end_of_a_burst_is_reported_one_interval_later(self):
        clock = Clock()
        events: list[dict] = []
        refusals = self.refusal_log(clock, events)
        for _ in range(5):  # 5 visitors in 0.5 s, then none
            self.refuse(refusals)
            clock.advance(0.1)
        self.assertEqual([e["count"] for e in events], [1])
        clock.advance(0.5)  # one second after the first line
        self.assertEqual([e["count"] for e in events], [1, 4])
        clock.advance(60)
        self.assertEqual(len(events), 2)  # nothing more to say
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_reports_what_is_left_and_leaves_no_timer(self):
        clock = Clock()
        events: list[dict] = []
        refusals = self.refusal_log(clock, events)
        for _ in range(3):
            self.refuse(refusals)
        refusals.stop()
        self.assertEqual([e["count"] for e in events], [1, 2])
        self.assertEqual(clock.getDelayedCalls(), [])
        refusals.stop()
        self.assertEqual(len(events), 2)

    def test_each_kind_has_its_own_first_line_and_count(self):
        clock = Clock()
        events: list[dict] = []
        refusals = self.refusal_log(clock, events)
        for i in range(100):
            refusals.refused(("bind_refused", "s1"), "refused to bind port {port}", port=i, event="bind_refused")
            refusals.refused(("bind_refused", "s2"), "refused to bind port {port}", port=i, event="bind_refused")
        self.assertEqual([(e["count"], e["port"]) for e in events], [(1, 0), (1, 0)])
        clock.advance(1)
        self.assertEqual([(e["count"], e["port"]) for e in events[2:]], [(99, 99), (99, 99)])
        self.assertEqual(
            formatEvent(events[2]), "refused to bind port 99; 99 refused like this since the previous line"
        )
        self.assertEqual(formatEvent(events[0]), "refused to bind port 0")

    def test_idle_kinds_are_forgotten_so_the_table_stays_small(self):
        clock = Clock()
        events: list[dict] = []
        refusals = self.refusal_log(clock, events)
        for second in range(50):  # 1000 new kinds a second (e.g. as many source addresses)
            for i in range(1000):
                refusals.refused((second, i), "refused {peer}", peer=i)
            clock.advance(1)
        self.assertEqual(len(events), 50_000)  # each its first line: nothing was repeated
        self.assertLessEqual(len(refusals._tallies), 2 * 1000 + 64)

    def test_kinds_beyond_the_maximum_share_one_count(self):
        clock = Clock()
        events: list[dict] = []
        refusals = self.refusal_log(clock, events)
        for i in range(MAX_KINDS + 500):  # all within one interval: none is idle yet
            refusals.refused(i, "refused {peer}", peer=i)
        self.assertEqual(len(events), MAX_KINDS + 1)  # the first of the shared kind at once
        refusals.stop()
        self.assertEqual(sum(e["count"] for e in events), MAX_KINDS + 500)
        self.assertLessEqual(len(events), MAX_KINDS + 2)

    def test_refusals_over_the_unauthenticated_cap_are_reported_after_a_burst(self):
        from rtunnel.config import ServerConfig
        from rtunnel.server import TunnelServer

        clock = Clock()
        server = TunnelServer(clock, ServerConfig(listen="tcp:0", state_dir=None, max_unauthenticated=1), None)
        events = LogCapture(self).events
        self.assertTrue(server.guard.admit("192.0.2.1", "first").admitted)
        for _ in range(5):  # 5 connections over the cap in 1 s, then none
            self.assertFalse(server.guard.admit("192.0.2.1", "next").admitted)
            server.connection_refused_over_cap()
            clock.advance(0.2)
        capped = [e for e in events if e.get("event") == "connections_capped"]
        self.assertEqual([e["refused"] for e in capped], [1])
        clock.advance(10)
        capped = [e for e in events if e.get("event") == "connections_capped"]
        self.assertEqual([(e["refused"], e["refused_total"]) for e in capped], [(1, 1), (4, 5)])
        clock.advance(60)
        self.assertEqual(len([e for e in events if e.get("event") == "connections_capped"]), 2)


class ConfigurationTests(NearMixin, unittest.TestCase):
    def client(self, extra: str):
        text = f'[clients.alice]\ntoken_sha256 = "{HASH}"\nports = [4000]\n{extra}\n'
        return parse_clients(text, "clients.toml")["alice"]

    def test_clients_file_keys(self):
        self.assertEqual(self.client("").limits(), Limits())
        self.assertEqual(self.client("bandwidth = 1000000").limits(), Limits(MB, MB))
        policy = self.client("bandwidth = 1000000\nbandwidth_from_client = 500000\nmax_connections_per_tunnel = 3")
        self.assertEqual(policy.limits(), Limits(MB, 500_000, 3))

    def test_clients_file_rejects_bad_values_saying_what_to_write(self):
        for extra in ("bandwidth = 0", 'bandwidth = "1M"', "bandwidth_to_client = 1.5",
                      "max_connections_per_tunnel = -1", "max_connections_per_tunnel = true"):
            with self.assertRaises(ConfigError) as caught:
                self.client(extra)
            message = str(caught.exception)
            self.assertIn("clients.toml", message)
            self.assertIn(extra.split(" ")[0], message)
            self.assertIn("leave it out for no limit", message)

    def test_server_flags(self):
        options = Options()
        options.parseOptions(["--bandwidth", "1000000", "--bandwidth-from-client", "2000",
                              "--max-connections-per-tunnel", "5"])
        self.assertEqual(options.config.limits, Limits(MB, 2000, 5))
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.config.limits, Limits())
        from twisted.python import usage
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--bandwidth", "-1"])

    def test_add_client_writes_the_limits(self):
        from rtunnel.auth import load_clients
        from rtunnel.tap.server import add_client_main

        path = self.mktemp()
        out = io.StringIO()
        status = add_client_main(
            ["alice", "--ports", "4000", "--clients", path, "--bandwidth", "1000000",
             "--max-connections-per-tunnel", "7"], out,
        )
        self.assertEqual(status, 0)
        self.assertEqual(load_clients(path)["alice"].limits(), Limits(MB, MB, 7))
        self.assertRaises(SystemExit, add_client_main, ["bob", "--ports", "4000", "--clients", path, "--bandwidth", "0"], io.StringIO())

    def test_server_config_file_keys_and_flags_over_them(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("bandwidth = 1000000\nmax_connections_per_tunnel = 10\n")
        options = Options()
        options.parseOptions(["--config", path, "--bandwidth-to-client", "3000"])
        self.assertEqual(options.config.limits, Limits(3000, MB, 10))


class ReloadTests(unittest.TestCase):
    def test_a_reload_gives_a_client_new_buckets_and_keeps_its_counts(self):
        from rtunnel.config import ServerConfig
        from rtunnel.server import TunnelServer

        def clients(extra: str):
            text = f'[clients.alice]\ntoken_sha256 = "{HASH}"\nports = [4000]\n{extra}\n'
            return parse_clients(text, "clients.toml")

        server = TunnelServer(Clock(), ServerConfig(listen="tcp:0", state_dir=None), None, clients(""))
        before = server.limiter_for("alice")
        self.assertIsNone(before.to_client)
        before.visitors_refused = 3
        server.set_clients(clients("bandwidth_to_client = 400000"))
        server.limiter_for("alice").to_client.bytes = 1234
        server.set_clients(clients("bandwidth_to_client = 500000\nmax_connections_per_tunnel = 2"))
        after = server.limiter_for("alice")
        self.assertEqual(after.to_client.bytes, 1234)
        self.assertEqual(after.to_client.rate, 500_000)
        self.assertIsNone(after.from_client)
        self.assertEqual(after.limits.max_connections_per_tunnel, 2)
        self.assertEqual(after.visitors_refused, 3)
        server.set_clients(clients("bandwidth_to_client = 500000\nmax_connections_per_tunnel = 2"))
        self.assertIs(server.limiter_for("alice"), after)  # unchanged limits: the same buckets


    def test_a_reload_that_adds_a_limit_refunds_only_credit_the_new_bucket_was_paid(self):

        from rtunnel.config import ServerConfig
        from rtunnel.server import ServerSession, TunnelServer

        def clients(extra: str):
            text = f'[clients.alice]\ntoken_sha256 = "{HASH}"\nports = [4000]\n{extra}\n'
            return parse_clients(text, "clients.toml")

        pair = Pair()
        server = TunnelServer(pair.clock, ServerConfig(listen="tcp:0", state_dir=None), None, clients(""))
        server.limiter_for("alice")
        # a session of alice running over the memory pair's server end
        owner = ServerSession(server, "alice")
        owner.mux_session = pair.server
        server.sessions[owner.id] = owner
        self.addCleanup(server.sessions.clear)
        fresh, _ = pair.open()  # granted its initial window without a limit
        sending_end, client_end = pair.open()
        client_end.send(pattern(6, 100_000))
        pair.pump()
        self.assertEqual(sending_end.stream.received, 100_000)
        server.set_clients(clients("bandwidth_from_client = 400000"))
        pacer = server.limiter_for("alice").from_client
        self.assertIs(pair.server.recv_pacer, pacer)
        pacer.bucket.take(pacer.bucket.burst)  # an empty bucket: a refund would show
        fresh.lose()
        sending_end.lose()
        pair.pump()
        self.assertEqual(pacer.bytes, 0)  # nothing paid, nothing returned
        self.assertEqual(pacer.bucket.available(), 0)  # no free tokens

        # credit the new bucket did pay for comes back when the stream ends
        server_end, client_end = pair.open()
        client_end.send(pattern(7, 400_000))
        for _ in range(400):  # bounded: 2 s of fake time
            pair.advance(0.005)
            stream = server_end.stream
            if stream.paid_limit > stream.received + 10_000 and stream.received > 300_000:
                break
        stream = server_end.stream
        paid_ahead = stream.paid_limit - stream.received
        self.assertGreater(paid_ahead, 0)
        pacer.bucket.take(pacer.bucket.available())
        paced = pacer.bytes
        server_end.lose()
        pair.pump()
        self.assertEqual(pacer.bytes, paced)
        self.assertEqual(pacer.bucket.available(), paid_ahead)


class Sink(Protocol):
    """A target that counts what it receives."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)


def scrape_limits(server):
    """The server's metrics as Prometheus text, parsed (rtunnel.metrics)."""
    return parse_metrics(generate_latest(registry_for(ServerCollector(lambda: server))).decode())


class EndToEndTests(NearMixin, unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def measure(self, count, warmup=1.0, window=5.0):
        """The rate of count() over `window` seconds after `warmup`."""
        yield sleep(warmup)
        start, t0 = count(), time.monotonic()
        yield sleep(window)
        return (count() - start) / (time.monotonic() - t0)

    @defer.inlineCallbacks
    def test_one_mb_per_second_to_the_client_within_ten_percent(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server(limits=Limits(to_client=MB, from_client=MB))
        sinks, target = listen_target(self, Sink)
        [public] = yield tunnel.connect([(0, target)])
        visitor = Visitor(pattern(1, 12 * MB), half_close=False)
        visit(public, visitor).addErrback(lambda _: None)
        yield wait_until(lambda: sinks.connections, 10)
        rate = yield self.measure(lambda: sinks.connections[0].received)
        print(f"\nto the client: {rate / MB:.3f} MB/s with a 1 MB/s limit")
        self.assertNear(rate / MB, 0.1)
        pacer = tunnel.server.limiters["default"].to_client
        self.assertGreater(pacer.held_seconds_at(reactor.seconds()), 4.0)
        samples = scrape_limits(tunnel.server)
        self.assertEqual(
            metric_value(samples, "rtunnel_bandwidth_limit_bytes_per_second", client="default", direction="to_client"), MB
        )
        self.assertGreater(
            metric_value(samples, "rtunnel_bandwidth_paced_bytes_total", client="default", direction="to_client"), 5 * MB
        )
        self.assertGreater(
            metric_value(samples, "rtunnel_bandwidth_held_seconds_total", client="default", direction="to_client"), 4.0
        )
        # no connection limit: no limit series, but the open connections are there
        self.assertEqual([n for n, _ in samples if n == "rtunnel_connection_limit"], [])
        self.assertEqual(
            metric_value(samples, "rtunnel_tunnel_connections_open", client="default", tunnel=f"127.0.0.1:{public}"), 1
        )
        visitor.transport.abortConnection()

    @defer.inlineCallbacks
    def test_one_mb_per_second_from_the_client_within_ten_percent(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server(limits=Limits(to_client=MB, from_client=MB))
        _, target = listen_target(self, Source, seed=2, size=12 * MB)
        [public] = yield tunnel.connect([(0, target)])
        visitor = Visitor(half_close=False)
        visit(public, visitor).addErrback(lambda _: None)
        yield wait_until(lambda: visitor.received, 10)
        rate = yield self.measure(lambda: visitor.received)
        print(f"\nfrom the client: {rate / MB:.3f} MB/s with a 1 MB/s limit")
        self.assertNear(rate / MB, 0.1)
        pacer = tunnel.server.limiters["default"].from_client
        self.assertGreater(pacer.held_seconds_at(reactor.seconds()), 0.5)  # grants waiting for tokens
        visitor.transport.abortConnection()

    @defer.inlineCallbacks
    def test_connection_limit_refuses_beyond_it_and_admits_after_one_closes(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server(limits=Limits(max_connections_per_tunnel=2))
        _, target = listen_target(self, Echo)
        [public] = yield tunnel.connect([(0, target)])
        first, second = Visitor(b"one", half_close=False), Visitor(b"two", half_close=False)
        done = [visit(public, first), visit(public, second)]
        yield wait_until(lambda: first.received and second.received, 10)
        [listener] = tunnel.server.listeners.values()
        self.assertEqual(listener.open_connections, 2)
        events = LogCapture(self).events
        replies = yield defer.gatherResults(
            [visit(public, Visitor(b"three")).addTimeout(10, reactor) for _ in range(30)]
        )
        self.assertEqual({reply for reply, _ in replies}, {b""})  # closed at once, before the tunnel
        self.assertEqual(listener.visitors_refused, 30)
        self.assertEqual(tunnel.server.limiters["default"].visitors_refused, 30)
        self.assertEqual(tunnel.server.limiters["default"].refused_by_tunnel, {f"127.0.0.1:{public}": 30})
        samples = scrape_limits(tunnel.server)
        self.assertEqual(
            metric_value(samples, "rtunnel_visitors_refused_connection_limit_total", tunnel=f"127.0.0.1:{public}"), 30
        )
        tunnel_label = {"client": "default", "tunnel": f"127.0.0.1:{public}"}
        self.assertEqual(metric_value(samples, "rtunnel_tunnel_connections_open", **tunnel_label), 2)
        self.assertEqual(metric_value(samples, "rtunnel_connection_limit", client="default"), 2)
        lines = [e for e in events if e.get("reason") == "max_connections_per_tunnel"]
        self.assertLessEqual(len(lines), 2)  # not one line per visitor
        self.assertEqual(lines[0]["count"], 1)
        first.transport.loseConnection()
        yield done[0]
        yield wait_until(lambda: listener.open_connections == 1, 10)
        reply, _ = yield visit(public, Visitor(b"four")).addTimeout(10, reactor)
        self.assertEqual(reply, b"four")
        second.transport.loseConnection()
        yield done[1]
        yield wait_until(lambda: listener.open_connections == 0, 10)
        samples = scrape_limits(tunnel.server)
        self.assertEqual(metric_value(samples, "rtunnel_tunnel_connections_open", **tunnel_label), 0)
