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
member links (`IncomingLink`) and only receives streams on them.
Two members serving each other's tunnels hold two links, one each way.

One module per part: `memberlink` (the link protocol and its handshake,
names on the wire), `edge` (`ForwardListener`, `ForwardedVisitor`,
`PeerLink`), `bridge` (the home's `Bridge`); this one is `FleetLinks`, the
coordinator that keeps them in step with the directory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from rtunnel import wire
from rtunnel.addresses import format_host_port
from rtunnel.descriptors import listen_tcp
from rtunnel.fleet.bridge import Bridge
from rtunnel.fleet.ca import MemberIdentity
from rtunnel.fleet.edge import ForwardListener, PeerLink
from rtunnel.fleet.memberlink import IncomingLink, MemberLink, OutgoingLink, address_field, name_from_json
from rtunnel.fleet.workers import sibling_workers
from rtunnel.mux import Session, Stream, cancel_call
from rtunnel.server.claims import Name, TcpPort
from rtunnel.tcp import port_number
from rtunnel.tlslink import LinkTLSFactory
from rtunnel.wire import ResetCode

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

    def lost_touch(self, member: str) -> bool:
        """Whether our link to `member` was up and is down now, not made
        again (it is redialled within about 2 s while the member lives): the
        member is most likely gone, though its lease may not have run out."""
        peer = self.peers.get(member)
        return peer is not None and peer.lost and peer.link is None

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
            self.peer(home)  # dialled now (see below)
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
        # the link to the home is made now, not at the first visitor: that visitor does not wait
        # for it, and a home that dies is noticed at once (its link is cut: lost_touch)
        self.peer(home)

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
        src = address_field(info.get("src"), "src")
        dst = address_field(info.get("dst"), "dst")
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
