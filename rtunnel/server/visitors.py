"""A public port's visitors: the listener's factory and each visitor's
connection, a stream of the port holder's session.

While the holder is detached, visitors wait (paused); a session that takes
the port over (rtunnel.server.ports) takes them too: their OPEN crossed no
link yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel.addresses import host_port
from rtunnel.limits import VISITORS_OVER_LIMIT, RefusalLog
from rtunnel.mux import SessionBufferFull, Stream, StreamIdsExhausted, StreamProtocol
from rtunnel.server.claims import Claim
from rtunnel.tcp import port_number, tcp_transport
from rtunnel.wire import ResetCode

if TYPE_CHECKING:
    from rtunnel.server.session import ServerSession


def _address(addr: IAddress | None) -> list[Any]:
    return list(host_port(addr)) if addr is not None else ["?", 0]


class PublicListener(Factory):
    """A bound public port. Each visitor becomes a stream of the holder's
    session; while the holder is detached, visitors wait (paused)."""

    log = Logger()
    noisy = False

    def __init__(self, reactor: Any, host: str) -> None:
        self.host = host
        self.claim: Claim[ServerSession] | None = None  # None: released (or not yet claimed)
        self.port: IListeningPort | None = None
        # visitors that arrived while the owner was detached: their OPEN has
        # crossed no link, so a session taking the port over can take them too
        # (a dict used as a set: an empty one costs 64 bytes in every session, a set 216)
        self.away: dict[_VisitorConnection, None] = {}
        # max_connections_per_tunnel (rtunnel.limits); plain ints for the metrics
        self.open_connections = 0  # visitors connected now
        self.visitors_refused = 0  # closed at once: the tunnel had its limit
        self.refusals = RefusalLog(reactor)  # stopped by PublicPorts.release

    @property
    def owner(self) -> ServerSession | None:
        """The session holding the port (None once released)."""
        return self.claim.holder if self.claim is not None else None

    @property
    def tunnel_id(self) -> int:
        """The owner's tunnel id for the port."""
        return self.claim.tag if self.claim is not None else 0

    @property
    def key(self) -> tuple[str, int]:
        assert self.port is not None
        return (self.host, port_number(self.port))

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return _VisitorConnection(self) if self.admit(addr) else None

    def admit(self, addr: IAddress | None, src: list[Any] | None = None, edge: str | None = None) -> bool:
        """True if the holder's session and the tunnel take one more visitor
        (counted in `open_connections` until its connection ends), else the
        refusal is logged. A visitor another fleet member carries here
        (rtunnel.fleet.links) comes with its `src` and that `edge` member."""
        owner = self.owner
        if owner is None or owner.expired:
            return False
        mux = owner.mux_session
        refusals = owner.server.refusals
        more = {"edge": edge} if edge is not None else {}
        if len(mux.streams) >= mux.settings.max_streams:
            refusals.refused(
                ("max_streams", owner.id),
                "refusing visitor {visitor}: session {session} has {n} streams, the maximum",
                visitor=src or _address(addr), n=len(mux.streams),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="max_streams",
                **more,
            )
            return False
        if owner.detached and mux.queued_reliable >= 2 * mux.settings.max_streams:
            refusals.refused(
                ("detached_queue_full", owner.id),
                "refusing visitor {visitor}: too many waiting for the client of session {session} to come back",
                visitor=src or _address(addr),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="detached_queue_full",
                **more,
            )
            return False
        if not mux.room_for_stream():  # the session's budget (docs/security.md "Memory per session")
            refusals.refused(
                ("session_buffer_full", owner.id),
                "refusing visitor {visitor}: {why}", visitor=src or _address(addr), why=mux.why_full(),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="session_buffer_full",
                **more,
            )
            return False
        limit = owner.server.limits_for(owner.credential).max_connections_per_tunnel
        if limit is not None and self.open_connections >= limit:
            self._refuse_over_limit(owner, limit)
            return False
        self.open_connections += 1  # until the connection is lost, opened or refused
        return True

    def open_stream(self, src: list[Any], dst: list[Any], edge: str | None = None) -> Stream | None:
        """Send OPEN for a visitor who connected from `src` to `dst` (the
        address it reached, not the bind address; at fleet member `edge` if
        that is not this one); None if it is refused."""
        owner = self.owner
        if owner is None or owner.expired:
            return None
        info: dict[str, Any] = {"src": src, "dst": dst}
        if edge is not None:
            info["edge"] = edge
        try:
            return owner.mux_session.open_stream(self.tunnel_id, info)
        except SessionBufferFull as e:
            owner.server.refusals.refused(
                ("session_buffer_full", owner.id), "refusing visitor: {why}", why=str(e),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason="session_buffer_full",
            )
            return None
        except StreamIdsExhausted as e:
            self.log.warn(
                "refusing visitor: {why}", why=str(e),
                event="visitor_refused", session=owner.id[:8], credential=owner.credential, reason=str(e),
            )
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

    stream: Stream | None

    def __init__(self, listener: PublicListener) -> None:
        self.listener = listener
        self.stream = None

    def connectionMade(self) -> None:
        transport = tcp_transport(self.transport)
        self.stream = self.listener.open_stream(_address(transport.getPeer()), _address(transport.getHost()))
        if self.stream is None:
            transport.abortConnection()
            return
        owner = self.listener.owner
        if owner is not None and owner.detached:
            self.listener.away[self] = None
        super().connectionMade()

    def move_to_owner(self) -> None:
        """Carry on as a stream of the listener's (new) owner: a visitor that
        arrived while the previous owner was away has sent nothing over any
        link, so it is opened again there instead of being reset."""
        old = self.stream
        if old is None or old.closed:
            return
        owner = self.listener.owner
        if owner is None or len(owner.mux_session.streams) >= owner.mux_session.settings.max_streams:
            old.reset(ResetCode.LIMIT, "the tunnel's new session has no room for the visitor")
            return
        transport = tcp_transport(self.transport)
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
        self.listener.away.pop(self, None)
        if self.stream is not None:
            super().connectionLost(reason)
