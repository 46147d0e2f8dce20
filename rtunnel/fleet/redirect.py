"""Resumes that reach a member other than the session's home, and the
member a draining member sends its clients to (docs/fleet.md "Clients and
resume", "Draining a member").

A member knows every session's home from the directory (`sessions/<id>`)
and every member's control address from `members/<name>` ("control": its
control port endpoint string, "public_host"). A client that follows MOVED
(its HELLO says `"accepts": ["moved"]`) and asks to resume a session held
elsewhere is answered ERROR MOVED with the home's `HOST:PORT`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from rtunnel.addresses import WILDCARD_HOSTS
from rtunnel.fleet.directory import FleetDirectory
from rtunnel.server import TunnelServer

WORKER_NAMES_ENV = "RTUNNEL_WORKER_NAMES"  # set by --workers N's parent: its workers' member names

_PORT = re.compile(r"^(?:tcp6?|ssl):(?:port=)?(\d+)(?::|$)")
_INTERFACE = re.compile(r"(?:^|:)interface=((?:\\:|[^:])*)")


def control_address(record: dict[str, Any]) -> tuple[str, int] | None:
    """The (host, port) a client reaches a member's control port at, from
    its `members/<name>` record: the control endpoint's port, on its
    interface, or on the member's public host if it listens on every
    address. None for an endpoint without a port of its own (systemd:)."""
    control, public_host = record.get("control"), record.get("public_host")
    if not isinstance(control, str):
        return None
    port = _PORT.match(control)
    if port is None:
        return None
    interface = _INTERFACE.search(control)
    host = interface.group(1).replace("\\:", ":") if interface is not None else ""
    if host in WILDCARD_HOSTS or host == "::":
        if not isinstance(public_host, str) or not public_host or public_host in WILDCARD_HOSTS:
            return None
        host = public_host
    return host, int(port.group(1))


def _worker_siblings() -> frozenset[str]:
    """The member names of this machine's `--workers N` (empty for a lone member)."""
    return frozenset(name for name in os.environ.get(WORKER_NAMES_ENV, "").split(",") if name)


def _process_gone(pid: Any) -> bool:
    """Whether no process `pid` runs on this machine (False when unsure)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # it exists (another user's), or we cannot tell
    return False


class SessionLocator:
    """Where a session lives, if at another member (TunnelServer.session_elsewhere).

    A session is not sent on to a member known to have lost it: a run of
    that member other than the one that wrote the session (it restarted),
    a sibling worker of this machine whose process is gone (its lease has
    not run out yet, and "there" is this very control port), or a member
    our member link to was cut and not made again (`lost_touch`: killed, or
    cut off from us). Such a resume fails here, and the client starts a new
    session and takes its ports back at once instead of bouncing between
    here and a dead address until the member's lease expires."""

    def __init__(
        self, directory: FleetDirectory, siblings: frozenset[str] | None = None,
        lost_touch: Callable[[str], bool] | None = None,
    ) -> None:
        self.directory = directory
        self.siblings = _worker_siblings() if siblings is None else siblings
        self.lost_touch = lost_touch

    def __call__(self, session_id: str, credential: str) -> tuple[str, int, str] | None:
        info = self.directory.sessions.get(session_id)
        if not info or info.get("credential") != credential:
            return None  # unknown, or another credential's: no hint (nothing to learn by guessing ids)
        member = info.get("member")
        if not isinstance(member, str) or member == self.directory.member:
            return None
        if not self.directory.same_run(member, session_id):
            return None
        record = self.directory.members.get(member) or {}
        if member in self.siblings and _process_gone(record.get("pid")):
            return None
        if self.lost_touch is not None and self.lost_touch(member):
            return None
        return self.member_address(member)

    def member_address(self, member: str) -> tuple[str, int, str] | None:
        record = self.directory.members.get(member)
        address = control_address(record) if record else None
        return (address[0], address[1], member) if address is not None else None

    def another_member(
        self, siblings: frozenset[str] | None = None, exclude_siblings: bool = False,
    ) -> tuple[str, int, str] | None:
        """A member other than this one with a control address (the drain's
        hint): a member of another machine before a sibling worker of this
        one (never a sibling with `exclude_siblings`: they all drain), then
        the least loaded by sessions, then by name."""
        if siblings is None:
            siblings = self.siblings
        counts: dict[str, int] = {}
        for info in self.directory.sessions.values():
            member = info.get("member")
            if isinstance(member, str):
                counts[member] = counts.get(member, 0) + 1
        order = sorted(self.directory.members, key=lambda m: (m in siblings, counts.get(m, 0), m))
        for member in order:
            if member == self.directory.member or (exclude_siblings and member in siblings):
                continue
            found = self.member_address(member)
            if found is not None:
                return found
        return None


def redirect_resumes(
    server: TunnelServer, directory: FleetDirectory, lost_touch: Callable[[str], bool] | None = None,
) -> SessionLocator:
    """Make `server` answer resumes of sessions held elsewhere with MOVED."""
    locator = SessionLocator(directory, lost_touch=lost_touch)
    server.session_elsewhere = locator
    return locator
