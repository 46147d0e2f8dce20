"""Draining a member for an upgrade (docs/fleet.md "Draining a member").

`Drain.start()` (SIGUSR2, or the admin API through the same method) asks
every client of this member to move: GOAWAY MOVED with the control address
of another member (the one with the fewest sessions). A client that follows
MOVED starts a new session there, whose BINDs take its ports over (same
credential: the newest holds), and closes its link here once its open
streams are done; meanwhile new visitors reach the new home (through the
edges). New sessions and resumes here are sent the same way (ERROR MOVED
to a client that follows it). When no session is left here, or after
`timeout` seconds, `stop` is called (the member exits as on SIGTERM).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from rtunnel import wire
from rtunnel.addresses import format_host_port
from rtunnel.fleet.redirect import SessionLocator
from rtunnel.moved import moved_reason
from rtunnel.server import TunnelServer
from rtunnel.wire import ErrorCode, FrameType

CHECK_EVERY = 0.25  # seconds between looks at the sessions left (and at newly attached ones)


class Drain:
    """Moves this member's clients to other members, then stops it."""

    log = Logger()

    def __init__(
        self, reactor: Any, server: TunnelServer, locator: SessionLocator, stop: Callable[[], None],
        timeout: float = 300.0,
    ) -> None:
        self.reactor = reactor
        self.server = server
        self.locator = locator
        self.stop = stop
        self.timeout = timeout
        self.target: tuple[str, int, str] | None = None
        self.started: float | None = None
        self._told: set[tuple[int, str]] = set()  # (id of the link, session id) sent GOAWAY MOVED
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor
        self._stopped = False

    @property
    def draining(self) -> bool:
        return self.started is not None

    def install_signal(self) -> None:
        """SIGUSR2 starts the drain; the --workers parent's MACHINE_DRAIN_SIGNAL
        starts it towards other machines only (both from the reactor's thread)."""
        from rtunnel.fleet.workers import MACHINE_DRAIN_SIGNAL

        signal.signal(signal.SIGUSR2, lambda _n, _f: self.reactor.callFromThread(self.start))
        signal.signal(MACHINE_DRAIN_SIGNAL, lambda _n, _f: self.reactor.callFromThread(self.start, True))

    def start(self, whole_machine: bool = False) -> str:
        """Start draining (again: nothing new). With `whole_machine` (every
        worker of this machine drains) the clients go to another machine's
        member only. Returns what happens, for the caller to show."""
        if self.started is not None:
            return self.describe()
        target = self.locator.another_member(exclude_siblings=whole_machine)
        if target is None:
            where = "of another machine " if whole_machine else ""
            message = (
                f"cannot drain: no other fleet member {where}with a control address is up to move the "
                "clients to; start another member first, or stop this one with SIGTERM"
            )
            self.log.error("{message}", message=message, event="drain_refused")
            return message
        self.target = target
        self.started = self.reactor.seconds()
        self.server.moved_to = target
        self.log.warn(
            "draining: asking {n} client(s) to move to member {member} at {where}; exiting when none is "
            "left (at most {t:.0f} s)",
            n=len(self.server.sessions), member=target[2], where=format_host_port(target[0], target[1]),
            t=self.timeout, event="drain_started", sessions=len(self.server.sessions), target=target[2],
        )
        self._loop.start(CHECK_EVERY, now=True)
        return self.describe()

    def describe(self) -> str:
        if self.target is None:
            return "not draining"
        return (
            f"draining to member {self.target[2]} ({format_host_port(self.target[0], self.target[1])}): "
            f"{len(self.server.sessions)} session(s) left"
        )

    def _check(self) -> None:
        assert self.target is not None and self.started is not None
        host, port, member = self.target
        for session in list(self.server.sessions.values()):
            link = session.link
            key = (id(link), session.id)
            if link is None or key in self._told or link.session is None or not link.session.can_send:
                continue
            self._told.add(key)
            link.send(wire.encode_coded(
                FrameType.GOAWAY, 0, ErrorCode.MOVED,
                moved_reason(host, port, f"this member is being drained; move to member {member}"),
            ))
        left = len(self.server.sessions)
        waited = self.reactor.seconds() - self.started
        if left and waited < self.timeout:
            return
        self._loop.stop()
        if not self._stopped:
            self._stopped = True
            self.log.warn(
                "drained: {what}; stopping",
                what="no session left" if not left else f"{left} session(s) left after {self.timeout:.0f} s",
                event="drain_finished", sessions=left, seconds=round(waited, 1),
            )
            self.stop()
