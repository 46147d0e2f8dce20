"""Prometheus metrics (rtunnel.metrics): scraped over HTTP from a real server
and client on loopback while real bytes go through, and parsed with
prometheus_client's own parser.

The flow-control blocked time is also checked exactly, in memory, on a fake
clock (tests/memory.py).
"""

from __future__ import annotations

import socket
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from rtunnel.counters import tunnel_name
from rtunnel.endpoints import local_endpoint
from rtunnel.errors import ConfigError
from rtunnel.metrics import ClientCollector, registry_for
from rtunnel.server import SessionState
from rtunnel.tap.client import Options as ClientOptions
from rtunnel.tap.server import Options as ServerOptions
from tests.faultproxy import FaultProxy
from tests.harness import (
    TOKEN,
    Conversation,
    Echo,
    HashReply,
    Source,
    Tunnel,
    Visitor,
    converse,
    listen_target,
    metric_value,
    parse_metrics,
    pattern,
    sleep,
    visit,
    wait_until,
    with_timeout,
)
from tests.memory import Pair

KiB = 1024
MiB = 1024 * KiB
METRICS = "tcp:0:interface=127.0.0.1"

@defer.inlineCallbacks
def scrape(port: int) -> Any:
    """GET /metrics over HTTP and parse it."""
    response = yield with_timeout(
        Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode()), 10
    )
    if response.code != 200:
        raise AssertionError(f"/metrics answered {response.code}")
    body = yield readBody(response)
    content_type = response.headers.getRawHeaders(b"content-type")[0]
    if not content_type.startswith(b"text/plain"):
        raise AssertionError(f"/metrics content type {content_type!r}")
    return parse_metrics(body.decode())


class StalledVisitor(Visitor):
    """A visitor that does not read until `read_now` is called."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        super().connectionMade()

    def read_now(self) -> None:
        self.transport.resumeProducing()


class MetricsTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def start(self, **client: Any) -> Any:
        """Server and client, each serving metrics; fires with the public ports."""
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(metrics=METRICS)
        self.server_metrics = self.tunnel.server_service.metrics_port.getHost().port
        targets = client.pop("targets")
        ports = yield self.tunnel.connect(targets, metrics=METRICS, **client)
        port = yield with_timeout(self.tunnel.client_service.metrics.ready, 10)
        self.client_metrics = port.getHost().port
        return ports

    @defer.inlineCallbacks
    def test_byte_counters_follow_a_transfer_and_stream_gauges_return_to_zero(self):
        target, target_port = listen_target(self, HashReply)
        [public] = yield self.start(targets=[(0, target_port)])
        tunnel = tunnel_name("127.0.0.1", public)
        first, second = pattern(1, 1 * MiB), pattern(2, 2 * MiB + 123)

        before = yield scrape(self.server_metrics)
        self.assertEqual(metric_value(before, "rtunnel_sessions", state="connected"), 1)
        self.assertEqual(metric_value(before, "rtunnel_sessions", state="detached"), 0)
        self.assertEqual(metric_value(before, "rtunnel_tunnels"), 1)

        uploader = Conversation()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", public), uploader)
        self.addCleanup(lambda: uploader.closed.called or uploader.transport.abortConnection())
        uploader.transport.write(first)
        yield wait_until(lambda: target.connections and target.connections[0].count == len(first))

        # mid-transfer: one stream open, its first megabyte counted at both ends
        during = yield scrape(self.server_metrics)
        labels = {"client": "default", "tunnel": tunnel}
        self.assertEqual(metric_value(during, "rtunnel_streams_open", **labels), 1)
        self.assertEqual(metric_value(during, "rtunnel_streams_opened_total", **labels), 1)
        self.assertEqual(metric_value(during, "rtunnel_stream_bytes_total", direction="in", **labels), len(first))
        client_during = yield scrape(self.client_metrics)
        self.assertEqual(metric_value(client_during, "rtunnel_streams_open", tunnel=tunnel), 1)
        self.assertEqual(
            metric_value(client_during, "rtunnel_stream_bytes_total", direction="in", tunnel=tunnel), len(first)
        )

        uploader.transport.write(second)
        uploader.transport.loseWriteConnection()
        reply = yield with_timeout(uploader.closed, 30)
        self.assertTrue(reply.startswith(str(len(first) + len(second)).encode()), reply)
        yield wait_until(lambda: not self.tunnel.server.sessions[self.client().session_id].mux_session.streams)
        yield wait_until(lambda: not self.client().session.streams)

        after = yield scrape(self.server_metrics)
        sent = len(first) + len(second)
        self.assertEqual(metric_value(after, "rtunnel_streams_open", **labels), 0)
        self.assertEqual(metric_value(after, "rtunnel_streams_opened_total", **labels), 1)
        self.assertEqual(metric_value(after, "rtunnel_stream_bytes_total", direction="in", **labels), sent)
        self.assertEqual(metric_value(after, "rtunnel_stream_bytes_total", direction="out", **labels), len(reply))
        client_after = yield scrape(self.client_metrics)
        self.assertEqual(metric_value(client_after, "rtunnel_streams_open", tunnel=tunnel), 0)
        self.assertEqual(metric_value(client_after, "rtunnel_streams_opened_total", tunnel=tunnel), 1)
        self.assertEqual(metric_value(client_after, "rtunnel_stream_bytes_total", direction="in", tunnel=tunnel), sent)
        self.assertEqual(
            metric_value(client_after, "rtunnel_stream_bytes_total", direction="out", tunnel=tunnel), len(reply)
        )
        self.assertEqual(metric_value(client_after, "rtunnel_client_link_up"), 1)
        self.assertEqual(metric_value(client_after, "rtunnel_client_tunnels_bound"), 1)

    def client(self) -> Any:
        return self.tunnel.client_service.client

    @defer.inlineCallbacks
    def test_many_streams_are_summed_per_tunnel(self):
        target, target_port = listen_target(self, HashReply)
        ports = yield self.start(targets=[(0, target_port), (0, target_port)])
        sizes = [10_000, 20_000, 30_000]
        results = yield defer.gatherResults(
            [visit(ports[0], Visitor(pattern(i, n))) for i, n in enumerate(sizes)]
            + [visit(ports[1], Visitor(pattern(9, 5_000)))]
        )
        self.assertEqual(len(results), 4)
        yield wait_until(lambda: not self.client().session.streams)
        yield wait_until(lambda: not self.tunnel.server.sessions[self.client().session_id].mux_session.streams)
        samples = yield scrape(self.server_metrics)
        one, two = (tunnel_name("127.0.0.1", p) for p in ports)
        self.assertEqual(metric_value(samples, "rtunnel_streams_opened_total", tunnel=one), 3)
        self.assertEqual(metric_value(samples, "rtunnel_stream_bytes_total", tunnel=one, direction="in"), sum(sizes))
        self.assertEqual(metric_value(samples, "rtunnel_streams_opened_total", tunnel=two), 1)
        self.assertEqual(metric_value(samples, "rtunnel_stream_bytes_total", tunnel=two, direction="in"), 5_000)

    @defer.inlineCallbacks
    def test_a_wrong_token_is_an_authentication_failure(self):
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(metrics=METRICS)
        port = self.tunnel.server_service.metrics_port.getHost().port
        before = yield scrape(port)
        self.assertEqual(metric_value(before, "rtunnel_auth_failures_total"), 0)
        service = self.tunnel.start_client(self.tunnel.client_config([(0, 1)], token="not-" + TOKEN))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("wrong token", message)
        after = yield scrape(port)
        self.assertEqual(metric_value(after, "rtunnel_auth_failures_total"), 1)
        self.assertEqual(metric_value(after, "rtunnel_links_accepted_total"), 1)
        self.assertEqual(metric_value(after, "rtunnel_handshakes_dropped_total", reason="rate_limited"), 0)

    @defer.inlineCallbacks
    def test_a_handshake_that_never_comes_is_dropped_and_counted(self):
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(metrics=METRICS, handshake_timeout=0.3)
        port = self.tunnel.server_service.metrics_port.getHost().port
        idle = socket.create_connection(("127.0.0.1", self.tunnel.control_port))
        self.addCleanup(idle.close)
        yield wait_until(lambda: self.tunnel.server.events.handshakes_expired == 1, 10)
        samples = yield scrape(port)
        self.assertEqual(metric_value(samples, "rtunnel_handshakes_dropped_total", reason="deadline"), 1)

    @defer.inlineCallbacks
    def test_a_severed_link_is_counted_as_a_reconnect_and_a_resume(self):
        target, target_port = listen_target(self, HashReply)
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(metrics=METRICS)
        server_port = self.tunnel.server_service.metrics_port.getHost().port
        proxy = FaultProxy(reactor, "127.0.0.1", self.tunnel.control_port)
        proxy_port = proxy.listen()
        self.addCleanup(proxy.stop)
        yield self.tunnel.connect([(0, target_port)], server_port=proxy_port, metrics=METRICS)
        self.addCleanup(proxy.sever_rst)
        client_port = (yield with_timeout(self.tunnel.client_service.metrics.ready, 10)).getHost().port
        owner = self.tunnel.server.sessions[self.client().session_id]

        proxy.refuse_new(True)
        proxy.sever_rst()
        yield wait_until(lambda: owner.state is SessionState.DETACHED and self.client().link is None)
        down = yield scrape(server_port)
        self.assertEqual(metric_value(down, "rtunnel_sessions", state="detached"), 1)
        self.assertEqual(metric_value(down, "rtunnel_sessions", state="connected"), 0)
        client_down = yield scrape(client_port)
        self.assertEqual(metric_value(client_down, "rtunnel_client_link_up"), 0)
        self.assertEqual(metric_value(client_down, "rtunnel_client_links_lost_total"), 1)

        proxy.refuse_new(False)
        yield wait_until(lambda: owner.state is SessionState.CONNECTED and self.client().link is not None, 20)
        yield wait_until(lambda: self.client().session.can_send)
        up = yield scrape(server_port)
        self.assertEqual(metric_value(up, "rtunnel_sessions", state="connected"), 1)
        self.assertEqual(metric_value(up, "rtunnel_sessions_started_total", client="default"), 1)
        self.assertEqual(metric_value(up, "rtunnel_reconnects_total", client="default"), 1)
        self.assertEqual(metric_value(up, "rtunnel_resumes_total", client="default"), 1)
        self.assertGreaterEqual(metric_value(up, "rtunnel_links_accepted_total"), 2)
        client_up = yield scrape(client_port)
        self.assertEqual(metric_value(client_up, "rtunnel_client_link_up"), 1)
        self.assertEqual(metric_value(client_up, "rtunnel_client_resumes_total"), 1)
        self.assertEqual(metric_value(client_up, "rtunnel_client_sessions_started_total"), 1)
        self.assertGreaterEqual(metric_value(client_up, "rtunnel_client_connect_attempts_total"), 2)

    @defer.inlineCallbacks
    def test_blocked_time_grows_while_a_visitor_does_not_read(self):
        size = 32 * MiB
        target, target_port = listen_target(self, Source, seed=3, size=size)
        [public] = yield self.start(targets=[(0, target_port)])
        tunnel = tunnel_name("127.0.0.1", public)
        visitor = StalledVisitor()
        done = visit(public, visitor)
        self.addCleanup(lambda: done.called or visitor.transport.abortConnection())
        yield wait_until(lambda: bool(self.client().session.streams))
        blocked = 0.0
        for _ in range(100):  # the buffers on the way fill up, then the client runs out of credit
            stalled = yield scrape(self.client_metrics)
            blocked = metric_value(stalled, "rtunnel_stream_flow_control_blocked_seconds_total", tunnel=tunnel)
            if blocked > 0.5:
                break
            yield sleep(0.2)
        self.assertGreater(blocked, 0.5)
        self.assertLess(blocked, 60)
        yield sleep(0.5)
        later = yield scrape(self.client_metrics)
        self.assertGreater(
            metric_value(later, "rtunnel_stream_flow_control_blocked_seconds_total", tunnel=tunnel), blocked + 0.2
        )
        visitor.read_now()
        data, _ = yield with_timeout(done, 60)
        self.assertEqual(len(data), size)
        yield wait_until(lambda: not self.client().session.streams)
        final = yield scrape(self.client_metrics)
        folded = metric_value(final, "rtunnel_stream_flow_control_blocked_seconds_total", tunnel=tunnel)
        self.assertGreater(folded, blocked + 0.2)
        self.assertEqual(metric_value(final, "rtunnel_stream_bytes_total", tunnel=tunnel, direction="out"), size)
        self.assertEqual(metric_value(final, "rtunnel_streams_open", tunnel=tunnel), 0)

    @defer.inlineCallbacks
    def test_a_metrics_port_in_use_is_a_fatal_error_for_the_client(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server()
        config = self.tunnel.client_config([(0, 1)], metrics=f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1")
        service = self.tunnel.start_client(config)
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("cannot serve metrics on tcp:", message)
        self.assertIn("choose another --metrics port", message)


class RemovedTunnelLabelTests(unittest.TestCase):
    """The client's metrics: a removed tunnel's connections keep their
    tunnel label while they last and after they close."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_removed_tunnels_open_connection_keeps_its_tunnel_label(self) -> Any:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        [public] = yield tunnel.connect([(0, target)])
        client = tunnel.client_service.client
        name = tunnel_name("127.0.0.1", public)
        registry = registry_for(ClientCollector(client))

        def scraped() -> Any:
            return parse_metrics(generate_latest(registry).decode())

        visitor = yield converse(public)
        visitor.transport.write(b"before")
        yield wait_until(lambda: bytes(visitor.received) == b"before")
        client.remove_tunnel(1)
        self.assertEqual(client.tunnel_name(1), name)
        live = scraped()
        self.assertEqual(metric_value(live, "rtunnel_stream_bytes_total", tunnel=name, direction="in"), 6)
        self.assertNotIn("?", {dict(labels).get("tunnel") for _, labels in live})

        visitor.transport.write(b" after")
        yield wait_until(lambda: bytes(visitor.received) == b"before after")
        visitor.transport.loseWriteConnection()
        yield with_timeout(visitor.closed, 10)
        yield wait_until(lambda: client.session is not None and not client.session.streams)
        self.assertEqual(sorted(client.traffic.closed), [("", name)])
        self.assertEqual(client.traffic.closed[("", name)].bytes_in, 12)
        closed = scraped()
        self.assertEqual(metric_value(closed, "rtunnel_stream_bytes_total", tunnel=name, direction="in"), 12)
        self.assertNotIn("?", {dict(labels).get("tunnel") for _, labels in closed})


class BlockedTimeTests(unittest.TestCase):
    """Stream.blocked_seconds on a fake clock: exactly the time with bytes
    to send and no credit."""

    def test_blocked_time_is_the_time_without_credit(self):
        pair = Pair()
        server_end, client_end = pair.open()
        stream = server_end.stream
        client_end.fill()  # the client's target stops reading
        server_end.send(pattern(1, 3 * pair.server.settings.initial_window))
        pair.pump()
        self.assertEqual(stream.blocked_seconds_at(pair.clock.seconds()), 0)
        pair.clock.advance(5)
        self.assertEqual(stream.blocked_seconds_at(pair.clock.seconds()), 5)
        self.assertEqual(stream.blocked_seconds, 0)  # the spell has not ended yet
        client_end.drain()
        pair.pump()
        pair.clock.advance(7)
        self.assertEqual(stream.blocked_seconds, 5)
        self.assertEqual(stream.blocked_seconds_at(pair.clock.seconds()), 5)

    def test_a_stream_with_credit_is_never_blocked(self):
        pair = Pair()
        server_end, client_end = pair.open()
        server_end.send(pattern(2, 100 * KiB))
        pair.pump()
        pair.clock.advance(10)
        self.assertEqual(server_end.stream.blocked_seconds_at(pair.clock.seconds()), 0)

    def test_closing_ends_a_blocked_spell(self):
        pair = Pair()
        server_end, client_end = pair.open()
        client_end.fill()
        server_end.send(pattern(3, 2 * pair.server.settings.initial_window))
        pair.pump()
        pair.clock.advance(2)
        server_end.lose()
        pair.clock.advance(3)
        self.assertEqual(server_end.stream.blocked_seconds, 2)


class OptionTests(unittest.TestCase):
    def test_a_bare_port_means_loopback(self):
        self.assertEqual(local_endpoint("9120", "--metrics", 9120), "tcp:9120:interface=127.0.0.1")

    def test_an_endpoint_string_is_kept(self):
        self.assertEqual(local_endpoint(r"tcp:9120:interface=\:\:1", "--metrics", 9120), r"tcp:9120:interface=\:\:1")

    def test_nonsense_is_refused_with_an_example(self):
        for text in ("nosuchtype:1", "tcp:notaport", "70000"):
            with self.assertRaises(ConfigError) as caught:
                local_endpoint(text, "--metrics", 9120)
            self.assertIn("--metrics", str(caught.exception))

    def test_server_and_client_options_take_metrics(self):
        server = ServerOptions()
        server.parseOptions(["--token", "x", "--metrics", "9120"])
        self.assertEqual(server.config.metrics, "tcp:9120:interface=127.0.0.1")
        client = ClientOptions()
        client.parseOptions(
            ["-c", "h", "-f", "4000", "-t", "3000", "--token", "x", "--fingerprint", "sha256:" + "ab" * 32,
             "--metrics", "tcp:9121"]
        )
        self.assertEqual(client.config.metrics, "tcp:9121")
        plain = ServerOptions()
        plain.parseOptions(["--token", "x"])
        self.assertIsNone(plain.config.metrics)

    def test_bad_metrics_option_is_a_usage_error(self):
        with self.assertRaises(usage.UsageError) as caught:
            ServerOptions().parseOptions(["--token", "x", "--metrics", "tcp:nope"])
        self.assertIn("--metrics", str(caught.exception))
