"""The home's end of a forwarded visitor (docs/fleet.md "Member links"):
the member link's stream joined to a stream of the client session holding
the name, two streams as one, with credit passed back across both hops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

from rtunnel.mux import Stream
from rtunnel.wire import ResetCode


class _BridgeEnd:
    """One stream's LocalPort whose "socket" is the other stream: bytes,
    EOF and resets cross over; the other stream pausing its reads (no credit
    on its side) is this stream's local buffer being full, so credit stops
    flowing back across both hops."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.stream: Stream | None = None
        self.other: _BridgeEnd | None = None
        self.paused = False  # our stream asked us to stop reading: the other stream's send side is full
        self.ended = False

    def bind(self, stream: Stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        assert self.other is not None and self.other.stream is not None
        self.other.stream.local_data(data)

    def half_close(self) -> None:
        assert self.other is not None and self.other.stream is not None
        self.other.stream.local_eof()

    def abort(self) -> None:
        self._end()
        other = self.other.stream if self.other is not None else None
        if other is not None and not other.closed:
            other.reset(ResetCode.ABORTED, "the visitor's other hop was reset")

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.bridge.end_done()

    def pause_reading(self) -> None:
        self.paused = True
        other = self.other.stream if self.other is not None else None
        if other is not None:
            other.local_buffer_full()

    def resume_reading(self) -> None:
        self.paused = False
        other = self.other.stream if self.other is not None else None
        if other is not None:
            other.local_buffer_drained()

    def getPeer(self) -> IAddress:
        """The visitor's address (the status page lists it)."""
        host, port = self.bridge.src
        return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


class Bridge:
    """A forwarded visitor at its home: the member link's stream (`hop`)
    joined to the client session's stream (`visitor`), byte for byte, with
    credit passed back in both directions (docs/fleet.md "Member links")."""

    #: the hop's end (a subclass may look at what the edge sends first)
    hop_end_class: type[_BridgeEnd] = _BridgeEnd

    def __init__(self, hop: Stream, visitor: Stream, src: list[Any], on_end: Callable[[], None]) -> None:
        self.src = src
        self._on_end = on_end
        self._ends = 2
        hop_end, visitor_end = self.hop_end_class(self), _BridgeEnd(self)
        hop_end.other, visitor_end.other = visitor_end, hop_end
        hop_end.stream, visitor_end.stream = hop, visitor
        # the hop first: its early bytes become the visitor stream's pending
        # bytes; then the visitor stream, whose first update_reading may say
        # "full" to the hop, which by then has a local end to be full
        hop.attach_local(hop_end)
        visitor.attach_local(visitor_end)
        if hop_end.paused and not visitor.closed:  # the hop paused before the visitor stream had its end
            visitor.local_buffer_full()

    def end_done(self) -> None:
        self._ends -= 1
        if self._ends == 0:
            self._on_end()
