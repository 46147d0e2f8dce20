"""Member links (rtunnel.fleet.links): any member serves every tunnel.

Three real servers in this process (one reactor), each a fleet member on
its own loopback address (127.0.0.1, .2, .3: its control port, its
--public-host and its member link), with real mutual TLS between them and
a real client connected to member 1; the fleet's directory is a
StaticFleet (tests/harness.py) instead of etcd. In-process servers rather
than processes: the directory needs no test-only option, and the tests can
look at both hops of a forwarded visitor. Visitors reach the client's
tunnel at each member; bytes, half-close, flow control across two hops, a
big transfer by hash, the home unreachable, a member link cut mid-transfer,
and member certificates of another CA or of another member.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from rtunnel.admin import RateMeter, describe_session
from rtunnel.config import TunnelSpec
from rtunnel.fleet import ca
from rtunnel.fleet.edge import PeerLink
from rtunnel.fleet.links import FleetLinks
from rtunnel.fleet.memberlink import IncomingLink, MemberLink, OutgoingLink
from rtunnel.metrics import ServerCollector, registry_for
from rtunnel.mux import SessionSettings
from rtunnel.server.claims import TcpPort
from tests.harness import (
    Echo,
    HashReply,
    LogCapture,
    Source,
    StaticFleet,
    Target,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    metric_value,
    parse_metrics,
    pattern,
    sleep,
    wait_until,
    with_timeout,
)

MEMBERS = ("m1", "m2", "m3")
#: smaller stream windows than the default, so that what flow control holds
#: back across two hops is small next to the transfer
SETTINGS = SessionSettings(max_stream_window=1024 * 1024)


@implementer(IHalfCloseableProtocol)
class Recorder(Target):
    """Reads until EOF (a PROXY header first, if the tunnel sends one), then
    answers with everything it read and closes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"".join(self.chunks))
        self.transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class Sink(Target):
    """Reads nothing until `factory.reading` is set (then everything), and
    answers with the count of bytes at EOF."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.count = 0
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(str(self.count).encode())
        self.transport.loseConnection()


def visit_from(source: str, host: str, port: int, visitor: Visitor) -> defer.Deferred[Any]:
    """Connect `visitor` to host:port from the address `source`."""
    factory = ClientFactory.forProtocol(lambda: visitor)
    factory.noisy = False
    factory.clientConnectionFailed = lambda connector, reason: visitor.done.errback(reason)  # type: ignore[method-assign]
    reactor.connectTCP(host, port, factory, bindAddress=(source, 0))
    return visitor.done


class Fleet:
    """Three members on 127.0.0.1/.2/.3 with member links, and a client at m1."""

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.fleet = StaticFleet()
        self.tunnels: dict[str, Tunnel] = {}
        self.links: dict[str, FleetLinks] = {}
        base = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-"))
        self.ca_dir = base / "ca"
        ca.init_ca(self.ca_dir)
        self.certs = base / "certs"
        self.public_port = 0

    def address(self, member: str) -> str:
        return f"127.0.0.{MEMBERS.index(member) + 1}"

    def identity(self, member: str, as_member: str | None = None, ca_dir: Path | None = None) -> ca.MemberIdentity:
        """`member`'s identity; `as_member`: a certificate naming another
        member; `ca_dir`: issued by another CA."""
        named = as_member or member
        files = ca.issue_member(ca_dir or self.ca_dir, named, self.certs / member)
        identity = ca.load_member_identity(files.cert, files.key, files.ca, named)
        return replace(identity, member=member)

    @defer.inlineCallbacks
    def start_member(self, member: str, identity: ca.MemberIdentity | None = None, **links: Any) -> Any:
        address = self.address(member)
        tunnel = Tunnel(self.test)
        yield tunnel.start_server(
            listen=f"tcp:0:interface={address}", public_host=address, session=SETTINGS, resume_grace=5.0,
        )
        member_links = FleetLinks(
            reactor, tunnel.server, self.fleet.directory(member), identity or self.identity(member),
            f"tcp:0:interface={address}", **links,
        )
        port = yield member_links.start()
        self.test.addCleanup(member_links.stop)
        self.fleet.endpoints[member] = f"tcp:host={address}:port={port.getHost().port}"
        self.tunnels[member], self.links[member] = tunnel, member_links

    @defer.inlineCallbacks
    def start(self, target_port: int, proxy_protocol: str = "off", **links: Any) -> Any:
        """Every member, then a client at m1 with one default-address tunnel."""
        for member in MEMBERS:
            yield self.start_member(member, **links)
        service = yield self.connect_client("m1", target_port, proxy_protocol)
        return service

    @defer.inlineCallbacks
    def connect_client(self, home: str, target_port: int, proxy_protocol: str = "off", port: int = 0) -> Any:
        tunnel = self.tunnels[home]
        self.public_port = port or free_port()
        config = tunnel.client_config([], session=SETTINGS)
        config = replace(
            config, server_host=self.address(home),
            tunnels=(TunnelSpec(1, "", self.public_port, "127.0.0.1", target_port, proxy_protocol),),
        )
        service = tunnel.start_client(config)
        yield with_timeout(service.client.when_bound(), 10)
        self.fleet.set_home(TcpPort("default", self.public_port), home)
        yield wait_until(lambda: all(
            TcpPort("default", self.public_port) in self.links[m].forwards for m in self.links if m != home
        ))
        return service

    def scrape(self, member: str) -> Any:
        """`member`'s Prometheus metrics, as samples."""
        registry = registry_for(ServerCollector(lambda: self.tunnels[member].server))
        return parse_metrics(generate_latest(registry).decode())

    def visit(self, member: str, visitor: Visitor) -> defer.Deferred[Any]:
        return visit_from("127.0.0.1", self.address(member), self.public_port, visitor)

    @defer.inlineCallbacks
    def cut_links_to(self, home: str) -> Any:
        """Cut every edge's member link to `home` (edges dial their homes at
        once): with `home`'s endpoint changed first, they are not made again."""
        edges = [links for member, links in self.links.items() if member != home]
        yield wait_until(lambda: all(links.peers.get(home) is not None and links.peers[home].link for links in edges))
        for member, links in self.links.items():
            peer = links.peers.get(home)
            if member != home and peer is not None and peer.link is not None:
                peer.link.transport.abortConnection()
        yield wait_until(lambda: all(
            links.peers.get(home) is None or links.peers[home].link is None
            for member, links in self.links.items() if member != home
        ))


class AnyMemberServesEveryTunnelTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_visitor_at_each_member_reaches_the_tunnel_of_a_client_connected_to_one(self) -> Any:
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        yield fleet.start(target)
        for seed, member in enumerate(MEMBERS):
            payload = pattern(seed, 300_000)
            reply, reason = yield with_timeout(fleet.visit(member, Visitor(payload)), 20)
            self.assertEqual(hashlib.sha256(reply).hexdigest(), hashlib.sha256(payload).hexdigest(), member)
            self.assertTrue(reason.check(ConnectionDone), f"{member}: {reason}")  # half-close both ways, clean
        # the metrics of the home and of an edge say which member carried what (docs/metrics.md)
        home, edge = fleet.scrape("m1"), fleet.scrape("m2")
        self.assertEqual(metric_value(home, "rtunnel_fleet_visitors_received_total", edge="m2"), 1)
        self.assertEqual(metric_value(home, "rtunnel_fleet_visitors_received_total", edge="m3"), 1)
        self.assertEqual(metric_value(home, "rtunnel_fleet_member_links", member="m3", direction="in"), 1)
        self.assertEqual(metric_value(edge, "rtunnel_fleet_visitors_forwarded_total", home="m1"), 1)
        self.assertEqual(metric_value(edge, "rtunnel_fleet_visitors_waiting", home="m1"), 0)
        sent = metric_value(edge, "rtunnel_fleet_member_link_bytes_total", member="m1", direction="out")
        self.assertGreater(sent, 300_000)
        self.assertEqual(sorted(fleet.links["m2"].peers), ["m1"])
        yield wait_until(lambda: not fleet.tunnels["m1"].server.listeners[("127.0.0.1", fleet.public_port)].open_connections)

    @defer.inlineCallbacks
    def test_the_client_sees_the_visitors_real_address_and_the_address_it_reached_and_the_edge(self) -> Any:
        _, target = listen_target(self, Recorder)
        fleet = Fleet(self)
        service = yield fleet.start(target, proxy_protocol="v1")
        opened: list[dict[str, Any]] = []
        stream_opened = service.client.stream_opened

        def spy(session: Any, stream: Any, tunnel_id: int, info: dict[str, Any]) -> None:
            opened.append(info)
            stream_opened(session, stream, tunnel_id, info)

        service.client.stream_opened = spy
        visitor = Visitor(b"hello")
        reply, _ = yield with_timeout(visit_from("127.0.0.5", "127.0.0.3", fleet.public_port, visitor), 20)
        header, _, rest = reply.partition(b"\r\n")
        fields = header.split()
        self.assertEqual(fields[:4], [b"PROXY", b"TCP4", b"127.0.0.5", b"127.0.0.3"], header)
        self.assertEqual(int(fields[5]), fleet.public_port)
        self.assertEqual(rest, b"hello")
        self.assertEqual(opened[0]["edge"], "m3")
        self.assertEqual(opened[0]["src"][0], "127.0.0.5")

    @defer.inlineCallbacks
    def test_a_big_upload_through_an_edge_arrives_whole(self) -> Any:
        _, target = listen_target(self, HashReply)
        fleet = Fleet(self)
        yield fleet.start(target)
        payload = pattern(7, 24 * 1024 * 1024)
        reply, _ = yield with_timeout(fleet.visit("m2", Visitor(payload)), 40)
        self.assertEqual(reply, f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode())

    @defer.inlineCallbacks
    def test_a_visitor_at_an_edge_that_does_not_read_holds_the_target_back_across_both_hops_and_is_listed_at_home(self) -> Any:
        size = 24 * 1024 * 1024
        _, target = listen_target(self, Source, seed=3, size=size)
        fleet = Fleet(self)
        service = yield fleet.start(target)
        visitor = Visitor(half_close=False)
        done = fleet.visit("m2", visitor)
        yield wait_until(lambda: visitor.transport is not None and service.client.session.streams)
        visitor.transport.pauseProducing()  # a reader that stops reading
        yield sleep(1.5)
        (stream,) = service.client.session.streams.values()
        # (about 4.7 MiB on loopback: socket buffers and one window per hop; 24 MiB without the bridge's credit)
        self.assertLess(stream.read_total, 10 * 1024 * 1024, f"the client read {stream.read_total} of {size} bytes")
        # each hop holds at most its window: the edge's stream of the member link, and the home's two streams
        edge_stream = next(iter(fleet.links["m2"].peers["m1"].link.session.streams.values()))
        self.assertLessEqual(edge_stream.received - edge_stream.reported, SETTINGS.max_stream_window)
        # the home's status page lists the forwarded visitor by its own address
        (session,) = fleet.tunnels["m1"].server.sessions.values()
        listed = describe_session(session, reactor.seconds(), RateMeter())["streams"]
        self.assertEqual([s["visitor"] for s in listed], [f"127.0.0.1:{visitor.transport.getHost().port}"])
        visitor.transport.resumeProducing()
        reply, _ = yield with_timeout(done, 40)
        self.assertEqual(hashlib.sha256(reply).hexdigest(), hashlib.sha256(pattern(3, size)).hexdigest())


    @defer.inlineCallbacks
    def test_a_target_that_does_not_read_holds_an_uploading_visitor_at_an_edge_back(self) -> Any:
        size = 24 * 1024 * 1024
        sinks, target = listen_target(self, Sink)
        fleet = Fleet(self)
        yield fleet.start(target)
        done = fleet.visit("m2", Visitor(pattern(9, size)))
        yield wait_until(lambda: sinks.connections)
        yield sleep(1.5)
        peer = fleet.links["m2"].peers["m1"]
        (edge_stream,) = peer.link.session.streams.values()  # the visitor's stream at the edge
        self.assertLess(edge_stream.read_total, 10 * 1024 * 1024, "the edge read on while the target did not")
        sinks.connections[0].transport.resumeProducing()
        reply, _ = yield with_timeout(done, 40)
        self.assertEqual(reply, str(size).encode())


class HomeUnreachableTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_visitor_waits_for_an_unreachable_home_and_is_carried_once_its_link_is_up(self) -> Any:
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        yield fleet.start(target, visitor_wait=10.0)
        endpoint = fleet.fleet.endpoints["m1"]
        fleet.fleet.endpoints["m1"] = f"tcp:host=127.0.0.1:port={free_port()}"  # nothing listens there
        yield fleet.cut_links_to("m1")
        done = fleet.visit("m3", Visitor(b"waited"))
        yield wait_until(lambda: fleet.links["m3"].peers.get("m1") is not None and fleet.links["m3"].peers["m1"].waiting)
        yield sleep(0.5)
        self.assertFalse(done.called)
        fleet.fleet.endpoints["m1"] = endpoint
        reply, _ = yield with_timeout(done, 15)
        self.assertEqual(reply, b"waited")

    @defer.inlineCallbacks
    def test_visitors_waiting_for_a_home_that_left_go_to_the_member_that_holds_the_name_next(self) -> Any:
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        first = yield fleet.start(target, visitor_wait=20.0)
        port = fleet.public_port
        del fleet.fleet.endpoints["m1"]  # m1 left the directory (as when its lease expires)
        yield fleet.cut_links_to("m1")
        done = fleet.visit("m3", Visitor(b"rerouted"))
        yield wait_until(lambda: fleet.links["m3"].peers.get("m1") is not None and fleet.links["m3"].peers["m1"].waiting)
        yield first.stopService()
        yield fleet.connect_client("m2", target, port=port)  # the client came back at m2: the name's home is m2
        reply, _ = yield with_timeout(done, 15)
        self.assertEqual(reply, b"rerouted")
        self.assertEqual(fleet.links["m2"].visitors_received, {"m3": 1})
        self.assertNotIn("m1", fleet.links["m3"].peers)  # m3 no longer dials a member that left

    @defer.inlineCallbacks
    def test_a_visitor_whose_home_stays_unreachable_is_closed_after_the_wait(self) -> Any:
        logs = LogCapture(self)
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        yield fleet.start(target, visitor_wait=1.0)
        fleet.fleet.endpoints["m1"] = f"tcp:host=127.0.0.1:port={free_port()}"
        yield fleet.cut_links_to("m1")
        started = reactor.seconds()
        reply, reason = yield with_timeout(fleet.visit("m2", Visitor(b"lost")), 15)
        self.assertEqual(reply, b"")
        self.assertFalse(reason.check(ConnectionDone), "closed with a reset, not as a finished connection")
        self.assertGreaterEqual(reactor.seconds() - started, 0.9)
        self.assertEqual(logs.refusals("visitor_refused", reason="home_unreachable", edge="m2"), 1)


class MemberLinkCutTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_cutting_a_member_link_mid_transfer_resets_its_visitors_and_the_next_visitor_gets_through(self) -> Any:
        size = 24 * 1024 * 1024
        targets, target = listen_target(self, Source, seed=5, size=size)
        fleet = Fleet(self)
        yield fleet.start(target)
        visitor = Visitor(half_close=False, read_slowly=0.05)
        done = fleet.visit("m2", visitor)
        yield wait_until(lambda: visitor.received > 1024 * 1024)
        peer = fleet.links["m2"].peers["m1"]
        peer.link.transport.transport.abortConnection()  # the TCP connection under the member link
        reply, reason = yield with_timeout(done, 20)
        self.assertLess(len(reply), size)
        self.assertFalse(reason.check(ConnectionDone), "the cut visitor is reset, never ended as if complete")
        self.assertEqual(reply, pattern(5, size)[: len(reply)])  # what it got was right, in order
        yield wait_until(lambda: not targets.connections)  # the home reset the target's connection too
        # a new visitor at the same edge: the link is dialled again
        _, echo_port = listen_target(self, Echo)
        yield fleet.connect_client("m1", echo_port)
        reply, _ = yield with_timeout(fleet.visit("m2", Visitor(b"again")), 20)
        self.assertEqual(reply, b"again")


class LogNamespaceTests(SynchronousTestCase):
    def test_member_link_events_keep_the_namespaces_they_had_in_one_module(self) -> None:
        """The member link and the edge moved out of rtunnel.fleet.links
        (memberlink, edge); the namespaces of their events did not (an
        operator's log filters keep working)."""
        for cls in (MemberLink, OutgoingLink, IncomingLink, PeerLink, FleetLinks):
            self.assertEqual(cls.log.namespace, f"rtunnel.fleet.links.{cls.__name__}")


class MemberCertificateTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def _visit_with_m2(self, identity_of_m2: Any, logs: LogCapture) -> Any:
        """A fleet of m1 (with a client) and m2 whose identity is
        `identity_of_m2`; a visitor at m2 must not get through."""
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        yield fleet.start_member("m1")
        yield fleet.start_member("m2", identity_of_m2(fleet), visitor_wait=1.5)
        yield fleet.connect_client("m1", target)
        reply, _ = yield with_timeout(fleet.visit("m2", Visitor(b"x")), 15)
        self.assertEqual(reply, b"")
        self.assertIsNone(fleet.links["m2"].peers["m1"].link)
        return fleet

    @defer.inlineCallbacks
    def test_a_member_certificate_of_another_fleet_ca_gets_no_link(self) -> Any:
        logs = LogCapture(self)
        other = Path(tempfile.mkdtemp(prefix="rtunnel-other-ca-"))
        ca.init_ca(other, "other")
        yield self._visit_with_m2(lambda fleet: fleet.identity("m2", ca_dir=other), logs)
        self.assertEqual(logs.named("member_link_up"), [])

    @defer.inlineCallbacks
    def test_a_member_presenting_the_certificate_of_another_member_is_refused(self) -> Any:
        logs = LogCapture(self)
        yield self._visit_with_m2(lambda fleet: fleet.identity("m2", as_member="m3"), logs)
        refused = logs.named("member_link_refused")
        self.assertTrue(refused, logs.text())
        self.assertIn("certificate names 'm3'", refused[0]["reason"])
        self.assertIn(refused[0]["log_namespace"], ("rtunnel.fleet.links.OutgoingLink", "rtunnel.fleet.links.IncomingLink"))

    @defer.inlineCallbacks
    def test_a_member_the_directory_does_not_know_is_refused(self) -> Any:
        logs = LogCapture(self)
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        yield fleet.start(target, visitor_wait=1.5)
        del fleet.fleet.endpoints["m3"]  # m3 left the fleet (its lease expired) but still dials
        reply, _ = yield with_timeout(
            visit_from("127.0.0.1", "127.0.0.3", fleet.public_port, Visitor(b"x")), 15,
        )
        self.assertEqual(reply, b"")
        self.assertTrue(
            [e for e in logs.named("member_link_refused") if "not a member of this fleet" in e["reason"]], logs.text(),
        )


class FencedHomeTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_home_cut_off_from_etcd_refuses_visitors_carried_from_edges(self) -> Any:
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        yield fleet.start(target)
        reply, _ = yield with_timeout(fleet.visit("m2", Visitor(b"before")), 20)
        self.assertEqual(reply, b"before")
        fleet.fleet.fenced.add("m1")  # m1 cannot prove its lease: it must not act as the name's owner
        reply, reason = yield with_timeout(fleet.visit("m2", Visitor(b"during")), 20)
        self.assertEqual(reply, b"")
        self.assertFalse(reason.check(ConnectionDone), "refused with a reset")
        fleet.fleet.fenced.discard("m1")
        reply, _ = yield with_timeout(fleet.visit("m3", Visitor(b"after")), 20)
        self.assertEqual(reply, b"after")


class ClientMovesTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_client_that_moves_to_an_edge_member_gets_its_port_there_and_every_member_follows(self) -> Any:
        logs = LogCapture(self)
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        first = yield fleet.start(target)
        port = fleet.public_port
        yield first.stopService()  # its home's session ends; the directory still says m1 (etcd would, for a while)
        # the client comes back at m2, which serves the port as an edge: its BIND takes that very socket
        yield fleet.connect_client("m2", target, port=port)
        self.assertEqual(len(logs.named("edge_adopted", member="m1", port=port)), 1)
        yield wait_until(lambda: fleet.links["m1"].forwards.get(TcpPort("default", port)) is not None
                         and fleet.links["m1"].forwards[TcpPort("default", port)].port is not None)
        for seed, member in enumerate(MEMBERS):
            payload = pattern(seed, 10_000)
            reply, _ = yield with_timeout(fleet.visit(member, Visitor(payload)), 20)
            self.assertEqual(reply, payload, member)
        self.assertEqual(fleet.links["m2"].visitors_received, {"m1": 1, "m3": 1})

    @defer.inlineCallbacks
    def test_a_client_moving_to_an_edge_gets_its_port_when_the_directory_says_so_just_before_its_bind(self) -> Any:
        """In a fleet the BIND's etcd transaction and the watch event of that
        very claim arrive together, the event often first: the edge listener
        must still be there for the session to take over (not closing, which
        made the BIND fail `in_use` and the client wait 5 s)."""
        logs = LogCapture(self)
        _, target = listen_target(self, Echo)
        fleet = Fleet(self)
        first = yield fleet.start(target)
        port = fleet.public_port
        yield first.stopService()
        ports = fleet.tunnels["m2"].server.ports
        adopt = ports.adopt

        def event_first(host: str, number: int, listener: Any) -> Any:
            fleet.fleet.set_home(TcpPort("default", port), "m2")  # the watch event, just before the bind
            return adopt(host, number, listener)

        ports.adopt = event_first
        started = reactor.seconds()
        yield fleet.connect_client("m2", target, port=port)
        self.assertLess(reactor.seconds() - started, 3.0)
        self.assertEqual(len(logs.named("edge_adopted", member="m1", port=port)), 1)
        for seed, member in enumerate(MEMBERS):
            payload = pattern(seed, 1000)
            reply, _ = yield with_timeout(fleet.visit(member, Visitor(payload)), 20)
            self.assertEqual(reply, payload, member)
