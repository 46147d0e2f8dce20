"""rtunnel.client: connecting a stream to its target, on a memory reactor.

The end-to-end behaviour (replies, refused targets, PROXY headers, host
name targets) is in test_tunnel, test_proxyproto and test_ipv6; these pin
what a target connection keeps and how an attempt ends."""

from __future__ import annotations

from dataclasses import replace

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel import wire
from rtunnel.client import TunnelClient
from rtunnel.config import ClientConfig, TunnelSpec
from rtunnel.mux import Session, Stream, StreamProtocol
from rtunnel.wire import FrameType, ResetCode

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
        self.assertEqual(self.client._connecting, {})
        self.assertIsNone(factory._settled)  # type: ignore[attr-defined]
        self.assertIsNone(factory._cancel)  # type: ignore[attr-defined]

    def test_refused_target_resets_the_stream(self) -> None:
        factory, connector = self.open()
        with capturedLogs() as events:
            factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))  # type: ignore[attr-defined]
        self.assertTrue(self.stream.closed)
        self.assertEqual([code for code, _ in self.resets()], [ResetCode.REFUSED])
        self.assertEqual([e.get("event") for e in events], ["target_failed"])
        self.assertEqual(self.client._connecting, {})

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
        self.assertEqual(self.client._connecting, {})

    def test_proxy_header_is_written_first_and_not_kept(self) -> None:
        self.client.tunnels[1] = replace(TARGET, proxy_protocol="v1")
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
        self.client.reactor = RaisingMemoryReactor(connectException=OSError("no such scope"))
        with capturedLogs():
            self.client.stream_opened(self.session, self.stream, TARGET.tunnel_id, INFO)
        self.assertTrue(self.stream.closed)
        [(code, reason)] = self.resets()
        self.assertEqual(code, ResetCode.UNREACHABLE)
        self.assertIn("no such scope", reason)
        self.assertEqual(self.client._connecting, {})
