"""A stream's local TCP socket over Twisted: the `LocalPort` adapter.

`StreamProtocol` is the protocol of a local connection (a visitor on the
server, a target on the client) and, for its stream, the `LocalPort` of
rtunnel.mux.ports: it hands the socket's bytes, EOF and loss to the stream,
and it is the producer registered on its transport, so a slow local reader
(a full send buffer) reaches the stream as `local_buffer_full` and
`local_buffer_drained`. Writes and half-closes take the socket fast paths
of rtunnel.transports.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.mux.stream import Stream
from rtunnel.transports import close_write_now, set_nodelay, set_read_size, write_now

__all__ = ["StreamProtocol", "set_nodelay"]


@implementer(IHalfCloseableProtocol, IPushProducer)
class StreamProtocol(Protocol):
    """A local TCP connection (visitor or target) bound to one Stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    # ------------------------------------------------------------ Twisted -> stream

    def connectionMade(self) -> None:
        transport = self.transport
        set_nodelay(transport)
        set_read_size(transport)
        transport.registerProducer(self, True)  # type: ignore[union-attr]
        # write() as a C-level partial: no Python frame of ours per write
        self.write = functools.partial(write_now, transport)  # type: ignore[method-assign]
        self.stream.attach_local(self)

    def dataReceived(self, data: bytes) -> None:
        self.stream.local_data(data)

    def readConnectionLost(self) -> None:
        self.stream.local_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.stream.local_lost(reason.getErrorMessage())

    # IPushProducer: the transport's send buffer filled up or drained
    def pauseProducing(self) -> None:
        self.stream.local_buffer_full()

    def resumeProducing(self) -> None:
        self.stream.local_buffer_drained()

    def stopProducing(self) -> None:
        self.stream.local_buffer_full()

    # ------------------------------------------------------------ LocalPort

    def bind(self, stream: Stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        write_now(self.transport, data)  # (replaced by a partial once connected)

    def half_close(self) -> None:
        transport = self.transport
        # A transport that paused its producer resumes it when its buffer
        # drains instead of shutting down: let go of it first.
        transport.unregisterProducer()  # type: ignore[union-attr]
        close_write_now(transport)

    def abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def close(self) -> None:
        # both halves are shut down; Twisted does not close the socket by
        # itself for a half-closeable protocol
        self.transport.loseConnection()  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def getPeer(self) -> Any:
        """The address of the socket's peer (the status page lists it)."""
        return self.transport.getPeer()  # type: ignore[union-attr]
