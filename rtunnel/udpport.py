"""A UDP port read a bounded number of datagrams per reactor turn, with a
call at the end of each read.

Twisted's `udp.Port` reads up to 256 KiB per turn (4,000 small datagrams),
and its protocol cannot tell where one read ends. `ReadPort` reads at most
`per_read` datagrams each time the socket is readable (the rest wait in the
kernel's buffer for the next turn, so other sockets of the reactor get
their turns under a flood: docs/udp.md "Fairness"), then calls the
protocol's `read_done()`, where it can write what the read produced in one
go (rtunnel.server.udp: one write to the control link per read, not one
per datagram).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import udp
from twisted.logger import Logger

#: Errors of recvfrom() that end a read and are not the socket's end
#: (nothing more to read; a signal; an ICMP error reported on the socket).
_READ_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED})


class ReadPort(udp.Port):
    """`twisted.internet.udp.Port` with a bounded read and `read_done()`.
    Its protocol must have `read_done()`."""

    log = Logger()

    def __init__(self, *args: Any, per_read: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_read = per_read

    def doRead(self) -> None:
        protocol = self.protocol
        received = protocol.datagramReceived
        recvfrom = self.socket.recvfrom
        size = self.maxPacketSize
        ipv6 = self.addressFamily == socket.AF_INET6
        try:
            for _ in range(self.per_read):
                try:
                    data, addr = recvfrom(size)
                except OSError as e:
                    if e.errno in _READ_AGAIN:
                        return
                    raise
                if ipv6:
                    addr = addr[:2]  # (host, port) without flow info and scope id, as Twisted
                try:
                    received(data, addr)
                except Exception:
                    self.log.failure("datagram handler failed", event="internal_error")
        finally:
            protocol.read_done()


def listen_udp(reactor: Any, port: int, protocol: Any, interface: str, max_packet: int, per_read: int) -> ReadPort:
    """What `reactor.listenUDP` does, with a `ReadPort`."""
    listening = ReadPort(port, protocol, interface, max_packet, reactor, per_read=per_read)
    listening.startListening()
    return listening
