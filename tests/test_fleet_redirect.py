"""Where a fleet member sends a client (rtunnel.fleet.redirect) and when a
drain refuses to start (rtunnel.fleet.drain), on the directory's own data
and a real server in this process."""

from __future__ import annotations

import os
import subprocess

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rtunnel.client import ClientState
from rtunnel.fleet.directory import FleetDirectory
from rtunnel.fleet.drain import Drain
from rtunnel.fleet.etcd import KeyValue
from rtunnel.fleet.redirect import SessionLocator, control_address
from tests.harness import (
    Echo,
    LogCapture,
    Tunnel,
    Visitor,
    converse,
    listen_target,
    visit,
    wait_until,
    with_timeout,
)


def directory(member: str = "m1") -> FleetDirectory:
    """A directory as its watch fills it (not started: the test fills it)."""
    return FleetDirectory(None, "/rtunnel/", member, "127.0.0.1")  # type: ignore[arg-type]


class ControlAddressTests(SynchronousTestCase):
    def test_the_control_endpoint_s_interface_and_port(self) -> None:
        record = {"control": "tcp:19050:backlog=1024:interface=127.0.0.2", "public_host": "203.0.113.9"}
        self.assertEqual(control_address(record), ("127.0.0.2", 19050))

    def test_an_escaped_ipv6_interface(self) -> None:
        record = {"control": r"tcp:19050:backlog=1024:interface=2001\:db8\:\:2", "public_host": "x"}
        self.assertEqual(control_address(record), ("2001:db8::2", 19050))

    def test_a_wildcard_interface_means_the_member_s_public_host(self) -> None:
        for interface in ("", "0.0.0.0", r"\:\:"):
            record = {"control": f"tcp:19050:backlog=1024:interface={interface}", "public_host": "198.51.100.4"}
            self.assertEqual(control_address(record), ("198.51.100.4", 19050), interface)

    def test_no_address_without_a_port_or_a_usable_host(self) -> None:
        self.assertIsNone(control_address({"control": "systemd:domain=INET:index=0", "public_host": "a"}))
        self.assertIsNone(control_address({"control": "tcp:19050:interface=0.0.0.0", "public_host": "0.0.0.0"}))
        self.assertIsNone(control_address({}))


class SessionLocatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = directory("m1")
        for name, host in (("m1", "127.0.0.1"), ("m2", "127.0.0.2"), ("m3", "127.0.0.3")):
            self.directory.members[name] = {"control": f"tcp:1905{name[1]}:interface={host}", "public_host": host}
        self.locator = SessionLocator(self.directory)

    def test_a_session_held_elsewhere_is_told_only_to_its_credential(self) -> None:
        self.directory.sessions["a" * 32] = {"member": "m2", "credential": "alice"}
        self.assertEqual(self.locator("a" * 32, "alice"), ("127.0.0.2", 19052, "m2"))
        self.assertIsNone(self.locator("a" * 32, "bob"))
        self.assertIsNone(self.locator("b" * 32, "alice"))

    def test_a_session_held_here_is_not_redirected(self) -> None:
        self.directory.sessions["a" * 32] = {"member": "m1", "credential": "alice"}
        self.assertIsNone(self.locator("a" * 32, "alice"))

    def test_a_session_of_an_earlier_run_of_its_member_is_not_redirected(self) -> None:
        """The member restarted (a new lease): the session died with the old
        process, so the client starts anew here instead of being sent on."""
        self.directory._apply(KeyValue("/rtunnel/members/m2", b'{"control": "tcp:19052:interface=127.0.0.2"}',
                                       lease=7), False, notify=False)
        self.directory._apply(KeyValue("/rtunnel/sessions/" + "a" * 32, b'{"member": "m2", "credential": "alice"}',
                                       lease=7), False, notify=False)
        self.directory._apply(KeyValue("/rtunnel/sessions/" + "b" * 32, b'{"member": "m2", "credential": "alice"}',
                                       lease=5), False, notify=False)
        self.assertEqual(self.locator("a" * 32, "alice"), ("127.0.0.2", 19052, "m2"))
        self.assertIsNone(self.locator("b" * 32, "alice"))

    def test_a_session_of_a_sibling_worker_whose_process_is_gone_is_not_redirected(self) -> None:
        """A sibling worker shares this control port: sending the client
        "there" only reconnects it here while the dead worker's lease runs
        out; its process is known to be gone, so the client starts anew."""
        gone = subprocess.Popen(["true"])
        gone.wait()
        locator = SessionLocator(self.directory, siblings=frozenset({"m1", "m2"}))
        self.directory.members["m2"]["pid"] = gone.pid
        self.directory.members["m3"]["pid"] = gone.pid  # another machine's pid says nothing here
        self.directory.sessions["a" * 32] = {"member": "m2", "credential": "alice"}
        self.directory.sessions["b" * 32] = {"member": "m3", "credential": "alice"}
        self.assertIsNone(locator("a" * 32, "alice"))
        self.assertEqual(locator("b" * 32, "alice"), ("127.0.0.3", 19053, "m3"))
        self.directory.members["m2"]["pid"] = os.getpid()
        self.assertEqual(locator("a" * 32, "alice"), ("127.0.0.2", 19052, "m2"))

    def test_a_session_of_a_member_our_link_to_was_cut_is_not_redirected(self) -> None:
        """Our member link to m2 went down and was not made again (m2 was
        killed): "resume at m2" would send the client to a dead address
        until m2's lease runs out, so it starts anew here."""
        cut = {"m2"}
        locator = SessionLocator(self.directory, siblings=frozenset(), lost_touch=lambda member: member in cut)
        self.directory.sessions["a" * 32] = {"member": "m2", "credential": "alice"}
        self.assertIsNone(locator("a" * 32, "alice"))
        cut.clear()  # the link is back: m2 lives
        self.assertEqual(locator("a" * 32, "alice"), ("127.0.0.2", 19052, "m2"))

    def test_a_drain_goes_to_the_member_with_the_fewest_sessions(self) -> None:
        self.directory.sessions["a" * 32] = {"member": "m2", "credential": "alice"}
        self.directory.sessions["b" * 32] = {"member": "m1", "credential": "bob"}
        self.assertEqual(self.locator.another_member(), ("127.0.0.3", 19053, "m3"))
        del self.directory.members["m3"]
        self.assertEqual(self.locator.another_member(), ("127.0.0.2", 19052, "m2"))

    def test_a_whole_machine_drain_goes_to_another_machine_or_nowhere(self) -> None:
        """Every worker of this machine drains (the --workers parent's
        signal): a sibling is no target, even the least loaded."""
        self.directory.sessions["a" * 32] = {"member": "m3", "credential": "alice"}
        self.assertEqual(self.locator.another_member(frozenset({"m1", "m2"}), exclude_siblings=True),
                         ("127.0.0.3", 19053, "m3"))
        self.assertIsNone(self.locator.another_member(frozenset({"m1", "m2", "m3"}), exclude_siblings=True))

    def test_a_drain_prefers_another_machine_s_member_to_a_sibling_worker(self) -> None:
        self.directory.sessions["a" * 32] = {"member": "m2", "credential": "alice"}
        self.assertEqual(self.locator.another_member(frozenset({"m1", "m3"})), ("127.0.0.2", 19052, "m2"))
        self.assertEqual(self.locator.another_member(frozenset({"m1", "m2", "m3"})), ("127.0.0.3", 19053, "m3"))


class DrainRefusalTests(TestCase):
    @defer.inlineCallbacks
    def test_a_member_alone_refuses_to_drain_and_keeps_serving(self) -> None:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        alone = directory("m1")
        alone.members["m1"] = {"control": "tcp:1:interface=127.0.0.1", "public_host": "127.0.0.1"}
        stops: list[bool] = []
        logs = LogCapture(self)
        drain = Drain(reactor, tunnel.server, SessionLocator(alone), lambda: stops.append(True))
        message = drain.start()
        self.assertIn("cannot drain: no other fleet member", message)
        self.assertEqual(len(logs.named("drain_refused")), 1)
        self.assertFalse(drain.draining)
        self.assertIsNone(tunnel.server.moved_to)
        self.assertEqual(stops, [])


class InProcessDrainTests(TestCase):
    timeout = 25

    """Two servers in this process with one certificate, a Drain on the
    first whose directory names the second (no etcd: each server keeps its
    own claims, so the tunnels bind port 0)."""

    @defer.inlineCallbacks
    def start_pair(self) -> defer.Generator[object, object, tuple[Tunnel, Tunnel, Drain, list[bool]]]:
        a, b = Tunnel(self), Tunnel(self)
        yield a.start_server()
        yield b.start_server(cert=a.state_dir / "server.crt", key=a.state_dir / "server.key")
        fleet = directory("a")
        fleet.members["b"] = {"control": f"tcp:{b.control_port}:interface=127.0.0.1", "public_host": "127.0.0.1"}
        stops: list[bool] = []
        drain = Drain(reactor, a.server, SessionLocator(fleet), lambda: stops.append(True))
        return a, b, drain, stops

    @defer.inlineCallbacks
    def test_a_client_stopped_while_its_old_link_drains_closes_both_links(self) -> None:
        a, b, drain, stops = yield self.start_pair()
        _, target = listen_target(self, Echo)
        logs = LogCapture(self)
        [old_port] = yield a.connect([(0, target)])
        service = a.client_service
        assert service is not None
        old = yield converse(old_port)
        old.transport.write(b"before")
        yield wait_until(lambda: bytes(old.received) == b"before")
        drain.start()
        yield wait_until(lambda: len(b.server.sessions) == 1 and service.client.session is not None)
        bound = yield with_timeout(service.client.when_bound(), 10)
        new_port = bound[1][1]
        data, _ = yield visit(new_port, Visitor(b"at the new server"))
        self.assertEqual(data, b"at the new server")
        self.assertEqual(len(service.client.draining), 1)
        self.assertEqual(stops, [])  # the old connection still runs through a
        yield service.stopService()
        received = yield with_timeout(old.closed, 10)
        self.assertEqual(received, b"before")
        yield wait_until(lambda: stops == [True], 5)  # the client said goodbye: a has no session left
        self.assertIs(service.client.state, ClientState.STOPPING)
        self.assertEqual(service.client.draining, {})
        self.assertEqual(len(logs.named("session_moving")), 1)
        self.assertEqual(len(logs.named("old_link_closed")), 1)

    @defer.inlineCallbacks
    def test_the_old_server_going_away_resets_what_was_left_on_the_old_link(self) -> None:
        a, b, drain, stops = yield self.start_pair()
        _, target = listen_target(self, Echo)
        [old_port] = yield a.connect([(0, target)])
        service = a.client_service
        assert service is not None
        old = yield converse(old_port)
        old.transport.write(b"before")
        yield wait_until(lambda: bytes(old.received) == b"before")
        drain.start()
        yield wait_until(lambda: len(b.server.sessions) == 1)
        yield with_timeout(service.client.when_bound(), 10)
        yield a.stop_server()  # the drained member stops before the connection is done
        yield with_timeout(old.closed, 10)
        yield wait_until(lambda: service.client.draining == {}, 5)
        yield wait_until(lambda: stops == [True], 5)  # a's drain ends: no session left there
        connects = service.client.events.connect_attempts
        [new_port] = [port for _, port in service.client.bound.values()]
        data, _ = yield visit(new_port, Visitor(b"still served by b"))
        self.assertEqual(data, b"still served by b")
        self.assertEqual(service.client.events.connect_attempts, connects)  # the old link is not made again
        self.assertIs(service.client.state, ClientState.READY)  # the old link's loss is not the new one's
