"""Several datagrams to one address in one system call (Linux UDP GSO).

A UDP tunnel's end writes each datagram it gets from the link to a UDP
socket, and on loopback one `send()` costs about as much as the rest of the
datagram's path (docs/performance.md "UDP tunnels"). Datagrams that come in
one reactor turn for one destination leave in one `sendmsg()` with the
`UDP_SEGMENT` option (Linux 4.18+): the kernel cuts the buffer into
datagrams of `gso_size` bytes (the last may be shorter), each a datagram of
its own on the wire and at the receiver, exactly as if sent one by one.

`send_batch` groups a flow's datagrams into such runs (equal sizes, at most
`MAX_SEGMENTS` and `MAX_GSO_BYTES`) and sends the rest one by one; every
outcome is counted per datagram, as single sends are. Where the kernel or
the path refuses GSO (another OS, an old kernel, a path MTU below the
datagram size), it sends one by one: the datagrams are the same either way.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: setsockopt/cmsg level and option of UDP GSO (linux/udp.h); not in Python's socket module.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103
#: Datagrams per GSO send: the kernel's UDP_MAX_SEGMENTS was 64 before Linux 6.9.
MAX_SEGMENTS = 64
#: Bytes per GSO send: one IP packet's worth (64 KiB) less the headers.
MAX_GSO_BYTES = 65000

#: Errors that mean "no GSO here" (the whole process stops trying it).
GSO_UNSUPPORTED = frozenset({errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP})
#: Errors of a send that drop the datagram(s) and are counted, not raised.
FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
REFUSED = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})

#: told of datagrams not sent: (reason, those datagrams); reasons "too_big", "full", "refused", "error"
Dropped = Callable[[str, Sequence[bytes]], None]


class BatchSender:
    """Sends a destination's datagrams, several per system call where the
    kernel allows. One per process is enough; `gso` turns off for good
    after the kernel says it has no UDP GSO."""

    def __init__(self, gso: bool | None = None) -> None:
        # a kernel without UDP GSO ignores the option in sendmsg() and would
        # send the run as one datagram: it is used only where setsockopt knows it
        self.gso = can_segment() if gso is None else gso
        self.syscalls = 0  # sends made (for tests and tools)

    def send_batch(
        self, skt: Any, datagrams: Sequence[bytes], dropped: Dropped, address: Any = None,
    ) -> int:
        """Send `datagrams` in order on `skt` (to `address`, or its connected
        peer); return how many were sent. Each datagram not sent is reported
        to `dropped` with its reason."""
        count = len(datagrams)
        if count == 1 or not self.gso:
            return self._one_by_one(skt, datagrams, dropped, address)
        sent = i = 0
        while i < count:
            size = len(datagrams[i])
            j = i + 1
            if size and size <= MAX_GSO_BYTES // 2:
                limit = min(count, i + MAX_SEGMENTS, i + MAX_GSO_BYTES // size)
                while j < limit and len(datagrams[j]) == size:
                    j += 1
                if j < limit and 0 < len(datagrams[j]) < size:
                    j += 1  # a shorter (not empty) last segment ends the run
            if j - i == 1 or not self.gso:
                sent += self._one_by_one(skt, datagrams[i:j], dropped, address)
            else:
                sent += self._segmented(skt, datagrams[i:j], size, dropped, address)
            i = j
        return sent

    def _segmented(self, skt: Any, run: Sequence[bytes], size: int, dropped: Dropped, address: Any) -> int:
        ancillary = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
        while True:
            try:
                self.syscalls += 1
                if address is None:
                    skt.sendmsg(run, ancillary)
                else:
                    skt.sendmsg(run, ancillary, 0, address)
                return len(run)
            except InterruptedError:
                continue
            except OSError as e:
                code = e.errno
                if code in FULL:
                    dropped("full", run)
                    return 0
                if code in REFUSED:
                    dropped("refused", run)
                    return 0
                if code in GSO_UNSUPPORTED:
                    self.gso = False
                # EINVAL (the path's MTU is below the segment size), EMSGSIZE,
                # or no GSO at all: each datagram alone, with its own outcome
                return self._one_by_one(skt, run, dropped, address)

    def _one_by_one(self, skt: Any, datagrams: Sequence[bytes], dropped: Dropped, address: Any) -> int:
        sent = 0
        for data in datagrams:
            while True:
                try:
                    self.syscalls += 1
                    if address is None:
                        skt.send(data)
                    else:
                        skt.sendto(data, address)
                    sent += 1
                except InterruptedError:
                    continue
                except OSError as e:
                    code = e.errno
                    dropped(
                        "too_big" if code == errno.EMSGSIZE else "full" if code in FULL
                        else "refused" if code in REFUSED else "error", (data,),
                    )
                break
        return sent


def can_segment() -> bool:
    """True if this kernel takes UDP_SEGMENT (a socket accepts the option)."""
    if sys.platform != "linux":
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
        except OSError:
            return False
    return True
