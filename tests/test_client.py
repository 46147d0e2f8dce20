"""rtunnel.client: connecting a stream to its target, on a memory reactor.

The end-to-end behaviour (replies, refused targets, PROXY headers, host
name targets) is in test_tunnel, test_proxyproto and test_ipv6; these pin
what a target connection keeps and how an attempt ends."""

from __future__ import annotations

from dataclasses import replace

from twisted.internet import defer, error, reactor
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel import wire
from rtunnel.client import ClientState, TunnelClient, retry_policy
from rtunnel.config import ClientConfig, TunnelSpec
from rtunnel.mux import Session, Stream, StreamProtocol
from rtunnel.tunnels import BIND_RETRY_DELAY
from rtunnel.wire import FrameType, ResetCode
from tests.harness import Echo, Tunnel, listen_target, sleep

TARGET = TunnelSpec(tunnel_id=1, bind_host="", bind_port=0, target_host="127.0.0.1", target_port=3000)
INFO = {"src": ["198.51.100.1", 5555], "dst": ["203.0.113.1", 4000]}


class TargetConnectionTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        config = ClientConfig("server", 1, (TARGET,), token="t", connect_timeout=7.0)
        self.client = TunnelClient(self.reactor, config, on_fatal=self.fail)
        self.session = Session(self.reactor, self.client, is_server=False)
        self.stream = Stream(self.session, 2, TARGET.tunnel_id)
        self.session.streams[2] = self.stream

    def open(self) -> tuple[object, object]:
        """The server opens stream 2: return (factory, connector) of its attempt."""
        self.client.stream_opened(self.session, self.stream, TARGET.tunnel_id, INFO)
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 3000, 7.0))
        return factory, self.reactor.connectors[0]

    def resets(self) -> list[tuple[int, str]]:
        """(code, reason) of every RST the session has sent."""
        return [
            wire.decode_coded(next(iter(wire.FrameDecoder(wire.DEFAULT_MAX_FRAME).feed(data))))
            for _, ftype, _, data in self.session._outbox
            if ftype is FrameType.RST
        ]

    def test_ip_target_connection_keeps_no_endpoint_wrapper(self) -> None:
        """Issue #6: the target's protocol is the StreamProtocol itself (no
        endpoint's wrapping protocol, factory or Deferred per connection),
        and the factory lets go of the failure path once connected."""
        factory, _ = self.open()
        protocol = factory.buildProtocol(None)  # type: ignore[attr-defined]
        self.assertIs(type(protocol), StreamProtocol)
        protocol.makeConnection(StringTransport())
        self.assertIsNotNone(self.stream.local)
        self.assertEqual(self.client.tunnels._connecting, {})
        self.assertIsNone(factory._settled)  # type: ignore[attr-defined]
        self.assertIsNone(factory._cancel)  # type: ignore[attr-defined]

    def test_refused_target_resets_the_stream(self) -> None:
        factory, connector = self.open()
        with capturedLogs() as events:
            factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))  # type: ignore[attr-defined]
        self.assertTrue(self.stream.closed)
        self.assertEqual([code for code, _ in self.resets()], [ResetCode.REFUSED])
        self.assertEqual([e.get("event") for e in events], ["target_failed"])
        self.assertEqual(self.client.tunnels._connecting, {})

    def test_timed_out_target_resets_the_stream(self) -> None:
        factory, connector = self.open()
        with capturedLogs():
            factory.clientConnectionFailed(connector, Failure(error.TimeoutError()))  # type: ignore[attr-defined]
        self.assertEqual([code for code, _ in self.resets()], [ResetCode.TIMEOUT])

    def test_stream_closed_while_connecting_stops_the_attempt_quietly(self) -> None:
        factory, connector = self.open()
        with capturedLogs() as events:
            self.stream.reset(ResetCode.ABORTED, "visitor left")
            self.assertTrue(connector.stoppedConnecting)  # type: ignore[attr-defined]
            # what a real connector then reports
            factory.clientConnectionFailed(connector, Failure(error.UserError()))  # type: ignore[attr-defined]
        self.assertEqual([e.get("event") for e in events if e.get("event") == "target_failed"], [])
        self.assertEqual([code for code, _ in self.resets()], [ResetCode.ABORTED])
        self.assertEqual(self.client.tunnels._connecting, {})

    def test_proxy_header_is_written_first_and_not_kept(self) -> None:
        self.client.retarget_tunnel(replace(TARGET, proxy_protocol="v1"))
        factory, _ = self.open()
        protocol = factory.buildProtocol(None)  # type: ignore[attr-defined]
        transport = StringTransport()
        self.stream.data_received(b"early")
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"PROXY TCP4 198.51.100.1 203.0.113.1 5555 4000\r\nearly")
        self.assertEqual((factory.header, protocol.header), (b"", b""))  # type: ignore[attr-defined]

    def test_connect_raising_resets_the_stream(self) -> None:
        """connectTCP raising (say, a bad IPv6 scope) fails the stream, not
        the session (what TCP4ClientEndpoint did with it)."""
        self.client.tunnels.reactor = RaisingMemoryReactor(connectException=OSError("no such scope"))
        with capturedLogs():
            self.client.stream_opened(self.session, self.stream, TARGET.tunnel_id, INFO)
        self.assertTrue(self.stream.closed)
        [(code, reason)] = self.resets()
        self.assertEqual(code, ResetCode.UNREACHABLE)
        self.assertIn("no such scope", reason)
        self.assertEqual(self.client.tunnels._connecting, {})


class RetryPolicyTests(unittest.SynchronousTestCase):
    def test_jitter_never_goes_above_the_maximum(self) -> None:
        """`--max-retry-delay 3` means at most 3 s: the +20% of the jitter
        stops at the maximum (it waited up to 3.6 s)."""
        for r in (0.0, 0.5, 0.999999):
            delay = retry_policy(0.5, 3.0, lambda r=r: r)
            self.assertLessEqual(max(delay(attempt) for attempt in range(1, 40)), 3.0)
        self.assertAlmostEqual(retry_policy(0.5, 3.0, lambda: 0.0)(30), 2.4)  # still spread below it

    def test_jitter_spreads_plus_minus_20_percent_below_the_maximum(self) -> None:
        low, high = retry_policy(1.0, 30.0, lambda: 0.0), retry_policy(1.0, 30.0, lambda: 1.0)
        self.assertEqual([low(n) for n in (1, 2, 3)], [0.8, 1.6, 3.2])
        self.assertEqual([round(high(n), 6) for n in (1, 2, 3)], [1.2, 2.4, 4.8])


class HandshakeRefusalBackoffTests(unittest.TestCase):
    """A server that refuses the handshake (here: the credential is at
    --max-sessions-per-client) is retried with the same exponential backoff
    as one that refuses the TCP connection, not every initial delay."""

    @defer.inlineCallbacks
    def test_refused_handshakes_back_off_exponentially(self):  # type: ignore[no-untyped-def]
        tunnel = Tunnel(self)
        yield tunnel.start_server(max_sessions_per_client=1)
        _, target = listen_target(self, Echo)
        yield tunnel.connect([(0, target)])  # holds the credential's only session
        second = tunnel.start_client(
            tunnel.client_config([(0, target)], initial_retry_delay=0.1, max_retry_delay=30.0)
        )
        started = reactor.seconds()
        yield sleep(2.5)
        attempts = second.client.events.connect_attempts
        # backoff from 0.1 s (+-20%): attempts at about 0, 0.1, 0.3, 0.7, 1.5 (3.1) s;
        # a retry every 0.1 s would be about 20
        self.assertGreaterEqual(attempts, 3)
        self.assertLessEqual(attempts, 6, f"{attempts} attempts in {reactor.seconds() - started:.1f} s")
        self.assertEqual(second.client.events.sessions_started, 0)


class LogAddressTests(unittest.SynchronousTestCase):
    """Addresses in the client's log lines are written as a user types them:
    HOST:PORT, IPv6 in brackets, the address visitors really reach."""

    def client(self, server_host: str, target_host: str = "127.0.0.1", bind_host: str = "") -> TunnelClient:
        spec = replace(TARGET, bind_host=bind_host, bind_port=4000, target_host=target_host)
        config = ClientConfig(server_host, 19050, (spec,), token="t")
        client = TunnelClient(MemoryReactorClock(), config, on_fatal=self.fail)
        client.session = Session(client.reactor, client, is_server=False)
        return client

    def bound(self, client: TunnelClient, host: str) -> str:
        frame = next(iter(wire.FrameDecoder(wire.DEFAULT_MAX_FRAME).feed(
            wire.encode_json(FrameType.BOUND, {"tunnel": 1, "host": host, "port": 4000})
        )))
        with capturedLogs() as events:
            client.control_frame(client.session, frame)  # type: ignore[arg-type]
        [ready] = [e for e in events if e.get("event") == "tunnel_ready"]
        return formatEvent(ready)

    def test_tunnel_ready_shows_the_bound_address_not_the_server_host(self) -> None:
        self.assertEqual(self.bound(self.client("::1", bind_host="127.0.0.1"), "127.0.0.1"),
                         "tunnel ready: 127.0.0.1:4000 -> 127.0.0.1:3000")

    def test_tunnel_ready_on_every_address_shows_the_server_host(self) -> None:
        self.assertEqual(self.bound(self.client("tunnel.example.com"), "::"),
                         "tunnel ready: tunnel.example.com:4000 -> 127.0.0.1:3000")
        self.assertEqual(self.bound(self.client("2001:db8::5"), "0.0.0.0"),
                         "tunnel ready: [2001:db8::5]:4000 -> 127.0.0.1:3000")

    def test_ipv6_target_and_visitor_are_bracketed(self) -> None:
        client = self.client("::1", target_host="::1")
        session = client.session
        assert session is not None
        stream = Stream(session, 2, 1)
        session.streams[2] = stream
        with capturedLogs() as events:
            client.stream_opened(session, stream, 1, {"src": ["2001:db8::7", 41254], "dst": ["::1", 4000]})
            [(_, _, factory, _, _)] = client.reactor.tcpClients  # type: ignore[attr-defined]
            factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        [failed] = [e for e in events if e.get("event") == "target_failed"]
        self.assertEqual(
            formatEvent(failed),
            "target [::1]:3000 failed for a visitor from [2001:db8::7]:41254: connection refused",
        )

    def test_visitor_address_is_host_port_not_a_list(self) -> None:
        client = self.client("server")
        session = client.session
        assert session is not None
        stream = Stream(session, 2, 1)
        session.streams[2] = stream
        with capturedLogs() as events:
            client.stream_opened(session, stream, 1, INFO)
            [(_, _, factory, _, _)] = client.reactor.tcpClients  # type: ignore[attr-defined]
            factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        [failed] = [e for e in events if e.get("event") == "target_failed"]
        self.assertIn("for a visitor from 198.51.100.1:5555:", formatEvent(failed))


class LogNamespaceTests(unittest.SynchronousTestCase):
    """The client's tunnels and moves are objects of their own
    (rtunnel.tunnels, rtunnel.mover), but their events are still the
    client's: namespace rtunnel.client.TunnelClient, source the client."""

    def test_tunnel_and_move_events_keep_the_clients_namespace_and_source(self) -> None:
        spec = replace(TARGET, bind_port=4000)
        client = TunnelClient(MemoryReactorClock(), ClientConfig("server", 1, (spec,), token="t"), on_fatal=self.fail)
        session = client.session = Session(client.reactor, client, is_server=False)
        stream = Stream(session, 2, 1)
        session.streams[2] = stream
        bound = next(iter(wire.FrameDecoder(wire.DEFAULT_MAX_FRAME).feed(
            wire.encode_json(FrameType.BOUND, {"tunnel": 1, "host": "::", "port": 4000})
        )))
        with capturedLogs() as events:
            client.control_frame(session, bound)
            client.stream_opened(session, stream, 1, INFO)
            [(_, _, factory, _, _)] = client.reactor.tcpClients  # type: ignore[attr-defined]
            factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
            client.moved("no address here")
        logged = [(e["event"], e["log_namespace"], e["log_source"]) for e in events if "event" in e]
        self.assertEqual(logged, [
            ("tunnel_ready", "rtunnel.client.TunnelClient", client),
            ("target_failed", "rtunnel.client.TunnelClient", client),
            ("moved_ignored", "rtunnel.client.TunnelClient", client),
        ])


class BindRefusalTests(unittest.SynchronousTestCase):
    """Which BIND_FAILED codes end the client (docs/protocol.md)."""

    def setUp(self) -> None:
        self.fatal: list[str] = []
        spec = replace(TARGET, bind_port=4000)
        self.client = TunnelClient(MemoryReactorClock(), ClientConfig("server", 1, (spec,), token="t"), self.fatal.append)
        self.client.session = Session(self.client.reactor, self.client, is_server=False)

    def refuse(self, code: str, ftype: FrameType = FrameType.BIND_FAILED) -> list[dict[str, object]]:
        frame = next(iter(wire.FrameDecoder(wire.DEFAULT_MAX_FRAME).feed(
            wire.encode_json(ftype, {"tunnel": 1, "code": code, "message": "no", "host": "::", "port": 4000})
        )))
        with capturedLogs() as events:
            self.client.control_frame(self.client.session, frame)  # type: ignore[arg-type]
        return list(events)

    def binds_sent(self) -> int:
        session = self.client.session
        assert session is not None
        return sum(1 for _, ftype, _, _ in session._outbox if ftype is FrameType.BIND)

    def test_refusals_retrying_cannot_fix_are_fatal(self) -> None:
        fatal = []
        for code in ("not_permitted", "bad_address", "limit"):
            self.setUp()  # a client of its own for each
            self.refuse(code)
            self.assertEqual(self.client.state, ClientState.FAILED, code)
            fatal += self.fatal
        self.assertEqual(len(fatal), 3)

    def test_an_unknown_code_is_retried_not_fatal(self) -> None:
        """A newer server may add codes the client does not know yet: the
        client asks again."""
        events = self.refuse("a_code_of_a_later_version")
        self.assertEqual(self.fatal, [])
        self.assertEqual([e.get("event") for e in events], ["bind_failed"])
        before = self.binds_sent()
        self.client.reactor.advance(BIND_RETRY_DELAY)  # type: ignore[attr-defined]
        self.assertEqual(self.binds_sent(), before + 1)

    def test_a_bound_read_after_a_fatal_refusal_is_not_announced(self) -> None:
        self.refuse("limit")
        events = self.refuse("", FrameType.BOUND)
        self.assertEqual([e.get("event") for e in events], [])
        self.assertEqual(self.client.bound, {})
