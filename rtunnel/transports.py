"""Cheaper writes and reads on Twisted's TCP transports, without replacing them.

Twisted's `write()` only queues: it registers the socket for writability
(an epoll_ctl call), sends on the reactor's next turn, then unregisters it
(another epoll_ctl). For a small message that is most of the cost of a hop.
`write_now` sends at once when nothing is queued, as asyncio's transports do,
and hands whatever the socket does not take to `write()`, which then buffers,
pauses the producer and resumes it exactly as before. The control link's
TLS layer (`rtunnel.tlslink`) sends its ciphertext the same way.

The private Twisted state these read is in `rtunnel.twisted_private`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rtunnel.mux.settings import READ_SIZE
from rtunnel.twisted_private import tcp_close_write_now, tcp_idle

__all__ = ["READ_SIZE", "close_write_now", "set_nodelay", "set_read_size", "write_now"]


def write_now(transport: Any, data: bytes) -> None:
    """`transport.write(data)`, sending at once if it is a TCP transport
    with nothing queued (other transports just get `write`)."""
    if not tcp_idle(transport):
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
    be writable, with an epoll_ctl each way and an empty send()."""
    if getattr(transport, "producer", True) is not None or not tcp_idle(transport):
        transport.loseWriteConnection()
    elif not tcp_close_write_now(transport):
        transport.loseWriteConnection()


def set_read_size(transport: Any, size: int = READ_SIZE) -> None:
    """Read up to `size` bytes at a time from the socket under `transport`
    (found through wrapping protocols such as TLS)."""
    while (inner := getattr(transport, "transport", None)) is not None:
        transport = inner
    if isinstance(getattr(transport, "bufferSize", None), int):
        transport.bufferSize = size


def set_nodelay(transport: Any) -> None:
    """Turn off Nagle's algorithm where the transport allows it."""
    setter: Callable[[bool], None] | None = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass
