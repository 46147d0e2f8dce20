"""Control connections before and around their handshake: admission, the
HELLO (version, credential, session), and every refusal.

A ServerLink is "handshaking" until its HELLO is accepted; then it carries
its client's session (rtunnel.server.session) until it closes. Whatever a
peer sends before it is authenticated costs it what a wrong token costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from rtunnel import PROTOCOL_VERSIONS, auth, wire
from rtunnel.addresses import format_host_port, host_port, known_host_port
from rtunnel.guard import MOST_HELD, address_key
from rtunnel.link import ControlLink
from rtunnel.moved import moved_reason
from rtunnel.mux import ProtocolViolation, Session
from rtunnel.tcp import tcp_transport
from rtunnel.wire import ErrorCode, Frame, FrameType

if TYPE_CHECKING:
    from rtunnel.server import TunnelServer
    from rtunnel.server.session import ServerSession


class AdmittingFactory(Factory):
    """See TunnelServer.admitting."""

    def __init__(self, server: TunnelServer, factory: IProtocolFactory) -> None:
        self.server = server
        self.factory = factory
        self.noisy = False

    def logPrefix(self) -> str:
        prefix = getattr(self.factory, "logPrefix", None)
        return prefix() if prefix is not None else type(self.factory).__name__

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        host = host_port(addr)[0] if addr is not None else "?"
        refused = self.server.guard.refuses(host)
        if refused is not None:
            self.server.connection_refused_over_cap(host, refused)
            self.server.events.links_accepted += 1
            return None
        return cast("Protocol | None", self.factory.buildProtocol(cast(IAddress, addr)))


# the `event` of each ServerLink.refuse, and its words in the log line
_REFUSALS = {
    "auth_failed": "authentication failed", "rate_limited": "rate limited", "session_limit": "session limit",
    "handshake_refused": "invalid handshake",
}


class ServerLink(ControlLink):
    """One client connection: handshake, then carries that client's session."""

    def __init__(self, server: TunnelServer) -> None:
        super().__init__(server.reactor, server.config.keepalive)
        self.server = server
        self.owner: ServerSession | None = None  # set by an accepted HELLO
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._handshake_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.server.links.add(self)
        self.server.events.links_accepted += 1
        host = self.peer_host()
        admission = self.server.guard.admit(host, self)
        if not admission.admitted:
            self.server.connection_refused_over_cap(host, admission.refused or MOST_HELD)
            self.abort()
            return
        if admission.evicted is not None:
            self.server.connection_evicted(admission.evicted)
        self._handshake_call = self.clock.callLater(self.server.config.handshake_timeout, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        self.server.events.handshakes_expired += 1
        self.server.refusals.refused(  # an idle flood from one address: a line a second
            ("handshake_timeout", address_key(self.peer_host())),
            "dropping {peer}: no handshake within {t:.0f} s",
            peer=self.peer_description(),
            t=self.server.config.handshake_timeout,
            event="handshake_timeout", timeout=self.server.config.handshake_timeout,
        )
        self.abort()

    def _authenticated(self) -> None:
        self.server.guard.release(self)  # nothing if it was not (or no longer) counted

    def _stop_handshake_timer(self) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None

    def peer_host(self) -> str:
        """The client's host, IPv4-mapped unmapped (what the guard counts); "?" if unknown."""
        address = self.peer_address()
        return address[0] if address is not None else "?"

    def peer_address(self) -> tuple[str, int] | None:
        """The client's (host, port), if the transport knows it."""
        try:
            return known_host_port(tcp_transport(self.transport).getPeer())
        except Exception:
            return None

    def peer_certificate_der(self) -> bytes | None:
        """The DER of the TLS client certificate the peer presented, if any."""
        try:
            cert = cast(ISSLTransport, self.transport).getPeerCertificate()
        except Exception:
            return None
        if cert is None:
            return None
        try:
            return crypto.dump_certificate(crypto.FILETYPE_ASN1, cast(crypto.X509, cert))
        except crypto.Error:
            return None

    # ------------------------------------------------------------ refusals

    def refuse(self, code: ErrorCode, reason: str, event: str, **fields: Any) -> None:
        """Send ERROR `reason` and close, logging the refusal once, as a
        refusal with `fields` (instead of close_with_error's line)."""
        if self.closing:
            return
        self.server.refusals.refused(
            (event, address_key(self.peer_host())),
            "refused {peer}: {what}: {reason}",
            peer=self.peer_description(), event=event, reason=reason, code=code.name, **fields,
            what=_REFUSALS.get(event, event),
        )
        self.send_error_and_close(code, reason)

    def close_with_error(self, code: ErrorCode, reason: str) -> None:
        """Before authentication every refusal but shutdown counts as a
        failed authentication of the peer's address: what a peer sends
        before it is trusted costs it the same as a wrong token."""
        if self.owner is None and code is not ErrorCode.SHUTDOWN:  # not authenticated yet
            self._refuse_handshake(code, reason)
        else:
            super().close_with_error(code, reason)

    def _refuse_handshake(self, code: ErrorCode, reason: str) -> None:
        if self.closing:  # refused already (e.g. bad bytes after a refused HELLO): counted once
            return
        guard, host = self.server.guard, self.peer_host()
        guard.record_failure(host)
        self.refuse(code, reason, "handshake_refused", host=host, failures_total=guard.failures)

    # ------------------------------------------------------------ handshake

    def frame_received(self, frame: Frame) -> None:
        # Before the handshake every frame must be the HELLO: PING and ERROR
        # too go to handshake_frame, which refuses them (and counts it).
        if self.session is None:
            self.handshake_frame(frame)
        else:
            super().frame_received(frame)

    def handshake_frame(self, frame: Frame) -> None:
        """HELLO -> version -> credential -> session, or one refusal."""
        if self._rate_limited():
            return
        if frame.type is not FrameType.HELLO:
            raise ProtocolViolation(f"expected HELLO, got {frame.type.name}")
        hello = wire.decode_hello(frame)  # raises HandshakeError: refused and counted
        common = set(hello.versions) & set(PROTOCOL_VERSIONS)
        if not common:
            self.close_with_error(
                ErrorCode.UNSUPPORTED_VERSION,
                f"the server speaks protocol versions {list(PROTOCOL_VERSIONS)} but the client "
                f"offered {list(hello.versions)}; upgrade the older of the two",
            )
            return
        if self.server.shutting_down:
            self.close_with_error(ErrorCode.SHUTDOWN, "the server is shutting down; retry shortly")
            return
        credential = self._credential(hello)
        if credential is None or self._redirected(credential, hello):
            return
        if not self._room_for_session(credential, hello.resume):
            return
        self._stop_handshake_timer()
        self._authenticated()
        self._welcome(credential, hello, max(common))

    def _rate_limited(self) -> bool:
        guard, host = self.server.guard, self.peer_host()
        wait = guard.retry_after(host)
        if wait is None:
            return False
        self.refuse(  # not AUTH_FAILED: an honest client behind the same address retries later
            ErrorCode.LIMIT_EXCEEDED,
            f"too many failed attempts from {host}; wait {max(1, round(wait))} s",
            "rate_limited", host=host, retry_after=wait, refused_total=guard.refused_attempts,
        )
        return True

    def _credential(self, hello: wire.Hello) -> str | None:
        """The credential HELLO's token or the TLS client certificate proves;
        None (refused, counted as a failure of the address) if neither does."""
        peer_cert = self.peer_certificate_der()
        credential = self.server.authenticate(hello.token, peer_cert)
        if credential is not None:
            return credential
        guard, host = self.server.guard, self.peer_host()
        guard.record_failure(host)
        reason = (
            "wrong token: pass the server's token (the file 'token' in its state dir, or "
            "the --token it was started with) with --token-file, --token or RTUNNEL_TOKEN"
        )
        if peer_cert is not None:
            reason += (
                f"; the client certificate (sha256:{auth.cert_digest(peer_cert)}) is not "
                "a cert_sha256 of the server's clients file"
            )
        self.refuse(ErrorCode.AUTH_FAILED, reason, "auth_failed", host=host, failures_total=guard.failures)
        return None

    def _redirected(self, credential: str, hello: wire.Hello) -> bool:
        """From a client that follows MOVED: a resume of a session another
        fleet member holds, or any new session while this member is drained,
        is answered ERROR MOVED with that member's control address (the
        client goes there at once). A client that does not follow MOVED gets
        a new session here instead (docs/fleet.md "Clients and resume").
        True if the HELLO was answered so."""
        server, resume = self.server, hello.resume
        if not hello.follows_moved or (resume is not None and server.resumable(credential, resume) is not None):
            return False  # an old client, or a resume of a session held here (a drain moves it later)
        home = None
        if resume is not None and server.session_elsewhere is not None:
            home = server.session_elsewhere(resume.session, credential)
        if home is not None and resume is not None:
            host, port, member = home
            what = f"session {resume.session[:8]} is held by fleet member {member}; resume there"
            session = resume.session[:8]
        elif server.moved_to is not None:  # a new session while this member is drained
            host, port, member = server.moved_to
            what = f"this member is being drained; connect to member {member}"
            session = "new"
        else:
            return False
        self._stop_handshake_timer()
        self._authenticated()
        self.log.info(
            "session {id} of {cred} goes to fleet member {member}: sending {peer} to {where}",
            id=session, cred=credential, member=member, peer=self.peer_description(),
            where=format_host_port(host, port), event="session_redirected", session=session,
            credential=credential, home=member,
        )
        self.send_error_and_close(ErrorCode.MOVED, moved_reason(host, port, what))
        return True

    def _room_for_session(self, credential: str, resume: wire.ResumeRequest | None) -> bool:
        """A resume always fits; a new session only within --max-sessions-per-client."""
        server = self.server
        if server.resumable(credential, resume) is not None or server.make_room_for_session(credential):
            return True
        limit = server.config.max_sessions_per_client
        self.refuse(
            ErrorCode.LIMIT_EXCEEDED,
            f"client {credential} already has {limit} connected sessions, the most this "
            "server allows (--max-sessions-per-client); stop one of its other clients",
            "session_limit", credential=credential, limit=limit,
        )
        return False

    def _welcome(self, credential: str, hello: wire.Hello, version: int) -> None:
        owner, resumed = self.server.session_for(credential, hello.resume)
        self.owner = owner
        self.send(
            wire.encode_json(
                FrameType.WELCOME,
                {
                    "version": version,
                    "session": owner.id,
                    "secret": owner.secret,
                    "resumed": resumed,
                    "max_frame": self.server.config.session.max_frame,
                    "features": list(self.server.tunnel_kinds),
                },
            )
        )
        self.log.info(
            "{what} session {id} for {cred} from {peer}",
            what="resumed" if resumed else "new", id=owner.id[:8], cred=credential, peer=self.peer_description(),
            event="session_resumed" if resumed else "session_started", session=owner.id[:8], credential=credential,
        )
        owner.attach_link(self, resumed, hello.max_frame)

    # ------------------------------------------------------------ the end

    def session_failed(self) -> None:
        if self.owner is not None:
            self.owner.expire("protocol error")

    def link_lost(self, session: Session | None, reason: Failure) -> None:
        self._stop_handshake_timer()
        self._authenticated()  # no longer waiting to authenticate, either way
        self.server.links.discard(self)
        if self.owner is not None:
            self.owner.link_lost(self)
        self.closed.callback(None)
