"""rtunnel.server.session: a server session's attachment is one state
machine (enum + one transition table); an input it has no transition for
raises instead of leaving the session half in one state. The table is
checked on its own (pure), then through a ServerSession on a Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.config import ServerConfig
from rtunnel.server import TunnelServer
from rtunnel.server.session import (
    SHOWN,
    TRANSITIONS,
    Attachment,
    AttachmentInput,
    ImpossibleTransition,
    ServerSession,
    SessionState,
    next_attachment,
)

A, In = Attachment, AttachmentInput


class TransitionTableTests(SynchronousTestCase):
    def test_the_lifecycle_of_a_session_that_resumes_then_leaves(self) -> None:
        state = A.NEW
        path = []
        for event in (In.ATTACH, In.LINK_LOST, In.ATTACH, In.ATTACH, In.GOAWAY, In.LINK_LOST):
            state = next_attachment(state, event)
            path.append(state)
        self.assertEqual(path, [A.ATTACHED, A.DETACHED, A.ATTACHED, A.ATTACHED, A.LEAVING, A.EXPIRED])

    def test_every_state_but_expired_can_expire(self) -> None:
        for state in A:
            if state is not A.EXPIRED:
                self.assertIs(next_attachment(state, In.EXPIRE), A.EXPIRED)

    def test_nothing_leaves_expired(self) -> None:
        for event in In:
            self.assertRaises(ImpossibleTransition, next_attachment, A.EXPIRED, event)

    def test_impossible_inputs_raise_naming_the_input_and_the_state(self) -> None:
        impossible = [(s, e) for s in A for e in In if (s, e) not in TRANSITIONS]
        self.assertIn((A.DETACHED, In.GOAWAY), impossible)  # no link, so no frame
        self.assertIn((A.DETACHED, In.LINK_LOST), impossible)  # lost already
        self.assertIn((A.NEW, In.LINK_LOST), impossible)
        for state, event in impossible:
            e = self.assertRaises(ImpossibleTransition, next_attachment, state, event)
            self.assertIn(event.value, str(e))
            self.assertIn(state.value, str(e))

    def test_what_the_status_page_shows_keeps_its_three_documented_values(self) -> None:
        self.assertEqual({s.value for s in SHOWN.values()}, {"connected", "detached", "expired"})
        self.assertEqual(
            [s for s in A if SHOWN[s] is SessionState.CONNECTED], [A.NEW, A.ATTACHED, A.LEAVING],
        )


class FakeLink:
    """What a ServerSession asks of its ServerLink."""

    def __init__(self) -> None:
        self.session: Any = None
        self.aborted = False

    def peer_address(self) -> tuple[str, int]:
        return ("192.0.2.1", 40000)

    def start_session(self, session: Any, resuming: bool, peer_max_frame: int) -> None:
        self.session = session

    def abort(self) -> None:
        self.aborted = True


class ServerSessionMachineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.server = TunnelServer(self.clock, ServerConfig(listen="tcp:0", state_dir=None, resume_grace=30), "tok")
        self.session = ServerSession(self.server, "default")
        self.server.sessions[self.session.id] = self.session

    def test_a_detached_session_expires_when_its_grace_runs_out(self) -> None:
        link = FakeLink()
        self.session.attach_link(link, False, 65536)  # type: ignore[arg-type]
        self.session.link_lost(link)  # type: ignore[arg-type]
        self.assertEqual((self.session.attachment, self.session.state), (A.DETACHED, SessionState.DETACHED))
        self.clock.advance(30)
        self.assertIs(self.session.attachment, A.EXPIRED)
        self.assertNotIn(self.session.id, self.server.sessions)

    def test_a_resume_over_a_new_link_aborts_the_old_one_and_stays_attached(self) -> None:
        old, new = FakeLink(), FakeLink()
        self.session.attach_link(old, False, 65536)  # type: ignore[arg-type]
        self.clock.advance(5)
        self.session.attach_link(new, True, 65536)  # type: ignore[arg-type]
        self.assertTrue(old.aborted)
        self.assertIsNone(old.session)
        self.assertEqual((self.session.attachment, self.session.state_since), (A.ATTACHED, 5))
        self.session.link_lost(old)  # type: ignore[arg-type]  # the old link's close, later: not ours
        self.assertIs(self.session.attachment, A.ATTACHED)

    def test_a_client_that_said_goaway_is_expired_when_its_link_drops(self) -> None:
        link = FakeLink()
        self.session.attach_link(link, False, 65536)  # type: ignore[arg-type]
        self.session.control_frame(self.session.mux_session, _goaway())
        self.assertEqual((self.session.attachment, self.session.state), (A.LEAVING, SessionState.CONNECTED))
        self.session.link_lost(link)  # type: ignore[arg-type]
        self.assertIs(self.session.attachment, A.EXPIRED)

    def test_expire_twice_is_harmless_but_goaway_while_detached_raises(self) -> None:
        link = FakeLink()
        self.session.attach_link(link, False, 65536)  # type: ignore[arg-type]
        self.session.link_lost(link)  # type: ignore[arg-type]
        self.assertRaises(ImpossibleTransition, self.session.control_frame, self.session.mux_session, _goaway())
        self.assertIs(self.session.attachment, A.DETACHED)  # unchanged by the refused input
        self.session.expire("test")
        self.session.expire("again")
        self.assertIs(self.session.attachment, A.EXPIRED)


def _goaway() -> Any:
    from rtunnel import wire

    [frame] = wire.FrameDecoder().feed(wire.encode_coded(wire.FrameType.GOAWAY, 0, 0, "stopping"))
    return frame
