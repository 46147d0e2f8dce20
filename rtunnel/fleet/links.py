"""Member links: any member serves every tunnel (docs/fleet.md "Member links").

A visitor may reach any member of a fleet. A member that is not the home of
the name the visitor reached (the member whose client session holds it) is
its *edge*: it listens on that name too and carries each visitor to the
home over a member link, a mutual-TLS connection between two members
(rtunnel.fleet.ca) running the ordinary multiplexer (rtunnel.mux): each
visitor is one stream with the same per-stream credit, half-close and
per-link memory budget as a client session's. At the home the stream is
bridged (`Bridge`) into a stream of the owning client session, opened
exactly as a local visitor's is (the real `src`, the `dst` the visitor
reached, and the `edge`), so the client, its PROXY protocol header and the
server's limits see the visitor as it is.

Roles: an edge dials the home (`PeerLink`, one outgoing link per peer,
reconnected by a ClientService) and opens streams on it; the home accepts
member links (`MemberLinkListener`) and only receives streams on them.
Two members serving each other's tunnels hold two links, one each way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel import wire
from rtunnel.addresses import format_host_port, host_port
from rtunnel.descriptors import listen_tcp
from rtunnel.fleet.ca import MEMBER_NAME, MemberIdentity, member_name_of
from rtunnel.fleet.workers import sibling_workers
from rtunnel.link import ControlLink
from rtunnel.localsocket import StreamProtocol
from rtunnel.mux import ProtocolViolation, Session, SessionBufferFull, Stream, StreamIdsExhausted, cancel_call
from rtunnel.server.claims import Hostname, Name, TcpPort, UdpPort
from rtunnel.tcp import port_number, tcp_transport
from rtunnel.tlslink import LinkTLSEndpoint, LinkTLSFactory
from rtunnel.wire import ErrorCode, Frame, FrameType, ResetCode

#: The member-link protocol's version (HELLO "version").
MEMBER_LINK_VERSION = 1

#: How long an edge listener whose name became this member's own is kept
#: (not accepting) for the session whose BIND claimed it to take over
#: (`FleetLinks.hand_over`); closed after that if no session did.
HAND_OVER_WAIT = 10.0

#: A default-address port (a BIND without a host) as the directory names it:
#: every member serves it on its own --public-host.
DEFAULT_HOST = "default"


class EdgeKind(TypingProtocol):
    """The edge and home of one other kind of name (FleetLinks.kinds)."""

    def moved(self, name: Name, home: str | None) -> None: ...

    def arrived(
        self, hop: Stream, name: Name, src: list[Any], dst: list[Any], edge: str, info: dict[str, Any],
    ) -> None: ...


class FleetDirectory(TypingProtocol):
    """What member links need of the fleet directory (rtunnel.fleet.directory)."""

    member: str

    def link_endpoint(self, member: str) -> str | None: ...

    def home_of(self, name: Name) -> str | None: ...

    def remote_names(self) -> Iterable[tuple[Name, str]]: ...

    def watch_names(self, callback: Callable[[Name, str | None], None]) -> None: ...

    @property
    def fenced(self) -> bool: ...


# ---------------------------------------------------------------- names on the wire


def name_to_json(name: Name) -> dict[str, Any]:
    """A public name as OPEN's "name" on a member link."""
    if isinstance(name, TcpPort):
        return {"kind": "tcp", "host": name.host, "port": name.port}
    if isinstance(name, UdpPort):
        return {"kind": "udp", "host": name.host, "port": name.port}
    return {"kind": "host", "hostname": name.name}


def name_from_json(value: Any) -> Name:
    """The inverse of name_to_json; ProtocolViolation if malformed."""
    if isinstance(value, dict):
        kind = value.get("kind")
        host, port = value.get("host"), value.get("port")
        if kind in ("tcp", "udp") and isinstance(host, str) and isinstance(port, int) and 0 < port < 65536:
            return TcpPort(host, port) if kind == "tcp" else UdpPort(host, port)
        if kind == "host" and isinstance(value.get("hostname"), str):
            return Hostname(value["hostname"])
    raise ProtocolViolation(f"member link OPEN: invalid name {str(value)[:100]!r}")


def _address_field(value: Any, what: str) -> list[Any]:
    if (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and len(value[0]) <= 64
        and isinstance(value[1], int) and 0 <= value[1] < 65536
    ):
        return value
    raise ProtocolViolation(f"member link OPEN: invalid {what} {str(value)[:100]!r}")


def _address(addr: IAddress | None) -> list[Any]:
    return list(host_port(addr)) if addr is not None else ["?", 0]


# ---------------------------------------------------------------- the link


class MemberLink(ControlLink):
    """One member link, either end: the HELLO/WELCOME that names both
    members (checked against their certificates), then a mux Session."""

    log = Logger()

    def __init__(self, links: FleetLinks) -> None:
        super().__init__(links.reactor, links.server.config.keepalive)
        self.links = links
        self.peer_member: str | None = None

    def certified_member(self) -> str | None:
        """The member the peer's certificate names (its chain to the fleet
        CA was checked by TLS: MemberIdentity.tls_options)."""
        try:
            cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        except Exception:
            return None
        return member_name_of(cert.to_cryptography()) if cert is not None else None

    def _hello_body(self, frame: Frame, expected: FrameType) -> dict[str, Any]:
        if frame.type is not expected:
            raise ProtocolViolation(f"member link: expected {expected.name}, got {frame.type.name}")
        body = wire.decode_json(frame)
        if body.get("version") != MEMBER_LINK_VERSION:
            raise ProtocolViolation(
                f"member link version {str(body.get('version'))[:20]} is not {MEMBER_LINK_VERSION}: "
                "run the same rtunnel version on every member", ErrorCode.UNSUPPORTED_VERSION,
            )
        return body

    def _peer_max_frame(self, body: dict[str, Any]) -> int:
        value = body.get("max_frame")
        if not isinstance(value, int) or not wire.MIN_MAX_FRAME <= value <= wire.MAX_U32:
            raise ProtocolViolation(f"member link: invalid max_frame {str(value)[:20]}")
        return value

    def _hello(self, ftype: FrameType) -> bytes:
        return wire.encode_json(ftype, {
            "version": MEMBER_LINK_VERSION, "member": self.links.member,
            "max_frame": self.links.settings.max_frame,
        })

    def refuse(self, why: str) -> None:
        """The peer is not who it must be: say why (to it and in our log), close."""
        self.log.warn(
            "member link from {peer} refused: {why}", peer=self.peer_description(), why=why,
            event="member_link_refused", member=self.peer_member, reason=why,
        )
        self.send_error_and_close(ErrorCode.AUTH_FAILED, why)

    def link_lost(self, session: Session | None, reason: Failure) -> None:
        if session is not None:
            carried = len(session.streams)
            # no resume on member links: the streams it carried end here (docs/fleet.md)
            session.close(ResetCode.ABORTED, f"the member link to {self.peer_member} was lost")
            self.links.link_down(self, session, carried)


class OutgoingLink(MemberLink):
    """The edge's end: dials the home, opens one stream per visitor."""

    def __init__(self, peer: PeerLink) -> None:
        super().__init__(peer.links)
        self.peer = peer
        self.peer_member = peer.member

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self._hello(FrameType.HELLO))  # type: ignore[union-attr]

    def handshake_frame(self, frame: Frame) -> None:
        body = self._hello_body(frame, FrameType.WELCOME)
        certified = self.certified_member()
        if certified != self.peer.member or body.get("member") != self.peer.member:
            self.refuse(
                f"dialled member {self.peer.member} but the peer's certificate names {certified!r} "
                f"and it calls itself {str(body.get('member'))[:64]!r}"
            )
            return
        session = Session(self.links.reactor, EdgeSide(self.links), is_server=True, settings=self.links.settings)
        self.start_session(session, False, self._peer_max_frame(body))
        self.peer.link_up(self)

    def link_lost(self, session: Session | None, reason: Failure) -> None:
        super().link_lost(session, reason)
        self.peer.link_gone(self)


class IncomingLink(MemberLink):
    """The home's end: accepts an edge's link and takes its streams."""

    def __init__(self, links: FleetLinks) -> None:
        super().__init__(links)
        self._handshake_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.links.incoming.add(self)
        self._handshake_call = self.clock.callLater(self.links.server.config.handshake_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._handshake_call = None
        self.log.warn(
            "member link from {peer}: no HELLO within {t:.0f} s", peer=self.peer_description(),
            t=self.links.server.config.handshake_timeout, event="member_link_refused", reason="handshake_timeout",
        )
        self.abort()

    def handshake_frame(self, frame: Frame) -> None:
        body = self._hello_body(frame, FrameType.HELLO)
        cancel_call(self._handshake_call)
        self._handshake_call = None
        claimed = body.get("member")
        edge = claimed if isinstance(claimed, str) and MEMBER_NAME.fullmatch(claimed) else None
        self.peer_member = edge
        certified = self.certified_member()
        if edge is None or certified != edge:
            self.refuse(f"the peer calls itself {str(claimed)[:64]!r} but its certificate names {certified!r}")
            return
        if edge == self.links.member or self.links.directory.link_endpoint(edge) is None:
            self.refuse(f"member {edge} is not a member of this fleet now (not in the directory)")
            return
        self.transport.write(self._hello(FrameType.WELCOME))  # type: ignore[union-attr]
        session = Session(self.links.reactor, HomeSide(self.links, edge), is_server=False, settings=self.links.settings)
        self.start_session(session, False, self._peer_max_frame(body))
        self.links.link_up(self)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        cancel_call(self._handshake_call)
        self._handshake_call = None
        self.links.incoming.discard(self)
        super().connectionLost(reason)


class EdgeSide:
    """The edge's session delegate: it opens streams, the home never does."""

    def __init__(self, links: FleetLinks) -> None:
        self.links = links

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        raise ProtocolViolation("the home member opened a stream on a member link")

    def control_frame(self, session: Session, frame: Frame) -> None:
        if frame.type is not FrameType.GOAWAY:
            raise ProtocolViolation(f"unexpected {frame.type.name} on a member link")

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None:
        handler = self.links.datagrams_out
        if handler is None:
            raise ProtocolViolation("this member carries no UDP datagrams on member links")
        handler(session, datagram)

    def stream_closed(self, session: Session, stream: Stream) -> None:
        pass


class HomeSide:
    """The home's session delegate: each stream is a visitor of one of our
    names, bridged into the stream of the client session holding it."""

    def __init__(self, links: FleetLinks, edge: str) -> None:
        self.links = links
        self.edge = edge

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        self.links.visitor_arrived(stream, info, self.edge)

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None:
        handler = self.links.datagrams_in
        if handler is None:
            raise ProtocolViolation("this member takes no UDP datagrams on member links")
        handler(session, datagram, self.edge)

    def control_frame(self, session: Session, frame: Frame) -> None:
        if frame.type is not FrameType.GOAWAY:
            raise ProtocolViolation(f"unexpected {frame.type.name} on a member link")

    def stream_closed(self, session: Session, stream: Stream) -> None:
        pass


# ---------------------------------------------------------------- the home: two streams as one


class _BridgeEnd:
    """One stream's LocalPort whose "socket" is the other stream: bytes,
    EOF and resets cross over; the other stream pausing its reads (no credit
    on its side) is this stream's local buffer being full, so credit stops
    flowing back across both hops."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.stream: Stream | None = None
        self.other: _BridgeEnd | None = None
        self.paused = False  # our stream asked us to stop reading: the other stream's send side is full
        self.ended = False

    def bind(self, stream: Stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        assert self.other is not None and self.other.stream is not None
        self.other.stream.local_data(data)

    def half_close(self) -> None:
        assert self.other is not None and self.other.stream is not None
        self.other.stream.local_eof()

    def abort(self) -> None:
        self._end()
        other = self.other.stream if self.other is not None else None
        if other is not None and not other.closed:
            other.reset(ResetCode.ABORTED, "the visitor's other hop was reset")

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.bridge.end_done()

    def pause_reading(self) -> None:
        self.paused = True
        other = self.other.stream if self.other is not None else None
        if other is not None:
            other.local_buffer_full()

    def resume_reading(self) -> None:
        self.paused = False
        other = self.other.stream if self.other is not None else None
        if other is not None:
            other.local_buffer_drained()

    def getPeer(self) -> IAddress:
        """The visitor's address (the status page lists it)."""
        host, port = self.bridge.src
        return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


class Bridge:
    """A forwarded visitor at its home: the member link's stream (`hop`)
    joined to the client session's stream (`visitor`), byte for byte, with
    credit passed back in both directions (docs/fleet.md "Member links")."""

    #: the hop's end (a subclass may look at what the edge sends first)
    hop_end_class: type[_BridgeEnd] = _BridgeEnd

    def __init__(self, hop: Stream, visitor: Stream, src: list[Any], on_end: Callable[[], None]) -> None:
        self.src = src
        self._on_end = on_end
        self._ends = 2
        hop_end, visitor_end = self.hop_end_class(self), _BridgeEnd(self)
        hop_end.other, visitor_end.other = visitor_end, hop_end
        hop_end.stream, visitor_end.stream = hop, visitor
        # the hop first: its early bytes become the visitor stream's pending
        # bytes; then the visitor stream, whose first update_reading may say
        # "full" to the hop, which by then has a local end to be full
        hop.attach_local(hop_end)
        visitor.attach_local(visitor_end)
        if hop_end.paused and not visitor.closed:  # the hop paused before the visitor stream had its end
            visitor.local_buffer_full()

    def end_done(self) -> None:
        self._ends -= 1
        if self._ends == 0:
            self._on_end()


# ---------------------------------------------------------------- the edge


class VisitorForward(TypingProtocol):
    """Where an edge's visitor goes: a port's ForwardListener, or a
    passthrough hostname's forward (rtunnel.fleet.hostedge.HostForward)."""

    @property
    def links(self) -> FleetLinks: ...

    @property
    def name(self) -> Name: ...

    @property
    def home(self) -> str: ...

    def peer(self) -> PeerLink: ...


class ForwardedVisitor(StreamProtocol):
    """A visitor at an edge: a stream of the member link to the name's home.
    While that link is not up it waits, unread (as for a detached session),
    at most `FleetLinks.visitor_wait` seconds."""

    stream: Stream | None  # type: ignore[assignment]

    def __init__(self, forward: VisitorForward) -> None:
        self.forward = forward
        self.stream = None
        self.src: list[Any] = ["?", 0]
        self.dst: list[Any] = ["?", 0]
        self.wait_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        transport = tcp_transport(self.transport)
        self.src, self.dst = _address(transport.getPeer()), _address(transport.getHost())
        self.forward.links.forwarded_visitors += 1
        self.forward.peer().carry(self)

    @property
    def waiting_for(self) -> PeerLink | None:
        """The member link this visitor waits for, if it waits."""
        return next((peer for peer in self.forward.links.peers.values() if self in peer.waiting), None)

    def start(self, session: Session) -> None:
        """The link is up: open our stream on it and start reading."""
        links = self.forward.links
        info = {"name": name_to_json(self.forward.name), "src": self.src, "dst": self.dst, "edge": links.member}
        try:
            self.stream = session.open_stream(0, info)
        except (SessionBufferFull, StreamIdsExhausted) as e:
            links.server.refusals.refused(
                ("member_link_full", self.forward.home), "refusing visitor {visitor} at this edge: {why}",
                visitor=self.src, why=str(e), event="visitor_refused", reason="member_link_full",
                edge=links.member, home=self.forward.home,
            )
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        links.visitors_forwarded[self.forward.home] += 1
        self.transport.resumeProducing()  # type: ignore[union-attr]  # attach_local pauses it if need be
        super().connectionMade()

    def wait(self, seconds: float) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self.wait_call = self.forward.links.reactor.callLater(seconds, self._waited_too_long, seconds)

    def _waited_too_long(self, seconds: float) -> None:
        self.wait_call = None
        links = self.forward.links
        links.server.refusals.refused(
            ("home_unreachable", self.forward.home),
            "closing visitor {visitor} of {name}: its home member {home} was unreachable for {t:.0f} s",
            visitor=self.src, name=self.forward.name.describe(), home=self.forward.home, t=seconds,
            event="visitor_refused", reason="home_unreachable", edge=links.member,
        )
        peer = self.waiting_for
        if peer is not None:
            peer.stop_waiting(self)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            super().dataReceived(data)

    def readConnectionLost(self) -> None:
        if self.stream is not None:
            super().readConnectionLost()

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        cancel_call(self.wait_call)
        self.wait_call = None
        self.forward.links.forwarded_visitors -= 1
        if self.stream is not None:
            super().connectionLost(reason)
            return
        peer = self.waiting_for
        if peer is not None:
            peer.stop_waiting(self)


class ForwardListener(Factory):
    """A name held at another member, served here: its visitors are carried
    to the home (`home`, kept up to date from the directory's watch)."""

    noisy = False

    def __init__(self, links: FleetLinks, name: Name, home: str, host: str) -> None:
        self.links = links
        self.name = name
        self.home = home
        self.host = host  # the address it listens on (a default-address port: our --public-host)
        self.port: IListeningPort | None = None
        #: set while the name is this member's own and the socket waits for its session's bind
        self.handing_over: IDelayedCall | None = None

    def peer(self) -> PeerLink:
        return self.links.peer(self.home)

    def rehome(self, home: str) -> None:
        """The name moved to `home`: new visitors go there, and so do those
        still waiting for the old home's link (nothing of theirs crossed a
        link yet), within what is left of their wait."""
        if self.handing_over is not None:  # it was to be ours, but moved on: serve it again
            cancel_call(self.handing_over)
            self.handing_over = None
            if self.port is not None:
                self.port.startReading()  # type: ignore[attr-defined]  # tcp.Port
        if home == self.home:
            return
        old = self.links.peers.get(self.home)
        self.home = home
        if old is None:
            return
        moving = [visitor for visitor in old.waiting if visitor.forward is self]
        for visitor in moving:
            old.stop_waiting(visitor)
        new = self.peer()
        for visitor in moving:
            new.carry(visitor, waited=True)

    def buildProtocol(self, addr: IAddress | None) -> ForwardedVisitor:
        return ForwardedVisitor(self)


@implementer(IStreamClientEndpoint)
class _MemberEndpoint:
    """A TLS client endpoint to `member`'s link, where the directory has it
    at each attempt (a member restarted on another port is found again)."""

    def __init__(self, links: FleetLinks, member: str) -> None:
        self.links = links
        self.member = member
        self.tls = links.identity.tls_options()

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        description = self.links.directory.link_endpoint(self.member)
        if description is None:
            return defer.fail(error.ConnectError(string=f"member {self.member} has no link endpoint in the directory"))
        tcp = clientFromString(self.links.reactor, description)
        connected: defer.Deferred[Any] = LinkTLSEndpoint(self.tls, tcp, self.links.reactor).connect(factory)
        return connected


class PeerLink:
    """This edge's one outgoing link to `member`, reconnected with backoff
    (ClientService) while visitors need it; the visitors that wait for it."""

    log = Logger()

    def __init__(self, links: FleetLinks, member: str) -> None:
        self.links = links
        self.member = member
        self.link: OutgoingLink | None = None
        self.waiting: dict[ForwardedVisitor, None] = {}  # oldest first
        factory = Factory.forProtocol(lambda: OutgoingLink(self))
        factory.noisy = False
        self.service = ClientService(
            _MemberEndpoint(links, member), factory, retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0), clock=links.reactor,
        )
        self.service.startService()

    @property
    def session(self) -> Session | None:
        link = self.link
        return link.session if link is not None and link.session is not None and link.session.can_send else None

    def carry(self, visitor: ForwardedVisitor, waited: bool = False) -> None:
        """Carry `visitor` over this link, or let it wait for the link
        (`waited`: it waited for another member's link; its wait goes on)."""
        session = self.session
        if session is not None:
            cancel_call(visitor.wait_call)
            visitor.wait_call = None
            visitor.start(session)
            return
        if len(self.waiting) >= self.links.settings.max_streams:
            self.links.server.refusals.refused(
                ("home_queue_full", self.member),
                "refusing visitor {visitor}: {n} visitors already wait for the link to member {home}",
                visitor=visitor.src, n=len(self.waiting), home=self.member,
                event="visitor_refused", reason="home_queue_full", edge=self.links.member,
            )
            visitor.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.waiting[visitor] = None
        if not waited:
            visitor.wait(self.links.visitor_wait)

    def stop_waiting(self, visitor: ForwardedVisitor) -> None:
        self.waiting.pop(visitor, None)

    def link_up(self, link: OutgoingLink) -> None:
        self.link = link
        self.log.info(
            "member link to {home} up ({n} visitors were waiting)", home=self.member, n=len(self.waiting),
            event="member_link_up", member=self.member, direction="out",
        )
        waiting, self.waiting = self.waiting, {}
        assert link.session is not None
        for callback in list(self.links.on_link_up):
            callback(self.member, link.session)
        for visitor in waiting:
            cancel_call(visitor.wait_call)
            visitor.wait_call = None
            visitor.start(link.session)

    def link_gone(self, link: OutgoingLink) -> None:
        if self.link is link:
            self.link = None

    def stop(self) -> defer.Deferred[None]:
        for visitor in list(self.waiting):
            visitor.transport.abortConnection()  # type: ignore[union-attr]
        self.waiting.clear()
        if self.link is not None:
            self.link.lose()  # the session lets go first: TLS does not close under a registered producer
        return defer.maybeDeferred(self.service.stopService).addCallback(lambda _: None)


# ---------------------------------------------------------------- the member's links


class FleetLinks:
    """Everything member links do for one member (one TunnelServer): the
    listener for other members' links, the outgoing links, and the public
    listeners of names held elsewhere (kept in step with the directory)."""

    log = Logger()

    def __init__(
        self, reactor: Any, server: Any, directory: FleetDirectory, identity: MemberIdentity, listen: str,
        visitor_wait: float | None = None, siblings: frozenset[str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.server = server  # rtunnel.server.TunnelServer
        self.directory = directory
        self.identity = identity
        self.member = directory.member
        self.listen = listen
        self.settings = server.config.session  # each member link has a client session's bounds
        #: how long a visitor at an edge waits for the link to its home: as
        #: long as a detached session keeps its visitors waiting
        self.visitor_wait = visitor_wait if visitor_wait is not None else server.config.resume_grace
        self.port: IListeningPort | None = None
        self.peers: dict[str, PeerLink] = {}
        self.incoming: set[IncomingLink] = set()
        self.forwards: dict[Name, ForwardListener] = {}
        #: the other workers of this machine's `--workers N`: their ports are open on this
        #: machine's addresses already (at the home worker), so this member is not their edge
        self.siblings = sibling_workers(self.member) if siblings is None else siblings
        self.stopping = False
        # for the metrics (docs/metrics.md "Fleet metrics"): plain counters, read at scrape time
        self.forwarded_visitors = 0  # visitors at this edge now (carried or waiting)
        self.visitors_forwarded: Counter[str] = Counter()  # home -> visitors this edge carried there
        self.visitors_received: Counter[str] = Counter()  # edge -> visitors carried here from it
        self.ended_link_bytes: Counter[tuple[str, str]] = Counter()  # (member, in|out) of links gone
        #: the other kinds of names (hostnames, UDP ports: rtunnel.fleet.hostedge, udpedge), by their
        #: Name class: told when such a name moves (`moved(name, home)`, home None: released), and
        #: given each visitor of it an edge carries here (`arrived(hop, name, src, dst, edge, info)`)
        self.kinds: dict[type, EdgeKind] = {}
        #: DATAGRAM frames (rtunnel.fleet.udpedge): at an edge, the home's replies
        #: (session, datagram); at a home, an edge's visitors' (session, datagram, edge)
        self.datagrams_out: Callable[[Session, wire.Datagram], None] | None = None
        self.datagrams_in: Callable[[Session, wire.Datagram, str], None] | None = None
        #: told when a link to a home is up: (home, its session)
        self.on_link_up: list[Callable[[str, Session], None]] = []
        server.fleet_links = self
        server.ports.adopt = self.hand_over

    # ------------------------------------------------------------ starting, stopping

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Listen for member links; serve every name held elsewhere, and
        follow the directory's changes from now on."""
        factory = LinkTLSFactory(
            self.identity.tls_options(), False, Factory.forProtocol(lambda: IncomingLink(self)), self.reactor,
        )
        self.port = yield serverFromString(self.reactor, self.listen).listen(factory)
        for name, home in list(self.directory.remote_names()):
            self.name_moved(name, home)
        self.directory.watch_names(self.name_moved)
        return self.port

    def stop(self) -> defer.Deferred[None]:
        """Close every listener and link (their visitors' connections end)."""
        self.stopping = True
        if self.server.ports.adopt == self.hand_over:
            self.server.ports.adopt = None
        waits: list[defer.Deferred[Any]] = []
        for forward in list(self.forwards.values()):
            waits.append(self._unserve(forward))
        for peer in list(self.peers.values()):
            waits.append(peer.stop())
        for link in list(self.incoming):
            link.abort()
        if self.port is not None:
            waits.append(defer.maybeDeferred(self.port.stopListening))
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def peer(self, member: str) -> PeerLink:
        """The outgoing link to `member`, made on first use."""
        peer = self.peers.get(member)
        if peer is None:
            peer = self.peers[member] = PeerLink(self, member)
        return peer

    # ------------------------------------------------------------ the edge: names held elsewhere

    def name_moved(self, name: Name, home: str | None) -> None:
        """The directory says `name` is now held at `home` (None: released)."""
        if self.stopping:
            return
        self._serve(name, home)
        self._forget_gone_members()

    def _forget_gone_members(self) -> None:
        """Stop dialling members that left the fleet (not in the directory)
        and that no name here and no waiting visitor needs."""
        needed = {forward.home for forward in self.forwards.values()}
        for member, peer in list(self.peers.items()):
            if (
                member not in needed and not peer.waiting and peer.link is None
                and self.directory.link_endpoint(member) is None
            ):
                del self.peers[member]
                peer.stop()

    def _serve(self, name: Name, home: str | None) -> None:
        kind = self.kinds.get(type(name))
        if kind is not None:
            kind.moved(name, home)
            return
        forward = self.forwards.get(name)
        if home == self.member and forward is not None and forward.port is not None:
            # a session here claimed it: etcd's watch event comes as the BIND's own transaction
            # answers, often just before, so keep the socket for that session (hand_over), not
            # accepting meanwhile; closing it would make the bind find the port still in use
            if forward.handing_over is None:
                forward.port.stopReading()  # type: ignore[attr-defined]  # tcp.Port
                forward.handing_over = self.reactor.callLater(HAND_OVER_WAIT, self._hand_over_expired, forward)
            return
        if home is None or home == self.member or home in self.siblings:
            if forward is not None:
                self._unserve(forward)
            return
        if forward is not None:
            forward.rehome(home)
            return
        if not isinstance(name, TcpPort):
            # a kind this member serves no edge of (a hostname without --http/--https here)
            self.log.info(
                "{name} is held at member {home}; this member does not serve that kind at its edge yet",
                name=name.describe(), home=home, event="edge_unsupported", member=home,
            )
            return
        host = self.server.config.public_host if name.host == DEFAULT_HOST else name.host
        forward = self.forwards[name] = ForwardListener(self, name, home, host)
        self._listen(forward)

    def _listen(self, forward: ForwardListener) -> None:
        """Open `forward`'s port; if this member's own listener of the name
        is still closing (its session let go of it), once it has closed."""
        if self.stopping or self.forwards.get(forward.name) is not forward:
            return
        name, host = forward.name, forward.host
        assert isinstance(name, TcpPort)
        try:
            # the workers of one machine (--workers N) are each an edge of the port, with SO_REUSEPORT
            forward.port = listen_tcp(
                self.reactor, name.port, forward, 1024, host, self.server.visitor_gate,
                reuse_port=self.server.config.reuse_port,
            )
        except error.CannotListenError as e:
            closing = self.server.ports.when_port_closed(name.port)
            if closing is not None:
                closing.addCallback(lambda _: self._listen(forward))
                return
            del self.forwards[name]
            self.log.warn(
                "cannot serve {name} (held at member {home}) here on {address}: {why}; visitors must "
                "reach it at another member", name=name.describe(), home=forward.home,
                address=format_host_port(host, name.port), why=str(e.socketError),
                event="edge_listen_failed", member=forward.home,
            )
            return
        self.log.info(
            "serving {name} here for member {home}", name=name.describe(), home=forward.home,
            event="edge_serving", member=forward.home, host=host, port=name.port,
        )

    def _hand_over_expired(self, forward: ForwardListener) -> None:
        forward.handing_over = None
        if self.forwards.get(forward.name) is forward and self.directory.home_of(forward.name) in (None, self.member):
            self._unserve(forward)

    def hand_over(self, host: str, port: int, listener: Factory) -> IListeningPort | None:
        """PublicPorts.adopt: a session of this member binds `host:port`, which
        this member serves as an edge (its client moved here, e.g. after its
        home failed): the listening socket goes to the session's listener at
        once, with no moment where the port is closed; visitors already
        carried to the old home finish there."""
        for forward in list(self.forwards.values()):
            if forward.port is not None and forward.host == host and port_number(forward.port) == port:
                del self.forwards[forward.name]
                listening, forward.port = forward.port, None
                forward.doStop()
                listener.doStart()
                listening.factory = listener  # type: ignore[attr-defined]  # tcp.Port's factory
                if forward.handing_over is not None:
                    cancel_call(forward.handing_over)
                    forward.handing_over = None
                    listening.startReading()  # type: ignore[attr-defined]
                self.log.info(
                    "{name}, served here for member {home}, is now this member's own", name=forward.name.describe(),
                    home=forward.home, event="edge_adopted", member=forward.home, host=host, port=port,
                )
                return listening
        return None

    def _unserve(self, forward: ForwardListener) -> defer.Deferred[Any]:
        if forward.handing_over is not None:
            cancel_call(forward.handing_over)
            forward.handing_over = None
        self.forwards.pop(forward.name, None)
        port, forward.port = forward.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

    # ------------------------------------------------------------ the home: visitors from edges

    def visitor_arrived(self, hop: Stream, info: dict[str, Any], edge: str) -> None:
        """An edge carried a visitor of `info["name"]` here: inject it into
        the session holding the name, as a local visitor would be."""
        name = name_from_json(info.get("name"))
        src = _address_field(info.get("src"), "src")
        dst = _address_field(info.get("dst"), "dst")
        if info.get("via") != "cert":  # a certificate fetch (rtunnel.fleet.certshare) is no visitor
            self.visitors_received[edge] += 1
        if self.directory.fenced:
            hop.reset(ResetCode.REFUSED, f"member {self.member} cannot prove its claims now (cut off from etcd)")
            return
        kind = self.kinds.get(type(name))
        if kind is not None:
            kind.arrived(hop, name, src, dst, edge, info)
            return
        listener = self.local_listener(name)
        if listener is None:
            hop.reset(ResetCode.REFUSED, f"{name.describe()} is not held at member {self.member}")
            return
        if not listener.admit(None, src=src, edge=edge):
            hop.reset(ResetCode.LIMIT, f"the tunnel of {name.describe()} refused the visitor (its limits)")
            return
        visitor = listener.open_stream(src, dst, edge=edge)
        if visitor is None:
            listener.open_connections -= 1
            hop.reset(ResetCode.REFUSED, f"the session holding {name.describe()} refused the visitor")
            return

        def ended() -> None:
            listener.open_connections -= 1

        Bridge(hop, visitor, src, ended)

    def local_listener(self, name: Name) -> Any:
        """The public listener serving `name` here (a PublicListener), if any."""
        if not isinstance(name, TcpPort):
            return None  # UDP ports and hostnames: their listeners join here (#15, #16)
        listeners = self.server.listeners
        if name.host != DEFAULT_HOST:
            return listeners.get((name.host, name.port))
        for (_host, port), listener in listeners.items():
            if port == name.port and listener.owner is not None:
                return listener
        return None

    # ------------------------------------------------------------ links coming and going

    def link_up(self, link: IncomingLink) -> None:
        self.log.info(
            "member link from {edge} up", edge=link.peer_member, event="member_link_up",
            member=link.peer_member, direction="in",
        )

    def link_down(self, link: MemberLink, session: Session, carried: int) -> None:
        outgoing = isinstance(link, OutgoingLink)
        member = link.peer_member or "?"
        self.ended_link_bytes[(member, "in")] += session.bytes_in
        self.ended_link_bytes[(member, "out")] += session.bytes_out
        self.log.info(
            "member link {way} {member} down; visitors it carried (reset): {n}",
            way="to" if outgoing else "from", member=link.peer_member, n=carried,
            event="member_link_down", direction="out" if outgoing else "in",
        )

    def live_links(self) -> list[tuple[str, str, Session]]:
        """(member, "out" or "in", session) of every member link up now:
        "out" the links this member dialled (as an edge), "in" the others."""
        live = [(m, "out", p.link.session) for m, p in self.peers.items() if p.link and p.link.session]
        live += [(link.peer_member or "?", "in", link.session) for link in self.incoming if link.session]
        return live

    def link_bytes(self) -> Counter[tuple[str, str]]:
        """Bytes of member-link frames per (member, "in" or "out"), the
        links gone and the links up now."""
        total = Counter(self.ended_link_bytes)
        for member, _, session in self.live_links():
            total[(member, "in")] += session.bytes_in
            total[(member, "out")] += session.bytes_out
        return total
