"""The client end: one session across reconnects, as a state machine.

ClientService (with our jittered exponential backoff) keeps a link up; every
new link first tries to resume the session, so a dropped link does not break
the tunnelled connections. What each link event means (a failed attempt, a
lost or resumed session, the end) is decided in one place: the client's
transition table (ClientState, ClientInput, TunnelClient.TRANSITIONS).

Two collaborators that TunnelClient owns do the rest: its tunnels
(`rtunnel.tunnels.ClientTunnels`: BIND and its answers, live changes,
targets and UDP flows) and its moves between fleet members
(`rtunnel.mover.Mover`: MOVED hints, the old links that drain).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Any, ClassVar

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel import PROTOCOL_VERSIONS, wire
from rtunnel.addresses import format_host_port
from rtunnel.config import ClientConfig, TunnelSpec
from rtunnel.counters import ClientEvents, Traffic
from rtunnel.link import ControlLink
from rtunnel.moved import parse_moved
from rtunnel.mover import Mover
from rtunnel.mux import ProtocolViolation, Session, Stream
from rtunnel.servers import ServerListEndpoint
from rtunnel.tls import PinnedCertificateCreator, TrustOnFirstUseCreator, format_fingerprint
from rtunnel.tunnels import ClientTunnels
from rtunnel.udpflows import UdpFlows
from rtunnel.wire import ErrorCode, Frame, FrameError, FrameType, ResetCode

FATAL_ERRORS = {ErrorCode.AUTH_FAILED, ErrorCode.UNSUPPORTED_VERSION}


def retry_policy(initial: float, maximum: float, rng: Callable[[], float] = random.random) -> Callable[[int], float]:
    """Exponential backoff from `initial` doubling to `maximum`, +-20% jitter
    that never goes above `maximum` (at the cap: 80-100% of it)."""

    def delay(attempt: int) -> float:
        base = min(initial * 2 ** min(max(attempt - 1, 0), 60), maximum)
        low, high = 0.8 * base, min(1.2 * base, maximum)
        return low + (high - low) * rng()

    return delay


class ClientState(enum.Enum):
    """Where the client's connection to the server is (docs/architecture.md
    draws the machine). A session is held in READY, LOST and RESUMING, and
    only there; STOPPING, FAILED and GAVE_UP are never left (a fatal error
    while stopping still makes it FAILED)."""

    CONNECTING = "connecting"  # no link, no session: an attempt, or the wait before the next
    HANDSHAKING = "handshaking"  # a link, HELLO sent: waiting for WELCOME (a new session)
    READY = "ready"  # the session runs on the link
    LOST = "lost"  # the session's link dropped: the session is held while we reconnect
    RESUMING = "resuming"  # a link, HELLO with the held session sent: waiting for WELCOME
    STOPPING = "stopping"  # a clean stop: GOAWAY sent, the link closes
    FAILED = "failed"  # retrying cannot help (exit status 2)
    GAVE_UP = "gave_up"  # --max-retries attempts in a row made no session (exit status 3)


class ClientInput(enum.Enum):
    """What happens to the client's connection; each input's data follows it."""

    LINK_MADE = "link_made"  # (link): a connection to the server is up (TLS still to come)
    CONNECT_FAILED = "connect_failed"  # (why): an attempt failed before a link was made
    WELCOMED = "welcomed"  # (link, Welcome): a new session
    RESUMED = "resumed"  # (link, Welcome): the server resumed the held session
    HANDSHAKE_ABANDONED = "handshake_abandoned"  # (link, why): no or a bad WELCOME, logged; the link closes
    LINK_LOST = "link_lost"  # (link, Failure): a link closed
    SESSION_FAILED = "session_failed"  # (link): an ERROR either way: the link's session is forgotten
    MOVE = "move"  # (host, port): GOAWAY MOVED: a new session at that member; the old link drains
    GIVE_UP = "give_up"  # (message): the attempt that reached --max-retries
    FATAL = "fatal"  # (message): retrying cannot help
    STOP = "stop"  # (): a clean stop


#: The states that are never left (but for STOPPING -> FAILED).
LEAVING = frozenset({ClientState.STOPPING, ClientState.FAILED, ClientState.GAVE_UP})


class ImpossibleTransition(RuntimeError):
    """An input that the client's state has no transition for: a bug."""

    def __init__(self, state: ClientState, event: ClientInput) -> None:
        super().__init__(f"the client cannot take {event.name} in state {state.name}")
        self.state, self.event = state, event


class TunnelClient:
    """The client's side of its session (the mux Session's delegate), and
    the state machine of its connection: every input goes through
    `_transition`, which looks up `TRANSITIONS` and raises
    ImpossibleTransition for a pair that is not there."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: ClientConfig,
        on_fatal: Callable[[str], None],
        tls_creator: Any = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.on_fatal = on_fatal
        self.tls_creator = tls_creator
        self.state = ClientState.CONNECTING
        self.session: Session | None = None
        self.session_id: str | None = None
        self.session_secret: str | None = None
        self.link: ClientLink | None = None  # the link the session runs on (READY)
        self.handshaking: ClientLink | None = None  # the link waiting for WELCOME (HANDSHAKING, RESUMING)
        # the tunnels by id (a mapping), what the server bound, targets and UDP flows
        self.tunnels = ClientTunnels(reactor, config, self.log, lambda: self.session, self.fatal)
        self.events = ClientEvents()  # event counts and closed streams' totals (rtunnel.metrics)
        self.traffic = Traffic(visitor_side=False)
        self.failed_attempts = 0  # connection attempts in a row that made no session
        self.servers: ServerListEndpoint | None = None  # set by the service: follows MOVED hints
        # sessions we moved away from (GOAWAY MOVED), on their links until their streams end;
        # the service sets its on_move (a new connection) and on_drained (an old link done)
        self.mover: Mover[ClientLink] = Mover(reactor, self.log)

    def link_factory(self) -> Factory[ClientLink]:
        factory = Factory.forProtocol(lambda: ClientLink(self))
        factory.noisy = False
        return factory

    def when_bound(self) -> defer.Deferred[dict[int, tuple[str, int]]]:
        """Fires with {tunnel id: (host, port)} once every tunnel is bound."""
        return self.tunnels.when_bound()

    @property
    def bound(self) -> dict[int, tuple[str, int]]:
        """{tunnel id: (host, port)} the server bound on this session (a
        hostname's is (hostname, 0))."""
        return self.tunnels.bound

    @property
    def udp(self) -> UdpFlows:
        return self.tunnels.udp

    @property
    def draining(self) -> dict[ClientLink, Session]:
        """Old links of sessions we moved away from, until each is lost."""
        return self.mover.draining

    # ------------------------------------------------------------ inputs

    def link_made(self, link: ClientLink) -> None:
        self._transition(ClientInput.LINK_MADE, link)

    def connect_failed(self, why: str) -> None:
        """An attempt failed before a link was made (the endpoint's errback)."""
        self._transition(ClientInput.CONNECT_FAILED, why)

    def welcomed(self, link: ClientLink, welcome: wire.Welcome) -> None:
        resumed = welcome.resumed and self.session is not None and welcome.session == self.session_id
        self._transition(ClientInput.RESUMED if resumed else ClientInput.WELCOMED, link, welcome)

    def handshake_abandoned(self, link: ClientLink, why: str) -> None:
        """The link gave up on this attempt and logged why (it closes next)."""
        self._transition(ClientInput.HANDSHAKE_ABANDONED, link, why)

    def link_lost(self, link: ClientLink, reason: Failure) -> None:
        if self.mover.holds(link):
            self.mover.link_lost(link)
            return
        self._transition(ClientInput.LINK_LOST, link, reason)

    def session_failed(self, link: ClientLink) -> None:
        if self.mover.holds(link):
            return  # the old session's link closes next (link_lost)
        self._transition(ClientInput.SESSION_FAILED, link)

    def fatal(self, message: str) -> None:
        """Retrying cannot help: leave the server (GOAWAY) and tell on_fatal (once)."""
        self._transition(ClientInput.FATAL, message)

    def stop(self) -> None:
        """A clean stop: GOAWAY while the link is up, then let the link close."""
        self._transition(ClientInput.STOP)

    def _transition(self, event: ClientInput, *data: Any) -> None:
        try:
            target, effect = self.TRANSITIONS[self.state, event]
        except KeyError:
            raise ImpossibleTransition(self.state, event) from None
        self.state = target  # first: an effect may feed the next input (FATAL, GIVE_UP)
        if effect is not None:
            effect(self, *data)

    # ------------------------------------------------------------ effects

    def _send_hello(self, link: ClientLink) -> None:
        self.handshaking = link
        link.await_welcome(self.hello())

    def _refuse_link(self, link: ClientLink) -> None:
        link.abort()  # made while leaving: nothing to say on it

    def _start_new_session(self, link: ClientLink, welcome: wire.Welcome) -> None:
        self.handshaking, self.link, self.failed_attempts = None, link, 0
        if self.session is not None:
            self.log.warn(
                "the server did not resume the session (it restarted or the grace ran "
                "out); closing {n} tunnelled connections and binding again",
                n=len(self.session.streams),
                event="session_lost", session=(self.session_id or "")[:8], streams=len(self.session.streams),
            )
            self.abandon_session()
        self.tunnels.udp.clear()  # flow ids are the server's, per session
        udp = sorted(spec.bind_port for spec in self.tunnels.values() if spec.kind == "udp")
        if udp and "udp" not in welcome.features:
            self.fatal(
                f"the server does not serve UDP tunnels (it serves: {', '.join(welcome.features) or 'none'}), "
                f"so -f udp:{udp[0]} cannot be opened; upgrade the rtunnel server or drop the UDP tunnels"
            )
            return
        self.session = Session(self.reactor, self, is_server=False, settings=self.config.session)
        self.session_id, self.session_secret = welcome.session, welcome.secret
        self.events.sessions_started += 1
        self.log.info(
            "connected to {server}; session {session} started",
            server=self.server_name(),
            session=welcome.session[:8], event="connected",
        )
        self.tunnels.session_started()
        link.start_session(self.session, False, welcome.max_frame)
        missing = sorted({spec.kind for spec in self.tunnels.values()} - set(welcome.features))
        if missing:
            self.fatal(
                f"the server does not serve {' or '.join(repr(k) for k in missing)} tunnels (it serves: "
                f"{', '.join(welcome.features)}); start it with --http/--https (and --domain), or drop "
                f"the --{missing[0]} tunnels"
            )
            return
        self.tunnels.bind_all()

    def _resume_session(self, link: ClientLink, welcome: wire.Welcome) -> None:
        session = self.session
        assert session is not None
        self.handshaking, self.link, self.failed_attempts = None, link, 0
        self.log.info(
            "link restored to {server}; session resumed with {n} open streams", n=len(session.streams),
            server=self.server_name(),
            event="session_resumed", session=welcome.session[:8], streams=len(session.streams),
        )
        self.events.resumes += 1
        link.start_session(session, True, welcome.max_frame)

    def _handshake_link_lost(self, link: ClientLink, reason: Failure) -> None:
        self.handshaking = None
        if self.servers is None or not self.servers.has_hint:  # (a MOVED closes the link: said already)
            self._explain_failed_handshake(reason)
        self._attempt_failed(reason.getErrorMessage())

    def _handshake_abandoned(self, link: ClientLink, why: str) -> None:
        self.handshaking = None
        self._attempt_failed(why)

    def _session_link_lost(self, link: ClientLink, reason: Failure) -> None:
        self.link = None
        self.events.links_lost += 1

    def _session_ended(self, link: ClientLink) -> None:
        self.abandon_session()
        self.link = None
        self.events.links_lost += 1

    def _forget_link(self, link: ClientLink, reason: Failure) -> None:
        if self.handshaking is link:
            self.handshaking = None
        if self.link is link:
            self.link = None
            self.events.links_lost += 1

    def _forget_session(self, link: ClientLink) -> None:
        if link.session is not None and link.session is self.session:
            self.abandon_session()

    def _attempt_failed(self, why: str) -> None:
        """One more attempt in a row without a session: the backoff grows
        with it; the one that reaches --max-retries gives up."""
        self.failed_attempts += 1
        limit = self.config.max_retries
        if limit is not None and self.failed_attempts >= limit:
            self._transition(
                ClientInput.GIVE_UP,
                f"giving up after {self.failed_attempts} failed attempts in a row to connect to the "
                f"rtunnel server at {', '.join(format_host_port(*a) for a in self.config.server_list)} "
                f"(--max-retries {limit}); the last one: {why.rstrip('.')}. Check that the server runs "
                "and is reachable, or raise --max-retries.",
            )

    def _give_up(self, message: str) -> None:
        # soon, not now: this runs inside ClientService's callbacks, and on_fatal stops it
        self.reactor.callLater(0, self._report_fatal, message, "gave_up")

    def _fail(self, message: str) -> None:
        self._report_fatal(message, "fatal")

    def _report_fatal(self, message: str, event: str) -> None:
        self.log.critical("{reason}", event=event, reason=message)
        self.leave()
        self.on_fatal(message)

    def leave(self) -> None:
        """Tell the server we are leaving (GOAWAY) while the link is up, and
        ready the link to close: the connector's disconnect then ends it."""
        self.say_goodbye()
        self.mover.close_all()
        if self.handshaking is not None:
            self.handshaking.abort()  # TLS cannot close cleanly mid-handshake
        link = self.link
        if link is not None and link.session is not None:
            link.session.detach()  # TLS cannot close while the session produces

    #: (state, input) -> (next state, effect): every transition of the
    #: client's connection (built below the class); a pair that is not
    #: there is impossible.
    TRANSITIONS: ClassVar[dict[tuple[ClientState, ClientInput], tuple[ClientState, Callable[..., None] | None]]]

    # ------------------------------------------------------------ handshake

    def hello(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "protocol": "rtunnel",
            "versions": list(PROTOCOL_VERSIONS),
            "token": self.config.token,
            "max_frame": self.config.session.max_frame,
            "accepts": ["moved"],  # we follow ERROR/GOAWAY MOVED to the session's fleet member
        }
        if self.session is not None:
            body["resume"] = {"session": self.session_id, "secret": self.session_secret}
        return body

    def shutdown(self) -> None:
        """The client is stopping: close every tunnelled connection."""
        self.abandon_session()

    def say_goodbye(self) -> None:
        """Before a clean stop: reset our streams and tell the server we are
        leaving, while the link is still up, so it frees our ports at once."""
        session, link = self.session, self.link
        if session is None or link is None or link.session is not session or not session.can_send:
            return  # (not between RESUMEs: the server then keeps the session for its grace)
        session.reset_all(ResetCode.SHUTDOWN, "client stopped")
        link.send(wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "client stopped"))

    def abandon_session(self) -> None:
        session, self.session = self.session, None
        self.tunnels.session_ended()
        if session is not None:
            session.close(ResetCode.EXPIRED, "session abandoned")

    def moved(self, reason: str) -> None:
        """ERROR MOVED: the next attempt goes to the member it names (rtunnel.mover)."""
        self.mover.follow(reason, self.servers)

    def server_name(self) -> str:
        """The server the link is (or was last) made to, for the log."""
        current = self.servers.current if self.servers is not None else None
        return format_host_port(*(current or (self.config.server_host, self.config.server_port)))

    def _move_away(self, host: str, port: int) -> None:
        """GOAWAY MOVED (the member is drained): a new session at `host:port`;
        the old one finishes its streams on the old link (rtunnel.mover)."""
        link, session = self.link, self.session
        assert link is not None and session is not None
        self.link, self.session, self.session_id, self.session_secret = None, None, None, None
        self.tunnels.session_ended()  # UDP flows are per session: the next datagrams make new ones
        self.tunnels.bound.clear()
        self.mover.move_away(link, session, host, port, self.servers)

    # ------------------------------------------------------------ live tunnel changes

    def add_tunnel(self, spec: TunnelSpec) -> TunnelSpec:
        """Add a tunnel under a fresh id (returned); bound at once with a session."""
        return self.tunnels.add(spec)

    def remove_tunnel(self, tunnel_id: int) -> TunnelSpec:
        """Close a tunnel's port on the server (UNBIND); its open connections carry on."""
        return self.tunnels.remove(tunnel_id)

    def retarget_tunnel(self, spec: TunnelSpec) -> None:
        """New visitors of a live tunnel reach a new target; open ones stay."""
        self.tunnels.retarget(spec)

    def tunnel_name(self, tunnel_id: int) -> str:
        """A tunnel's public "host:port" (its metrics label)."""
        return self.tunnels.name(tunnel_id)

    def _explain_failed_handshake(self, reason: Failure) -> None:
        creator = self.tls_creator
        if isinstance(creator, TrustOnFirstUseCreator) and creator.store_error is not None:
            self.fatal(creator.store_error)
        elif isinstance(creator, TrustOnFirstUseCreator) and creator.mismatch is not None:
            assert creator.fingerprint is not None
            self.fatal(
                f"the certificate of {creator.key} has CHANGED: stored "
                f"{format_fingerprint(creator.fingerprint)}, now {format_fingerprint(creator.mismatch)}. "
                "Someone may be intercepting, or the server's key was replaced. If you trust the "
                f"new key, remove the line for {creator.key} from {creator.path}."
            )
        elif (
            isinstance(creator, PinnedCertificateCreator)
            and creator.mismatch is not None
            and creator.fingerprint is not None
        ):
            self.fatal(
                f"the server's certificate has fingerprint {format_fingerprint(creator.mismatch)} "
                f"but --fingerprint is {format_fingerprint(creator.fingerprint)}: you may be "
                "talking to another machine. Check the fingerprint the server printed; if the "
                "server's key was replaced on purpose, pass its new fingerprint."
            )
        elif reason.check(SSL.Error, VerificationError):
            self.fatal(
                f"TLS with the server failed: {reason.getErrorMessage()}. Check --ca / "
                "--fingerprint and that the server's certificate names the host you connect to."
            )
        else:
            self.log.warn(
                "link to the server closed before the handshake finished: {why}",
                why=reason.getErrorMessage(),
                event="handshake_failed", reason=reason.getErrorMessage(),
            )

    # ------------------------------------------------------------ delegate

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        self.tunnels.open_target(stream, tunnel_id, info)

    def stream_closed(self, session: Session, stream: Stream) -> None:
        self.traffic.fold("", self.tunnels.name(stream.tunnel_id), stream)
        self.tunnels.stream_closed(stream)
        if session is not self.session:
            self.mover.stream_closed(session)

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None:
        self.tunnels.datagram_received(session, datagram)

    def control_frame(self, session: Session, frame: Frame) -> None:
        if self.state is ClientState.FAILED:
            return  # leaving: a BOUND read with the fatal refusal is not "tunnel ready"
        if session is not self.session:
            return  # a session we moved away from: its ports are the new session's business
        if frame.type is FrameType.BOUND:
            self.tunnels.bound_received(wire.Bound.parse(frame))
        elif frame.type is FrameType.BIND_FAILED:
            self.tunnels.bind_failed(session, wire.BindFailed.parse(frame))
        elif frame.type is FrameType.GOAWAY:
            code, reason = wire.decode_coded(frame)
            hint = parse_moved(reason) if code == ErrorCode.MOVED else None
            if hint is not None and self.state is ClientState.READY and self.link is not None and self.mover.on_move:
                self._transition(ClientInput.MOVE, *hint)
                return
            self.log.info("server says goodbye ({reason}); will reconnect", reason=reason, event="server_goaway", code=code)
        else:
            raise ProtocolViolation(f"unexpected {frame.type.name} from the server")


def _transitions() -> dict[tuple[ClientState, ClientInput], tuple[ClientState, Callable[..., None] | None]]:
    S, I, C = ClientState, ClientInput, TunnelClient  # noqa: E741
    table: dict[tuple[ClientState, ClientInput], tuple[ClientState, Callable[..., None] | None]] = {
        (S.CONNECTING, I.LINK_MADE): (S.HANDSHAKING, C._send_hello),
        (S.CONNECTING, I.CONNECT_FAILED): (S.CONNECTING, C._attempt_failed),
        (S.CONNECTING, I.LINK_LOST): (S.CONNECTING, None),  # a link abandoned or failed before
        (S.CONNECTING, I.SESSION_FAILED): (S.CONNECTING, None),  # ditto, as it closes
        (S.CONNECTING, I.GIVE_UP): (S.GAVE_UP, C._give_up),
        (S.HANDSHAKING, I.WELCOMED): (S.READY, C._start_new_session),
        (S.HANDSHAKING, I.HANDSHAKE_ABANDONED): (S.CONNECTING, C._handshake_abandoned),
        (S.HANDSHAKING, I.LINK_LOST): (S.CONNECTING, C._handshake_link_lost),
        (S.HANDSHAKING, I.SESSION_FAILED): (S.HANDSHAKING, None),  # no session yet; the link closes
        (S.READY, I.LINK_LOST): (S.LOST, C._session_link_lost),
        (S.READY, I.SESSION_FAILED): (S.CONNECTING, C._session_ended),
        (S.READY, I.MOVE): (S.CONNECTING, C._move_away),
        (S.LOST, I.LINK_MADE): (S.RESUMING, C._send_hello),
        (S.LOST, I.CONNECT_FAILED): (S.LOST, C._attempt_failed),
        (S.LOST, I.LINK_LOST): (S.LOST, None),
        (S.LOST, I.SESSION_FAILED): (S.LOST, None),
        (S.LOST, I.GIVE_UP): (S.GAVE_UP, C._give_up),
        (S.RESUMING, I.RESUMED): (S.READY, C._resume_session),
        (S.RESUMING, I.WELCOMED): (S.READY, C._start_new_session),  # the held session is gone
        (S.RESUMING, I.HANDSHAKE_ABANDONED): (S.LOST, C._handshake_abandoned),
        (S.RESUMING, I.LINK_LOST): (S.LOST, C._handshake_link_lost),
        (S.RESUMING, I.SESSION_FAILED): (S.RESUMING, None),  # the held session is kept
        (S.FAILED, I.FATAL): (S.FAILED, None),  # the first fatal error is the one told
        (S.GAVE_UP, I.FATAL): (S.GAVE_UP, None),
    }
    for state in S:
        if state not in (S.FAILED, S.GAVE_UP):
            table[state, I.FATAL] = (S.FAILED, C._fail)
        if state not in LEAVING:
            table[state, I.STOP] = (S.STOPPING, C.leave)
    for state in LEAVING:  # leaving: links close, and nothing starts again
        table[state, I.LINK_MADE] = (state, C._refuse_link)
        table[state, I.CONNECT_FAILED] = (state, None)
        table[state, I.WELCOMED] = (state, None)  # on a link that is being closed
        table[state, I.RESUMED] = (state, None)
        table[state, I.HANDSHAKE_ABANDONED] = (state, None)
        table[state, I.LINK_LOST] = (state, C._forget_link)
        table[state, I.SESSION_FAILED] = (state, C._forget_session)
        table[state, I.GIVE_UP] = (state, None)
        table[state, I.MOVE] = (state, None)
        table[state, I.STOP] = (state, C.leave)
    return table


TunnelClient.TRANSITIONS = _transitions()


class ClientLink(ControlLink):
    """One connection to the server. What its events mean (a failed
    attempt, a lost session, a resume) is the client's state machine's
    business: the link reports them."""

    def __init__(self, client: TunnelClient) -> None:
        super().__init__(client.reactor, client.config.keepalive)
        self.client = client
        self._handshake_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.client.link_made(self)

    def await_welcome(self, hello: dict[str, Any]) -> None:
        """Send HELLO: TLS and WELCOME must then arrive within dead_after,
        or this attempt is abandoned."""
        self.send(wire.encode_json(FrameType.HELLO, hello))
        self._handshake_call = self.clock.callLater(self.keepalive.dead_after, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        self.log.warn(
            "no answer from the server within {t:.0f} s of connecting; retrying",
            t=self.keepalive.dead_after,
            event="handshake_timeout", timeout=self.keepalive.dead_after,
        )
        self.client.handshake_abandoned(self, f"no answer within {self.keepalive.dead_after:.0f} s of connecting")
        self.abort()

    def start_session(self, session: Session, resuming: bool, peer_max_frame: int) -> None:
        self._cancel_handshake_timer()
        super().start_session(session, resuming, peer_max_frame)

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def handshake_frame(self, frame: Frame) -> None:
        if frame.type is not FrameType.WELCOME:
            raise ProtocolViolation(f"expected WELCOME, got {frame.type.name}")
        try:
            welcome = wire.Welcome.parse(frame)
        except FrameError as e:
            self.client.handshake_abandoned(self, str(e))  # logged as the link closes with it
            raise
        self.client.welcomed(self, welcome)

    def error_received(self, code: int, reason: str) -> None:
        if code == ErrorCode.MOVED:
            self.client.moved(reason)
        elif code in FATAL_ERRORS:
            self.client.fatal(f"the server refused us: {reason}")
        else:
            super().error_received(code, reason)

    def session_failed(self) -> None:
        self.client.session_failed(self)

    def link_lost(self, session: Session | None, reason: Failure) -> None:
        self._cancel_handshake_timer()
        self.client.link_lost(self, reason)
