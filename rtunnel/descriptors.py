"""File descriptors: the process's limit, a share kept from visitors, and
running out without a busy loop.

* `raise_limit()` sets the soft RLIMIT_NOFILE to the hard limit at server
  start: the usual soft limit (1,024) is below the default --max-streams.
* accept(2) hands out the lowest free descriptor number, so a connection
  accepted as descriptor n proves that the n below it are all open. A
  `DescriptorGate` gives a kind of listening port a ceiling: a connection
  accepted at or above it is closed at once (a reset), counted, and
  summarised in the log. Visitors' ceiling is `limit - reserve_for(limit)`,
  so visitors never hold the top descriptors, which stay for control
  connections, tunnel listeners and files; control connections' ceiling is
  `limit - CONTROL_MARGIN`, a few kept for files (the clients file, logs).
* accept(2) failing for lack of descriptors or memory (EMFILE, ENFILE,
  ENOBUFS, ENOMEM): Twisted's Port logs a line and returns, and a
  level-triggered poller calls it again at once -- a busy loop with a log
  line per turn (or, for EMFILE, it accepts and closes every waiting
  connection with a line each). A `GatedPort` stops reading for
  ACCEPT_PAUSE seconds instead: waiting connections stay in the kernel's
  accept queue until a descriptor is free, and the gate logs one summary
  line per interval.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory, IReactorTime
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel.limits import RefusalLog

#: accept(2) errors that mean "no descriptor (or memory) for one more now"
ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
MAX_RESERVE = 512  # descriptors kept from visitors (at most a quarter of the limit)
CONTROL_MARGIN = 16  # descriptors kept from control connections, for files
ACCEPT_PAUSE = 0.25  # seconds a port stops accepting after running out
MAX_CLOSED_PER_ACCEPT = 64  # connections over the ceiling closed per accept() call


@dataclass(frozen=True)
class FdLimit:
    """What raise_limit() found and did; `error` says why the soft limit
    could not be raised, if it could not."""

    before: int
    soft: int
    hard: int
    error: str | None = None


def raise_limit() -> FdLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return FdLimit(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:  # e.g. an unlimited hard limit the kernel caps lower
        return FdLimit(soft, soft, hard, str(e))
    return FdLimit(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)


def soft_limit() -> int | None:
    """The soft RLIMIT_NOFILE now (None: unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def reserve_for(limit: int) -> int:
    """Descriptors kept from visitors under a limit of `limit`."""
    return min(MAX_RESERVE, limit // 4)


class DescriptorGate:
    """The descriptor rule of one kind of listening port: which accepted
    descriptors it keeps (below `ceiling()`), and the summary log lines of
    what it closes and of accept errors. `stop()` reports what is left."""

    log = Logger()

    def __init__(self, clock: IReactorTime, kind: str) -> None:
        if kind not in ("visitor", "control"):
            raise ValueError(f"unknown kind of port {kind!r}")
        self.kind = kind
        self.refused = 0  # connections closed over the ceiling, ever
        self.accept_errors = 0  # accept(2) calls that found no descriptor or memory, ever
        if kind == "visitor":
            self._refusal_message = (
                "refusing visitors: descriptor {fd} of the process's {limit} is in use and the last "
                "{kept} are kept for control connections; raise the hard limit of open files "
                "(LimitNOFILE= in systemd, ulimit -Hn) or lower --max-streams; {count} refused "
                "since the last report"
            )
            self._refusal_fields: dict[str, Any] = {
                "count_field": "count", "event": "visitor_refused", "reason": "descriptors",
            }
        else:
            self._refusal_message = (
                "refusing control connections: descriptor {fd} of the process's {limit} is in use; "
                "raise the hard limit of open files (LimitNOFILE= in systemd, ulimit -Hn); "
                "{refused} refused since the last report"
            )
            self._refusal_fields = {
                "count_field": "refused", "event": "connections_capped", "reason": "descriptors",
            }
        self._refusals = RefusalLog(clock, interval=10.0, log=self.log)
        self._errors = RefusalLog(clock, interval=10.0, log=self.log)

    def kept_free(self, limit: int) -> int:
        return reserve_for(limit) if self.kind == "visitor" else CONTROL_MARGIN

    def ceiling(self) -> int | None:
        """The first descriptor number this kind of connection may not hold
        (None: no limit)."""
        limit = soft_limit()
        return None if limit is None else limit - self.kept_free(limit)

    def over_ceiling(self, fd: int) -> None:
        """A connection accepted as descriptor `fd`, over the ceiling, was closed."""
        self.refused += 1
        limit = soft_limit() or 0
        self._refusals.refused(
            "descriptors", self._refusal_message, **self._refusal_fields,
            fd=fd, limit=limit, kept=self.kept_free(limit),
        )

    def accept_failed(self, code: int) -> None:
        self.accept_errors += 1
        self._errors.refused(
            ("accept_paused", code),
            "cannot accept {what} connections ({error}: {why}); not accepting on that port for "
            "{pause} s at a time, they wait in its queue; {count} times since the last report",
            event="accept_paused", what=self.kind, pause=ACCEPT_PAUSE,
            error=errno.errorcode.get(code, str(code)), why=os.strerror(code),
        )

    def stop(self) -> None:
        self._refusals.stop()
        self._errors.stop()


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class _GatedSocket(socket.socket):
    """A listening socket whose accept() applies its port's gate."""

    __slots__ = ("port",)  # no __dict__: 336 bytes less for every listening port (one per tunnel)

    port: GatedPort

    def accept(self) -> tuple[socket.socket, Any]:
        gate = self.port.gate
        for _ in range(MAX_CLOSED_PER_ACCEPT):
            try:
                conn, address = super().accept()
            except OSError as e:
                if e.errno not in ACCEPT_ERRORS:
                    raise
                self.port.out_of_descriptors(e.errno)
                raise BlockingIOError(errno.EAGAIN, "not accepting for now") from None
            ceiling = gate.ceiling()
            if ceiling is None or conn.fileno() < ceiling:
                return conn, address
            fd = conn.fileno()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()
            gate.over_ceiling(fd)
        raise BlockingIOError(errno.EAGAIN, "the rest at the reactor's next turn")


class GatedPort(tcp.Port):
    """A TCP listening port under a DescriptorGate (see the module);
    `ipv6_only` sets IPV6_V6ONLY whatever net.ipv6.bindv6only says;
    `reuse_port` sets SO_REUSEPORT before the bind, so that the workers of
    `--workers N` (processes of the same user) each listen on the same
    control port and the kernel spreads new connections over them."""

    def __init__(
        self, port: int, factory: IProtocolFactory, backlog: int, interface: str, reactor: Any,
        gate: DescriptorGate, ipv6_only: bool = False, reuse_port: bool = False,
    ) -> None:
        super().__init__(port, factory, backlog, interface, reactor)
        self.clock: IReactorTime = reactor  # Port types its reactor as an IReactorFDSet
        self.gate = gate
        self.ipv6_only = ipv6_only
        self.reuse_port = reuse_port
        self._resume_call: IDelayedCall | None = None

    def createInternetSocket(self) -> socket.socket:
        plain = super().createInternetSocket()
        if self.ipv6_only:
            plain.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.reuse_port:
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        gated = _GatedSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        gated.setblocking(False)
        gated.port = self
        return gated

    def out_of_descriptors(self, code: int) -> None:
        """accept(2) failed with `code` (ACCEPT_ERRORS): pause accepting."""
        self.gate.accept_failed(code)
        if self._resume_call is None:
            self.stopReading()
            self._resume_call = self.clock.callLater(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def connectionLost(self, reason: Failure) -> None:
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
        super().connectionLost(reason)


def listen_tcp(
    reactor: Any, port: int, factory: IProtocolFactory, backlog: int, interface: str,
    gate: DescriptorGate, ipv6_only: bool = False, reuse_port: bool = False,
) -> IListeningPort:
    """Listen on a GatedPort. A reactor that is not a POSIX reactor (a test
    double standing in for one) listens its own way, ungated."""
    if not isinstance(reactor, PosixReactorBase) and not ipv6_only and not reuse_port:
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = GatedPort(port, factory, backlog, interface, reactor, gate, ipv6_only, reuse_port)
    listening.startListening()
    return listening


class GatedListening:
    """A reactor for `serverFromString`: its listenTCP (the tcp: and tcp6:
    endpoints) listens on a GatedPort; everything else is the reactor's own
    (systemd: sockets are adopted as they are, ungated). With `reuse_port`
    its ports set SO_REUSEPORT (the control port of a `--workers` worker)."""

    def __init__(self, reactor: Any, gate: DescriptorGate, reuse_port: bool = False) -> None:
        self._reactor = reactor
        self._gate = gate
        self._reuse_port = reuse_port

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = "") -> IListeningPort:
        return listen_tcp(self._reactor, port, factory, backlog, interface, self._gate, reuse_port=self._reuse_port)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
