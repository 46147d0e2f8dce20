"""In-memory test doubles for rtunnel.mux: two Sessions joined by fake links.

Nothing here touches a reactor or a socket, and nothing imports Twisted
unless asked for: a L{Pair} holds a server and a client L{Session} on a
clock (Twisted's L{Clock} by default, or a L{ManualTimers}); each side's
link is a L{FakeLink} (a LinkPort that keeps what is written). L{Pair.pump}
moves the bytes each session wrote through a L{wire.FrameDecoder} into the
other session's C{frame_received}, and lets every local socket (a
L{LocalEnd}, whose L{LocalSocket} is the stream's LocalPort) hand its
application's bytes to its stream while the stream lets it read.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from collections.abc import Callable
from typing import Any

from rtunnel import wire
from rtunnel.mux import Session, SessionSettings, Stream
from rtunnel.wire import ErrorCode, Frame, FrameType

S2C = "s2c"  # server -> client
C2S = "c2s"  # client -> server


def pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (a misordered or repeated chunk shows)."""
    return random.Random(seed).randbytes(size)


class ManualCall:
    """A call of L{ManualTimers}: runs when the timers are advanced past it."""

    def __init__(self, when: float, f: Callable[..., object], args: tuple[object, ...]) -> None:
        self.when, self.f, self.args = when, f, args
        self.called = self.cancelled = False

    def active(self) -> bool:
        return not (self.called or self.cancelled)

    def cancel(self) -> None:
        assert self.active(), "cancel of a call that ran or was cancelled"
        self.cancelled = True


class ManualTimers:
    """The core's Timers with time that moves only when told (no Twisted)."""

    def __init__(self) -> None:
        self.time = 0.0
        self._calls: list[tuple[float, int, ManualCall]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self.time

    def call_later(self, delay: float, f: Callable[..., object], *args: object) -> ManualCall:
        call = ManualCall(self.time + delay, f, args)
        heapq.heappush(self._calls, (call.when, next(self._order), call))
        return call

    def pending(self) -> list[ManualCall]:
        return [call for _, _, call in self._calls if call.active()]

    def advance(self, seconds: float) -> None:
        self.time += seconds
        while self._calls and self._calls[0][0] <= self.time:
            _, _, call = heapq.heappop(self._calls)
            if call.active():
                call.called = True
                call.f(*call.args)


class RecordingLog:
    """An EventLog that keeps (level, event fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def debug(self, format: str, **fields: Any) -> None:
        self.events.append(("debug", dict(fields, format=format)))

    def info(self, format: str, **fields: Any) -> None:
        self.events.append(("info", dict(fields, format=format)))


class FakeLink:
    """A LinkPort (rtunnel.mux.ports) that keeps what the session wrote."""

    def __init__(self, srtt: float = 0.1) -> None:
        self.out = bytearray()
        self.srtt = srtt
        self.session_log = RecordingLog()
        self.errors: list[tuple[ErrorCode, str]] = []
        self.watcher: Session | None = None  # the session told of buffer fill and drain
        self.reading = True

    def write(self, frame: bytes) -> None:
        self.out += frame

    def write_frame(self, header: bytes, payload: bytes) -> None:
        self.out += header
        self.out += payload

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def watch_writes(self, session: Session) -> None:
        self.watcher = session

    def unwatch_writes(self) -> None:
        self.watcher = None

    def close_with_error(self, code: ErrorCode, reason: str) -> None:
        self.errors.append((code, reason))

    def value(self) -> bytes:
        return bytes(self.out)

    def clear(self) -> None:
        del self.out[:]


class LocalSocket:
    """A stream's LocalPort (rtunnel.mux.ports): records what the stream
    wrote and did, and any misuse (a write after close, two half-closes)."""

    def __init__(self) -> None:
        self.stream: Stream | None = None
        self.data = bytearray()
        self.reading = True
        self.write_closed = False
        self.aborted = False
        self.closed = False
        self.misuse: list[str] = []

    def bind(self, stream: Stream) -> None:
        self.stream = stream

    def write(self, data: bytes) -> None:
        if self.write_closed or self.aborted:
            self.misuse.append(f"write of {len(data)} bytes after close")
        self.data += data

    def half_close(self) -> None:
        if self.write_closed:
            self.misuse.append("half_close twice")
        self.write_closed = True

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def value(self) -> bytes:
        return bytes(self.data)


class LocalEnd:
    """The local socket of one stream, seen from both of its ends.

    C{send} is the local application writing (bytes wait in C{inbox}, like a
    kernel buffer, until the stream reads them: only while the socket is
    read). C{received} is what the stream wrote to the application.
    """

    def __init__(self, stream: Stream, chunk: int = 16384) -> None:
        self.stream = stream
        self.chunk = chunk
        self.transport = LocalSocket()
        self.inbox = bytearray()
        self.sent = bytearray()  # everything the application wrote
        self.eof_pending = False
        self.eof_delivered = False
        stream.attach_local(self.transport)

    @property
    def received(self) -> bytes:
        return self.transport.value()

    @property
    def reading(self) -> bool:
        return self.transport.reading

    def send(self, data: bytes) -> None:
        self.inbox += data
        self.sent += data

    def shutdown_write(self) -> None:
        """The application half-closes; EOF is read after the inbox drains."""
        self.eof_pending = True

    def eof_now(self) -> None:
        """Deliver EOF at once, even while the stream is not reading."""
        assert not self.inbox, "bytes still unread"
        self.eof_pending = self.eof_delivered = True
        self.stream.local_eof()

    def lose(self) -> None:
        """The local connection breaks (as if reset by the peer)."""
        self.stream.local_lost("reset by test")

    def fill(self) -> None:
        """The local application stops reading: its socket's buffer is full."""
        self.stream.local_buffer_full()

    def drain(self) -> None:
        """The local application read everything: its buffer drained."""
        self.stream.local_buffer_drained()

    def feed(self) -> bool:
        """Hand the stream what it may read now; True if anything moved."""
        moved = False
        stream = self.stream
        while self.inbox and self.reading and not stream.closed and not self.transport.aborted:
            data = bytes(self.inbox[: self.chunk])
            del self.inbox[: self.chunk]
            stream.local_data(data)
            moved = True
        if (
            self.eof_pending
            and not self.eof_delivered
            and not self.inbox
            and self.reading
            and not stream.closed
        ):
            self.eof_delivered = True
            stream.local_eof()
            moved = True
        return moved


class RecordingDelegate:
    """A SessionDelegate that records every call.

    With C{auto_attach}, a stream the peer opens gets a L{LocalEnd} at once
    (like a client whose target accepted instantly).
    """

    def __init__(self, auto_attach: bool = True) -> None:
        self.auto_attach = auto_attach
        self.opened: list[tuple[int, int, dict[str, Any]]] = []
        self.control: list[Frame] = []
        self.closed: list[int] = []
        self.streams: dict[int, Stream] = {}
        self.ends: dict[int, LocalEnd] = {}
        self.datagrams: list[wire.Datagram] = []

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        self.opened.append((stream.id, tunnel_id, info))
        self.streams[stream.id] = stream
        if self.auto_attach:
            self.ends[stream.id] = LocalEnd(stream)

    def control_frame(self, session: Session, frame: Frame) -> None:
        self.control.append(frame)

    def stream_closed(self, session: Session, stream: Stream) -> None:
        self.closed.append(stream.id)

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None:
        self.datagrams.append(datagram)


class Pair:
    """A server and a client Session over in-memory links."""

    def __init__(
        self,
        settings: SessionSettings | None = None,
        client_settings: SessionSettings | None = None,
        auto_attach: bool = True,
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet.task import Clock  # a fake clock, not a reactor

            clock = Clock()
        self.clock: Any = clock
        self.server_delegate = RecordingDelegate(auto_attach=False)
        self.client_delegate = RecordingDelegate(auto_attach=auto_attach)
        self.server = Session(self.clock, self.server_delegate, True, settings)
        self.client = Session(self.clock, self.client_delegate, False, client_settings or settings)
        self.frames: list[tuple[str, Frame]] = []
        self.data_bytes: collections.Counter[tuple[str, int]] = collections.Counter()
        self.dropped: collections.Counter[str] = collections.Counter()  # link bytes lost
        self.links = 0
        self.connect(resuming=False)

    # ------------------------------------------------------------ links

    def connect(self, resuming: bool) -> None:
        """Give both sessions a new link (resuming: both send RESUME)."""
        self.links += 1
        self.server_link = FakeLink()
        self.client_link = FakeLink()
        self.decoders = {
            S2C: wire.FrameDecoder(self.client.settings.max_frame),
            C2S: wire.FrameDecoder(self.server.settings.max_frame),
        }
        self.server.attach(self.server_link, resuming, self.client.settings.max_frame)
        self.client.attach(self.client_link, resuming, self.server.settings.max_frame)

    def sever(self, deliver_s2c: int = 0, deliver_c2s: int = 0) -> None:
        """Break the link: deliver a prefix of what is in flight, drop the rest."""
        self.transfer(S2C, deliver_s2c)
        self.transfer(C2S, deliver_c2s)
        self.dropped[S2C] += self.in_flight(S2C) + self.decoders[S2C].buffered
        self.dropped[C2S] += self.in_flight(C2S) + self.decoders[C2S].buffered
        self.server_link.clear()
        self.client_link.clear()
        self.server.detach()
        self.client.detach()

    def reconnect(self, deliver_s2c: int = 0, deliver_c2s: int = 0) -> None:
        self.sever(deliver_s2c, deliver_c2s)
        self.connect(resuming=True)

    # ------------------------------------------------------------ moving bytes

    def _ends(self, direction: str) -> tuple[FakeLink, Session]:
        if direction == S2C:
            return self.server_link, self.client
        return self.client_link, self.server

    def in_flight(self, direction: str) -> int:
        return len(self._ends(direction)[0].value())

    def transfer(self, direction: str, limit: int | None = None) -> int:
        """Deliver up to `limit` bytes written in `direction`; return how many."""
        source, destination = self._ends(direction)
        data = source.value()
        if limit is not None and limit < len(data):
            data, rest = data[:limit], data[limit:]
            source.clear()
            source.out += rest
        else:
            source.clear()
        if data:
            for frame in self.decoders[direction].feed(data):
                self.frames.append((direction, frame))
                if frame.type is FrameType.DATA:
                    self.data_bytes[direction, frame.stream_id] += len(frame.body)
                destination.frame_received(frame)
        return len(data)

    def all_ends(self) -> list[LocalEnd]:
        return list(self.server_delegate.ends.values()) + list(self.client_delegate.ends.values())

    def step(self) -> bool:
        moved = False
        for end in self.all_ends():
            moved = end.feed() or moved
        moved = self.transfer(S2C) > 0 or moved
        moved = self.transfer(C2S) > 0 or moved
        return moved

    def pump(self, max_rounds: int = 100_000) -> None:
        """Run until nothing moves any more."""
        for _ in range(max_rounds):
            if not self.step():
                return
        raise AssertionError("pump did not settle")

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()

    # ------------------------------------------------------------ streams

    def open_server_end(self, tunnel_id: int = 1, info: dict[str, Any] | None = None) -> LocalEnd:
        """A visitor arrives: the server opens a stream (nothing is pumped)."""
        stream = self.server.open_stream(tunnel_id, info if info is not None else {"src": ["v", 1]})
        server_end = LocalEnd(stream)
        self.server_delegate.streams[stream.id] = stream
        self.server_delegate.ends[stream.id] = server_end
        return server_end

    def open(self, tunnel_id: int = 1, info: dict[str, Any] | None = None) -> tuple[LocalEnd, LocalEnd]:
        """Open a stream from the server and pump; return (server end, client end)."""
        server_end = self.open_server_end(tunnel_id, info)
        self.pump()
        return server_end, self.client_delegate.ends[server_end.stream.id]

    def frames_of(self, direction: str, ftype: FrameType, stream_id: int | None = None) -> list[Frame]:
        return [
            f
            for d, f in self.frames
            if d == direction and f.type is ftype and (stream_id is None or f.stream_id == stream_id)
        ]
