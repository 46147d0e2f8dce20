"""In-memory test doubles for rtunnel.mux: two Sessions joined by fake links.

Nothing here touches a reactor or a socket. A L{Pair} holds a server and a
client L{Session} on a L{Clock}; each side's link is a L{FakeLink} whose
transport is a L{StringTransport}. L{Pair.pump} moves the bytes each session
wrote through a L{wire.FrameDecoder} into the other session's
C{frame_received}, and lets every local socket (a L{LocalEnd}) hand its
application's bytes to its stream while the stream lets it read.
"""

from __future__ import annotations

import collections
import random
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from rtunnel import wire
from rtunnel.mux import Session, SessionSettings, Stream
from rtunnel.wire import ErrorCode, Frame, FrameType

S2C = "s2c"  # server -> client
C2S = "c2s"  # client -> server


def pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (a misordered or repeated chunk shows)."""
    return random.Random(seed).randbytes(size)


class LocalTransport(StringTransport):
    """A local TCP socket's transport: records half-close, abort and misuse."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.aborted = False
        self.misuse: list[str] = []

    def write(self, data: bytes) -> None:
        if self.write_closed or self.aborted:
            self.misuse.append(f"write of {len(data)} bytes after close")
        super().write(data)

    def loseWriteConnection(self) -> None:
        if self.write_closed:
            self.misuse.append("loseWriteConnection twice")
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class FakeLink:
    """What a Session needs of its link (see rtunnel.mux.Link)."""

    def __init__(self, srtt: float = 0.1) -> None:
        self.transport = StringTransport()
        self.srtt = srtt
        self.errors: list[tuple[ErrorCode, str]] = []

    def close_with_error(self, code: ErrorCode, reason: str) -> None:
        self.errors.append((code, reason))


class LocalEnd:
    """The local socket of one stream, seen from both of its ends.

    C{send} is the local application writing (bytes wait in C{inbox}, like a
    kernel buffer, until the stream reads them: only while the transport is
    not paused). C{received} is what the stream wrote to the application.
    """

    def __init__(self, stream: Stream, chunk: int = 16384) -> None:
        self.stream = stream
        self.chunk = chunk
        self.transport = LocalTransport()
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
        return self.transport.producerState == "producing"

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
        self.stream.local_lost(Failure(ConnectionLost("reset by test")))

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

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        self.opened.append((stream.id, tunnel_id, info))
        self.streams[stream.id] = stream
        if self.auto_attach:
            self.ends[stream.id] = LocalEnd(stream)

    def control_frame(self, session: Session, frame: Frame) -> None:
        self.control.append(frame)

    def stream_closed(self, session: Session, stream: Stream) -> None:
        self.closed.append(stream.id)


class Pair:
    """A server and a client Session over in-memory links."""

    def __init__(
        self,
        settings: SessionSettings | None = None,
        client_settings: SessionSettings | None = None,
        auto_attach: bool = True,
    ) -> None:
        self.clock = Clock()
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
        self.server_link.transport.clear()
        self.client_link.transport.clear()
        self.server.detach()
        self.client.detach()

    def reconnect(self, deliver_s2c: int = 0, deliver_c2s: int = 0) -> None:
        self.sever(deliver_s2c, deliver_c2s)
        self.connect(resuming=True)

    # ------------------------------------------------------------ moving bytes

    def _ends(self, direction: str) -> tuple[StringTransport, Session]:
        if direction == S2C:
            return self.server_link.transport, self.client
        return self.client_link.transport, self.server

    def in_flight(self, direction: str) -> int:
        return len(self._ends(direction)[0].value())

    def transfer(self, direction: str, limit: int | None = None) -> int:
        """Deliver up to `limit` bytes written in `direction`; return how many."""
        source, destination = self._ends(direction)
        data = source.value()
        if limit is not None and limit < len(data):
            data, rest = data[:limit], data[limit:]
            source.clear()
            source.write(rest)
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
