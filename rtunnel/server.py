"""The server end: accepts client links, owns public listeners and sessions.

A ServerSession lives as long as its client's session: across link drops it
keeps its listeners and visitors (detached, paused) for the resume grace,
then expires. Ports belong to credentials, so the rightful owner always gets
its port back at once and nobody else can take it meanwhile. Among the
sessions of one credential the newest holds a port; older ones that asked
for it wait, and the newest of them gets it when the holder lets go
(TunnelServer.bind, TunnelServer.let_go).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hmac
import ipaddress
import itertools
import secrets
import socket
from typing import Any

from OpenSSL import crypto
from twisted.internet import defer, error
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel import PROTOCOL_VERSIONS, auth, wire
from rtunnel.addresses import (
    IPV4_ANY,
    NO_IPV6_ERRNOS,
    format_host_port,
    host_port,
    is_ip_literal,
    known_host_port,
)
from rtunnel.auth import ClientPolicy
from rtunnel.config import ServerConfig
from rtunnel.counters import ServerEvents, Traffic, tunnel_name
from rtunnel.descriptors import DescriptorGate, listen_tcp
from rtunnel.errors import ConfigError
from rtunnel.guard import MOST_HELD, PER_ADDRESS, AdmissionGuard, address_key
from rtunnel.limits import VISITORS_OVER_LIMIT, ClientLimiter, Limits, RefusalLog
from rtunnel.link import ControlLink
from rtunnel.mux import (
    ProtocolViolation,
    Session,
    SessionBufferFull,
    SessionSettings,
    Stream,
    StreamIdsExhausted,
    StreamProtocol,
)
from rtunnel.wire import ErrorCode, Frame, FrameType, ResetCode

DEFAULT_CREDENTIAL = "default"
PICK_PORT_ATTEMPTS = 256  # ports tried in a client's ranges for "-f 0"


class SessionState(enum.Enum):
    CONNECTED = "connected"
    DETACHED = "detached"
    EXPIRED = "expired"


def _address(addr: IAddress) -> list[Any]:
    return list(host_port(addr))


class PublicListener(Factory):
    """A bound public port. Each visitor becomes a stream of the owner's
    session; while the owner is detached, visitors wait (paused)."""

    log = Logger()
    noisy = False

    def __init__(self, owner: ServerSession, tunnel_id: int, host: str) -> None:
        self.owner: ServerSession | None = owner
        self.tunnel_id = tunnel_id
        self.host = host
        self.port: IListeningPort | None = None
        # visitors that arrived while the owner was detached: their OPEN has
        # crossed no link, so a session taking the port over can take them too
        self.away: set[_VisitorConnection] = set()
        # max_connections_per_tunnel (rtunnel.limits); plain ints for the metrics
        self.open_connections = 0  # visitors connected now
        self.visitors_refused = 0  # closed at once: the tunnel had its limit
        self.refusals = RefusalLog(owner.server.reactor)  # stopped by TunnelServer.release

    @property
    def key(self) -> tuple[str, int]:
        assert self.port is not None
        return (self.host, self.port.getHost().port)

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        owner = self.owner
        if owner is None or owner.state is SessionState.EXPIRED:
            return None
        session = owner.session
        if len(session.streams) >= session.settings.max_streams:
            owner.server.refusals.refused(
                ("max_streams", owner.id),
                "refusing visitor {visitor}: session {session} has {n} streams, the maximum",
                visitor=_address(addr),
                n=len(session.streams),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="max_streams",
            )
            return None
        if owner.state is SessionState.DETACHED and session.queued_reliable >= 2 * session.settings.max_streams:
            owner.server.refusals.refused(
                ("detached_queue_full", owner.id),
                "refusing visitor {visitor}: too many waiting for the client of session {session} to come back",
                visitor=_address(addr),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="detached_queue_full",
            )
            return None
        if not session.room_for_stream():  # the session's budget (docs/security.md "Memory per session")
            owner.server.refusals.refused(
                ("session_buffer_full", owner.id),
                "refusing visitor {visitor}: {why}", visitor=_address(addr), why=session.why_full(),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="session_buffer_full",
            )
            return None
        limit = owner.server.limits_for(owner.credential).max_connections_per_tunnel
        if limit is not None and self.open_connections >= limit:
            self._refuse_over_limit(owner, limit)
            return None
        self.open_connections += 1  # until the connection is lost, opened or refused
        return _VisitorConnection(self)

    def open_stream(self, src: list[Any], dst: list[Any]) -> Stream | None:
        """Send OPEN for a visitor who connected from `src` to `dst` (the
        address it reached, not the bind address); None if it is refused."""
        owner = self.owner
        if owner is None or owner.state is SessionState.EXPIRED:
            return None
        try:
            return owner.session.open_stream(self.tunnel_id, {"src": src, "dst": dst})
        except SessionBufferFull as e:
            owner.server.refusals.refused(
                ("session_buffer_full", owner.id), "refusing visitor: {why}", why=str(e),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="session_buffer_full",
            )
            return None
        except StreamIdsExhausted as e:
            self.log.warn("refusing visitor: {why}", why=str(e), event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason=str(e))
            owner.expire(str(e))
            return None

    def _refuse_over_limit(self, owner: ServerSession, limit: int) -> None:
        name = owner.tunnel_names.get(self.tunnel_id, "?")
        self.visitors_refused += 1
        limiter = owner.server.limiter_for(owner.credential)
        limiter.visitors_refused += 1
        limiter.refused_by_tunnel[name] += 1
        self.refusals.refused(
            "max_connections_per_tunnel", VISITORS_OVER_LIMIT,
            tunnel=name, limit=limit, session=owner.id[:8], credential=owner.credential,
            refused_total=self.visitors_refused, event="visitor_refused", reason="max_connections_per_tunnel",
        )


class _VisitorConnection(StreamProtocol):
    """A visitor's connection. Its stream is opened once the socket exists,
    so OPEN's `dst` is the address the visitor reached (getHost() of the
    accepted socket): on a listener bound to 0.0.0.0 or ::, that is the
    server's real address, which a PROXY protocol header passes on. Both
    addresses are read from the transport, not kept: they are in OPEN."""

    stream: Stream | None  # type: ignore[assignment]

    def __init__(self, listener: PublicListener) -> None:
        self.listener = listener
        self.stream = None

    def connectionMade(self) -> None:
        transport = self.transport
        self.stream = self.listener.open_stream(_address(transport.getPeer()), _address(transport.getHost()))
        if self.stream is None:
            self.transport.abortConnection()
            return
        owner = self.listener.owner
        if owner is not None and owner.state is SessionState.DETACHED:
            self.listener.away.add(self)
        super().connectionMade()

    def move_to_owner(self) -> None:
        """Carry on as a stream of the listener's (new) owner: a visitor that
        arrived while the previous owner was away has sent nothing over any
        link, so it is opened again there instead of being reset."""
        old = self.stream
        if old is None or old.closed:
            return
        owner = self.listener.owner
        if owner is None or len(owner.session.streams) >= owner.session.settings.max_streams:
            old.reset(ResetCode.LIMIT, "the tunnel's new session has no room for the visitor")
            return
        transport = self.transport
        new = self.listener.open_stream(_address(transport.getPeer()), _address(transport.getHost()))
        if new is None:
            old.reset(ResetCode.REFUSED, "the tunnel's new session refused the visitor")
            return
        old.hand_local_to(new)
        self.stream = new

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        if self.stream is not None:
            super().readConnectionLost()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.listener.open_connections -= 1
        self.listener.away.discard(self)
        if self.stream is not None:
            super().connectionLost(reason)


class ServerSession:
    """The server's side of one client session (the mux Session's delegate)."""

    log = Logger()

    def __init__(self, server: TunnelServer, credential: str) -> None:
        self.server = server
        self.credential = credential
        self.id = secrets.token_hex(16)
        self.serial = next(server.session_serials)  # creation order: the newest holds a contested port
        self.secret = secrets.token_hex(32)
        self.session = Session(
            server.reactor, self, is_server=True, settings=server.settings_for(credential)
        )
        limiter = server.limiter_for(credential)
        self.session.send_pacer, self.session.recv_pacer = limiter.to_client, limiter.from_client
        self.tunnels: dict[int, PublicListener] = {}
        self.tunnel_names: dict[int, str] = {}  # tunnel id -> "host:port", kept for the metrics
        self.link: ServerLink | None = None
        self.state = SessionState.CONNECTED
        self.leaving = False
        self._grace_call: IDelayedCall | None = None
        # for the status page (rtunnel.admin): when it began, when it last
        # changed state, and the address of its current (or last) link
        self.started_at = server.reactor.seconds()
        self.state_since = self.started_at
        self.peer: tuple[str, int] | None = None
        self._binds_waiting: set[int] = set()  # tunnel ids whose BIND waits for a closing port

    # ------------------------------------------------------------ links

    def attach_link(self, link: ServerLink, resumed: bool, peer_max_frame: int) -> None:
        old = self.link
        if old is not None:
            old.session = None
            self.session.detach()
            old.abort()
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None
        self.link = link
        if self.state is not SessionState.CONNECTED or old is not None:
            self.state_since = self.server.reactor.seconds()
        self.state = SessionState.CONNECTED
        self.peer = link.peer_address()
        link.start_session(self.session, resumed, peer_max_frame)
        for listener in self.tunnels.values():
            listener.away.clear()  # their OPENs went out with the resume

    def link_lost(self, link: ServerLink) -> None:
        if self.link is not link or self.state is SessionState.EXPIRED:
            return
        self.link = None
        if self.leaving:
            self.expire("the client stopped")
            return
        self.state = SessionState.DETACHED
        self.state_since = self.server.reactor.seconds()
        grace = self.server.config.resume_grace
        self.log.info(
            "session {id} detached; keeping its {n} streams for {grace:.0f} s",
            id=self.id[:8],
            n=len(self.session.streams),
            grace=grace,
            event="session_detached", session=self.id[:8], credential=self.credential, streams=len(self.session.streams),
        )
        self._grace_call = self.server.reactor.callLater(grace, self.expire, "resume grace ran out")

    def expire(self, why: str, abort_link: bool = True) -> None:
        """End the session for good: reset streams, free ports, forget it."""
        if self.state is SessionState.EXPIRED:
            return
        self.log.info("session {id} expired: {why}", id=self.id[:8], why=why, event="session_expired", session=self.id[:8], credential=self.credential, reason=why)
        self.state = SessionState.EXPIRED
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self.server.stop_waiting(self)
        for listener in list(self.tunnels.values()):  # first: visitors who waited for us may be handed on
            self.server.let_go(listener)
        self.tunnels.clear()
        self.session.close(ResetCode.EXPIRED, why)
        self.server.sessions.pop(self.id, None)
        if self.link is not None:
            link, self.link = self.link, None
            link.session = None
            if abort_link:
                link.abort()

    def close_tunnel(self, tunnel_id: int, why: str) -> bool:
        """Close one public port of this session and reset its open
        connections; the client hears BIND_FAILED "closed" and does not
        rebind it in this session. False if there is no such tunnel."""
        listener = self.tunnels.pop(tunnel_id, None)
        if listener is None:
            return False
        port = listener.key[1] if listener.port is not None else 0
        self.server.release(listener)
        for stream in list(self.session.streams.values()):
            if stream.tunnel_id == tunnel_id:
                stream.reset(ResetCode.ABORTED, why)
        self.session.send_json(
            FrameType.BIND_FAILED, {"tunnel": tunnel_id, "code": "closed", "message": why}
        )
        self.log.info("tunnel {port} of session {id} closed: {why}", port=port, id=self.id[:8], why=why, event="tunnel_closed", session=self.id[:8], credential=self.credential, tunnel=tunnel_id, host=listener.host, reason=why)
        return True

    # ------------------------------------------------------------ delegate

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        raise ProtocolViolation("clients may not open streams in protocol version 1")

    def stream_closed(self, session: Session, stream: Stream) -> None:
        self.server.traffic.fold(self.credential, self.tunnel_names.get(stream.tunnel_id, "?"), stream)
        self.server.stream_closed()

    def control_frame(self, session: Session, frame: Frame) -> None:
        if frame.type is FrameType.BIND:
            self._bind(wire.Bind.parse(frame.body))
        elif frame.type is FrameType.UNBIND:
            tunnel_id = wire.Unbind.parse(frame.body).tunnel
            listener = self.tunnels.pop(tunnel_id, None)
            self._binds_waiting.discard(tunnel_id)
            self.server.stop_waiting(self, tunnel_id)
            if listener is not None:
                self.server.let_go(listener)
        elif frame.type is FrameType.GOAWAY:
            self.leaving = True  # the client is stopping: no resume will come
        else:
            raise ProtocolViolation(f"unexpected {frame.type.name} from a client")

    def _bind(self, bind: wire.Bind, retry: bool = True) -> None:
        tunnel_id, host, port = bind.tunnel, bind.host, bind.port  # host "": TunnelServer.bind_default
        if tunnel_id in self.tunnels or tunnel_id in self._binds_waiting:
            raise ProtocolViolation(f"BIND reuses tunnel id {tunnel_id}")
        if host and not is_ip_literal(host):
            self.session.send_json(
                FrameType.BIND_FAILED,
                {"tunnel": tunnel_id, "code": "bad_address",
                 "message": f"bind address {host[:100]!r} is not an IP address; use e.g. 0.0.0.0 or ::"},
            )
            return
        try:
            if host:
                listener = self.server.bind(self, tunnel_id, host, port)
            else:
                listener = self.server.bind_default(self, tunnel_id, port)
        except BindRefused as refusal:
            closing = self.server.when_port_closed(port) if retry and refusal.code == "in_use" and port else None
            if closing is not None:  # e.g. UNBIND and BIND of the same port in one reload
                self._bind_when_closed(closing, bind)
                return
            if refusal.code == "taken_over":  # a newer session holds it; we wait (and the client asks again)
                if not refusal.repeated:
                    self.log.info(
                        "session {id} waits for {address}: {why}",
                        id=self.id[:8], address=format_host_port(host, port) if host else f"port {port}",
                        why=refusal.message, event="bind_waiting", session=self.id[:8],
                        credential=self.credential, tunnel=tunnel_id, host=host, port=port,
                    )
                self.session.send_json(
                    FrameType.BIND_FAILED,
                    {"tunnel": tunnel_id, "code": refusal.code, "message": refusal.message},
                )
                return
            self.server.refusals.refused(
                ("bind_refused", self.id, refusal.code),
                "refused to bind {address} for {cred}: {why}",
                address=format_host_port(host, port) if host else f"port {port} (default address)",
                host=host, port=port, cred=self.credential, why=refusal.message,
                event="bind_refused", session=self.id[:8], credential=self.credential, tunnel=tunnel_id, code=refusal.code, reason=refusal.message,
            )
            self.session.send_json(
                FrameType.BIND_FAILED,
                {"tunnel": tunnel_id, "code": refusal.code, "message": refusal.message},
            )
            return
        self.server.stop_waiting(self, tunnel_id)
        self.took_port(listener, tunnel_id, port)

    def took_port(self, listener: PublicListener, tunnel_id: int, requested_port: int) -> None:
        """`listener` is ours as tunnel `tunnel_id`: tell the client (BOUND)."""
        self.tunnels[tunnel_id] = listener
        host = listener.host
        bound_port = listener.key[1]
        self.tunnel_names[tunnel_id] = tunnel_name(host, bound_port)
        self.log.info("tunnel bound: {address} for session {id}", address=format_host_port(host, bound_port), host=host, port=bound_port, id=self.id[:8], event="tunnel_bound", session=self.id[:8], credential=self.credential, tunnel=tunnel_id, requested_port=requested_port)
        self.session.send_json(FrameType.BOUND, {"tunnel": tunnel_id, "host": host, "port": bound_port})

    def lost_port(self, listener: PublicListener, tunnel_id: int) -> None:
        """A newer session of our credential took our port: tell the
        client (BIND_FAILED taken_over) and wait for the port to come back."""
        host, port = listener.key
        self.server.wait_for(self, tunnel_id, listener.key)
        self.session.send_json(
            FrameType.BIND_FAILED,
            {
                "tunnel": tunnel_id, "code": "taken_over",
                "message": f"port {port} on {host} was taken over by a newer session of client "
                f"{self.credential} (another client with the same credential started); this client "
                "keeps asking for it and gets it back when that session lets go of it",
            },
        )

    def _bind_when_closed(self, closing: defer.Deferred[None], bind: wire.Bind) -> None:
        """Try a BIND once more when the port it wants has closed (a listening
        socket closes on the reactor's next turn, after stopListening)."""
        tunnel_id = bind.tunnel
        self._binds_waiting.add(tunnel_id)

        def closed(_: object) -> None:
            if tunnel_id in self._binds_waiting and self.state is not SessionState.EXPIRED:
                self._binds_waiting.discard(tunnel_id)
                self._bind(bind, retry=False)

        closing.addCallback(closed).addErrback(
            lambda failure: self.log.failure(
                "binding tunnel {tunnel} after its port closed failed", failure,
                tunnel=tunnel_id, event="bind_error", session=self.id[:8],
            )
        )


def _dual_stack(listener: PublicListener) -> bool:
    """True if the listener's socket is on `::` and takes IPv4 visitors too
    (IPV6_V6ONLY off)."""
    skt = getattr(listener.port, "socket", None)
    if skt is None or skt.family != socket.AF_INET6:
        return False
    try:
        if ipaddress.ip_address(listener.host) != ipaddress.IPv6Address("::"):
            return False
        return skt.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except (ValueError, OSError):
        return False


class BindRefused(Exception):
    def __init__(
        self, code: str, message: str, socket_errno: int | None = None, repeated: bool = False,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.socket_errno = socket_errno  # of the failed listen, if that was the cause
        self.repeated = repeated  # the same refusal as last time (taken_over: a retry while waiting)


class TunnelServer:
    """Every session and public listener of one server process.

    Credentials: the server's token ("default"), each `--client NAME=TOKEN`
    (these two follow the server-wide --allow-ports, any bind address), and
    the clients of the clients file (rtunnel.auth), each with its own policy.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, config: ServerConfig, token: str | None,
        clients: dict[str, ClientPolicy] | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self._credentials: dict[str, bytes] = {}
        if token:
            self._credentials[DEFAULT_CREDENTIAL] = auth.token_digest(token)
        for name, extra in config.extra_clients:
            self._credentials[name] = auth.token_digest(extra)
        self.clients: dict[str, ClientPolicy] = {}
        if clients:
            self.check_clients(clients)
            self.clients = dict(clients)
        self.sessions: dict[str, ServerSession] = {}
        self.listeners: dict[tuple[str, int], PublicListener] = {}
        # (host, port) -> {session: tunnel id} of older sessions of the holder's
        # credential waiting for the port (let_go hands it to the newest)
        self.waiting: dict[tuple[str, int], dict[ServerSession, int]] = {}
        self.session_serials = itertools.count(1)
        # (host, port) -> waiters for a released port whose socket is not closed yet
        self._closing: dict[tuple[str, int], list[defer.Deferred[None]]] = {}
        self.links: set[ServerLink] = set()
        self.shutting_down = False
        self._drained: defer.Deferred[None] | None = None
        self.guard: AdmissionGuard[ServerLink] = AdmissionGuard(
            reactor,
            max_unauthenticated=config.max_unauthenticated,
            max_per_address=config.max_unauthenticated_per_address,
            failure_burst=config.auth_failure_burst,
            failure_refill=config.auth_failure_refill,
        )
        # every refusal a peer can provoke is logged through these (a flood of
        # refusals must not flood the log); the control port's: a line in 10 s
        self.refusals = RefusalLog(reactor, log=self.log)
        self._cap_refusals = RefusalLog(reactor, interval=10.0, log=self.log)
        self._no_ipv6_logged = False
        # visitors never hold the descriptors kept for control connections (rtunnel.descriptors)
        self.visitor_gate = DescriptorGate(reactor, "visitor")
        self.events = ServerEvents()  # event counts and closed streams' totals (rtunnel.metrics)
        self.traffic = Traffic(visitor_side=True)
        self.limiters: dict[str, ClientLimiter] = {}  # per credential (rtunnel.limits), for the metrics

    def link_factory(self) -> Factory:
        factory = Factory.forProtocol(lambda: ServerLink(self))
        factory.noisy = False
        return factory

    def admitting(self, factory: IProtocolFactory) -> IProtocolFactory:
        """`factory` (the control port's, TLS included) behind the guard: a
        connection the guard refuses is closed as it is accepted, before any
        TLS state is made for it, so a flood costs little per connection."""
        return _AdmittingFactory(self, factory)

    # ------------------------------------------------------------ auth

    def authenticate(self, token: str | None, peer_cert_der: bytes | None = None) -> str | None:
        """The credential a TLS client certificate or a token proves.

        A certificate whose SHA-256 is a clients-file client's cert_sha256
        authenticates that client, whatever the token; otherwise (no
        certificate, or one nobody has) the token decides. Both compare in
        constant time against every candidate. A token that cannot be
        encoded (wire.decode_hello refuses those first) proves nothing."""
        by_cert = auth.authenticate_certificate(self.clients, peer_cert_der)
        if by_cert is not None:
            return by_cert.name
        if token is None:
            return None
        try:
            digest = auth.token_digest(token)
        except ValueError:
            return None
        found = None
        for name, expected in self._credentials.items():  # no early exit: constant time
            if hmac.compare_digest(digest, expected):
                found = name
        policy = auth.authenticate(self.clients, token)  # also compares against every client
        if policy is not None:
            found = policy.name
        return found

    def policy_for(self, credential: str) -> ClientPolicy | None:
        """The clients-file policy of a credential; None for the server's
        --token and --client credentials (server-wide --allow-ports)."""
        return self.clients.get(credential)

    def settings_for(self, credential: str) -> SessionSettings:
        """Session settings for a new session: a per-client copy whose
        max_streams is the client's own."""
        base = self.config.session
        policy = self.policy_for(credential)
        if policy is None:
            return base
        return dataclasses.replace(base, max_streams=policy.max_streams)

    def limits_for(self, credential: str) -> Limits:
        """The bandwidth and connection limits of a credential: its
        clients-file entry's, else the server's flags (--bandwidth …)."""
        policy = self.policy_for(credential)
        return policy.limits() if policy is not None else self.config.limits

    def limiter_for(self, credential: str) -> ClientLimiter:
        """The credential's live limiter (its token buckets), shared by all
        its sessions, made on first use."""
        limiter = self.limiters.get(credential)
        if limiter is None:
            limiter = ClientLimiter.create(self.reactor, self.limits_for(credential))
            self.limiters[credential] = limiter
        return limiter

    def _refresh_limiter(self, credential: str) -> None:
        """After a reload: new buckets if the credential's limits changed;
        its sessions switch to them and waiting streams go on at once."""
        old = self.limiters.get(credential)
        if old is None or old.limits == self.limits_for(credential):
            return
        old.stop()
        new = ClientLimiter.create(self.reactor, self.limits_for(credential))
        new.carry_counts(old)
        self.limiters[credential] = new
        for owner in list(self.sessions.values()):
            if owner.credential == credential:
                owner.session.replace_pacers(new.to_client, new.from_client)

    def check_clients(self, clients: dict[str, ClientPolicy]) -> None:
        clash = sorted(set(clients) & set(self._credentials))
        if clash:
            raise ConfigError(
                f"{self.config.clients_file}: client {clash[0]!r} is also given with --client or "
                "is reserved; use another name"
            )

    def set_clients(self, clients: dict[str, ClientPolicy]) -> dict[str, list[str]]:
        """Replace the clients-file policies (SIGHUP). Sessions of removed
        clients (or of clients whose token changed) end and free their
        ports; other sessions stay, and their new binds follow the new
        policy. Raises ConfigError (changing nothing) if the set clashes."""
        self.check_clients(clients)
        old, self.clients = self.clients, dict(clients)
        removed = sorted(set(old) - set(clients))
        added = sorted(set(clients) - set(old))
        rekeyed = sorted(
            n for n in set(old) & set(clients)
            if (old[n].token_sha256, old[n].cert_sha256) != (clients[n].token_sha256, clients[n].cert_sha256)
        )
        changed = sorted(
            n for n in set(old) & set(clients) if old[n] != clients[n] and n not in rekeyed
        )
        for session in list(self.sessions.values()):
            if session.credential in removed:
                session.expire("client removed from the clients file")
            elif session.credential in rekeyed:
                session.expire("client's token or certificate changed in the clients file")
            elif session.credential in changed:
                policy = clients[session.credential]
                mux = session.session
                mux.settings = dataclasses.replace(mux.settings, max_streams=policy.max_streams)
                outside = [
                    f"{listener.host}:{listener.key[1]}"
                    for listener in session.tunnels.values()
                    if listener.port is not None
                    and (
                        not (policy.permits_port(listener.key[1]) and policy.permits_address(listener.host))
                        or (_dual_stack(listener) and not policy.permits_address(IPV4_ANY))
                    )
                ]
                if outside:
                    self.log.warn(
                        "client {name}'s new policy does not cover its open port(s) {ports}; they "
                        "stay open until its session ends (remove the client to close them now)",
                        name=session.credential, ports=", ".join(outside),
                        event="policy_mismatch", session=session.id[:8], credential=session.credential,
                    )
        for credential in list(self.limiters):
            self._refresh_limiter(credential)
        return {"added": added, "removed": removed, "changed": changed + rekeyed}

    def connection_refused_over_cap(self, host: str = "?", reason: str = MOST_HELD) -> None:
        """Log a control connection from `host` refused by the guard: the
        first at once, then at most one summary line every 10 s per reason,
        the last one 10 s after the previous line (a flood must not flood
        the log too)."""
        guard = self.guard
        if reason == PER_ADDRESS:
            self._cap_refusals.refused(
                ("connections_capped", PER_ADDRESS, address_key(host)),
                "refusing new control connections from {host}: {n} of its connections are not "
                "authenticated yet, the most one address may have (--max-unauthenticated-per-address); "
                "{refused} refused since the last report",
                count_field="refused", event="connections_capped", reason="per_address",
                host=host, n=guard.waiting_from(host), refused_total=guard.refused_per_address,
            )
        else:
            self._cap_refusals.refused(
                ("connections_capped", MOST_HELD),
                "refusing new control connections: {n} are not authenticated yet, the maximum "
                "(--max-unauthenticated), and the newcomer's address {host} holds the most of them; "
                "{refused} refused since the last report",
                count_field="refused", event="connections_capped", reason="max_unauthenticated",
                n=guard.unauthenticated, host=host, refused_total=guard.refused_connections,
            )

    def connection_evicted(self, link: ServerLink) -> None:
        """Drop `link`, a connection still waiting to authenticate, to make
        room for a newcomer (the guard chose it and already forgot it)."""
        host = link.peer_host()
        self._cap_refusals.refused(
            ("connections_evicted",),
            "{n} control connections are not authenticated yet (--max-unauthenticated): dropped "
            "the oldest of the address holding the most ({host}, {held}) to make room for a new "
            "one; {dropped} dropped since the last report",
            count_field="dropped", event="connections_evicted",
            n=self.guard.unauthenticated, host=host, held=self.guard.waiting_from(host) + 1,
            dropped_total=self.guard.evicted,
        )
        link.abort()

    def resumable(self, credential: str, resume: wire.ResumeRequest | None) -> ServerSession | None:
        """The existing session `resume` proves it may take over, if any."""
        if resume is None:
            return None
        existing = self.sessions.get(resume.session)
        if (
            existing is not None
            and existing.credential == credential
            and hmac.compare_digest(resume.secret.encode(), existing.secret.encode())
        ):
            return existing
        return None

    def make_room_for_session(self, credential: str) -> bool:
        """Before a new session of `credential`: True if it stays within
        --max-sessions-per-client. At the limit, the oldest *detached*
        session of the credential (its client restarted rather than
        resumed) is expired to make room; only connected ones block."""
        mine = [s for s in self.sessions.values() if s.credential == credential]
        if len(mine) < self.config.max_sessions_per_client:
            return True
        detached = [s for s in mine if s.state is SessionState.DETACHED]
        if not detached:
            return False
        detached[0].expire("its client opened a new session (at --max-sessions-per-client)")
        return True

    def session_for(self, credential: str, resume: wire.ResumeRequest | None) -> tuple[ServerSession, bool]:
        """The session to resume, if the request proves it; else a new one."""
        existing = self.resumable(credential, resume)
        self.events.reconnects[credential] += resume is not None
        if existing is not None:
            self.events.resumes[credential] += 1
            return existing, True
        if resume is not None:
            self.log.info("resume of an unknown or expired session refused; starting a new one", event="resume_refused", credential=credential)
        session = ServerSession(self, credential)
        self.sessions[session.id] = session
        self.events.sessions_started[credential] += 1
        return session, False

    # ------------------------------------------------------------ ports

    def bind_default(self, owner: ServerSession, tunnel_id: int, port: int) -> PublicListener:
        """BIND without a host (`-f 4000`): `::` (config.public_host), on
        Linux one dual-stack socket for IPv6 and IPv4 visitors, if the
        credential may bind it; else 0.0.0.0. Without IPv6 on this host,
        0.0.0.0 too (logged once)."""
        policy = self.policy_for(owner.credential)
        candidates = [self.config.public_host]
        if self.config.public_host != IPV4_ANY:
            candidates.append(IPV4_ANY)
        if policy is not None:
            allowed = [host for host in candidates if policy.permits_address(host)]
            if not allowed:
                raise BindRefused(
                    "not_permitted",
                    f"client {policy.name} may not bind the default address "
                    f"({' or '.join(candidates)}); it may bind {', '.join(policy.bind)}: "
                    f"forward one of them, e.g. -f {format_host_port(policy.bind[0], port)}",
                )
            candidates = allowed
        for host in candidates:  # the credential's own port (e.g. bound by an older client): hand it back
            held = self.listeners.get((host, port)) if port else None
            if held is not None and held.owner is not None and held.owner.credential == owner.credential:
                return self.bind(owner, tunnel_id, host, port)
        for host in candidates[:-1]:
            try:
                return self.bind(owner, tunnel_id, host, port)
            except BindRefused as refusal:
                if refusal.socket_errno not in NO_IPV6_ERRNOS:
                    raise
                if not self._no_ipv6_logged:
                    self._no_ipv6_logged = True
                    self.log.warn(
                        "cannot bind public ports on {host} ({why}): this host has no IPv6; "
                        "binding {fallback} instead (IPv4 only)",
                        host=host, why=refusal.message, fallback=candidates[-1],
                        event="ipv6_unavailable", listener="public",
                    )
        return self.bind(owner, tunnel_id, candidates[-1], port)

    def bind(self, owner: ServerSession, tunnel_id: int, host: str, port: int) -> PublicListener:
        if self.shutting_down:
            raise BindRefused("shutdown", "the server is shutting down; try again shortly")
        policy = self.policy_for(owner.credential)
        if policy is None:
            if len(owner.tunnels) >= self.config.max_tunnels:
                raise BindRefused(
                    "limit",
                    f"at most {self.config.max_tunnels} tunnels per session (--max-tunnels); "
                    "close one first",
                )
            if not self.config.port_allowed(port):
                raise BindRefused(
                    "not_permitted",
                    f"port {port} is not permitted on this server (allowed: "
                    f"{_ranges(self.config.allow_ports)}); choose a port in that range",
                )
        else:
            if port and not policy.permits_port(port):
                raise BindRefused(
                    "not_permitted",
                    f"port {port} is not permitted for client {policy.name} (allowed: "
                    f"{policy.describe_ports()}); choose a port in that range",
                )
            if not policy.permits_address(host):
                raise BindRefused(
                    "not_permitted",
                    f"bind address {host} is not permitted for client {policy.name} (allowed: "
                    f"{', '.join(policy.bind)})",
                )
            if len(owner.tunnels) >= policy.max_tunnels:
                raise BindRefused(
                    "limit",
                    f"client {policy.name} may have at most {policy.max_tunnels} tunnels per "
                    "session; close one first",
                )
        held = self.listeners.get((host, port)) if port else None
        if held is not None and held.owner is not None:
            previous = held.owner
            if previous.credential != owner.credential:
                raise BindRefused(
                    "in_use", f"port {port} on {host} is held by another client; choose another port"
                )
            if previous.serial > owner.serial:
                # an older session (its client still runs) asks for the port of a newer one: it waits
                repeated = not self.wait_for(owner, tunnel_id, held.key)
                raise BindRefused(
                    "taken_over",
                    f"port {port} on {host} is held by a newer session of client {owner.credential} "
                    "(another client with the same credential); this client gets it when that "
                    "session lets go of it",
                    repeated=repeated,
                )
            if _dual_stack(held) and self._ipv6_only(held, host):
                # its socket takes IPv4 visitors too, which the owner may no longer
                # bind (a reload): close it; the BIND is tried again once it is closed
                previous.tunnels.pop(held.tunnel_id, None)
                self.release(held)
                if not previous.tunnels and previous.state is not SessionState.CONNECTED:
                    previous.expire("its owner started a new session")
                raise BindRefused(
                    "in_use",
                    f"port {port} on {host} is closing (it took IPv4 visitors too, which client "
                    f"{owner.credential} may no longer bind); try again shortly",
                )
            # The newest session wins (e.g. the owner restarted): hand the port over.
            old_tunnel = held.tunnel_id if previous.tunnels.pop(held.tunnel_id, None) is not None else None
            self._hand_over(held, owner, tunnel_id)
            self.log.info("port {port} handed to a newer session of {credential}", port=port, event="port_handed_back", host=host, credential=owner.credential, session=owner.id[:8], previous=previous.id[:8], previous_state=previous.state.value)
            if previous is not owner and old_tunnel is not None:
                previous.lost_port(held, old_tunnel)
            if not previous.tunnels and previous.state is not SessionState.CONNECTED:
                previous.expire("its owner started a new session")
            return held
        listener = PublicListener(owner, tunnel_id, host)
        if port == 0 and policy is not None:
            listener.port = self._listen_in_ranges(listener, policy, host)
        else:
            listener.port = self._listen(listener, host, port)
        self.listeners[listener.key] = listener
        return listener

    def _listen_in_ranges(self, listener: PublicListener, policy: ClientPolicy, host: str) -> IListeningPort:
        """`-f 0` for a clients-file client: a free port in its own ranges."""
        tried = 0
        for lo, hi in policy.ports:
            for candidate in range(lo, hi + 1):
                if (host, candidate) in self.listeners:
                    continue
                if tried >= PICK_PORT_ATTEMPTS:
                    break
                tried += 1
                try:
                    return self._listen(listener, host, candidate)
                except BindRefused as refusal:
                    if refusal.code != "in_use":
                        raise
        raise BindRefused(
            "in_use",
            f"no free port for client {policy.name} in {policy.describe_ports()} on {host}; "
            "close a tunnel or ask for more ports",
        )

    def _listen(self, listener: PublicListener, host: str, port: int) -> IListeningPort:
        try:
            # IPv6-only: an IPv6 address that never accepts IPv4 visitors
            ipv6_only = self._ipv6_only(listener, host)
            return listen_tcp(self.reactor, port, listener, 1024, host, self.visitor_gate, ipv6_only)
        except error.CannotListenError as e:
            code = getattr(e.socketError, "errno", None)
            if code in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                raise BindRefused(
                    "bad_address", f"this server has no IPv6, so it cannot bind {host}; "
                    "bind an IPv4 address (e.g. -f 0.0.0.0:PORT)", code,
                ) from None
            if code == errno.EACCES:
                raise BindRefused(
                    "not_permitted",
                    f"the server process may not bind {host}:{port} (permission denied); "
                    "choose a port above 1023",
                ) from None
            if code == errno.EADDRNOTAVAIL:
                raise BindRefused("bad_address", f"{host} is not an address of the server", code) from None
            raise BindRefused(
                "in_use",
                f"port {port} on {host} is already in use by another program on the "
                "server; choose another port (or -f 0 to let the server pick one)",
            ) from None

    def _ipv6_only(self, listener: PublicListener, host: str) -> bool:
        """Bind `::` IPv6-only for a client that may bind `::` but not
        0.0.0.0: on a dual-stack socket IPv4 visitors would reach it too."""
        policy = self.policy_for(listener.owner.credential) if listener.owner is not None else None
        if policy is None or policy.permits_address(IPV4_ANY):
            return False
        try:
            return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
        except ValueError:
            return False

    def _hand_over(self, listener: PublicListener, owner: ServerSession, tunnel_id: int) -> None:
        """Make `listener` tunnel `tunnel_id` of `owner`. Visitors that came
        while the previous owner was detached go with the port."""
        listener.owner, listener.tunnel_id = owner, tunnel_id
        for visitor in list(listener.away):
            visitor.move_to_owner()
        if owner.state is SessionState.CONNECTED:
            listener.away.clear()

    def wait_for(self, session: ServerSession, tunnel_id: int, key: tuple[str, int]) -> bool:
        """`session` wants port `key` (as `tunnel_id`), which a newer session
        of its credential holds. False if it was already waiting so."""
        waiters = self.waiting.setdefault(key, {})
        new = waiters.get(session) != tunnel_id
        waiters[session] = tunnel_id
        return new

    def stop_waiting(self, session: ServerSession, tunnel_id: int | None = None) -> None:
        """`session` no longer waits for a port as `tunnel_id` (None: for any)."""
        for key in [k for k, waiters in self.waiting.items() if session in waiters]:
            waiters = self.waiting[key]
            if tunnel_id is None or waiters[session] == tunnel_id:
                del waiters[session]
            if not waiters:
                del self.waiting[key]

    def let_go(self, listener: PublicListener) -> None:
        """Its owner no longer wants `listener` (its session ended, or it sent
        UNBIND): hand the port to the newest session of the credential that
        waits for it, with the visitors that waited for the owner; close it
        if none does."""
        key = listener.key if listener.port is not None else None
        waiters = self.waiting.get(key, {}) if key is not None and not self.shutting_down else {}
        heirs = [
            s for s in waiters
            if s.state is not SessionState.EXPIRED and s is not listener.owner
            and waiters[s] not in s.tunnels and waiters[s] not in s._binds_waiting
        ]
        if not heirs:
            self.release(listener)
            return
        heir = max(heirs, key=lambda s: s.serial)
        tunnel_id = waiters[heir]
        self.stop_waiting(heir, tunnel_id)
        previous = listener.owner
        self._hand_over(listener, heir, tunnel_id)
        assert key is not None
        self.log.info(
            "port {port} handed over to session {id}, which waited for it", port=key[1], id=heir.id[:8],
            event="port_handed_over", host=key[0], credential=heir.credential, session=heir.id[:8],
            previous=previous.id[:8] if previous is not None else None,
        )
        heir.took_port(listener, tunnel_id, key[1])

    def release(self, listener: PublicListener) -> defer.Deferred[None]:
        """Close a public port (once) and forget who owned it."""
        listener.owner = None
        listener.away.clear()
        listener.refusals.stop()
        port, listener.port = listener.port, None
        if port is None:
            return defer.succeed(None)
        key = (listener.host, port.getHost().port)
        self.listeners.pop(key, None)
        self._closing.setdefault(key, [])

        def closed(result: object) -> object:
            for waiter in self._closing.pop(key, []):
                waiter.callback(None)
            return result

        return defer.maybeDeferred(port.stopListening).addBoth(closed)

    def when_port_closed(self, port: int) -> defer.Deferred[None] | None:
        """Fires once the released public ports on `port` (any address) have
        closed their sockets; None if none is closing."""
        keys = [key for key in self._closing if key[1] == port]
        if not keys:
            return None
        waiters = []
        for key in keys:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._closing[key].append(waiter)
            waiters.append(waiter)
        return defer.gatherResults(waiters).addCallback(lambda _: None)

    # ------------------------------------------------------------ shutdown

    def _streams_to_drain(self) -> bool:
        return any(
            s.session.streams for s in self.sessions.values() if s.state is SessionState.CONNECTED
        )

    def stream_closed(self) -> None:
        if self._drained is not None and not self._streams_to_drain():
            d, self._drained = self._drained, None
            d.callback(None)

    def shutdown(self, drain_timeout: float = 5.0) -> defer.Deferred[None]:
        """GOAWAY to every client, close listeners, let streams drain, close."""
        self.shutting_down = True
        for link in list(self.links):
            if link.session is not None and link.session.can_send:  # not between RESUMEs
                link.send(wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "server shutting down"))
        stops = [self.release(listener) for listener in list(self.listeners.values())]
        drained: defer.Deferred[None] = defer.Deferred()
        if self._streams_to_drain():
            self._drained = drained
            timeout = self.reactor.callLater(drain_timeout, lambda: drained.called or drained.callback(None))
            drained.addBoth(lambda r: timeout.active() and timeout.cancel() or r)
        else:
            drained.callback(None)

        def close_all(_: object) -> defer.Deferred[Any]:
            self._drained = None
            closing = [link.closed for link in list(self.links)]
            for session in list(self.sessions.values()):
                session.expire("server shutting down", abort_link=False)
            for link in list(self.links):
                link.lose()
            for limiter in self.limiters.values():
                limiter.stop()
            for refusals in (self._cap_refusals, self.refusals, self.visitor_gate):
                refusals.stop()
            return defer.gatherResults(closing + stops)

        return drained.addCallback(close_all).addCallback(lambda _: None)


def _ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges)


class _AdmittingFactory(Factory):
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

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        host = host_port(addr)[0]
        refused = self.server.guard.refuses(host)
        if refused is not None:
            self.server.connection_refused_over_cap(host, refused)
            self.server.events.links_accepted += 1
            return None
        return self.factory.buildProtocol(addr)


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
        self.owner: ServerSession | None = None
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
        self._handshake_call = self.clock.callLater(
            self.server.config.handshake_timeout, self._handshake_expired
        )

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

    def peer_host(self) -> str:
        """The client's host, IPv4-mapped unmapped (what the guard counts); "?" if unknown."""
        address = self.peer_address()
        return address[0] if address is not None else "?"

    def peer_address(self) -> tuple[str, int] | None:
        """The client's (host, port), if the transport knows it."""
        try:
            return known_host_port(self.transport.getPeer())
        except Exception:
            return None

    def peer_certificate_der(self) -> bytes | None:
        """The DER of the TLS client certificate the peer presented, if any."""
        try:
            cert = self.transport.getPeerCertificate()
        except Exception:
            return None
        if cert is None:
            return None
        try:
            return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        except crypto.Error:
            return None

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

    def frame_received(self, frame: Frame) -> None:
        # Before the handshake every frame must be the HELLO: PING and ERROR
        # too go to handshake_frame, which refuses them (and counts it).
        if self.session is None:
            self.handshake_frame(frame)
        else:
            super().frame_received(frame)

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

    def handshake_frame(self, frame: Frame) -> None:
        guard = self.server.guard
        host = self.peer_host()
        wait = guard.retry_after(host)
        if wait is not None:
            self.refuse(  # not AUTH_FAILED: an honest client behind the same address retries later
                ErrorCode.LIMIT_EXCEEDED,
                f"too many failed attempts from {host}; wait {max(1, round(wait))} s",
                "rate_limited", host=host, retry_after=wait, refused_total=guard.refused_attempts,
            )
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
        peer_cert = self.peer_certificate_der()
        credential = self.server.authenticate(hello.token, peer_cert)
        if credential is None:
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
            self.refuse(
                ErrorCode.AUTH_FAILED, reason,
                "auth_failed", host=host, failures_total=guard.failures,
            )
            return
        resume = hello.resume
        if self.server.resumable(credential, resume) is None and not self.server.make_room_for_session(credential):
            limit = self.server.config.max_sessions_per_client
            self.refuse(
                ErrorCode.LIMIT_EXCEEDED,
                f"client {credential} already has {limit} connected sessions, the most this "
                "server allows (--max-sessions-per-client); stop one of its other clients",
                "session_limit", credential=credential, limit=limit,
            )
            return
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._handshake_call = None
        self._authenticated()
        owner, resumed = self.server.session_for(credential, resume)
        self.owner = owner
        self.send(
            wire.encode_json(
                FrameType.WELCOME,
                {
                    "version": max(common),
                    "session": owner.id,
                    "secret": owner.secret,
                    "resumed": resumed,
                    "max_frame": self.server.config.session.max_frame,
                },
            )
        )
        self.log.info(
            "{what} session {id} for {cred} from {peer}",
            what="resumed" if resumed else "new",
            id=owner.id[:8],
            cred=credential,
            peer=self.peer_description(),
            event="session_resumed" if resumed else "session_started", session=owner.id[:8], credential=credential,
        )
        owner.attach_link(self, resumed, hello.max_frame)

    def session_failed(self) -> None:
        if self.owner is not None:
            self.owner.expire("protocol error")

    def link_lost(self, session: Session | None, reason: Failure) -> None:
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        self._authenticated()  # no longer waiting to authenticate, either way
        self.server.links.discard(self)
        if self.owner is not None:
            self.owner.link_lost(self)
        self.closed.callback(None)
