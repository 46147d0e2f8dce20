"""Cheaper writes and reads on Twisted's TCP transports, without replacing them.

Twisted's `write()` only queues: it registers the socket for writability
(an epoll_ctl call), sends on the reactor's next turn, then unregisters it
(another epoll_ctl). For a small message that is most of the cost of a hop.
`write_now` sends at once when nothing is queued, as asyncio's transports do,
and hands whatever the socket does not take to `write()`, which then buffers,
pauses the producer and resumes it exactly as before. The control link's
TLS layer (`rtunnel.tlslink`) sends its ciphertext the same way.
"""

from __future__ import annotations

from typing import Any

#: Bytes read per recv() on the link and the local sockets (Twisted's
#: default is 64 KiB): fewer syscalls and frames per byte in bulk. Twisted
#: also pauses a transport's producer once this much waits to be written.
READ_SIZE = 256 * 1024


def _idle_socket(transport: Any) -> bool:
    """True for a connected TCP transport (Twisted's FileDescriptor) with
    nothing queued to write and no close under way."""
    return (
        getattr(transport, "writeSomeData", None) is not None
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnecting", True)
        and not getattr(transport, "_tempDataLen", 1)
        and len(transport.dataBuffer) == transport.offset
    )


def write_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sending at once if it is a TCP transport
    with nothing queued (other transports just get `write`)."""
    if not _idle_socket(transport):
        transport.write(data)
        return
    sent = transport.writeSomeData(data)
    if not isinstance(sent, int):  # lost: let write() and the reactor find out
        transport.write(data)
    elif sent < len(data):
        transport.write(data[sent:])


def close_write_now(transport: Any) -> None:
    """`transport.loseWriteConnection()`, done at once (shutdown(SHUT_WR)
    and the protocol's writeConnectionLost) when nothing is queued and no
    producer is registered: Twisted waits a reactor turn for the socket to
    be writable, with an epoll_ctl each way and an empty send().

    Twisted shuts a socket down only from doWrite, so it never calls doWrite
    on one it shut. Done here, that can happen once: the reactor event that
    completes an outgoing connect reports "writable" and, when the peer has
    already sent something, "readable" too; Twisted runs connectionMade from
    the read half and then calls doWrite, whose empty send() on the shut
    socket fails with EPIPE and would end the connection as lost (a target
    that speaks first, reached by a stream whose FIN came before the
    connect). From here on nothing can be written, so doWrite has nothing
    to do; loseConnection() closes without it."""
    close = getattr(transport, "_closeWriteConnection", None)
    if close is None or getattr(transport, "producer", True) is not None or not _idle_socket(transport):
        transport.loseWriteConnection()
        return
    # what FileDescriptor.doWrite does once the queue is empty
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport.doWrite = transport.stopWriting  # a write event already polled: nothing to send, no error
    close()


def set_read_size(transport: Any, size: int = READ_SIZE) -> None:
    """Read up to `size` bytes at a time from the socket under `transport`
    (found through wrapping protocols such as TLS)."""
    while (inner := getattr(transport, "transport", None)) is not None:
        transport = inner
    if isinstance(getattr(transport, "bufferSize", None), int):
        transport.bufferSize = size
