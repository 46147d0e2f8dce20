"""Cheaper writes and reads on Twisted's TCP transports, without replacing them.

Twisted's `write()` only queues: it registers the socket for writability
(an epoll_ctl call), sends on the reactor's next turn, then unregisters it
(another epoll_ctl). For a small message that is most of the cost of a hop.
`write_now` sends at once when nothing is queued, as asyncio's transports do,
and hands whatever the socket does not take to `write()`, which then buffers,
pauses the producer and resumes it exactly as before.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

#: Bytes read per recv() on the link and the local sockets (Twisted's
#: default is 64 KiB): fewer syscalls and frames per byte in bulk. Twisted
#: also pauses a transport's producer once this much waits to be written.
READ_SIZE = 256 * 1024

#: A full TLS record: more records of the same burst usually follow.
TLS_RECORD = 16 * 1024


def write_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sending at once if it is a TCP transport
    with nothing queued (other transports just get `write`)."""
    send = getattr(transport, "writeSomeData", None)
    if (
        send is None
        or not transport.connected
        or transport.disconnecting
        or getattr(transport, "_writeDisconnecting", True)
        or getattr(transport, "_tempDataLen", 1)
        or len(transport.dataBuffer) != transport.offset
    ):
        transport.write(data)
        return
    sent = send(data)
    if not isinstance(sent, int):  # lost: let write() and the reactor find out
        transport.write(data)
    elif sent < len(data):
        transport.write(data[sent:])


def set_read_size(transport: Any, size: int = READ_SIZE) -> None:
    """Read up to `size` bytes at a time from the socket under `transport`
    (found through wrapping protocols such as TLS)."""
    while (inner := getattr(transport, "transport", None)) is not None:
        transport = inner
    if isinstance(getattr(transport, "bufferSize", None), int):
        transport.bufferSize = size


class EagerWrites(ProtocolWrapper):
    """Sits between a TCP transport and TLS: a short TLS write (a small
    message, or the last record of a burst) goes out at once; full records
    queue, so a bulk burst still leaves in a few large send() calls."""

    def write(self, data: bytes) -> None:
        if len(data) >= TLS_RECORD:
            self.transport.write(data)
        else:
            write_now(self.transport, data)


class EagerWritesFactory(WrappingFactory):
    protocol = EagerWrites


class EagerWritesEndpoint:
    """A client endpoint whose connections get `EagerWrites` under the
    protocol (TLS when wrapped by `wrapClientTLS`)."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Any:
        d = self._endpoint.connect(EagerWritesFactory(factory))
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)
