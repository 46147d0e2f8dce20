"""The member link protocol (docs/fleet.md "Member links"): a mutual-TLS
connection between two members of a fleet (rtunnel.fleet.ca) whose
HELLO/WELCOME name both members, checked against their certificates, then
an ordinary mux Session. The edge's end (`OutgoingLink`, dialled by its
`rtunnel.fleet.edge.PeerLink`) opens one stream per visitor; the home's end
(`IncomingLink`) only takes streams (`HomeSide`: each is handed to
`FleetLinks.visitor_arrived`). Also the public names as OPEN carries them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel import wire
from rtunnel.fleet.ca import MEMBER_NAME, member_name_of
from rtunnel.link import ControlLink
from rtunnel.mux import ProtocolViolation, Session, Stream, cancel_call
from rtunnel.server.claims import Hostname, Name, TcpPort, UdpPort
from rtunnel.wire import ErrorCode, Frame, FrameType, ResetCode

if TYPE_CHECKING:  # the coordinator and the edge own the links (types only: they import this module)
    from rtunnel.fleet.edge import PeerLink
    from rtunnel.fleet.links import FleetLinks

#: The member-link protocol's version (HELLO "version").
MEMBER_LINK_VERSION = 1


class ClassLogger(Logger):
    """A class's logger whose namespace is `module.Class` for the module
    given, not the one the class now lives in: the member link's classes
    moved out of rtunnel.fleet.links, their log events' namespaces did not."""

    def __init__(self, module: str) -> None:
        super().__init__(namespace=module)
        self.module = module

    def __get__(self, instance: object, owner: type | None = None) -> Logger:
        assert owner is not None
        source: Any = owner if instance is None else instance
        return Logger(f"{self.module}.{owner.__name__}", source, observer=self.observer)


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


def address_field(value: Any, what: str) -> list[Any]:
    """OPEN's `src` or `dst`: [host, port], checked; ProtocolViolation if not."""
    if (
        isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and len(value[0]) <= 64
        and isinstance(value[1], int) and 0 <= value[1] < 65536
    ):
        return value
    raise ProtocolViolation(f"member link OPEN: invalid {what} {str(value)[:100]!r}")


# ---------------------------------------------------------------- the link


class MemberLink(ControlLink):
    """One member link, either end: the HELLO/WELCOME that names both
    members (checked against their certificates), then a mux Session."""

    log = ClassLogger("rtunnel.fleet.links")  # the namespace its events always had

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
