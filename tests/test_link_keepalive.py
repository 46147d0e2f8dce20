"""rtunnel.link keepalive: a link pings every interval and is ended after
`dead_after` of silence, with one timer per link (an idle server holds one
per session, so each costs memory in every session). Driven on a Clock
through a StringTransport: the frames the link writes are decoded."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rtunnel import wire
from rtunnel.config import Keepalive
from rtunnel.link import ControlLink
from rtunnel.mux import Session, SessionSettings
from rtunnel.wire import FrameType


class OpenLink(ControlLink):
    """A ControlLink whose handshake is skipped: the test starts its session."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, Keepalive(interval=10, dead_after=30))
        self.lost = False

    def link_lost(self, session: Any, reason: Any) -> None:
        self.lost = True


class KeepaliveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.link = OpenLink(self.clock)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        session = Session(self.clock, self.link, is_server=True, settings=SessionSettings())
        self.link.start_session(session, False, wire.DEFAULT_MAX_FRAME)
        self.decoder = wire.FrameDecoder()

    def pings_sent(self) -> int:
        frames = self.decoder.feed(self.transport.value())
        self.transport.clear()
        return sum(1 for f in frames if f.type is FrameType.PING and not f.flags & wire.FLAG_PONG)

    def keepalive_timers(self) -> list[Any]:
        return [c for c in self.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is self.link]

    def test_an_idle_link_pings_every_interval_on_one_timer(self) -> None:
        pings = []
        for _ in range(5):
            self.clock.advance(0)
            self.assertEqual(len(self.keepalive_timers()), 1)
            pings.append(self.pings_sent())
            self.link.dataReceived(wire.encode_ping(1, pong=True))  # the peer answers
            self.clock.advance(10)
        self.assertEqual(pings, [1, 1, 1, 1, 1])

    def test_a_silent_link_is_ended_after_dead_after_and_not_before(self) -> None:
        self.clock.advance(29.9)
        self.assertFalse(self.transport.disconnecting or self.link.closing)
        self.clock.advance(0.1)
        self.assertTrue(self.link.closing)
        self.assertEqual(self.keepalive_timers(), [])

    def test_frames_from_the_peer_push_the_deadline_back(self) -> None:
        self.clock.advance(25)
        self.link.dataReceived(wire.encode_ping(7))  # a ping from the peer: the link is alive
        self.clock.advance(25)
        self.assertFalse(self.link.closing)
        self.clock.advance(5)
        self.assertTrue(self.link.closing)

    def test_a_lost_connection_leaves_no_timer(self) -> None:
        self.clock.advance(0)
        self.link.connectionLost()
        self.assertEqual(self.keepalive_timers(), [])

    def test_a_link_closing_cleanly_is_still_aborted_if_the_peer_never_finishes_the_close(self) -> None:
        aborted: list[bool] = []
        self.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[attr-defined]
        self.clock.advance(0)
        self.link.lose()  # a clean close waits for the peer's part (TLS close_notify) ...
        self.clock.advance(29.9)
        self.assertEqual(aborted, [])
        self.clock.advance(0.1)  # ... which never comes: 30 s of silence
        self.assertEqual(aborted, [True])
