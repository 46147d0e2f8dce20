"""The client end: one session across reconnects (the tunnels' targets are
connected by rtunnel.targets).

ClientService (with our jittered exponential backoff) keeps a link up; every
new link first tries to resume the session, so a dropped link does not break
the tunnelled connections.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel import PROTOCOL_VERSIONS, proxyproto, wire
from rtunnel.addresses import bracket, format_host_port, format_peer, public_address
from rtunnel.config import ClientConfig, TunnelSpec
from rtunnel.counters import ClientEvents, Traffic, tunnel_name
from rtunnel.link import ControlLink
from rtunnel.mux import ProtocolViolation, Session, Stream
from rtunnel.targets import TargetFactory, reset_code_for
from rtunnel.tls import PinnedCertificateCreator, TrustOnFirstUseCreator, format_fingerprint
from rtunnel.wire import ErrorCode, Frame, FrameType, ResetCode

FATAL_ERRORS = {ErrorCode.AUTH_FAILED, ErrorCode.UNSUPPORTED_VERSION}
FATAL_BIND_CODES = {"not_permitted", "bad_address", "limit"}
BIND_RETRY_DELAY = 5.0


def retry_policy(initial: float, maximum: float, rng: Callable[[], float] = random.random) -> Callable[[int], float]:
    """Exponential backoff from `initial` doubling to `maximum`, +-20% jitter
    that never goes above `maximum` (at the cap: 80-100% of it)."""

    def delay(attempt: int) -> float:
        base = min(initial * 2 ** min(max(attempt - 1, 0), 60), maximum)
        low, high = 0.8 * base, min(1.2 * base, maximum)
        return low + (high - low) * rng()

    return delay


class TunnelClient:
    """The client's side of its session (the mux Session's delegate)."""

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
        self.tunnels: dict[int, TunnelSpec] = {t.tunnel_id: t for t in config.tunnels}
        self.session: Session | None = None
        self.session_id: str | None = None
        self.session_secret: str | None = None
        self.link: ClientLink | None = None
        self.links: set[ClientLink] = set()  # every live link, handshaking or not
        self.bound: dict[int, tuple[str, int]] = {}
        # tunnel id -> "host:port" from its BOUND, never popped (ids are never
        # reused): a removed tunnel's connections keep their metrics label
        self.tunnel_names: dict[int, str] = {}
        self.bound_waiters: list[defer.Deferred[dict[int, tuple[str, int]]]] = []
        self.failed = False
        self._connecting: dict[int, TargetFactory] = {}
        self._bind_retries: list[Any] = []
        # live tunnel changes (add_tunnel, remove_tunnel): ids are never reused
        self._next_tunnel_id = max(self.tunnels, default=0) + 1
        self._unbound: set[int] = set()  # removed ids whose BOUND/BIND_FAILED may still come
        self._added_live: set[int] = set()  # added while running: a refusal drops only that tunnel
        self._taken_over: set[int] = set()  # tunnels whose port a newer client of our credential holds
        self.events = ClientEvents()  # event counts and closed streams' totals (rtunnel.metrics)
        self.traffic = Traffic(visitor_side=False)
        self.failed_attempts = 0  # connection attempts in a row that made no session
        self.on_attempt_failed: Callable[[str], None] | None = None

    def link_factory(self) -> Factory:
        factory = Factory.forProtocol(lambda: ClientLink(self))
        factory.noisy = False
        return factory

    def when_bound(self) -> defer.Deferred[dict[int, tuple[str, int]]]:
        """Fires with {tunnel id: (host, port)} once every tunnel is bound."""
        d: defer.Deferred[dict[int, tuple[str, int]]] = defer.Deferred()
        self.bound_waiters.append(d)
        self._check_all_bound()
        return d

    def fatal(self, message: str, event: str = "fatal") -> None:
        if self.failed:
            return
        self.failed = True
        self.log.critical("{reason}", event=event, reason=message)
        self.on_fatal(message)

    # ------------------------------------------------------------ handshake

    def hello(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "protocol": "rtunnel",
            "versions": list(PROTOCOL_VERSIONS),
            "token": self.config.token,
            "max_frame": self.config.session.max_frame,
        }
        if self.session is not None:
            body["resume"] = {"session": self.session_id, "secret": self.session_secret}
        return body

    def welcome(self, link: ClientLink, body: dict[str, Any]) -> None:
        session_id, secret = body.get("session"), body.get("secret")
        peer_max = body.get("max_frame", wire.DEFAULT_MAX_FRAME)
        if not isinstance(session_id, str) or not isinstance(secret, str):
            raise ProtocolViolation("WELCOME lacks session and secret")
        if not isinstance(peer_max, int) or peer_max < wire.MIN_MAX_FRAME:
            raise ProtocolViolation(f"WELCOME max_frame must be an integer >= {wire.MIN_MAX_FRAME}")
        peer_max = min(peer_max, wire.MAX_U32)
        self.link = link
        if body.get("resumed") and self.session is not None and session_id == self.session_id:
            self.log.info(
                "link restored; session resumed with {n} open streams", n=len(self.session.streams),
                event="session_resumed", session=session_id[:8], streams=len(self.session.streams),
            )
            self.events.resumes += 1
            link.start_session(self.session, True, peer_max)
            return
        if self.session is not None:
            self.log.warn(
                "the server did not resume the session (it restarted or the grace ran "
                "out); closing {n} tunnelled connections and binding again",
                n=len(self.session.streams),
                event="session_lost", session=(self.session_id or "")[:8], streams=len(self.session.streams),
            )
            self.abandon_session()
        self.session = Session(self.reactor, self, is_server=False, settings=self.config.session)
        self.session_id, self.session_secret = session_id, secret
        self.events.sessions_started += 1
        self.log.info("connected to {server}; session {session} started", server=format_host_port(self.config.server_host, self.config.server_port), session=session_id[:8], event="connected")
        self.bound.clear()
        self._unbound.clear()
        self._taken_over.clear()
        link.start_session(self.session, False, peer_max)
        for spec in self.tunnels.values():
            self._send_bind(spec)

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
        if session is not None:
            session.close(ResetCode.EXPIRED, "session abandoned")

    def _send_bind(self, spec: TunnelSpec) -> None:
        if self.session is None:
            return
        self.session.send_json(
            FrameType.BIND, {"tunnel": spec.tunnel_id, "host": spec.bind_host, "port": spec.bind_port}
        )

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

    def link_lost(self, link: ClientLink, reason: Failure) -> None:
        if self.link is link:
            self.link = None
            self.events.links_lost += 1
        if link.session is None and not link.handshake_done:
            self._explain_failed_handshake(reason)
        if not link.established and self.on_attempt_failed is not None:
            self.on_attempt_failed(reason.getErrorMessage())

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
        elif isinstance(creator, PinnedCertificateCreator) and creator.mismatch is not None:
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

    def control_frame(self, session: Session, frame: Frame) -> None:
        if self.failed:
            return  # leaving: a BOUND read with the fatal refusal is not "tunnel ready"
        if frame.type is FrameType.BOUND:
            body = wire.decode_json(frame)
            if body.get("tunnel") in self._unbound:
                return  # bound before our UNBIND reached the server, which closes it
            spec = self.tunnels.get(body.get("tunnel", -1))
            port = body.get("port")
            if spec is None or not isinstance(port, int):
                raise ProtocolViolation("BOUND for a tunnel this client did not ask for")
            self.bound[spec.tunnel_id] = (str(body.get("host", spec.bind_host)), port)
            self._taken_over.discard(spec.tunnel_id)
            self.tunnel_names[spec.tunnel_id] = tunnel_name(*self.bound[spec.tunnel_id])
            host = self.bound[spec.tunnel_id][0]
            self.log.info(
                "tunnel ready: {address} -> {target}",
                address=public_address(host, port, self.config.server_host), target=spec.target,
                server=bracket(self.config.server_host), port=port,
                event="tunnel_ready", tunnel=spec.tunnel_id, host=host,
            )
            self._check_all_bound()
        elif frame.type is FrameType.BIND_FAILED:
            body = wire.decode_json(frame)
            spec = self.tunnels.get(body.get("tunnel", -1))
            message = str(body.get("message", "no reason given"))
            code = str(body.get("code", ""))
            if spec is None and body.get("tunnel") in self._unbound:
                return  # refused, and removed since: nothing to do
            if spec is None:
                raise ProtocolViolation("BIND_FAILED for a tunnel this client did not ask for")
            if code == "taken_over":  # a newer client of our credential holds the port: wait for it
                public = self.bound.pop(spec.tunnel_id, (spec.bind_host, spec.bind_port))
                level = self.log.debug if spec.tunnel_id in self._taken_over else self.log.warn
                self._taken_over.add(spec.tunnel_id)
                level(
                    "port {port} is not ours now: {message}; asking again every {delay:.0f} s",
                    port=public[1], message=message, delay=BIND_RETRY_DELAY, event="bind_taken_over",
                    tunnel=spec.tunnel_id, host=public[0], code=code, reason=message,
                )
                self._retry_bind_later(session, spec)
                return
            if code == "closed":  # the server's administrator closed a bound port
                public = self.bound.pop(spec.tunnel_id, (spec.bind_host, spec.bind_port))
                self.log.warn(
                    "the server closed port {port}: {message}; it opens again when this "
                    "client starts a new session (restart it to reopen the port now)",
                    port=public[1], message=message, event="tunnel_closed", tunnel=spec.tunnel_id, host=public[0], reason=message,
                )
                return
            text = f"the server refused to open port {spec.bind_port}: {message}"
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
        elif frame.type is FrameType.GOAWAY:
            code, reason = wire.decode_coded(frame)
            self.log.info("server says goodbye ({reason}); will reconnect", reason=reason, event="server_goaway", code=code)
        else:
            raise ProtocolViolation(f"unexpected {frame.type.name} from the server")

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


class ClientLink(ControlLink):
    def __init__(self, client: TunnelClient) -> None:
        super().__init__(client.reactor, client.config.keepalive)
        self.client = client
        self.handshake_done = False
        self.established = False  # a session started on this link
        self._handshake_call: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.client.links.add(self)
        self.send(wire.encode_json(FrameType.HELLO, self.client.hello()))
        # TLS + WELCOME must arrive in time, or this attempt is abandoned
        self._handshake_call = self.clock.callLater(self.keepalive.dead_after, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        self.log.warn(
            "no answer from the server within {t:.0f} s of connecting; retrying",
            t=self.keepalive.dead_after,
            event="handshake_timeout", timeout=self.keepalive.dead_after,
        )
        self.handshake_done = True  # explained here
        self.abort()

    def start_session(self, session: Session, resuming: bool, peer_max_frame: int) -> None:
        self._cancel_handshake_timer()
        self.established, self.client.failed_attempts = True, 0
        super().start_session(session, resuming, peer_max_frame)

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def handshake_frame(self, frame: Frame) -> None:
        if frame.type is not FrameType.WELCOME:
            raise ProtocolViolation(f"expected WELCOME, got {frame.type.name}")
        self.handshake_done = True
        self.client.welcome(self, wire.decode_json(frame))

    def error_received(self, code: int, reason: str) -> None:
        if code in FATAL_ERRORS:
            self.handshake_done = True  # explained here, not as a TLS failure
            self.client.fatal(f"the server refused us: {reason}")
        else:
            super().error_received(code, reason)

    def session_failed(self) -> None:
        if self.session is not None:
            self.client.abandon_session()

    def link_lost(self, session: Session | None, reason: Failure) -> None:
        self._cancel_handshake_timer()
        self.client.links.discard(self)
        self.client.link_lost(self, reason)
