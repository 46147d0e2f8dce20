"""The client's moves between fleet members (docs/fleet.md "Clients and resume").

ERROR MOVED (the handshake's answer: our session lives at another member)
sends the next attempt to that member (`follow`). GOAWAY MOVED (the member
is drained) is a move of a running session: the client starts a new
session at the member named, and `Mover` keeps the old session aside on
its link (`draining`) until its last stream ends, then says GOAWAY on it
and closes it. Which link is current, and when to move, is the client's
state machine's business (`rtunnel.client`); this module owns only the old
links.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.logger import Logger

from rtunnel import wire
from rtunnel.addresses import format_host_port
from rtunnel.link import ControlLink
from rtunnel.moved import parse_moved
from rtunnel.mux import Session
from rtunnel.servers import ServerListEndpoint
from rtunnel.wire import ErrorCode, FrameType, ResetCode

L = TypeVar("L", bound=ControlLink)


class Mover(Generic[L]):
    """The links of sessions the client moved away from, until each is lost.

    An old link stays in `draining` from the move until it is lost (also
    after we closed it), so that its loss is never taken for the current
    link's (`holds`). `on_move(old link)` asks for a new connection for the
    moved session; `on_drained(old link)` says an old link is done."""

    def __init__(self, reactor: Any, log: Logger) -> None:
        self.reactor = reactor
        self.log = log  # the client's: these events are the client's
        self.draining: dict[L, Session] = {}
        self._closing: set[L] = set()  # old links we closed, until they are lost
        self.on_move: Callable[[L], None] | None = None
        self.on_drained: Callable[[L], None] | None = None

    def holds(self, link: L) -> bool:
        """`link` is an old session's (its events are not the client's state's)."""
        return link in self.draining

    def follow(self, reason: str, servers: ServerListEndpoint | None) -> None:
        """The server says our session lives at another fleet member (ERROR
        MOVED): the next attempt goes there first, at once. A hint from a
        server we reached by a hint is not followed (no redirect loops)."""
        hint = parse_moved(reason)
        if hint is None or servers is None or servers.current_is_hint:
            self.log.warn(
                "the server says our session is elsewhere but {why}: {reason}; trying the servers in order",
                why="names no address" if hint is None else "it was reached through such a hint already",
                reason=reason, event="moved_ignored",
            )
            return
        self.log.info(
            "the server sends us to another fleet member, {where}: connecting there", where=format_host_port(*hint),
            event="session_moved", server=format_host_port(*hint), reason=reason,
        )
        servers.move_to(hint[0], hint[1], servers.current)

    def move_away(self, link: L, session: Session, host: str, port: int, servers: ServerListEndpoint | None) -> None:
        """GOAWAY MOVED (the member is drained): the client has let go of
        `session` and starts a new one at `host:port` (its BINDs take the
        ports over: same credential, the newest holds); the old session's
        open streams finish on `link`, which then closes (GOAWAY, so the old
        member ends the session)."""
        self.draining[link] = session
        self.log.info(
            "the server is being drained: moving to {where}; {n} open connections finish on the old link",
            where=format_host_port(host, port), n=len(session.streams),
            event="session_moving", server=format_host_port(host, port), streams=len(session.streams),
        )
        if servers is not None:
            servers.move_to(host, port, servers.current)
        if self.on_move is not None:
            self.on_move(link)
        self._check_drained(link)

    def stream_closed(self, session: Session) -> None:
        """A stream of `session` closed: if it was an old session's last,
        its link closes (soon: not inside the session's own call)."""
        if session.streams:
            return
        for link, old in list(self.draining.items()):
            if old is session:
                self.reactor.callLater(0, self._check_drained, link)

    def _check_drained(self, link: L) -> None:
        """The old session has no stream left: say goodbye and close its
        link (it stays in `draining` until it is lost, so that its loss is
        never taken for the current link's)."""
        session = self.draining.get(link)
        if session is None or session.streams or link in self._closing:
            return
        self._closing.add(link)
        if session.can_send:
            link.send(wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "client moved to another member"))
        link.lose()

    def close_all(self) -> None:
        """Stopping: reset what is left on every old link and close it."""
        for link in list(self.draining):
            session = self.draining.get(link)
            if session is not None and session.can_send and link not in self._closing:
                session.reset_all(ResetCode.SHUTDOWN, "client stopped")
                link.send(wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "client stopped"))
            self._closing.add(link)
            link.lose()

    def link_lost(self, link: L) -> None:
        """An old link is lost: its session ends (what is left on it is reset)."""
        self._closing.discard(link)
        session = self.draining.pop(link, None)
        if session is None:
            return
        if session.streams:
            session.close(ResetCode.ABORTED, "the old member closed the link")
        self.log.info("the link of the session we moved away from is closed", event="old_link_closed")
        if self.on_drained is not None:
            self.on_drained(link)
