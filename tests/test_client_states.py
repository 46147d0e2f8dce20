"""rtunnel.client's connection state machine, driven input by input.

A real TunnelClient and real ClientLinks over memory transports, on a
task.Clock: the server's side is frames written into the link, so each
test walks the transitions it names and checks what the client did on the
way (what it sent, logged, kept and counted). The same paths against a
real server are in test_link_drops, test_operations and test_client_exit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import error, task
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel import wire
from rtunnel.client import (
    LEAVING,
    ClientInput,
    ClientLink,
    ClientState,
    ImpossibleTransition,
    TunnelClient,
)
from rtunnel.config import ClientConfig, TunnelSpec
from rtunnel.link import Keepalive
from rtunnel.wire import ErrorCode, Frame, FrameType

S = ClientState
SESSION, SECRET = "a1" * 16, "b2" * 32
OTHER_SESSION = "c3" * 16
TUNNEL = TunnelSpec(tunnel_id=1, bind_host="", bind_port=4000, target_host="127.0.0.1", target_port=3000)


class Machine:
    """A client and the links it has made, with the server's side as frames."""

    def __init__(self, **config: Any) -> None:
        self.clock = task.Clock()
        self.fatal: list[str] = []
        settings = ClientConfig("server", 1, (TUNNEL,), token="t", keepalive=Keepalive(10.0, 30.0))
        self.client = TunnelClient(self.clock, replace(settings, **config), self.fatal.append)
        self.transports: list[StringTransport] = []

    @property
    def state(self) -> ClientState:
        return self.client.state

    def connect(self) -> ClientLink:
        """A connection attempt succeeds: the link is made (LINK_MADE)."""
        link = ClientLink(self.client)
        transport = StringTransport()
        self.transports.append(transport)
        link.makeConnection(transport)
        return link

    def sent(self, link: ClientLink) -> list[Frame]:
        """Every frame the client has written on `link` so far."""
        transport = link.transport
        assert isinstance(transport, StringTransport)
        return list(wire.FrameDecoder(wire.DEFAULT_MAX_FRAME).feed(transport.value()))

    def hello(self, link: ClientLink) -> dict[str, Any]:
        [hello] = [f for f in self.sent(link) if f.type is FrameType.HELLO]
        return wire.decode_json(hello)

    def welcome(self, link: ClientLink, session: str = SESSION, resumed: bool = False) -> None:
        link.dataReceived(wire.Welcome(session, SECRET if session == SESSION else "d4" * 32, resumed).encode())

    def lose(self, link: ClientLink) -> None:
        link.connectionLost(Failure(error.ConnectionLost("the network went away")))

    def ready(self) -> ClientLink:
        link = self.connect()
        self.welcome(link)
        return link


def events(logged: Sequence[Mapping[str, Any]]) -> list[str]:
    return [e["event"] for e in logged if "event" in e]


class HappyPathTests(unittest.SynchronousTestCase):
    def test_a_link_sends_hello_and_waits_for_welcome(self) -> None:
        m = Machine()
        self.assertIs(m.state, S.CONNECTING)
        link = m.connect()
        self.assertIs(m.state, S.HANDSHAKING)
        self.assertIs(m.client.handshaking, link)
        self.assertNotIn("resume", m.hello(link))

    def test_welcome_starts_a_session_that_binds_every_tunnel_and_resets_the_failure_count(self) -> None:
        m = Machine()
        m.client.connect_failed("refused")
        with capturedLogs() as logged:
            link = m.ready()
        self.assertIs(m.state, S.READY)
        self.assertEqual((m.client.link, m.client.handshaking), (link, None))
        self.assertEqual((m.client.session_id, m.client.failed_attempts), (SESSION, 0))
        self.assertIs(link.session, m.client.session)
        binds = [wire.decode_json(f) for f in m.sent(link) if f.type is FrameType.BIND]
        self.assertEqual(binds, [{"tunnel": 1, "host": "", "port": 4000}])
        self.assertEqual(events(logged), ["connected"])

    def test_a_lost_link_keeps_the_session_and_the_next_one_resumes_it(self) -> None:
        m = Machine()
        first = m.ready()
        session = m.client.session
        m.lose(first)
        self.assertIs(m.state, S.LOST)
        self.assertEqual((m.client.link, m.client.events.links_lost), (None, 1))
        self.assertIs(m.client.session, session)
        second = m.connect()
        self.assertIs(m.state, S.RESUMING)
        self.assertEqual(m.hello(second)["resume"], {"session": SESSION, "secret": SECRET})
        with capturedLogs() as logged:
            m.welcome(second, resumed=True)
        self.assertIs(m.state, S.READY)
        self.assertIs(m.client.session, session)
        self.assertIs(session.link, second)  # type: ignore[union-attr]
        self.assertEqual(m.client.events.resumes, 1)
        self.assertEqual(events(logged), ["session_resumed"])
        self.assertEqual([f.type for f in m.sent(second)][-1], FrameType.RESUME)  # not BIND again

    def test_a_refused_resume_forgets_the_old_session_and_binds_in_the_new_one(self) -> None:
        m = Machine()
        m.lose(m.ready())
        old = m.client.session
        link = m.connect()
        with capturedLogs() as logged:
            m.welcome(link, session=OTHER_SESSION, resumed=False)
        self.assertIs(m.state, S.READY)
        self.assertIsNot(m.client.session, old)
        self.assertEqual(m.client.session_id, OTHER_SESSION)
        self.assertIsNone(old.link)  # type: ignore[union-attr]
        self.assertEqual(events(logged), ["session_lost", "connected"])
        self.assertIn(FrameType.BIND, [f.type for f in m.sent(link)])

    def test_a_welcome_that_claims_to_resume_another_session_starts_a_new_one(self) -> None:
        m = Machine()
        m.lose(m.ready())
        link = m.connect()
        with capturedLogs() as logged:
            m.welcome(link, session=OTHER_SESSION, resumed=True)
        self.assertEqual(events(logged), ["session_lost", "connected"])
        self.assertEqual(m.client.session_id, OTHER_SESSION)


class FailedAttemptTests(unittest.SynchronousTestCase):
    """Attempts that make no session: each counts once, and is explained once."""

    def test_a_failed_connect_counts_and_stays_connecting(self) -> None:
        m = Machine()
        m.client.connect_failed("connection refused")
        m.client.connect_failed("connection refused")
        self.assertEqual((m.state, m.client.failed_attempts), (S.CONNECTING, 2))

    def test_a_link_closed_before_welcome_is_explained_and_counted(self) -> None:
        m = Machine()
        link = m.connect()
        with capturedLogs() as logged:
            m.lose(link)
        self.assertEqual((m.state, m.client.failed_attempts, m.client.handshaking), (S.CONNECTING, 1, None))
        self.assertEqual(events(logged), ["handshake_failed"])

    def test_no_welcome_in_time_abandons_the_attempt_and_its_close_is_not_explained_again(self) -> None:
        m = Machine()
        link = m.connect()
        with capturedLogs() as logged:
            m.clock.advance(30.0)
            self.assertIs(m.state, S.CONNECTING)
            self.assertTrue(m.transports[0].disconnecting)  # aborted
            m.lose(link)
        self.assertEqual(events(logged), ["handshake_timeout"])
        self.assertEqual(m.client.failed_attempts, 1)

    def test_a_malformed_welcome_closes_the_link_with_an_error_once(self) -> None:
        m = Machine()
        link = m.connect()
        with capturedLogs() as logged:
            link.dataReceived(wire.encode_json(FrameType.WELCOME, {"session": "short", "secret": SECRET}))
            self.assertIs(m.state, S.CONNECTING)
            m.lose(link)
        self.assertEqual(events(logged), ["link_error"])
        [error_frame] = [f for f in m.sent(link) if f.type is FrameType.ERROR]
        self.assertIn("WELCOME session", wire.decode_coded(error_frame)[1])
        self.assertEqual(m.client.failed_attempts, 1)

    def test_a_failed_resume_attempt_keeps_the_session_held(self) -> None:
        m = Machine()
        m.lose(m.ready())
        session = m.client.session
        link = m.connect()
        m.clock.advance(30.0)
        self.assertIs(m.state, S.LOST)
        m.lose(link)
        link = m.connect()
        link.dataReceived(wire.encode_coded(FrameType.ERROR, 0, ErrorCode.LIMIT_EXCEEDED, "too many"))
        self.assertIs(m.state, S.RESUMING)  # the ERROR ends no session: there is none on this link yet
        m.lose(link)
        self.assertIs(m.state, S.LOST)
        self.assertIs(m.client.session, session)
        self.assertEqual(m.client.failed_attempts, 2)

    def test_the_attempt_that_reaches_max_retries_gives_up_soon_with_one_fatal_report(self) -> None:
        m = Machine(max_retries=3)
        m.client.connect_failed("refused")
        m.lose(m.connect())
        with capturedLogs() as logged:
            m.client.connect_failed("connection refused.")
            self.assertIs(m.state, S.GAVE_UP)
            self.assertEqual(m.fatal, [])  # not inside ClientService's callback
            m.clock.advance(0)
        [message] = m.fatal
        self.assertIn("giving up after 3 failed attempts in a row", message)
        self.assertIn("the last one: connection refused. Check", message)
        self.assertEqual(events(logged), ["gave_up"])
        m.client.connect_failed("refused")  # ClientService's last report: nothing more
        m.client.fatal("and another")
        m.clock.advance(0)
        self.assertEqual((m.state, len(m.fatal)), (S.GAVE_UP, 1))


class SessionEndTests(unittest.SynchronousTestCase):
    def test_an_error_in_a_session_forgets_it_and_the_next_link_starts_anew(self) -> None:
        m = Machine()
        link = m.ready()
        session = m.client.session
        with capturedLogs():
            link.dataReceived(wire.encode_coded(FrameType.ERROR, 0, ErrorCode.FLOW_CONTROL, "window"))
        self.assertIs(m.state, S.CONNECTING)
        self.assertEqual((m.client.session, m.client.link, m.client.events.links_lost), (None, None, 1))
        self.assertIsNone(session.link)  # type: ignore[union-attr]
        m.lose(link)  # its close changes nothing more
        self.assertEqual((m.state, m.client.events.links_lost, m.client.failed_attempts), (S.CONNECTING, 1, 0))
        self.assertNotIn("resume", m.hello(m.connect()))

    def test_a_fatal_refusal_fails_once_and_the_close_that_follows_explains_nothing(self) -> None:
        m = Machine()
        link = m.connect()
        with capturedLogs() as logged:
            link.dataReceived(wire.encode_coded(FrameType.ERROR, 0, ErrorCode.AUTH_FAILED, "bad token"))
            m.lose(link)
        self.assertIs(m.state, S.FAILED)
        self.assertEqual(m.fatal, ["the server refused us: bad token"])
        self.assertEqual(events(logged), ["fatal"])
        self.assertEqual(m.client.failed_attempts, 0)

    def test_a_fatal_bind_refusal_says_goodbye_on_the_live_link(self) -> None:
        m = Machine()
        link = m.ready()
        refusal = wire.BindFailed(1, "not_permitted", "port 4000 is not allowed").to_json()
        with capturedLogs():
            m.client.session.frame_received(  # type: ignore[union-attr]
                next(iter(wire.FrameDecoder().feed(wire.encode_json(FrameType.BIND_FAILED, refusal))))
            )
        self.assertIs(m.state, S.FAILED)
        self.assertEqual(len(m.fatal), 1)
        self.assertIn(FrameType.GOAWAY, [f.type for f in m.sent(link)])


class StopTests(unittest.SynchronousTestCase):
    def test_stop_when_ready_says_goodbye_and_the_close_is_not_a_lost_session(self) -> None:
        m = Machine()
        link = m.ready()
        m.client.stop()
        self.assertIs(m.state, S.STOPPING)
        [goaway] = [f for f in m.sent(link) if f.type is FrameType.GOAWAY]
        self.assertEqual(wire.decode_coded(goaway)[0], ErrorCode.SHUTDOWN)
        self.assertIsNone(link.session.link)  # type: ignore[union-attr]  # detached: TLS can close
        m.lose(link)
        self.assertEqual((m.state, m.client.link), (S.STOPPING, None))

    def test_stop_mid_handshake_aborts_the_link_without_a_failed_attempt(self) -> None:
        m = Machine()
        link = m.connect()
        with capturedLogs() as logged:
            m.client.stop()
            self.assertTrue(m.transports[0].disconnecting)
            m.lose(link)
        self.assertEqual(events(logged), [])
        self.assertEqual((m.state, m.client.failed_attempts, m.client.handshaking), (S.STOPPING, 0, None))

    def test_a_link_made_while_stopping_is_closed_at_once(self) -> None:
        m = Machine()
        m.client.stop()
        m.connect()
        self.assertEqual(m.transports[0].value(), b"")  # no HELLO
        self.assertTrue(m.transports[0].disconnecting)

    def test_a_fatal_error_while_stopping_still_fails(self) -> None:
        m = Machine()
        m.client.stop()
        with capturedLogs():
            m.client.fatal("the metrics port is taken")
        self.assertEqual((m.state, m.fatal), (S.FAILED, ["the metrics port is taken"]))


class TableTests(unittest.SynchronousTestCase):
    def test_an_impossible_input_raises_and_changes_nothing(self) -> None:
        m = Machine()
        link = m.ready()
        with self.assertRaises(ImpossibleTransition) as cm:
            m.connect()  # a second link while the session runs on one
        self.assertIn("LINK_MADE in state READY", str(cm.exception))
        with self.assertRaises(ImpossibleTransition):
            m.client.welcomed(link, wire.Welcome(SESSION, SECRET))
        with self.assertRaises(ImpossibleTransition):
            m.client.connect_failed("an attempt while a link is up")
        self.assertIs(m.state, S.READY)

    def test_welcome_before_any_link_is_impossible(self) -> None:
        m = Machine()
        with self.assertRaises(ImpossibleTransition):
            m.client.welcomed(ClientLink(m.client), wire.Welcome(SESSION, SECRET))
        self.assertIs(m.state, S.CONNECTING)

    def test_leaving_states_are_never_left_but_for_a_fatal_error_while_stopping(self) -> None:
        for (state, _), (target, _) in TunnelClient.TRANSITIONS.items():
            if state in LEAVING and target is not state:
                self.assertEqual((state, target), (S.STOPPING, S.FAILED))

    def test_every_leaving_state_takes_every_input(self) -> None:
        """Links close after the decision to leave: whatever they report
        then must not raise."""
        for state in LEAVING:
            for event in ClientInput:
                self.assertIn((state, event), TunnelClient.TRANSITIONS, (state, event))

    def test_only_ready_lost_and_resuming_hold_a_session(self) -> None:
        """Walk every reachable state and check the session invariant."""
        m = Machine()
        seen = {m.state: m.client.session is not None}
        link = m.connect()
        seen[m.state] = m.client.session is not None
        m.welcome(link)
        seen[m.state] = m.client.session is not None
        m.lose(link)
        seen[m.state] = m.client.session is not None
        m.connect()
        seen[m.state] = m.client.session is not None
        self.assertEqual(
            seen, {S.CONNECTING: False, S.HANDSHAKING: False, S.READY: True, S.LOST: True, S.RESUMING: True}
        )


class DocumentedMachineTests(unittest.SynchronousTestCase):
    def test_the_architecture_docs_draw_transitions_the_table_has(self) -> None:
        """docs/architecture.md's row for the client names every state, and
        each arrow between two states in it is a transition of the table."""
        docs = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
        [row] = [line for line in docs.read_text().splitlines() if line.startswith("| client connection |")]
        names = {state.name: state for state in ClientState}
        moves = {(state, target) for (state, _), (target, _) in TunnelClient.TRANSITIONS.items()}
        arrows = 0
        for chain in row.split("`")[1::2]:
            parts = [part.strip() for part in chain.split("→")]
            for before, after in zip(parts, parts[1:], strict=False):
                if before in names and after in names:
                    self.assertIn((names[before], names[after]), moves, chain)
                    arrows += 1
        self.assertGreaterEqual(arrows, 9)
        for name in names:
            self.assertRegex(row, rf"\b{name}\b")
