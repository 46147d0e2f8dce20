"""A client with several servers (members of one fleet): `-c a,b`, repeated
`-c`, `server = [...]` in the config file; tried in order, the next when one
cannot be reached; a name with several addresses tried address by address
(docs/fleet.md "Clients and resume")."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.protocol import Protocol
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from rtunnel import wire
from rtunnel.client import TunnelClient
from rtunnel.moved import moved_reason, parse_moved
from rtunnel.tap import client as tap_client
from rtunnel.tls import PinnedCertificateCreator
from tests.harness import (
    TOKEN,
    Echo,
    LogCapture,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    sleep,
    visit,
    with_timeout,
)

FP = "sha256:" + "ab" * 32


class ServerListOptionTests(SynchronousTestCase):
    def options(self, *args: str, config: str | None = None) -> tap_client.Options:
        argv = list(args)
        if config is not None:
            path = Path(tempfile.mkdtemp(prefix="rtunnel-servers-")) / "client.toml"
            path.write_text(config)
            argv = ["--config", str(path), *argv]
        options = tap_client.Options()
        options.parseOptions([*argv, "-f", "4000", "-t", "3000", "--token", "t", "--fingerprint", FP])
        return options

    def test_commas_and_repeated_c_give_every_server_in_order_with_the_default_port(self) -> None:
        config = self.options("-c", "a.example:1,b.example", "-c", "[::1]:3").config
        self.assertEqual(config.server_list, (("a.example", 1), ("b.example", 19050), ("::1", 3)))
        self.assertEqual((config.server_host, config.server_port), ("a.example", 1))

    def test_one_server_is_as_before(self) -> None:
        config = self.options("-c", "a.example").config
        self.assertEqual(config.servers, ())
        self.assertEqual(config.server_list, (("a.example", 19050),))

    def test_the_config_file_takes_an_array_and_c_on_the_command_line_replaces_it(self) -> None:
        text = 'server = ["m1.example:19050", "m2.example:19051"]\n'
        self.assertEqual(
            self.options(config=text).config.server_list, (("m1.example", 19050), ("m2.example", 19051))
        )
        self.assertEqual(self.options("-c", "other:5", config=text).config.server_list, (("other", 5),))

    def test_an_empty_server_between_commas_is_a_usage_error_naming_it(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options("-c", "a.example,,b.example")
        self.assertIn("an empty server between commas", str(caught.exception))

    def test_a_moved_reason_carries_the_address_both_ways(self) -> None:
        self.assertEqual(parse_moved(moved_reason("::1", 19050, "go there")), ("::1", 19050))
        self.assertEqual(parse_moved(moved_reason("127.0.0.2", 5, "x")), ("127.0.0.2", 5))
        self.assertIsNone(parse_moved("no address here"))
        self.assertIsNone(parse_moved(""))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class ManyAddresses:
    """Resolves `name` to `addresses` in that order (other names: the real
    resolver), and remembers the names asked for."""

    def __init__(self, real: IHostnameResolver, name: str, addresses: list[str]) -> None:
        self.real, self.name, self.addresses = real, name, addresses
        self.asked: list[str] = []

    def resolveHostName(
        self, receiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
        addressTypes: Any = None, transportSemantics: str = "TCP",
    ) -> IResolutionReceiver:
        if hostName != self.name:
            return self.real.resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)
        self.asked.append(hostName)
        receiver.resolutionBegan(_Resolution(hostName))
        for address in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()
        return receiver


class ServerListTests(TestCase):
    @defer.inlineCallbacks
    def test_a_server_that_cannot_be_reached_is_skipped_for_the_next_in_the_same_round(self) -> None:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        dead = free_port()  # nothing listens here
        logs = LogCapture(self)
        config = tunnel.client_config(
            [(0, target)], servers=(("127.0.0.1", dead), ("127.0.0.1", tunnel.control_port)),
            initial_retry_delay=5.0, max_retry_delay=5.0,  # a second round would take 5 s: it must not be needed
        )
        service = tunnel.start_client(config)
        bound = yield with_timeout(service.client.when_bound(), 4)
        data, _ = yield visit(bound[1][1], Visitor(b"through the second server"))
        self.assertEqual(data, b"through the second server")
        self.assertEqual([e["server"] for e in logs.named("server_unreachable")], [f"127.0.0.1:{dead}"])
        self.assertEqual(service.servers.current, ("127.0.0.1", tunnel.control_port))

    @defer.inlineCallbacks
    def test_a_name_with_several_addresses_is_tried_address_by_address(self) -> None:
        """HostnameEndpoint tries every address a name resolves to: two that
        refuse, then the server's (a resolver installed on the reactor)."""
        tunnel = Tunnel(self)
        yield tunnel.start_server(listen="tcp:0:interface=127.0.0.1")
        _, target = listen_target(self, Echo)
        resolver = ManyAddresses(reactor.nameResolver, "fleet.invalid", ["127.0.0.5", "127.0.0.6", "127.0.0.1"])
        previous = reactor.installNameResolver(resolver)
        self.addCleanup(reactor.installNameResolver, previous)
        config = tunnel.client_config([(0, target)], server_host="fleet.invalid")
        service = tunnel.start_client(config)
        bound = yield with_timeout(service.client.when_bound(), 8)
        data, _ = yield visit(bound[1][1], Visitor(b"third address"))
        self.assertEqual(data, b"third address")
        self.assertEqual(resolver.asked, ["fleet.invalid"])
        link = service.client.link
        assert link is not None
        self.assertEqual(link.transport.getPeer().host, "127.0.0.1")


class _FirstFrame(Protocol):
    """Sends one HELLO and fires `reply` with the server's first frame."""

    def __init__(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        self.decoder = wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME)
        self.reply: defer.Deferred[wire.Frame] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(wire.encode_json(wire.FrameType.HELLO, self.hello))

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if not self.reply.called:
                self.reply.callback(frame)


class MovedTests(TestCase):
    """ERROR MOVED at the handshake of a server being drained (its
    `moved_to` set, as rtunnel.fleet.drain does), in one process."""

    @defer.inlineCallbacks
    def test_a_hint_that_keeps_failing_backs_off_instead_of_spinning(self) -> None:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        dead = free_port()
        tunnel.server.moved_to = ("127.0.0.1", dead, "m9")
        logs = LogCapture(self)
        service = tunnel.start_client(tunnel.client_config([(0, target)], initial_retry_delay=0.5, max_retry_delay=0.5))
        yield sleep(3.0)
        moved = logs.named("session_moved")
        self.assertGreaterEqual(len(moved), 2)
        self.assertEqual({e["server"] for e in moved}, {f"127.0.0.1:{dead}"})
        # a round (connect_attempts counts rounds): the hint (refused), then the server (MOVED again);
        # between rounds the back-off (0.4-0.5 s), so at most 1 + 3.0 / 0.4 rounds in 3 s (11 without it here)
        self.assertLessEqual(service.client.events.connect_attempts, 8)
        self.assertIsNone(service.client.session)

    @defer.inlineCallbacks
    def test_a_client_that_does_not_follow_moved_gets_a_session_at_a_draining_server(self) -> None:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        tunnel.server.moved_to = ("127.0.0.1", free_port(), "m9")
        plain_hello = TunnelClient.hello

        def old_hello(client: TunnelClient) -> dict[str, Any]:
            body = plain_hello(client)
            body.pop("accepts")
            return body

        self.patch(TunnelClient, "hello", old_hello)
        [public] = yield tunnel.connect([(0, target)])
        data, _ = yield visit(public, Visitor(b"an old client"))
        self.assertEqual(data, b"an old client")

    @defer.inlineCallbacks
    def test_a_draining_server_sends_a_resume_it_does_not_know_on_and_keeps_one_it_holds(self) -> None:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        yield tunnel.connect([(0, target)])
        client = tunnel.client_service.client  # type: ignore[union-attr]
        tunnel.server.moved_to = ("127.0.0.1", 19999, "m9")

        @defer.inlineCallbacks
        def first_frame(resume: dict[str, str]) -> Any:
            hello = {"protocol": "rtunnel", "versions": [1], "token": TOKEN, "accepts": ["moved"], "resume": resume}
            endpoint = wrapClientTLS(
                PinnedCertificateCreator(tunnel.fingerprint), TCP4ClientEndpoint(reactor, "127.0.0.1", tunnel.control_port)
            )
            proto = yield connectProtocol(endpoint, _FirstFrame(hello))
            self.addCleanup(lambda: proto.transport.connected and proto.transport.abortConnection())
            frame = yield with_timeout(proto.reply, 5)
            return frame

        unknown = yield first_frame({"session": "a" * 32, "secret": "b" * 64})
        self.assertEqual(unknown.type, wire.FrameType.ERROR)
        code, reason = wire.decode_coded(unknown)
        self.assertEqual((code, parse_moved(reason)), (wire.ErrorCode.MOVED, ("127.0.0.1", 19999)))
        held = yield first_frame({"session": client.session_id, "secret": client.session_secret})
        self.assertEqual(held.type, wire.FrameType.WELCOME)
        self.assertTrue(wire.decode_json(held)["resumed"])
