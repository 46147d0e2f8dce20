"""A fault-injecting TCP proxy for end-to-end tests (pure Twisted, no threads).

Put a L{FaultProxy} between a tunnel client and server, then break the path
on demand::

    proxy = FaultProxy(reactor, "127.0.0.1", server_port)
    port = proxy.listen()          # connect the client to this port
    ...
    proxy.sever_rst()              # or sever_fin(), blackhole(), refuse_new(True)
    ...
    yield proxy.stop()             # closes everything; trial's reactor stays clean

Bytes are forwarded both ways with backpressure (each side's transport is a
streaming producer for the other side's transport) and half-closes are passed
through (a FIN read on one side becomes C{loseWriteConnection} on the other).
With C{delay > 0} every chunk is held C{delay} seconds in each direction.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from typing import cast

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, NotConnectingError
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["FaultProxy", "MAX_QUEUED_BYTES"]

#: In delay mode, stop reading a side once this many bytes wait in its queue.
MAX_QUEUED_BYTES = 16 * 1024 * 1024

_log = Logger()

# Pipe modes.
_FORWARD = "forward"  # normal operation
_BLACKHOLE = "blackhole"  # read and discard everything, close nothing
_SEVERED = "severed"  # closed by a fault command or stop(); no propagation
_REFUSED = "refused"  # closed right after accept (refuse_new)


def _set_rst_linger(transport: ITCPTransport) -> None:
    """Make the next close() of C{transport}'s socket send a RST."""
    try:
        sock = cast(socket.socket, transport.getHandle())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError):
        pass


@implementer(IPushProducer)
class _PauseRelay:
    """Producer registered with one side's transport on behalf of the other
    side: a full write buffer pauses reading on the side that fills it."""

    def __init__(self, side: _Side) -> None:
        self._side = side

    def pauseProducing(self) -> None:
        self._side.pause("peer-buffer")

    def resumeProducing(self) -> None:
        self._side.resume("peer-buffer")

    def stopProducing(self) -> None:
        """Closing is propagated by L{_Pipe.side_lost}, nothing to do."""


@implementer(IHalfCloseableProtocol)
class _Side(Protocol):
    """One TCP connection of a proxied pair: C{inbound} (accepted from the
    client) or C{outbound} (to the target)."""

    def __init__(self, pipe: _Pipe, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.peer: _Side | None = None
        self.lost = False
        self.read_eof = False
        self.write_eof = False
        self.closing = False
        self._pauses: set[str] = set()
        # Delay mode: chunks read from this side, waiting to go to the peer.
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.timer: IDelayedCall | None = None
        self.eof_queued = False
        self.close_queued = False

    @property
    def tcp(self) -> ITCPTransport:
        """This side's transport."""
        return cast(ITCPTransport, self.transport)

    # -- IProtocol / IHalfCloseableProtocol

    def connectionMade(self) -> None:
        self.pipe.side_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.pipe.data_from(self, data)

    def readConnectionLost(self) -> None:
        if self.read_eof:
            return
        self.read_eof = True
        self.pipe.eof_from(self)
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self.write_eof = True
        self._maybe_close()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.lost:
            return
        self.lost = True
        self.pipe.side_lost(self, reason)

    # -- flow control

    def pause(self, reason: str) -> None:
        """Stop reading from this side until every pause reason is resumed."""
        if self.lost:
            return
        first = not self._pauses
        self._pauses.add(reason)
        if first:
            self.tcp.pauseProducing()

    def resume(self, reason: str) -> None:
        """Drop one pause reason; read again once none is left."""
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses:
            self._restart_reading()

    def resume_all(self) -> None:
        """Drop every pause reason and read again."""
        if self._pauses:
            self._pauses.clear()
            self._restart_reading()

    def _restart_reading(self) -> None:
        # Never restart reading after EOF: Twisted would report EOF again.
        if not (self.lost or self.closing or self.read_eof):
            self.tcp.resumeProducing()

    # -- closing

    def detach_producer(self) -> None:
        """Unregister the peer's relay from this transport (a registered,
        paused producer would keep loseConnection waiting forever)."""
        if self.lost:
            return
        if getattr(self.transport, "producer", None) is not None:
            self.tcp.unregisterProducer()
        if self.peer is not None:
            self.peer.resume("peer-buffer")

    def close_fin(self, *, drop_buffered: bool = False) -> None:
        """Close with a FIN; with C{drop_buffered} the FIN goes out at once and
        data still in Twisted's write buffer is discarded."""
        if self.lost or self.closing:
            return
        self.closing = True
        self.detach_producer()
        if drop_buffered:
            try:
                cast(socket.socket, self.tcp.getHandle()).shutdown(socket.SHUT_WR)
            except (OSError, AttributeError):
                pass
        self.tcp.loseConnection()

    def close_rst(self) -> None:
        """Abort with a RST, dropping anything buffered."""
        if self.lost:
            return
        self.closing = True
        _set_rst_linger(self.tcp)
        self.tcp.abortConnection()

    def half_close(self) -> None:
        """Send a FIN after the buffered data; keep reading."""
        if self.lost or self.closing or self.write_eof:
            return
        self.detach_producer()
        self.tcp.loseWriteConnection()

    def _maybe_close(self) -> None:
        if self.read_eof and self.write_eof:
            self.close_fin()

    # -- delay queue

    def clear_queue(self) -> None:
        """Forget everything waiting in the delay queue."""
        self.queue.clear()
        self.queued = 0
        self.eof_queued = False
        self.close_queued = False
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


class _Pipe:
    """One proxied connection: the accepted inbound side and (once
    connected) the outbound side to the target."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.mode = _FORWARD
        self.inbound = _Side(self, "inbound")
        self.outbound: _Side | None = None
        self.connector: IConnector | None = None
        self.finished: defer.Deferred[None] = defer.Deferred()
        self._done = False

    def sides(self) -> list[_Side]:
        """Both sides that exist."""
        return [s for s in (self.inbound, self.outbound) if s is not None]

    # -- lifecycle

    def side_connected(self, side: _Side) -> None:
        proxy = self.proxy
        if side is self.inbound:
            proxy.connections_accepted += 1
            if proxy._stopping:
                self.mode = _SEVERED
                side.close_rst()
            elif proxy._refusing:
                proxy.connections_refused += 1
                self.mode = _REFUSED
                if proxy._refuse_rst:
                    side.close_rst()
                else:
                    side.close_fin()
            elif proxy._blackhole:
                # Accepted but never connected onwards; input is discarded.
                self.mode = _BLACKHOLE
            else:
                side.pause("connecting")
                self.connector = proxy.reactor.connectTCP(
                    proxy.target_host,
                    proxy.target_port,
                    _OutboundFactory(self),
                    timeout=proxy.connect_timeout,
                )
            return
        # The outbound side is up.
        self.connector = None
        self.outbound = side
        side.peer = self.inbound
        self.inbound.peer = side
        if self.inbound.lost or self.mode in (_SEVERED, _REFUSED):
            side.close_rst()
        elif self.mode == _FORWARD:
            self.inbound.tcp.registerProducer(_PauseRelay(side), True)
            side.tcp.registerProducer(_PauseRelay(self.inbound), True)
            self.inbound.resume("connecting")
        # _BLACKHOLE: both sides simply read and discard.

    def outbound_failed(self, reason: Failure) -> None:
        """The connection attempt to the target failed (or was cancelled)."""
        self.connector = None
        if self.mode == _FORWARD:
            _log.debug("faultproxy: target connect failed: {reason}", reason=reason.value)
            self.inbound.close_rst()
        self._check_done()

    def side_lost(self, side: _Side, reason: Failure) -> None:
        peer = side.peer
        if peer is not None:
            peer.clear_queue()  # nothing can reach `side` any more
        if peer is None or peer.lost:
            side.clear_queue()
        if side is self.inbound and self.connector is not None:
            self._stop_connecting()
        if peer is not None and not peer.lost and self.mode == _FORWARD:
            if not reason.check(ConnectionDone):
                side.clear_queue()
                if not peer.closing:
                    peer.close_rst()
            elif side.queue:
                side.close_queued = True
            else:
                peer.close_fin()
        self._check_done()

    def _stop_connecting(self) -> None:
        connector, self.connector = self.connector, None
        if connector is not None:
            try:
                connector.stopConnecting()
            except NotConnectingError:
                pass

    def _check_done(self) -> None:
        if self._done or not self.inbound.lost or self.connector is not None:
            return
        if self.outbound is not None and not self.outbound.lost:
            return
        self._done = True
        for s in self.sides():
            s.clear_queue()
        self.proxy._pipes.discard(self)
        self.finished.callback(None)

    # -- forwarding

    def data_from(self, side: _Side, data: bytes) -> None:
        peer = side.peer
        if self.mode != _FORWARD or peer is None:
            return  # blackholed / severed: read and discard
        delay = self.proxy.delay
        if delay <= 0:
            self._write(peer, data)
            return
        clock = self.proxy.clock
        side.queue.append((clock.seconds() + delay, data))
        side.queued += len(data)
        if side.queued > self.proxy.max_queued:
            side.pause("queue")
        if side.timer is None:
            side.timer = clock.callLater(delay, self._flush, side)

    def _write(self, peer: _Side, data: bytes) -> None:
        if peer.lost or peer.closing or peer.write_eof:
            return
        peer.tcp.write(data)
        n = len(data)
        self.proxy.bytes_forwarded += n
        if peer is self.inbound:
            self.proxy.bytes_to_client += n
        else:
            self.proxy.bytes_to_target += n

    def _flush(self, side: _Side) -> None:
        """Delay timer: forward every due chunk read from C{side}, in order."""
        side.timer = None
        peer = side.peer
        clock = self.proxy.clock
        now = clock.seconds()
        while side.queue and side.queue[0][0] <= now:
            _, data = side.queue.popleft()
            side.queued -= len(data)
            if peer is not None:
                self._write(peer, data)
        if side.queued <= self.proxy.max_queued // 2:
            side.resume("queue")
        if side.queue:
            side.timer = clock.callLater(max(0.0, side.queue[0][0] - now), self._flush, side)
            return
        if peer is not None and self.mode == _FORWARD:
            if side.eof_queued:
                side.eof_queued = False
                peer.half_close()
            if side.close_queued:
                side.close_queued = False
                peer.close_fin()
        self._check_done()

    def eof_from(self, side: _Side) -> None:
        """C{side} sent a FIN: pass it on once queued data has gone."""
        peer = side.peer
        if self.mode != _FORWARD or peer is None:
            return
        if side.queue:
            side.eof_queued = True
        else:
            peer.half_close()

    # -- faults

    def sever(self, rst: bool) -> None:
        """Close both sides now, with RST or FIN, forwarding nothing more."""
        self.mode = _SEVERED
        self._stop_connecting()
        for s in self.sides():
            s.clear_queue()
        for s in self.sides():
            if rst:
                s.close_rst()
            else:
                s.close_fin(drop_buffered=True)

    def blackhole(self) -> None:
        """Stop forwarding; keep reading (and discarding) on both sides."""
        if self.mode != _FORWARD:
            return
        self.mode = _BLACKHOLE
        for s in self.sides():
            s.clear_queue()
            s.detach_producer()
        for s in self.sides():
            s.resume_all()


class _InboundFactory(Factory):
    """Builds the inbound side of a new L{_Pipe} for each accepted connection."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        pipe = _Pipe(self.proxy)
        self.proxy._pipes.add(pipe)
        return pipe.inbound


class _OutboundFactory(ClientFactory):
    """Builds the outbound side of one L{_Pipe}."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return _Side(self.pipe, "outbound")

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.pipe.outbound_failed(reason)


class FaultProxy:
    """A TCP proxy to C{target_host:target_port} that can inject faults.

    Fault commands (L{sever_rst}, L{sever_fin}, L{blackhole}) act on every
    currently open proxied connection.

    @ivar connections_accepted: connections accepted so far (refused included).
    @ivar connections_refused: connections closed by L{refuse_new}.
    @ivar bytes_forwarded: bytes written onwards, both directions together.
    @ivar bytes_to_target: bytes written towards the target.
    @ivar bytes_to_client: bytes written back towards the clients.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        target_host: str,
        target_port: int,
        delay: float = 0.0,
        *,
        max_queued: int = MAX_QUEUED_BYTES,
        connect_timeout: float = 10.0,
    ) -> None:
        """
        @param delay: seconds each chunk is held in each direction (0: none).
        @param max_queued: in delay mode, pause reading a side while more than
            this many bytes from it are queued.
        @param connect_timeout: timeout for connecting to the target.
        """
        self.reactor = reactor
        self.clock = cast(IReactorTime, reactor)
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.max_queued = max_queued
        self.connect_timeout = connect_timeout
        self.connections_accepted = 0
        self.connections_refused = 0
        self.bytes_forwarded = 0
        self.bytes_to_target = 0
        self.bytes_to_client = 0
        self.listening_port: IListeningPort | None = None
        self._port_number: int | None = None
        self._pipes: set[_Pipe] = set()
        self._refusing = False
        self._refuse_rst = False
        self._blackhole = False
        self._stopping = False
        self._stop_waiters: list[defer.Deferred[None]] | None = []

    @property
    def open_connections(self) -> int:
        """Proxied connections not yet fully closed (either side still open)."""
        return len(self._pipes)

    @property
    def port(self) -> int:
        """The port L{listen} bound (still known after L{stop})."""
        assert self._port_number is not None, "listen() first"
        return self._port_number

    def listen(self, interface: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening (on an ephemeral port by default); return the port."""
        assert self.listening_port is None, "already listening"
        self.listening_port = self.reactor.listenTCP(port, _InboundFactory(self), interface=interface)
        self._port_number = cast(int, self.listening_port.getHost().port)  # type: ignore[attr-defined]
        return self._port_number

    # -- faults

    def sever_rst(self) -> None:
        """Abort every open connection, both sides, with a TCP RST."""
        for pipe in list(self._pipes):
            pipe.sever(rst=True)

    def sever_fin(self) -> None:
        """Close every open connection, both sides, with a FIN at once;
        nothing still buffered in the proxy is forwarded.

        As with any close(), the kernel turns the FIN into a RST for a socket
        that still has unread input, so quiesce traffic first if the test
        needs a clean close."""
        for pipe in list(self._pipes):
            pipe.sever(rst=False)

    def blackhole(self) -> None:
        """Silently drop all traffic of open and new connections; close
        nothing. New connections are accepted but never reach the target."""
        self._blackhole = True
        for pipe in list(self._pipes):
            pipe.blackhole()

    def heal(self) -> None:
        """End blackhole mode for new connections (old ones stay dead)."""
        self._blackhole = False

    def refuse_new(self, flag: bool = True, *, rst: bool = False) -> None:
        """While set, close newly accepted connections at once (FIN, or RST
        with C{rst=True})."""
        self._refusing = flag
        self._refuse_rst = rst

    # -- shutdown

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and abort all connections.  The Deferred fires once
        the listener is closed and every socket has seen connectionLost."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._stop_waiters is None:
            waiter.callback(None)  # already stopped
            return waiter
        self._stop_waiters.append(waiter)
        if not self._stopping:
            self._stopping = True
            port, self.listening_port = self.listening_port, None
            d: defer.Deferred[object] = defer.maybeDeferred(
                port.stopListening if port is not None else lambda: None
            )
            self.sever_rst()
            d.addCallback(lambda _: self._wait_pipes())
            d.addErrback(lambda f: _log.failure("faultproxy: stop failed", f))
            d.addCallback(self._stop_finished)
        return waiter

    def _wait_pipes(self) -> defer.Deferred[None]:
        if self._pipes:
            self.sever_rst()  # connections accepted while stopListening ran
            gathered = defer.gatherResults([p.finished for p in list(self._pipes)])
            return gathered.addCallback(lambda _: self._wait_pipes())
        # One more reactor turn: a cancelled connectTCP may still have its
        # zero-delay bootstrap call pending.
        return task.deferLater(self.clock, 0, lambda: None)

    def _stop_finished(self, _: object) -> None:
        waiters, self._stop_waiters = self._stop_waiters or [], None
        for w in waiters:
            w.callback(None)
