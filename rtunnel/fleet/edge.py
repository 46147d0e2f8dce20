"""The edge (docs/fleet.md "Member links"): names held at another member,
served here. `ForwardListener` listens on such a port; each visitor is a
`ForwardedVisitor`, a stream of the member link to the name's home, which
`PeerLink` (one outgoing link per home, reconnected with backoff) carries,
or keeps waiting, unread, while the link is down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.addresses import host_port
from rtunnel.fleet.memberlink import ClassLogger, OutgoingLink, name_to_json
from rtunnel.localsocket import StreamProtocol
from rtunnel.mux import Session, SessionBufferFull, Stream, StreamIdsExhausted, cancel_call
from rtunnel.server.claims import Name
from rtunnel.tcp import tcp_transport
from rtunnel.tlslink import LinkTLSEndpoint

if TYPE_CHECKING:  # the coordinator owns the edge (a type only: it imports this module)
    from rtunnel.fleet.links import FleetLinks


def _address(addr: IAddress | None) -> list[Any]:
    return list(host_port(addr)) if addr is not None else ["?", 0]


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

    log = ClassLogger("rtunnel.fleet.links")  # the namespace its events always had

    def __init__(self, links: FleetLinks, member: str) -> None:
        self.links = links
        self.member = member
        self.link: OutgoingLink | None = None
        self.lost = False  # the link was up and is down now (its member is likely gone)
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
        self.lost = False
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
            self.lost = True

    def stop(self) -> defer.Deferred[None]:
        for visitor in list(self.waiting):
            visitor.transport.abortConnection()  # type: ignore[union-attr]
        self.waiting.clear()
        if self.link is not None:
            self.link.lose()  # the session lets go first: TLS does not close under a registered producer
        return defer.maybeDeferred(self.service.stopService).addCallback(lambda _: None)
