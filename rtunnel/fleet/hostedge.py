"""Hostnames at every member (docs/fleet.md "Hostnames at every member").

A visitor of a hostname (`--http`/`--https` request, or a TLS ClientHello
for a `--tls` passthrough name) may reach any member. When the name is held
at another member (the directory's `claims/host/<name>`), this member is
its edge:

* HTTP (the `--http` port, and `--https` terminated with this member's own
  certificate): the HTTP edge (rtunnel.server.httpedge) does all the HTTP
  work here, as for a name held here — parsing, limits, X-Forwarded-* and
  Forwarded with the visitor's real address, keep-alive, WebSocket — and
  routes the request to a `RemoteHostTunnel`: its stream is a stream of the
  member link to the home (OPEN `name` `{"kind": "host", "hostname": ...}`,
  `"via": "http"`), which the home bridges byte for byte into a stream of
  the client session holding the name.
* TLS passthrough: the edge reads the ClientHello's SNI only and relays
  the raw bytes (OPEN without `via`): the visitor sees the service's own
  certificate.

The home's side (`HostEdge.arrived`) checks that it holds the name and
that the edge carries what the tunnel serves (HTTP to an "http" tunnel,
raw TLS to a "tls" one), then bridges (rtunnel.fleet.bridge.Bridge) with the
tunnel's stream opened as a local visitor's is, with the real `src`, the
`dst` reached at the edge and the `edge`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from rtunnel.fleet.bridge import Bridge, _BridgeEnd
from rtunnel.fleet.certshare import VIA_CERT, CertificateShare
from rtunnel.fleet.edge import ForwardedVisitor, PeerLink
from rtunnel.fleet.links import FleetLinks
from rtunnel.fleet.memberlink import name_to_json
from rtunnel.mux import Session, SessionBufferFull, Stream, StreamIdsExhausted
from rtunnel.server.claims import Hostname, Name
from rtunnel.wire import ResetCode


class RemoteOwner:
    """What the HTTP edge asks of a tunnel's owner, for a name held at
    another member: "detached" while no member link to the home is up (a
    request then waits for it, at most --offline-wait, as for a detached
    session); "expired" once the name moved on."""

    def __init__(self, tunnel: RemoteHostTunnel) -> None:
        self.tunnel = tunnel

    @property
    def detached(self) -> bool:
        return self.tunnel.claim is not None and self.tunnel.session() is None

    @property
    def expired(self) -> bool:
        return self.tunnel.claim is None


class HostForward:
    """The `forward` of a passthrough visitor (ForwardedVisitor): the name and its home."""

    def __init__(self, links: FleetLinks, name: Hostname, home: str) -> None:
        self.links = links
        self.name = name
        self.home = home

    def peer(self) -> PeerLink:
        return self.links.peer(self.home)


class RemoteHostTunnel:
    """A hostname held at another member, as the HTTP edge routes to it
    (the interface of rtunnel.server.hostnames.HostTunnel that httpedge uses)."""

    tunnel_id = 0

    def __init__(self, hosts: HostEdge, name: str, home: str, kind: str) -> None:
        self.hosts = hosts
        self._name = name
        self.home = home
        self.kind = kind  # "http" or "tls", from the claim's record
        #: not None while the directory says the name is held at `home`
        self.claim: tuple[str, str] | None = (name, home)
        self.owner = RemoteOwner(self)
        self.forward = HostForward(hosts.links, Hostname(name), home)

    @property
    def name(self) -> str:
        return self._name

    def session(self) -> Session | None:
        """The member link's session to the home, if it is up (dialled if not,
        while the name is held there: never once it moved or the edge stopped)."""
        if self.claim is None:
            return None
        return self.hosts.links.peer(self.home).session

    def room(self) -> str | None:
        """None if the member link can take one more stream now, else why not."""
        if self.claim is None:
            return "the name moved to another member"
        session = self.session()
        if session is None:
            return f"the member link to {self.home} is not up"
        if len(session.streams) >= session.settings.max_streams:
            return f"the member link to {self.home} carries its most streams"
        if not session.room_for_stream():
            return f"the member link to {self.home} has its session buffer full"
        return None

    def open_stream(self, src: list[Any], dst: list[Any]) -> Stream | None:
        """A stream of the member link to the home for one visitor's HTTP
        requests to this name; None if the link is not up or refuses it."""
        session = self.session()
        if session is None or self.claim is None:
            return None
        links = self.hosts.links
        info = {
            "name": name_to_json(self.forward.name), "src": src, "dst": dst, "edge": links.member, "via": "http",
        }
        try:
            stream = session.open_stream(0, info)
        except (SessionBufferFull, StreamIdsExhausted):
            return None
        links.visitors_forwarded[self.home] += 1
        return stream

    def carry(self) -> Protocol:
        """The protocol that relays a passthrough visitor's raw bytes to the
        home (waiting for the member link, bounded, if it is not up)."""
        return PassthroughVisitor(self.forward)


class PassthroughVisitor(ForwardedVisitor):
    """A TLS passthrough visitor at an edge: the bytes the SNI router read
    (the ClientHello) are kept until its stream to the home is open."""

    def __init__(self, forward: Any) -> None:
        super().__init__(forward)
        self.early = b""

    def dataReceived(self, data: bytes) -> None:
        if self.stream is None:
            self.early += data  # only the ClientHello: the socket is paused while it waits
            return
        super().dataReceived(data)

    def start(self, session: Session) -> None:
        super().start(session)
        early, self.early = self.early, b""
        if self.stream is not None and early:
            super().dataReceived(early)


ACME_CHALLENGE = re.compile(rb"GET /\.well-known/acme-challenge/([A-Za-z0-9_-]{1,200}) HTTP/1\.[01]\r\n")


class _ChallengeEnd(_BridgeEnd):
    """The hop's end of a ChallengeBridge: the edge's first bytes are the
    request head it wrote; an HTTP-01 challenge this member's certificate
    source has pending is answered here, never sent to the client."""

    answered = False
    checked = False

    def write(self, data: bytes) -> None:
        if self.answered:
            return
        if not self.checked:
            self.checked = True
            match = ACME_CHALLENGE.match(data)
            bridge = self.bridge
            assert isinstance(bridge, ChallengeBridge)
            answer = bridge.challenge_response(match.group(1).decode()) if match else None
            if answer is not None:
                self._answer(answer)
                return
        super().write(data)

    def _answer(self, answer: bytes) -> None:
        self.answered = True
        other, self.other = self.other, None
        if other is not None:
            other.other = None  # the client's stream ends alone: the hop carries the answer
            if other.stream is not None and not other.stream.closed:
                other.stream.reset(ResetCode.ABORTED, "the server answered the request (an ACME challenge)")
        hop = self.stream
        assert hop is not None
        hop.local_data(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n"
            b"connection: close\r\ncache-control: no-store\r\n\r\n%b" % (len(answer), answer)
        )
        hop.local_eof()

    def half_close(self) -> None:
        if not self.answered:
            super().half_close()

    def pause_reading(self) -> None:
        if not self.answered:
            super().pause_reading()

    def resume_reading(self) -> None:
        if not self.answered:
            super().resume_reading()

    def abort(self) -> None:
        if self.answered:
            self._end()
            return
        super().abort()


class ChallengeBridge(Bridge):
    """A Bridge of an HTTP visitor carried from an edge: an ACME HTTP-01
    challenge for a name held here (its certificate is ordered by this
    member) that reached another member is answered by this member."""

    hop_end_class = _ChallengeEnd

    def __init__(
        self, hop: Stream, visitor: Stream, src: list[Any], on_end: Callable[[], None],
        challenge_response: Callable[[str], bytes | None],
    ) -> None:
        self.challenge_response = challenge_response
        super().__init__(hop, visitor, src, on_end)


#: at most one edge_no_certificate line per hostname in this many seconds
NO_CERTIFICATE_LOG_EVERY = 60.0


class EdgeCertificates:
    """This member's certificate source, with the certificates of names held
    at other members fetched from their homes layered over it (HostEdge.certs,
    rtunnel.fleet.certshare), saying (in the log) why a TLS visitor of a name
    held elsewhere gets an unrecognized_name alert here: no certificate
    here for it (yet: a miss asks the home, at a bounded rate)."""

    log = Logger()

    def __init__(self, source: Any, hosts: HostEdge) -> None:
        self.source = source
        self.hosts = hosts
        self._logged: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    def context_for(self, hostname: str) -> Any:
        context = self.hosts.certs.context_for(hostname)  # held elsewhere: the home's certificate first
        if context is None:
            context = self.source.context_for(hostname)
        if context is None:
            tunnel = self.hosts.route(hostname)
            if tunnel is not None and tunnel.kind == "http":
                self.hosts.certs.missed(hostname)
                now = self.hosts.links.reactor.seconds()
                if now - self._logged.get(hostname, -NO_CERTIFICATE_LOG_EVERY) >= NO_CERTIFICATE_LOG_EVERY:
                    self._logged[hostname] = now
                    if len(self._logged) > 10_000:
                        self._logged.clear()
                    self.log.warn(
                        "no certificate here for hostname {hostname} (held at member {home}): its HTTPS "
                        "visitors at this member get an unrecognized_name alert until it is fetched from "
                        "its home (an ACME certificate the home has); if this lasts, check the home's "
                        "acme_order_failed lines, or give every member a certificate that covers it "
                        "(--https-cert, e.g. a wildcard)", hostname=hostname, home=tunnel.home,
                        event="edge_no_certificate", member=tunnel.home,
                    )
        return context

    def challenge_response(self, token: str) -> bytes | None:
        answer: bytes | None = self.source.challenge_response(token)
        return answer

    def name_claimed(self, hostname: str) -> None:
        self.source.name_claimed(hostname)

    def name_released(self, hostname: str) -> None:
        self.source.name_released(hostname)


class HostEdge:
    """Hostnames held at other members, served by this member's HTTP edge,
    and the visitors other edges carry here for the hostnames held here."""

    log = Logger()

    def __init__(self, links: FleetLinks, edge: Any) -> None:
        self.links = links
        self.edge = edge  # rtunnel.server.httpedge.HttpEdge
        self.remote: dict[str, RemoteHostTunnel] = {}  # normalised name (or "*.zone") -> its home's tunnel
        edge.elsewhere = self.route
        routes = edge.routes
        local = routes.certificates.source if isinstance(routes.certificates, EdgeCertificates) else routes.certificates
        #: the ACME certificates of names held elsewhere (fetched from their homes), and the home's answers
        self.certs = CertificateShare(links, local)
        if routes.certificates is not None and not isinstance(routes.certificates, EdgeCertificates):
            routes.certificates = EdgeCertificates(routes.certificates, self)
        links.kinds[Hostname] = self
        for name, home in list(links.directory.remote_names()):
            if isinstance(name, Hostname):
                self.moved(name, home)

    def stop(self) -> None:
        if self.edge.elsewhere == self.route:
            self.edge.elsewhere = None
        self.links.kinds.pop(Hostname, None)
        routes = self.edge.routes
        if isinstance(routes.certificates, EdgeCertificates) and routes.certificates.hosts is self:
            routes.certificates = routes.certificates.source
        for tunnel in self.remote.values():
            tunnel.claim = None
        self.remote.clear()
        self.certs.stop()

    # ------------------------------------------------------------ the edge

    def route(self, name: str) -> RemoteHostTunnel | None:
        """The tunnel at another member serving `name` (its own claim, else
        the wildcard one level up), as HostRoutes.route does for names held here."""
        tunnel = self.remote.get(name)
        if tunnel is None and "." in name and not name.startswith("*."):
            tunnel = self.remote.get("*." + name.split(".", 1)[1])
        return tunnel

    def moved(self, name: Name, home: str | None) -> None:
        """The directory says hostname `name` is held at `home` now (None: released)."""
        assert isinstance(name, Hostname)
        old = self.remote.get(name.name)
        if home is None or home == self.links.member:
            self.certs.released(name.name)
            if old is not None:
                del self.remote[name.name]
                old.claim = None
                self._move_waiting(old, None)
                self.log.info(
                    "no longer serving hostname {hostname} here for member {home}", hostname=name.name,
                    home=old.home, event="edge_stopped", member=old.home,
                )
            return
        claim_kind = getattr(self.links.directory, "claim_kind", None)
        kind = (claim_kind(name) if claim_kind is not None else "") or "http"
        if kind == "http":
            self.certs.held_at(name.name, home)
        else:
            self.certs.released(name.name)  # passthrough: the client's service holds its certificate
        if old is not None and old.home == home and old.kind == kind:
            return
        new = self.remote[name.name] = RemoteHostTunnel(self, name.name, home, kind)
        if old is not None:
            old.claim = None
            self._move_waiting(old, new)
        self.links.peer(home)  # dialled now: the first visitor need not wait for the link
        self.log.info(
            "serving hostname {hostname} ({kind}) here for member {home}", hostname=name.name, kind=kind,
            home=home, event="edge_serving", member=home,
        )

    def _move_waiting(self, old: RemoteHostTunnel, new: RemoteHostTunnel | None) -> None:
        """Passthrough visitors still waiting for the old home's link go to
        the new home (nothing of theirs crossed a link yet), or are closed."""
        peer = self.links.peers.get(old.home)
        if peer is None:
            return
        moving = [visitor for visitor in peer.waiting if visitor.forward is old.forward]
        for visitor in moving:
            peer.stop_waiting(visitor)
            if new is None:
                visitor.transport.abortConnection()  # type: ignore[union-attr]
                continue
            visitor.forward = new.forward
            self.links.peer(new.home).carry(visitor, waited=True)

    # ------------------------------------------------------------ the home

    def arrived(
        self, hop: Stream, name: Name, src: list[Any], dst: list[Any], edge: str, info: dict[str, Any],
    ) -> None:
        """An edge carried a visitor of hostname `name` here: bridge it into
        a stream of the session holding the name, opened as a local visitor's."""
        assert isinstance(name, Hostname)
        if info.get("via") == VIA_CERT:  # not a visitor: an edge asks for the name's certificate
            self.certs.answer(hop, name.name, edge)
            return
        tunnel = self.links.server.hostnames.tunnels.get(name.name)
        if tunnel is None or tunnel.claim is None or tunnel.owner is None:
            hop.reset(ResetCode.REFUSED, f"hostname {name.name[:253]} is not held at member {self.links.member}")
            return
        via = "http" if info.get("via") == "http" else "tls"
        if tunnel.kind != via:
            hop.reset(
                ResetCode.REFUSED,
                f"hostname {tunnel.name} is a {tunnel.kind} tunnel here; member {edge} carried {via} to it",
            )
            return
        why = tunnel.room()
        if why is not None:
            hop.reset(ResetCode.LIMIT, f"hostname {tunnel.name}: {why}")
            return
        owner = tunnel.owner
        try:
            visitor = owner.mux_session.open_stream(tunnel.tunnel_id, {"src": src, "dst": dst, "edge": edge})
        except SessionBufferFull:
            hop.reset(ResetCode.LIMIT, f"hostname {tunnel.name}: the tunnel's session buffer is full")
            return
        except StreamIdsExhausted as e:
            owner.expire(str(e))
            hop.reset(ResetCode.REFUSED, f"hostname {tunnel.name}: the session holding it ended")
            return
        certificates = self.links.server.hostnames.certificates
        if via == "http" and certificates is not None:
            ChallengeBridge(hop, visitor, src, lambda: None, certificates.challenge_response)
            return
        Bridge(hop, visitor, src, lambda: None)
