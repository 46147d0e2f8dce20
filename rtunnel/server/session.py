"""The server's side of one client session: attachment, resume, expiry,
tunnels.

A ServerSession lives as long as its client's session: across link drops it
keeps its tunnels and visitors (detached, paused) for the resume grace,
then expires. Its attachment is one state machine (Attachment, one
transition table); what the status page and metrics show is the coarser
SessionState derived from it.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from rtunnel import wire
from rtunnel.addresses import format_host_port, is_ip_literal
from rtunnel.counters import tunnel_name
from rtunnel.mux import ProtocolViolation, Session, Stream
from rtunnel.server.hostnames import HostRefused, HostTunnel
from rtunnel.server.ports import BindRefused
from rtunnel.server.udp import UdpTunnel
from rtunnel.server.visitors import PublicListener
from rtunnel.wire import Frame, FrameType, ResetCode

if TYPE_CHECKING:
    from rtunnel.server import TunnelServer
    from rtunnel.server.handshake import ServerLink


class SessionState(enum.Enum):
    """A session as the status page and metrics show it (docs/admin.md)."""

    CONNECTED = "connected"
    DETACHED = "detached"
    EXPIRED = "expired"


class Attachment(enum.Enum):
    """Where a server session is in its life (docs/architecture.md draws it)."""

    NEW = "new"  # made by a handshake; its link attaches in the same turn
    ATTACHED = "attached"  # a link carries it
    LEAVING = "leaving"  # attached, and the client said GOAWAY: losing the link ends it
    DETACHED = "detached"  # the link dropped; kept for the resume grace
    EXPIRED = "expired"  # ended for good; nothing comes back


class AttachmentInput(enum.Enum):
    ATTACH = "attach"  # a link finished its handshake for the session (new or resumed)
    GOAWAY = "goaway"  # the client is stopping: no resume will come
    LINK_LOST = "link_lost"  # its link closed
    EXPIRE = "expire"  # grace ran out, protocol error, reload, administrator, shutdown


_A, _I = Attachment, AttachmentInput
#: (state, input) -> next state. Anything else is impossible and raises.
TRANSITIONS: dict[tuple[Attachment, AttachmentInput], Attachment] = {
    (_A.NEW, _I.ATTACH): _A.ATTACHED,
    (_A.NEW, _I.EXPIRE): _A.EXPIRED,
    (_A.ATTACHED, _I.ATTACH): _A.ATTACHED,  # a resume while the server still holds the old link
    (_A.ATTACHED, _I.GOAWAY): _A.LEAVING,
    (_A.ATTACHED, _I.LINK_LOST): _A.DETACHED,
    (_A.ATTACHED, _I.EXPIRE): _A.EXPIRED,
    (_A.LEAVING, _I.ATTACH): _A.LEAVING,  # it said it stops: the new link's loss ends it too
    (_A.LEAVING, _I.GOAWAY): _A.LEAVING,
    (_A.LEAVING, _I.LINK_LOST): _A.EXPIRED,
    (_A.LEAVING, _I.EXPIRE): _A.EXPIRED,
    (_A.DETACHED, _I.ATTACH): _A.ATTACHED,
    (_A.DETACHED, _I.EXPIRE): _A.EXPIRED,
}
del _A, _I

#: What each attachment state shows as.
SHOWN = {
    Attachment.NEW: SessionState.CONNECTED,
    Attachment.ATTACHED: SessionState.CONNECTED,
    Attachment.LEAVING: SessionState.CONNECTED,
    Attachment.DETACHED: SessionState.DETACHED,
    Attachment.EXPIRED: SessionState.EXPIRED,
}


class ImpossibleTransition(Exception):
    """A bug: an input the attachment machine has no transition for."""


def next_attachment(state: Attachment, event: AttachmentInput) -> Attachment:
    """The state `event` leads to from `state`; ImpossibleTransition if none."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ImpossibleTransition(f"a server session cannot {event.value} when {state.value}") from None


class ServerSession:
    """The server's side of one client session (the mux Session's delegate)."""

    log = Logger()

    def __init__(self, server: TunnelServer, credential: str) -> None:
        self.server = server
        self.credential = credential
        self.id = secrets.token_hex(16)
        self.serial = next(server.session_serials)  # creation order: the newest holds a contested port
        self.secret = secrets.token_hex(32)
        self.mux_session = Session(server.reactor, self, is_server=True, settings=server.settings_for(credential))
        limiter = server.limiter_for(credential)
        self.mux_session.replace_pacers(limiter.to_client, limiter.from_client)
        self.tunnels: dict[int, PublicListener] = {}
        self.tunnel_names: dict[int, str] = {}  # tunnel id -> "host:port", kept for the metrics
        self.udp_tunnels: dict[int, UdpTunnel] = {}  # UDP ports (rtunnel.server.udp), same tunnel ids
        self.link: ServerLink | None = None  # set exactly while ATTACHED or LEAVING
        self.attachment = Attachment.NEW
        self._grace_call: IDelayedCall | None = None
        # for the status page (rtunnel.admin): when it began, when it last
        # changed state, and the address of its current (or last) link
        self.started_at = server.reactor.seconds()
        self.state_since = self.started_at
        self.peer: tuple[str, int] | None = None
        # tunnel ids whose BIND waits for a closing port (a dict used as a set: 64 bytes empty, a set 216)
        self._binds_waiting: dict[int, None] = {}
        self.hostnames: dict[int, HostTunnel] = {}  # tunnel id -> its claimed hostname (#15)

    # ------------------------------------------------------------ state

    @property
    def state(self) -> SessionState:
        return SHOWN[self.attachment]

    @property
    def attached(self) -> bool:
        return self.state is SessionState.CONNECTED

    @property
    def detached(self) -> bool:
        return self.attachment is Attachment.DETACHED

    @property
    def expired(self) -> bool:
        return self.attachment is Attachment.EXPIRED

    def _move(self, event: AttachmentInput) -> Attachment:
        """Take `event` through the transition table (raises if impossible)."""
        new = next_attachment(self.attachment, event)
        if SHOWN[new] is not self.state:
            self.state_since = self.server.reactor.seconds()
        self.attachment = new
        return new

    def still_wants(self, tag: int) -> bool:
        """For the claims registry: can this session take a port it waited
        for as tunnel `tag` (it has not ended or used the id since)?"""
        return (
            not self.expired and tag not in self.tunnels and tag not in self.udp_tunnels
            and tag not in self._binds_waiting and tag not in self.hostnames
        )

    @property
    def tunnel_count(self) -> int:
        """Tunnels bound of every kind (the max_tunnels limit counts them all)."""
        return len(self.tunnels) + len(self.udp_tunnels) + len(self.hostnames)

    # ------------------------------------------------------------ links

    def attach_link(self, link: ServerLink, resumed: bool, peer_max_frame: int) -> None:
        self._move(AttachmentInput.ATTACH)
        old, self.link = self.link, None  # before the abort: its link_lost is no longer ours
        if old is not None:  # a resume while the server still holds the old link
            old.session = None
            self.mux_session.detach()
            old.abort()
            self.state_since = self.server.reactor.seconds()
        self._cancel_grace()
        self.link = link
        self.peer = link.peer_address()
        link.start_session(self.mux_session, resumed, peer_max_frame)
        for listener in self.tunnels.values():
            listener.away.clear()  # their OPENs went out with the resume

    def link_lost(self, link: ServerLink) -> None:
        if self.link is not link:  # replaced by a resume, or expired
            return
        self.link = None
        if self._move(AttachmentInput.LINK_LOST) is Attachment.EXPIRED:
            self._end("the client stopped")
            return
        grace = self.server.config.resume_grace
        streams = len(self.mux_session.streams)
        self.log.info(
            "session {id} detached; keeping its {n} streams for {grace:.0f} s", id=self.id[:8], n=streams, grace=grace,
            event="session_detached", session=self.id[:8], credential=self.credential, streams=streams,
        )
        self._grace_call = self.server.reactor.callLater(grace, self.expire, "resume grace ran out")

    def expire(self, why: str, abort_link: bool = True) -> None:
        """End the session for good: reset streams, free ports, forget it.
        Once expired, a second call does nothing."""
        if self.expired:
            return
        self._move(AttachmentInput.EXPIRE)
        self._end(why, abort_link)

    def _end(self, why: str, abort_link: bool = True) -> None:
        self.log.info(
            "session {id} expired: {why}", id=self.id[:8], why=why,
            event="session_expired", session=self.id[:8], credential=self.credential, reason=why,
        )
        self._cancel_grace()
        self.server.claims.stop_waiting(self)
        for listener in list(self.tunnels.values()):  # first: visitors who waited for us may be handed on
            self.server.ports.let_go(listener)
        self.tunnels.clear()
        for host_tunnel in list(self.hostnames.values()):
            self.server.hostnames.let_go(host_tunnel, self.server.shutting_down)
        self.hostnames.clear()
        for udp in list(self.udp_tunnels.values()):
            self.server.udp.let_go(udp)
        self.udp_tunnels.clear()
        self.mux_session.close(ResetCode.EXPIRED, why)
        self.server.sessions.pop(self.id, None)
        if self.link is not None:
            link, self.link = self.link, None
            link.session = None
            if abort_link:
                link.abort()

    def _cancel_grace(self) -> None:
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None

    def set_max_streams(self, max_streams: int) -> None:
        """A reload changed the client's max_streams: new settings for the
        mux session (SessionSettings is frozen)."""
        mux = self.mux_session
        mux.settings = dataclasses.replace(mux.settings, max_streams=max_streams)

    # ------------------------------------------------------------ tunnels

    def close_tunnel(self, tunnel_id: int, why: str) -> bool:
        """Close one public port of this session and reset its open
        connections; the client hears BIND_FAILED "closed" and does not
        rebind it in this session. False if there is no such tunnel."""
        if tunnel_id in self.hostnames:
            return self._close_hostname(tunnel_id, why)
        udp = self.udp_tunnels.pop(tunnel_id, None)
        if udp is not None:
            port = udp.key[1] if udp.port is not None else 0
            self.server.udp.release(udp)
            self.mux_session.send_json(FrameType.BIND_FAILED, {"tunnel": tunnel_id, "code": "closed", "message": why})
            self.log.info(
                "UDP tunnel {port} of session {id} closed: {why}", port=port, id=self.id[:8], why=why,
                event="tunnel_closed", session=self.id[:8], credential=self.credential, tunnel=tunnel_id,
                host=udp.host, reason=why, kind="udp",
            )
            return True
        listener = self.tunnels.pop(tunnel_id, None)
        if listener is None:
            return False
        port = listener.key[1] if listener.port is not None else 0
        self.server.ports.release(listener)
        for stream in list(self.mux_session.streams.values()):
            if stream.tunnel_id == tunnel_id:
                stream.reset(ResetCode.ABORTED, why)
        self.mux_session.send_json(FrameType.BIND_FAILED, {"tunnel": tunnel_id, "code": "closed", "message": why})
        self.log.info(
            "tunnel {port} of session {id} closed: {why}", port=port, id=self.id[:8], why=why,
            event="tunnel_closed", session=self.id[:8], credential=self.credential, tunnel=tunnel_id,
            host=listener.host, reason=why,
        )
        return True

    def took_port(self, listener: PublicListener, tunnel_id: int, requested_port: int) -> None:
        """`listener` is ours as tunnel `tunnel_id`: tell the client (BOUND)."""
        self.tunnels[tunnel_id] = listener
        host, bound_port = listener.key
        self.tunnel_names[tunnel_id] = tunnel_name(host, bound_port)
        self.log.info(
            "tunnel bound: {address} for session {id}", address=format_host_port(host, bound_port),
            host=host, port=bound_port, id=self.id[:8], event="tunnel_bound", session=self.id[:8],
            credential=self.credential, tunnel=tunnel_id, requested_port=requested_port,
        )
        self.mux_session.send_json(FrameType.BOUND, {"tunnel": tunnel_id, "host": host, "port": bound_port})

    def lost_port(self, listener: PublicListener, tunnel_id: int) -> None:
        """A newer session of our credential took our port: tell the client
        (BIND_FAILED taken_over); the claims registry keeps us waiting for
        the port to come back."""
        host, port = listener.key
        self._bind_failed(
            tunnel_id, "taken_over",
            f"port {port} on {host} was taken over by a newer session of client "
            f"{self.credential} (another client with the same credential started); this client "
            "keeps asking for it and gets it back when that session lets go of it",
        )

    def took_udp_port(self, tunnel: UdpTunnel, tunnel_id: int, requested_port: int) -> None:
        """`tunnel`, a UDP port, is ours as tunnel `tunnel_id`: BOUND."""
        self.udp_tunnels[tunnel_id] = tunnel
        host, bound_port = tunnel.key
        self.tunnel_names[tunnel_id] = "udp:" + tunnel_name(host, bound_port)
        self.log.info(
            "UDP tunnel bound: {address} for session {id}", address=format_host_port(host, bound_port),
            host=host, port=bound_port, id=self.id[:8], event="tunnel_bound", session=self.id[:8],
            credential=self.credential, tunnel=tunnel_id, requested_port=requested_port, kind="udp",
        )
        self.mux_session.send_json(FrameType.BOUND, wire.Bound(tunnel_id, host, bound_port, "udp").to_json())

    def lost_udp_port(self, tunnel: UdpTunnel, tunnel_id: int) -> None:
        """A newer session of our credential took our UDP port (taken_over)."""
        host, port = tunnel.key
        self._bind_failed(
            tunnel_id, "taken_over",
            f"UDP port {port} on {host} was taken over by a newer session of client {self.credential}; "
            "this client keeps asking for it and gets it back when that session lets go of it",
        )

    def _bind_failed(self, tunnel_id: int, code: str, message: str) -> None:
        self.mux_session.send_json(FrameType.BIND_FAILED, {"tunnel": tunnel_id, "code": code, "message": message})

    # ------------------------------------------------------------ delegate

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        raise ProtocolViolation("clients may not open streams in protocol version 1")

    def stream_closed(self, session: Session, stream: Stream) -> None:
        self.server.traffic.fold(self.credential, self.tunnel_names.get(stream.tunnel_id, "?"), stream)
        self.server.stream_closed()

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None:
        """The client's reply on a flow: to its visitor (flows are the server's to name)."""
        if datagram.address is not None:
            raise ProtocolViolation("a client's DATAGRAM may not carry an address (flag 0x01)")
        tunnel = self.udp_tunnels.get(datagram.tunnel)
        if tunnel is None:
            self.server.udp.unknown_tunnel += 1  # unbound or taken over meanwhile
            return
        tunnel.reply(datagram.flow, datagram.payload)

    def control_frame(self, session: Session, frame: Frame) -> None:
        if frame.type is FrameType.BIND:
            self._bind(wire.Bind.parse(frame.body))
        elif frame.type is FrameType.UNBIND:
            tunnel_id = wire.Unbind.parse(frame.body).tunnel
            listener = self.tunnels.pop(tunnel_id, None)
            host_tunnel = self.hostnames.pop(tunnel_id, None)
            if host_tunnel is not None:
                self.server.hostnames.let_go(host_tunnel)
            udp = self.udp_tunnels.pop(tunnel_id, None)
            self._binds_waiting.pop(tunnel_id, None)
            self.server.claims.stop_waiting(self, tunnel_id)
            if listener is not None:
                self.server.ports.let_go(listener)
            if udp is not None:
                self.server.udp.let_go(udp)
        elif frame.type is FrameType.GOAWAY:
            self._move(AttachmentInput.GOAWAY)
        else:
            raise ProtocolViolation(f"unexpected {frame.type.name} from a client")

    def _bind(self, bind: wire.Bind, retry: bool = True) -> None:
        tunnel_id, host, port = bind.tunnel, bind.host, bind.port  # host "": PublicPorts.bind_default
        if tunnel_id in self.tunnels or tunnel_id in self.udp_tunnels or tunnel_id in self._binds_waiting:
            raise ProtocolViolation(f"BIND reuses tunnel id {tunnel_id}")
        if bind.kind not in self.server.tunnel_kinds:
            self._bind_failed(
                tunnel_id, "unsupported",
                f"this server does not serve {bind.kind[:20]!r} tunnels (it serves: "
                f"{', '.join(self.server.tunnel_kinds)}); upgrade or configure the server, or drop the tunnel",
            )
            return
        if bind.kind in ("http", "tls"):
            self._bind_hostname(bind)
            return
        if host and not is_ip_literal(host):
            self._bind_failed(
                tunnel_id, "bad_address", f"bind address {host[:100]!r} is not an IP address; use e.g. 0.0.0.0 or ::",
            )
            return
        if bind.kind == "udp":
            self._bind_udp(bind)
            return
        try:  # a fleet claims the name in etcd first (LocalClaims: None, and on at once)
            acquiring = self.server.ports.acquire(self, tunnel_id, host, port)
        except BindRefused as refusal:
            acquiring = defer.fail(refusal)
        if acquiring is not None:
            self._binds_waiting[tunnel_id] = None
            acquiring.addCallbacks(
                lambda _: self._bind_acquired(bind, retry), lambda failure: self._bind_acquired(bind, retry, failure),
            )
            return
        self._bind_now(bind, retry)

    def _bind_acquired(self, bind: wire.Bind, retry: bool, failure: Any = None) -> None:
        """The registry's asynchronous claim is done: bind now, or say why not."""
        if bind.tunnel not in self._binds_waiting or self.expired:
            return  # UNBIND or the session's end came first (the registry forgets the claim)
        self._binds_waiting.pop(bind.tunnel, None)
        if failure is None:
            self._bind_now(bind, retry)
        elif failure.check(BindRefused):
            self._bind_now(bind, retry, failure.value)
        else:
            self.log.failure("claiming tunnel {tunnel} failed", failure, tunnel=bind.tunnel, event="bind_error")
            self._bind_failed(bind.tunnel, "unavailable", "the server could not claim the port; try again shortly")

    def _bind_now(self, bind: wire.Bind, retry: bool, refused: BindRefused | None = None) -> None:
        tunnel_id, host, port = bind.tunnel, bind.host, bind.port
        ports = self.server.ports
        try:
            if refused is not None:
                raise refused
            listener = ports.bind(self, tunnel_id, host, port) if host else ports.bind_default(self, tunnel_id, port)
        except BindRefused as refusal:
            closing = ports.when_port_closed(port) if retry and refusal.code == "in_use" and port else None
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
            else:
                self.server.refusals.refused(
                    ("bind_refused", self.id, refusal.code),
                    "refused to bind {address} for {cred}: {why}",
                    address=format_host_port(host, port) if host else f"port {port} (default address)",
                    host=host, port=port, cred=self.credential, why=refusal.message,
                    event="bind_refused", session=self.id[:8], credential=self.credential, tunnel=tunnel_id,
                    code=refusal.code, reason=refusal.message,
                )
            self._bind_failed(tunnel_id, refusal.code, refusal.message)
            return
        self.took_port(listener, tunnel_id, port)

    def _bind_udp(self, bind: wire.Bind) -> None:
        """BIND of kind "udp": the same policy and claims as a TCP port."""
        try:
            tunnel = self.server.udp.bind(self, bind.tunnel, bind.host, bind.port)
        except BindRefused as refusal:
            if refusal.code != "taken_over":
                self.server.refusals.refused(
                    ("bind_refused", self.id, refusal.code),
                    "refused to bind UDP {address} for {cred}: {why}",
                    address=format_host_port(bind.host, bind.port) if bind.host else f"port {bind.port}",
                    host=bind.host, port=bind.port, cred=self.credential, why=refusal.message,
                    event="bind_refused", session=self.id[:8], credential=self.credential, tunnel=bind.tunnel,
                    code=refusal.code, reason=refusal.message, kind="udp",
                )
            self._bind_failed(bind.tunnel, refusal.code, refusal.message)
            return
        self.took_udp_port(tunnel, bind.tunnel, bind.port)

    def _bind_when_closed(self, closing: defer.Deferred[None], bind: wire.Bind) -> None:
        """Try a BIND once more when the port it wants has closed (a listening
        socket closes on the reactor's next turn, after stopListening)."""
        tunnel_id = bind.tunnel
        self._binds_waiting[tunnel_id] = None

        def closed(_: object) -> None:
            if tunnel_id in self._binds_waiting and not self.expired:
                self._binds_waiting.pop(tunnel_id, None)
                self._bind(bind, retry=False)

        closing.addCallback(closed).addErrback(
            lambda failure: self.log.failure(
                "binding tunnel {tunnel} after its port closed failed", failure,
                tunnel=tunnel_id, event="bind_error", session=self.id[:8],
            )
        )

    # ------------------------------------------------------------ hostnames (#15, rtunnel.server.hostnames)

    def _bind_hostname(self, bind: wire.Bind) -> None:
        if bind.tunnel in self.hostnames:
            raise ProtocolViolation(f"BIND reuses tunnel id {bind.tunnel}")
        try:
            tunnel = self.server.hostnames.bind(self, bind.tunnel, bind.kind, bind.hostname)
        except HostRefused as refusal:
            if refusal.code != "taken_over":
                self.server.refusals.refused(
                    ("bind_refused", self.id, refusal.code), "refused hostname {hostname} for {cred}: {why}",
                    hostname=bind.hostname[:253], cred=self.credential, why=refusal.message,
                    event="bind_refused", session=self.id[:8], credential=self.credential, tunnel=bind.tunnel,
                    code=refusal.code, reason=refusal.message,
                )
            self._bind_failed(bind.tunnel, refusal.code, refusal.message)
            return
        self.took_hostname(tunnel, bind.tunnel)

    def took_hostname(self, tunnel: HostTunnel, tunnel_id: int) -> None:
        """`tunnel`'s name is ours as tunnel `tunnel_id`: tell the client (BOUND with its URLs)."""
        self.hostnames[tunnel_id] = tunnel
        self.tunnel_names[tunnel_id] = tunnel.name
        urls = self.server.hostnames.urls(tunnel.name, tunnel.kind)
        self.log.info(
            "hostname bound: {hostname} ({kind}) for session {id}", hostname=tunnel.name, kind=tunnel.kind,
            id=self.id[:8], event="tunnel_bound", session=self.id[:8], credential=self.credential,
            tunnel=tunnel_id, urls=list(urls),
        )
        bound = wire.Bound(tunnel_id, None, 0, tunnel.kind, tunnel.name, urls)
        self.mux_session.send_json(FrameType.BOUND, bound.to_json())

    def _close_hostname(self, tunnel_id: int, why: str) -> bool:
        """close_tunnel for a hostname: the name is let go, its streams reset."""
        tunnel = self.hostnames.pop(tunnel_id)
        name = tunnel.name if tunnel.claim is not None else "?"
        self.server.hostnames.let_go(tunnel)
        for stream in list(self.mux_session.streams.values()):
            if stream.tunnel_id == tunnel_id:
                stream.reset(ResetCode.ABORTED, why)
        self.mux_session.send_json(FrameType.BIND_FAILED, {"tunnel": tunnel_id, "code": "closed", "message": why})
        self.log.info(
            "hostname {hostname} of session {id} closed: {why}", hostname=name, id=self.id[:8], why=why,
            event="tunnel_closed", session=self.id[:8], credential=self.credential, tunnel=tunnel_id, reason=why,
        )
        return True

    def lost_hostname(self, name: str, tunnel_id: int) -> None:
        """A newer session of our credential took our hostname; we wait for it back."""
        self._bind_failed(
            tunnel_id, "taken_over",
            f"hostname {name} was taken over by a newer session of client {self.credential} (another "
            "client with the same credential started); this client keeps asking for it and gets it back "
            "when that session lets go of it",
        )
