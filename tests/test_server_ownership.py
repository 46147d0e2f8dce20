"""Two clients of one credential asking for the same port (docs/security.md
"One port, several sessions of a credential").

The newest session holds the port; an older one is told (BIND_FAILED
`taken_over`), keeps asking every BIND_RETRY_DELAY seconds, and gets the port
back as soon as the newer one lets go of it. Visitors that arrived while the
holder was away (its session detached) go to the session that takes the port
over. Real server, clients, targets and visitors on loopback.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from rtunnel import tunnels as tunnels_module
from rtunnel.server import SessionState
from tests.harness import (
    Echo,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    sleep,
    visit,
    wait_until,
    with_timeout,
)


@implementer(IHalfCloseableProtocol)
class Tagged(Echo):
    """Says which target it is (`factory.tag`), then echoes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.factory.tag)


class SameCredentialPortTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    @defer.inlineCallbacks
    def start(self, tags: list[bytes], **server: Any) -> Any:
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(**server)
        self.port = free_port()
        self.targets = []
        for tag in tags:
            _, target = listen_target(self, Tagged, tag=tag)
            self.targets.append(target)

    def client(self, target: int) -> Any:
        return self.tunnel.start_client(self.tunnel.client_config([(self.port, target)]))

    @defer.inlineCallbacks
    def answer(self) -> Any:
        reply, _ = yield with_timeout(visit(self.port, Visitor(b"?")), 10)
        return reply

    @defer.inlineCallbacks
    def test_the_displaced_client_is_told_keeps_waiting_and_gets_the_port_back_when_the_other_leaves(self):
        yield self.start([b"A:", b"B:"])
        first = self.client(self.targets[0])
        yield with_timeout(first.client.when_bound(), 10)
        self.assertEqual((yield self.answer()), b"A:?")

        second = self.client(self.targets[1])
        yield with_timeout(second.client.when_bound(), 10)
        self.assertEqual((yield self.answer()), b"B:?")
        # the first client was told, and logged why; it no longer counts the port as its own
        yield wait_until(lambda: self.logged("bind_taken_over"), 5)
        [told] = self.logged("bind_taken_over")
        self.assertEqual(told["code"], "taken_over")
        self.assertIn("newer session", told["reason"])
        self.assertEqual(first.client.bound, {})
        self.assertIsNone(first.fatal_error)

        # it keeps asking, and is told again without taking the port back
        yield sleep(tunnels_module.BIND_RETRY_DELAY + 0.5)
        self.assertEqual(first.client.bound, {})
        self.assertEqual((yield self.answer()), b"B:?")

        left = time.monotonic()
        yield second.stopService()
        yield wait_until(lambda: first.client.bound, tunnels_module.BIND_RETRY_DELAY)
        print(f"\nthe port was back with the first client {time.monotonic() - left:.2f} s after the other left")
        self.assertEqual(first.client.bound[1][1], self.port)
        self.assertEqual((yield self.answer()), b"A:?")
        self.assertEqual(len(self.logged("tunnel_ready")), 3)  # A, B, A again

    @defer.inlineCallbacks
    def test_a_waiting_client_rebinds_a_port_closed_under_the_other_at_its_retry_interval(self):
        """When the port is closed outright (not handed over: here the
        administrator closes the holder's tunnel), the waiting client's own
        retries open it again."""
        self.patch(tunnels_module, "BIND_RETRY_DELAY", 0.5)
        yield self.start([b"A:", b"B:"])
        first = self.client(self.targets[0])
        yield with_timeout(first.client.when_bound(), 10)
        second = self.client(self.targets[1])
        yield with_timeout(second.client.when_bound(), 10)
        yield wait_until(lambda: self.logged("bind_taken_over"), 5)

        server = self.tunnel.server
        holder = server.sessions[second.client.session_id]
        self.assertTrue(holder.close_tunnel(1, "closed by the test"))
        yield wait_until(lambda: first.client.bound, 3)
        self.assertEqual((yield self.answer()), b"A:?")
        self.assertEqual(second.client.bound, {})

    @defer.inlineCallbacks
    def test_unbind_of_the_holder_hands_the_port_to_the_waiting_session(self):
        yield self.start([b"A:", b"B:"])
        first = self.client(self.targets[0])
        yield with_timeout(first.client.when_bound(), 10)
        second = self.client(self.targets[1])
        yield with_timeout(second.client.when_bound(), 10)
        yield wait_until(lambda: self.logged("bind_taken_over"), 5)
        second.client.remove_tunnel(1)
        yield wait_until(lambda: first.client.bound, tunnels_module.BIND_RETRY_DELAY)
        self.assertEqual((yield self.answer()), b"A:?")
        self.assertTrue(self.logged("port_handed_over"))

    @defer.inlineCallbacks
    def test_a_visitor_waiting_while_the_owner_was_away_reaches_the_new_sessions_target(self):
        yield self.start([b"old:", b"new:"])
        old = self.client(self.targets[0])
        yield with_timeout(old.client.when_bound(), 10)
        server = self.tunnel.server
        [old_session] = server.sessions.values()
        # the old client goes away without a goodbye (a crash): its session
        # is detached, and keeps the port for the resume grace
        self.patch(old.client, "say_goodbye", lambda: None)
        yield old.stopService()
        yield wait_until(lambda: old_session.state is SessionState.DETACHED, 5)

        visitor = Visitor(b"waiting", half_close=True)
        waiting = visit(self.port, visitor)
        yield wait_until(lambda: len(old_session.mux_session.streams) == 1, 5)

        new = self.client(self.targets[1])
        yield with_timeout(new.client.when_bound(), 10)
        reply, _ = yield with_timeout(waiting, 10)
        self.assertEqual(reply, b"new:waiting")
        self.assertIs(old_session.state, SessionState.EXPIRED)  # nothing left to it
        self.assertEqual((yield self.answer()), b"new:?")

    @defer.inlineCallbacks
    def test_when_the_holders_grace_runs_out_the_waiting_session_gets_the_port_and_its_waiting_visitors(self):
        yield self.start([b"A:", b"B:"], resume_grace=1.0)
        first = self.client(self.targets[0])
        yield with_timeout(first.client.when_bound(), 10)
        second = self.client(self.targets[1])
        yield with_timeout(second.client.when_bound(), 10)
        yield wait_until(lambda: self.logged("bind_taken_over"), 5)
        server = self.tunnel.server
        holder = server.sessions[second.client.session_id]
        # the holder crashes: its session is detached and keeps the port for the grace
        self.patch(second.client, "say_goodbye", lambda: None)
        yield second.stopService()
        yield wait_until(lambda: holder.state is SessionState.DETACHED, 5)
        waiting = visit(self.port, Visitor(b"waited"))
        yield wait_until(lambda: len(holder.mux_session.streams) == 1, 5)
        self.assertEqual(first.client.bound, {})

        reply, _ = yield with_timeout(waiting, 10)
        self.assertEqual(reply, b"A:waited")
        self.assertIs(holder.state, SessionState.EXPIRED)
        self.assertEqual(first.client.bound[1][1], self.port)
        self.assertTrue(self.logged("port_handed_over"))


class NoCrossCredentialHandOverTests(unittest.TestCase):
    """A session waiting for its credential's port never inherits it from
    another credential: once the port is closed without an heir, nobody
    waits for it any more. In-process server, sessions without links (as a
    handshake leaves them for a moment), real listening sockets."""

    timeout = 20

    @defer.inlineCallbacks
    def test_a_port_freed_by_an_administrator_is_never_handed_from_another_client_to_a_waiting_one(self):
        from twisted.internet import reactor

        from rtunnel import wire
        from rtunnel.config import ServerConfig
        from rtunnel.server import TunnelServer

        server = TunnelServer(
            reactor, ServerConfig(listen="tcp:0", state_dir=None, extra_clients=(("bob", "bob-token"),)), "tok",
        )
        self.addCleanup(server.shutdown, 0)
        port = free_port()
        key = ("127.0.0.1", port)

        def bind(session: Any) -> None:
            body = wire.encode_json(wire.FrameType.BIND, {"tunnel": 1, "host": "127.0.0.1", "port": port})
            [frame] = wire.FrameDecoder().feed(body)
            session.control_frame(None, frame)

        older, _ = server.session_for("default", None)
        newer, _ = server.session_for("default", None)
        bind(newer)
        bind(older)  # taken_over: it waits for the newer session's port
        self.assertIs(server.listeners[key].owner, newer)
        newer.close_tunnel(1, "closed by the server's administrator")
        bob, _ = server.session_for("bob", None)
        bind(bob)  # the port is closing: bound once it has closed
        yield wait_until(lambda: key in server.listeners, 5)
        self.assertIs(server.listeners[key].owner, bob)
        bob.expire("its client went away")
        self.assertNotIn(key, server.listeners)  # closed, not handed to the default client's older session
        self.assertEqual(older.tunnels, {})
