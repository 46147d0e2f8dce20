"""The client end: one session across reconnects, as a state machine.

ClientService (with our jittered exponential backoff) keeps a link up; every
new link first tries to resume the session, so a dropped link does not break
the tunnelled connections. What each link event means (a failed attempt, a
lost or resumed session, the end) is decided in one place: the client's
transition table (ClientState, ClientInput, TunnelClient.TRANSITIONS).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel import PROTOCOL_VERSIONS, proxyproto, wire
from rtunnel.addresses import bracket, format_host_port, format_peer, public_address
from rtunnel.config import ClientConfig, TunnelSpec
from rtunnel.counters import ClientEvents, Traffic, tunnel_name
from rtunnel.link import ControlLink
from rtunnel.moved import parse_moved
from rtunnel.mux import ProtocolViolation, Session, Stream
from rtunnel.servers import ServerListEndpoint
from rtunnel.targets import TargetFactory, reset_code_for
from rtunnel.tls import PinnedCertificateCreator, TrustOnFirstUseCreator, format_fingerprint
from rtunnel.udpflows import UdpFlows
from rtunnel.wire import ErrorCode, Frame, FrameError, FrameType, ResetCode

FATAL_ERRORS = {ErrorCode.AUTH_FAILED, ErrorCode.UNSUPPORTED_VERSION}
FATAL_BIND_CODES = {"not_permitted", "bad_address", "limit", "unsupported"}
BIND_RETRY_DELAY = 5.0


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
        self.tunnels: dict[int, TunnelSpec] = {t.tunnel_id: t for t in config.tunnels}
        self.session: Session | None = None
        self.session_id: str | None = None
        self.session_secret: str | None = None
        self.link: ClientLink | None = None  # the link the session runs on (READY)
        self.handshaking: ClientLink | None = None  # the link waiting for WELCOME (HANDSHAKING, RESUMING)
        self.bound: dict[int, tuple[str, int]] = {}
        # tunnel id -> "host:port" from its BOUND, never popped (ids are never
        # reused): a removed tunnel's connections keep their metrics label
        self.tunnel_names: dict[int, str] = {}
        self.bound_waiters: list[defer.Deferred[dict[int, tuple[str, int]]]] = []
        self._connecting: dict[int, TargetFactory] = {}
        self._bind_retries: list[Any] = []
        # live tunnel changes (add_tunnel, remove_tunnel): ids are never reused
        self._next_tunnel_id = max(self.tunnels, default=0) + 1
        self._unbound: set[int] = set()  # removed ids whose BOUND/BIND_FAILED may still come
        self._added_live: set[int] = set()  # added while running: a refusal drops only that tunnel
        self._taken_over: set[int] = set()  # tunnels told (once, at warn) that a newer client holds the port
        self.events = ClientEvents()  # event counts and closed streams' totals (rtunnel.metrics)
        self.traffic = Traffic(visitor_side=False)
        self.failed_attempts = 0  # connection attempts in a row that made no session
        # UDP tunnels' flows (rtunnel.udpflows): one local socket per flow, kept across resumes
        self.udp = UdpFlows(reactor, config.udp_idle_timeout, config.udp_max_flows, self._send_datagram)
        self.servers: ServerListEndpoint | None = None  # set by the service: follows MOVED hints
        # links of sessions we moved away from (GOAWAY MOVED): their streams finish there
        self.draining: dict[ClientLink, Session] = {}
        self._closing: set[ClientLink] = set()  # old links we closed, until they are lost
        # the service's: a new connection for the moved session (old link given) / an old link done
        self.on_move: Callable[[ClientLink], None] | None = None
        self.on_drained: Callable[[ClientLink], None] | None = None

    def link_factory(self) -> Factory[ClientLink]:
        factory = Factory.forProtocol(lambda: ClientLink(self))
        factory.noisy = False
        return factory

    def when_bound(self) -> defer.Deferred[dict[int, tuple[str, int]]]:
        """Fires with {tunnel id: (host, port)} once every tunnel is bound."""
        d: defer.Deferred[dict[int, tuple[str, int]]] = defer.Deferred()
        self.bound_waiters.append(d)
        self._check_all_bound()
        return d

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
        if link in self.draining:
            self._drained(link)
            return
        self._transition(ClientInput.LINK_LOST, link, reason)

    def session_failed(self, link: ClientLink) -> None:
        if link in self.draining:
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
        self.udp.clear()  # flow ids are the server's, per session
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
        self.bound.clear()
        self._unbound.clear()
        self._taken_over.clear()
        link.start_session(self.session, False, welcome.max_frame)
        missing = sorted({spec.kind for spec in self.tunnels.values()} - set(welcome.features))
        if missing:
            self.fatal(
                f"the server does not serve {' or '.join(repr(k) for k in missing)} tunnels (it serves: "
                f"{', '.join(welcome.features)}); start it with --http/--https (and --domain), or drop "
                f"the --{missing[0]} tunnels"
            )
            return
        for spec in self.tunnels.values():
            self._send_bind(spec)

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
        for old in list(self.draining):
            self._check_drained_now(old)
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
        for call in self._bind_retries:
            if call.active():
                call.cancel()
        self._bind_retries.clear()
        self.udp.clear()
        if session is not None:
            session.close(ResetCode.EXPIRED, "session abandoned")

    def moved(self, reason: str) -> None:
        """The server says our session lives at another fleet member (ERROR
        MOVED): the next attempt goes there first, at once. A hint from a
        server we reached by a hint is not followed (no redirect loops)."""
        hint = parse_moved(reason)
        servers = self.servers
        if hint is None or servers is None or servers.current_is_hint:
            self.log.warn(
                "the server says our session is elsewhere but {why}: {reason}; trying the servers in order",
                why="names no address" if hint is None else "it was reached through such a hint already",
                reason=reason, event="moved_ignored",
            )
            return
        self.log.info(
            "the server sends us to another fleet member, {where}: connecting there", where=format_host_port(*hint),
            event="session_moved", server=format_host_port(*hint), reason=reason,
        )
        servers.move_to(hint[0], hint[1], servers.current)

    def server_name(self) -> str:
        """The server the link is (or was last) made to, for the log."""
        current = self.servers.current if self.servers is not None else None
        return format_host_port(*(current or (self.config.server_host, self.config.server_port)))

    def _move_away(self, host: str, port: int) -> None:
        """GOAWAY MOVED (the member is drained): start a new session at
        `host:port` (its BINDs take the ports over: same credential, the newest
        holds) while the old session's open streams finish on the old link,
        which then closes (GOAWAY, so the old member ends the session)."""
        link, session = self.link, self.session
        assert link is not None and session is not None
        self.draining[link] = session
        self.link, self.session, self.session_id, self.session_secret = None, None, None, None
        for call in self._bind_retries:
            if call.active():
                call.cancel()
        self._bind_retries.clear()
        self.udp.clear()  # UDP flows are per session: the next datagrams make new ones
        self.bound.clear()
        self.log.info(
            "the server is being drained: moving to {where}; {n} open connections finish on the old link",
            where=format_host_port(host, port), n=len(session.streams),
            event="session_moving", server=format_host_port(host, port), streams=len(session.streams),
        )
        if self.servers is not None:
            self.servers.move_to(host, port, self.servers.current)
        if self.on_move is not None:
            self.on_move(link)
        self._check_drained(link)

    def _check_drained(self, link: ClientLink) -> None:
        """The old session has no stream left: say goodbye and close its
        link (it stays in `draining` until it is lost, so that its loss is
        never taken for the current link's)."""
        session = self.draining.get(link)
        if session is None or session.streams or link in self._closing:
            return
        self._closing.add(link)
        if session.can_send:
            link.send(wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "client moved to another member"))
        link.lose()

    def _check_drained_now(self, link: ClientLink) -> None:
        """Stopping: reset what is left on an old link and close it."""
        session = self.draining.get(link)
        if session is not None and session.can_send and link not in self._closing:
            session.reset_all(ResetCode.SHUTDOWN, "client stopped")
            link.send(wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "client stopped"))
        self._closing.add(link)
        link.lose()

    def _drained(self, link: ClientLink) -> None:
        """An old link is lost: its session ends (what is left on it is reset)."""
        self._closing.discard(link)
        session = self.draining.pop(link, None)
        if session is None:
            return
        if session.streams:
            session.close(ResetCode.ABORTED, "the old member closed the link")
        self.log.info("the link of the session we moved away from is closed", event="old_link_closed")
        if self.on_drained is not None:
            self.on_drained(link)

    def _send_bind(self, spec: TunnelSpec) -> None:
        if self.session is None:
            return
        bind = wire.Bind(spec.tunnel_id, spec.bind_host, spec.bind_port, spec.kind, spec.hostname)
        self.session.send_json(FrameType.BIND, bind.to_json())

    def _send_datagram(self, tunnel_id: int, flow_id: int, payload: bytes) -> str | None:
        """A target's datagram to the server, now or never (rtunnel.udpflows)."""
        session = self.session
        if session is None:
            return "link_down"
        return session.send_datagram(tunnel_id, flow_id, payload)

    # ------------------------------------------------------------ live tunnel changes

    def add_tunnel(self, spec: TunnelSpec) -> TunnelSpec:
        """Add a tunnel to the running client under a fresh id (returned).

        With a session it is bound at once (BIND is reliable: sent while the
        link is down, it reaches the server on resume); without one, the
        next session binds it with the others."""
        spec = replace(spec, tunnel_id=self._next_tunnel_id)
        self._next_tunnel_id += 1
        self.tunnels[spec.tunnel_id] = spec
        self._added_live.add(spec.tunnel_id)
        self._send_bind(spec)
        return spec

    def remove_tunnel(self, tunnel_id: int) -> TunnelSpec:
        """Close a tunnel's port on the server (UNBIND). Its open connections
        carry on until they close; visitors arriving after it are refused."""
        spec = self.tunnels.pop(tunnel_id)
        self.bound.pop(tunnel_id, None)
        self.udp.drop_tunnel(tunnel_id)
        self._added_live.discard(tunnel_id)
        if self.session is not None:
            self._unbound.add(tunnel_id)
            self.session.send_json(FrameType.UNBIND, {"tunnel": tunnel_id})
        self._check_all_bound()
        return spec

    def retarget_tunnel(self, spec: TunnelSpec) -> None:
        """Give a live tunnel a new target (or PROXY setting) under the same
        id and port: new visitors reach the new target, open ones stay."""
        if spec.tunnel_id not in self.tunnels:
            raise KeyError(spec.tunnel_id)
        self.tunnels[spec.tunnel_id] = spec

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
        spec = self.tunnels.get(tunnel_id)
        if spec is None:
            stream.reset(ResetCode.REFUSED, f"no tunnel {tunnel_id} on this client")
            return
        header = proxyproto.header(spec.proxy_protocol, info.get("src"), info.get("dst"))

        def settled(failure: Failure | None) -> None:
            self._connecting.pop(stream.id, None)
            if failure is None or stream.closed:
                return  # connected, or cancelled: the stream is gone
            code, why = reset_code_for(failure)
            self.log.warn(
                "target {target} failed for a visitor from {visitor}: {why}",
                target=spec.target, visitor=format_peer(info.get("src")), why=why,
                host=spec.target_host, port=spec.target_port, src=info.get("src"),
                event="target_failed", tunnel=tunnel_id, stream=stream.id, reason=why,
            )
            stream.local_failed(code, f"target {spec.target}: {why}")

        factory = self._connecting[stream.id] = TargetFactory(stream, header, settled)
        factory.connect(self.reactor, spec, self.config.connect_timeout)

    def stream_closed(self, session: Session, stream: Stream) -> None:
        self.traffic.fold("", self.tunnel_name(stream.tunnel_id), stream)
        connecting = self._connecting.pop(stream.id, None)
        if connecting is not None:
            connecting.cancel()
        if session is not self.session and not session.streams:
            for link, old in list(self.draining.items()):
                if old is session:
                    self.reactor.callLater(0, self._check_drained, link)

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None:
        spec = self.tunnels.get(datagram.tunnel)
        if session is not self.session or spec is None or spec.kind != "udp":
            self.udp.counters(datagram.tunnel).drops["unknown_tunnel"] += 1  # removed meanwhile
            return
        self.udp.deliver(spec, self.bound.get(spec.tunnel_id), datagram)

    def control_frame(self, session: Session, frame: Frame) -> None:
        if self.state is ClientState.FAILED:
            return  # leaving: a BOUND read with the fatal refusal is not "tunnel ready"
        if session is not self.session:
            return  # a session we moved away from: its ports are the new session's business
        if frame.type is FrameType.BOUND:
            self._bound(wire.Bound.parse(frame))
        elif frame.type is FrameType.BIND_FAILED:
            self._bind_failed(session, wire.BindFailed.parse(frame))
        elif frame.type is FrameType.GOAWAY:
            code, reason = wire.decode_coded(frame)
            hint = parse_moved(reason) if code == ErrorCode.MOVED else None
            if hint is not None and self.state is ClientState.READY and self.link is not None and self.on_move:
                self._transition(ClientInput.MOVE, *hint)
                return
            self.log.info("server says goodbye ({reason}); will reconnect", reason=reason, event="server_goaway", code=code)
        else:
            raise ProtocolViolation(f"unexpected {frame.type.name} from the server")

    def _bound(self, answer: wire.Bound) -> None:
        if answer.tunnel in self._unbound:
            return  # bound before our UNBIND reached the server, which closes it
        spec = self.tunnels.get(answer.tunnel)
        if spec is None:
            raise ProtocolViolation("BOUND for a tunnel this client did not ask for")
        if answer.kind in ("http", "tls"):
            self._bound_hostname(spec, answer)
            return
        host = answer.host if answer.host is not None else spec.bind_host
        self.bound[spec.tunnel_id] = (host, answer.port)
        self._taken_over.discard(spec.tunnel_id)
        prefix = "udp:" if spec.kind == "udp" else ""
        self.tunnel_names[spec.tunnel_id] = prefix + tunnel_name(host, answer.port)
        self.log.info(
            "tunnel ready: {address} -> {target}",
            address=prefix + public_address(host, answer.port, self.config.server_host),
            target=prefix + spec.target, kind=spec.kind,
            server=bracket(self.config.server_host), port=answer.port,
            event="tunnel_ready", tunnel=spec.tunnel_id, host=host,
        )
        self._check_all_bound()

    def _bound_hostname(self, spec: TunnelSpec, answer: wire.Bound) -> None:
        """A hostname is ours: log the public URLs the server gave."""
        self.bound[spec.tunnel_id] = (answer.hostname, 0)
        self._taken_over.discard(spec.tunnel_id)
        self.tunnel_names[spec.tunnel_id] = answer.hostname
        self.log.info(
            "tunnel ready: {public} -> {target}", public=" ".join(answer.urls) or answer.hostname, target=spec.target,
            event="tunnel_ready", tunnel=spec.tunnel_id, kind=answer.kind, hostname=answer.hostname,
            urls=list(answer.urls),
        )
        self._check_all_bound()

    def _bind_failed(self, session: Session, answer: wire.BindFailed) -> None:
        spec = self.tunnels.get(answer.tunnel)
        message, code = answer.message or "no reason given", answer.code
        if spec is None and answer.tunnel in self._unbound:
            return  # refused, and removed since: nothing to do
        if spec is None:
            raise ProtocolViolation("BIND_FAILED for a tunnel this client did not ask for")
        if code == "taken_over":  # a newer client of our credential holds the port: wait for it
            public = self.bound.pop(spec.tunnel_id, (spec.bind_host, spec.bind_port))
            level = self.log.debug if spec.tunnel_id in self._taken_over else self.log.warn
            self._taken_over.add(spec.tunnel_id)
            level(
                "{what} is not ours now: {message}; asking again every {delay:.0f} s",
                what=f"hostname {spec.hostname}" if spec.kind != "tcp" else f"port {public[1]}",
                port=public[1], message=message, delay=BIND_RETRY_DELAY, event="bind_taken_over",
                tunnel=spec.tunnel_id, host=public[0], code=code, reason=message,
            )
            self._retry_bind_later(session, spec)
            return
        if code == "closed":  # the server's administrator closed a bound port
            public = self.bound.pop(spec.tunnel_id, (spec.bind_host, spec.bind_port))
            self.log.warn(
                "the server closed {what}: {message}; it opens again when this "
                "client starts a new session (restart it to reopen it now)",
                what=f"hostname {spec.hostname}" if spec.kind != "tcp" else f"port {public[1]}", port=public[1], message=message, event="tunnel_closed", tunnel=spec.tunnel_id, host=public[0], reason=message,
            )
            return
        text = (
            f"the server refused to open port {spec.bind_port}: {message}" if spec.kind == "tcp"
            else f"the server refused hostname {spec.hostname} ({spec.kind}): {message}"
        )
        if code in FATAL_BIND_CODES and spec.tunnel_id in self._added_live:
            # a tunnel added while running: drop it, keep the others up
            self.log.error("{text}; tunnel not added", text=text, event="tunnel_add_failed", tunnel=spec.tunnel_id, host=spec.bind_host, port=spec.bind_port, code=code, reason=message)
            self.tunnels.pop(spec.tunnel_id, None)
            self._added_live.discard(spec.tunnel_id)
            self._check_all_bound()
        elif code in FATAL_BIND_CODES:
            self.fatal(text)
        else:
            self.log.error("{text} (retrying in {delay:.0f} s)", text=text, delay=BIND_RETRY_DELAY, event="bind_failed", tunnel=spec.tunnel_id, host=spec.bind_host, port=spec.bind_port, code=code, reason=message)
            self._retry_bind_later(session, spec)

    def tunnel_name(self, tunnel_id: int) -> str:
        """A tunnel's public "host:port" as the server bound it (the
        server's label for it too), or as asked for until it is bound."""
        name = self.tunnel_names.get(tunnel_id)
        if name is not None:
            return name
        spec = self.tunnels.get(tunnel_id)
        return tunnel_name(spec.bind_host or "*", spec.bind_port) if spec is not None else "?"

    def _retry_bind_later(self, session: Session, spec: TunnelSpec) -> None:
        self._bind_retries = [c for c in self._bind_retries if c.active()]
        self._bind_retries.append(self.reactor.callLater(BIND_RETRY_DELAY, self._retry_bind, session, spec))

    def _retry_bind(self, session: Session, spec: TunnelSpec) -> None:
        if session is self.session and spec.tunnel_id in self.tunnels and spec.tunnel_id not in self.bound:
            self._send_bind(self.tunnels[spec.tunnel_id])

    def _check_all_bound(self) -> None:
        if self.tunnels and len(self.bound) == len(self.tunnels):
            waiters, self.bound_waiters = self.bound_waiters, []
            for d in waiters:
                d.callback(dict(self.bound))




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
