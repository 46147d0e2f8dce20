"""Stateful fuzzing of one Session behind a real ControlLink.

A hypothesis RuleBasedStateMachine plays a hostile (or merely sloppy) peer
against one Session, server side or client side. Everything the peer sends
goes through ControlLink.dataReceived, as on a real link; the link's
transport is a StringTransport and time is a Clock, so every ERROR frame and
every close is observable. The peer mixes valid frames (built from the
session's own state, so they reach deep) with invalid ones: DATA/WINDOW/FIN/
RST for known, finished and never-opened streams, OPEN (valid, duplicate,
wrong parity), ACK with any count, RESUME at the wrong time, JSON control
frames with random bodies, random bytes. Local sockets produce data, EOF,
loss and back-pressure; the clock advances; the link drops and resumes.

Invariants:

* nothing but a clean close of the link escapes dataReceived, and the close
  of a violation is explained: an ERROR frame with a non-empty reason (never
  `internal`, which would mean a handler raised something unexpected);
* everything the session writes is valid framing;
* while the link is alive: per-stream flow-control bounds hold, the session
  only lists streams that are not closed, bytes reach local sockets in order
  and intact, and the window budget accounts for every grown window;
* once the session is closed, no timer is left on the clock.

Runs follow the hypothesis profile loaded by tests/__init__.py (the default
is quick; HYPOTHESIS_PROFILE=fuzz runs thousands of cases).
"""

from __future__ import annotations

import struct
import traceback
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rtunnel import mux, wire
from rtunnel.limits import Pacer, TokenBucket
from rtunnel.link import ControlLink, Keepalive
from rtunnel.mux import ProtocolViolation, Session, SessionSettings, Stream
from rtunnel.wire import ErrorCode, Frame, FrameError, FrameType, ResetCode
from tests.memory import LocalEnd

# Small numbers so windows fill, grow and run out within ~50 steps.
SETTINGS = dict(
    initial_window=4096,
    max_stream_window=16384,
    session_window_budget=65536,  # 48 KiB for windows: 6 streams of 5 KiB, and some growth
    max_frame=wire.MIN_MAX_FRAME,
    max_streams=6,
    ack_every=4,
    ack_delay=1.0,
    credit_delay=0.02,
    idle_window_reset=30.0,
    local_buffer=1024,
)
PEER_MAX_FRAME = wire.MIN_MAX_FRAME
KEEPALIVE = Keepalive(interval=10.0, dead_after=30.0)

# No max_examples here: it comes from the loaded profile (tests/__init__.py).
FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, wire.MAX_U32)
u64 = st.integers(0, wire.MAX_U64)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
json_objects = st.dictionaries(
    st.sampled_from(["tunnel", "host", "port", "code", "message", "session", "x"]) | st.text(max_size=8),
    json_values,
    max_size=5,
)
control_types = st.sampled_from(
    [
        FrameType.BIND,
        FrameType.BOUND,
        FrameType.BIND_FAILED,
        FrameType.UNBIND,
        FrameType.HELLO,
        FrameType.WELCOME,
    ]
)


class FuzzLink(ControlLink):
    """A ControlLink with a session already attached; records what escaped
    the frame handlers that ControlLink's catch-all would have hidden."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, KEEPALIVE)
        self.unexpected: list[str] = []
        self.errors_received: list[tuple[int, str]] = []
        self.failed = False

    def frame_received(self, frame: Frame) -> None:
        try:
            super().frame_received(frame)
        except (FrameError, struct.error, ProtocolViolation):
            raise
        except Exception:
            self.unexpected.append(traceback.format_exc())
            raise

    def error_received(self, code: int, reason: str) -> None:
        self.errors_received.append((code, reason))

    def session_failed(self) -> None:
        self.failed = True


class Delegate:
    """Session delegate: decodes control bodies like the real ends do (so a
    malformed body is a protocol error), attaches local sockets on request."""

    def __init__(self, is_server: bool) -> None:
        self.is_server = is_server
        self.control: list[Frame] = []
        self.closed: list[int] = []

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None:
        if self.is_server:
            raise ProtocolViolation("clients may not open streams in protocol version 1")

    def control_frame(self, session: Session, frame: Frame) -> None:
        if frame.type is not FrameType.GOAWAY:
            wire.decode_json(frame)
        self.control.append(frame)

    def stream_closed(self, session: Session, stream: Stream) -> None:
        self.closed.append(stream.id)


def parse_all(data: bytes, max_frame: int) -> list[Frame]:
    decoder = wire.FrameDecoder(max_frame)
    frames = list(decoder.feed(data))
    assert decoder.buffered == 0, f"session wrote a partial frame ({decoder.buffered} bytes left)"
    return frames


class SessionMachine(RuleBasedStateMachine):
    IS_SERVER = True

    def __init__(self) -> None:
        super().__init__()
        self.fresh_session()

    def fresh_session(self) -> None:
        self.clock = Clock()
        self.delegate = Delegate(self.IS_SERVER)
        self.session = Session(self.clock, self.delegate, self.IS_SERVER, SessionSettings(**SETTINGS))
        self.ends: dict[int, LocalEnd] = {}
        self.fed: dict[int, bytearray] = {}  # bytes the peer delivered per stream
        self.tainted: set[int] = set()  # streams that got random bytes
        self.dead = False  # the session ended after a violation
        self.link: FuzzLink | None = None
        self.next_peer_id = 1 if self.IS_SERVER else 2
        self.ever_opened: set[int] = set()
        self.connect(resuming=False)

    # ------------------------------------------------------------ plumbing

    def connect(self, resuming: bool) -> None:
        link = FuzzLink(self.clock)
        link.makeConnection(StringTransport())
        link.start_session(self.session, resuming, PEER_MAX_FRAME)
        self.link = link
        self.link_resuming = resuming

    @property
    def alive(self) -> bool:
        return self.link is not None and not self.link.closing and not self.dead

    def feed(self, data: bytes) -> None:
        """Deliver peer bytes; check that a close that follows is explained."""
        link = self.link
        assert link is not None
        before = len(link.transport.value())
        link.dataReceived(data)  # must not raise
        assert not link.unexpected, "a frame handler raised:\n" + "\n".join(link.unexpected)
        if link.closing:
            self.after_close(link, before)

    def after_close(self, link: FuzzLink, before: int) -> None:
        assert link.transport.disconnecting, "link closing but transport not told to close"
        if link.errors_received:
            # the peer sent ERROR: we close without answering
            assert link.failed
        else:
            out = parse_all(link.transport.value(), PEER_MAX_FRAME)
            assert out, "link closed without writing anything"
            last = out[-1]
            assert last.type is FrameType.ERROR, f"link closed, last frame written is {last.type.name}"
            code, reason = wire.decode_coded(last)
            assert reason.strip(), "ERROR frame without a reason"
            assert code != ErrorCode.INTERNAL, f"internal error: {reason}"
            assert code in set(ErrorCode), code
        # what the real ends do: an ERROR ends the session; the reactor then
        # reports the connection lost
        self.session.close(ResetCode.EXPIRED, "protocol error")
        link.connectionLost(Failure(ConnectionDone()))
        self.dead = True
        self.check_closed_session()

    def check_closed_session(self) -> None:
        assert self.session.link is None
        assert self.session.streams == {}, self.session.streams
        pending = [c for c in self.clock.getDelayedCalls() if c.active()]
        assert not pending, f"timers left after the session closed: {pending}"
        for end in self.ends.values():
            assert end.transport.aborted or end.transport.closed or end.stream.local is None, (
                f"local socket of {end.stream} left open"
            )

    def stream_ids(self) -> list[int]:
        return sorted(self.session.streams)

    def hostile(self, data: st.DataObject) -> bool:
        """About one peer frame in twelve is a deliberate violation (more and
        the session rarely lives long enough to get interesting)."""
        return data.draw(st.integers(0, 11), label="hostile") == 0

    def pick_stream(self, data: st.DataObject, hostile: bool) -> int | None:
        """A known stream (or, harmless, a finished one); hostile: any id."""
        known = self.stream_ids()
        finished = sorted(self.ever_opened - set(known))
        if hostile:
            return data.draw(st.integers(1, 40) | u32.filter(bool) | st.sampled_from(known or [1]), label="id")
        if self.session._resuming:
            return None  # only RESUME is valid now
        if finished and data.draw(st.integers(0, 7)) == 0:
            return data.draw(st.sampled_from(finished), label="finished id")
        if known:
            return data.draw(st.sampled_from(known), label="known id")
        return None

    # ------------------------------------------------------------ peer frames

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def peer_data(self, data: st.DataObject) -> None:
        hostile = self.hostile(data)
        sid = self.pick_stream(data, hostile)
        if sid is None:
            return
        stream = self.session.streams.get(sid)
        room = 100
        if stream is not None:
            room = stream.recv_limit - stream.received
            if stream.final_offset is not None:
                room = min(room, stream.final_offset - stream.received)
        if room <= 0 and not hostile:
            return
        if hostile:
            size = data.draw(st.integers(1, PEER_MAX_FRAME + 10), label="size")
        else:
            size = data.draw(st.integers(1, min(room, PEER_MAX_FRAME)), label="size")
        body = (data.draw(st.binary(min_size=1, max_size=16)) * (size // 16 + 1))[:size]
        known = sid in self.session.streams
        self.feed(wire.encode(FrameType.DATA, sid, body))
        if self.alive and known:
            self.fed.setdefault(sid, bytearray()).extend(body)

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def peer_window(self, data: st.DataObject) -> None:
        hostile = self.hostile(data)
        sid = self.pick_stream(data, hostile)
        if sid is None:
            return
        stream = self.session.streams.get(sid)
        if stream is not None and not hostile:
            consumed = data.draw(st.integers(stream.peer_consumed, stream.sent))
        else:
            consumed = data.draw(u64)
        window = data.draw(st.sampled_from([0, 1, 4096, 16384, 1 << 20, wire.MAX_U32]) | u32)
        self.feed(wire.encode_window(sid, consumed, window))

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def peer_fin(self, data: st.DataObject) -> None:
        hostile = self.hostile(data)
        sid = self.pick_stream(data, hostile)
        if sid is None:
            return
        stream = self.session.streams.get(sid)
        if stream is not None and not hostile:
            if stream.final_offset is not None:
                return  # a second FIN is a violation
            offset = data.draw(st.integers(stream.received, stream.recv_limit))
        else:
            offset = data.draw(u64)
        self.feed(wire.encode_fin(sid, offset))

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), code=u16, reason=st.text(max_size=30))
    def peer_rst(self, data: st.DataObject, code: int, reason: str) -> None:
        if data.draw(st.integers(0, 3)):
            return  # resets end streams: keep them rarer than data
        sid = self.pick_stream(data, self.hostile(data))
        if sid is not None:
            self.feed(wire.encode_coded(FrameType.RST, sid, code, reason))

    @precondition(lambda self: self.alive)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["duplicate", "wrong_parity", "skip", "any", "bad_json"]),
        tunnel=u32,
        info=json_objects,
        raw_json=st.binary(min_size=2, max_size=20),
    )
    def peer_open(
        self, data: st.DataObject, kind: str, tunnel: int, info: dict[str, Any], raw_json: bytes
    ) -> None:
        """Client side: the server opens streams (valid), or breaks the rules.
        Server side: every OPEN from a client is a violation."""
        hostile = self.hostile(data)
        if self.IS_SERVER and not hostile:
            return
        if not hostile and self.session._resuming:
            return
        if not hostile:
            kind = "next"
        if kind == "next":
            sid = self.next_peer_id
        elif kind == "duplicate":
            sid = max(self.next_peer_id - 2, 2)
        elif kind == "wrong_parity":
            sid = self.next_peer_id + 1
        elif kind == "skip":
            sid = self.next_peer_id + 4
        else:
            sid = tunnel % 64 + 1
        if sid % 2 == self.next_peer_id % 2 and sid >= self.next_peer_id:
            self.next_peer_id = sid + 2
        if kind == "bad_json":
            frame = wire.encode(FrameType.OPEN, sid, wire.U32.pack(tunnel) + raw_json)
        else:
            frame = wire.encode_open(sid, tunnel, info)
        self.feed(frame)
        if sid in self.session.streams:
            self.ever_opened.add(sid)

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def peer_ack(self, data: st.DataObject) -> None:
        sent = self.session.reliable.sent
        if self.hostile(data):
            count = data.draw(st.integers(0, sent + 2) | u64)
        elif self.session._resuming:
            return
        else:
            count = data.draw(st.integers(0, sent))
        self.feed(wire.encode_ack(count))

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def peer_resume(self, data: st.DataObject) -> None:
        """RESUME: valid when a resume is pending and its entries fit; at
        any other time a protocol error."""
        hostile = self.hostile(data)
        if not self.session._resuming and not hostile:
            return
        entries = []
        for sid, stream in self.session.streams.items():
            if data.draw(st.booleans(), label=f"list {sid}"):
                if hostile:
                    received = data.draw(u64)
                else:
                    received = data.draw(st.integers(stream.peer_consumed, stream.sent))
                limit = data.draw(st.integers(received, min(received + 65536, wire.MAX_U64)) | u64)
                entries.append(wire.ResumeEntry(sid, received, limit))
        for _ in range(data.draw(st.integers(0, 2))):  # streams we do not know: ignored
            entries.append(wire.ResumeEntry(data.draw(u32), data.draw(u64), data.draw(u64)))
        if hostile:
            reliable = data.draw(u64)
        else:
            reliable = data.draw(st.integers(0, self.session.reliable.sent))
        frame = wire.encode_resume(wire.ResumeState(reliable, tuple(entries)))
        if hostile and data.draw(st.booleans()):  # a count that lies
            frame = (
                frame[: wire.HEADER_SIZE + 8]
                + struct.pack(">I", len(entries) + 1)
                + frame[wire.HEADER_SIZE + 12 :]
            )
        self.feed(frame)

    @precondition(lambda self: self.alive)
    @rule(
        data=st.data(),
        ftype=control_types,
        body=json_objects,
        raw=st.binary(min_size=2, max_size=30),
        tunnel=st.integers(0, 5),
    )
    def peer_control(
        self, data: st.DataObject, ftype: FrameType, body: dict[str, Any], raw: bytes, tunnel: int
    ) -> None:
        if self.hostile(data):
            if data.draw(st.booleans()):
                self.feed(wire.encode_json(ftype, body))
            else:
                self.feed(wire.encode(ftype, 0, raw))
        elif self.session._resuming:
            return
        elif self.IS_SERVER:
            # what a client sends (the fuzz delegate does not bind for real)
            ftype = data.draw(st.sampled_from([FrameType.BIND, FrameType.UNBIND]))
            self.feed(wire.encode_json(ftype, {"tunnel": tunnel, "host": "127.0.0.1", "port": 0, **body}))
        else:
            ftype = data.draw(st.sampled_from([FrameType.BOUND, FrameType.BIND_FAILED]))
            self.feed(wire.encode_json(ftype, {"tunnel": tunnel, **body}))

    @precondition(lambda self: self.alive)
    @rule(
        data=st.data(),
        opaque=u64,
        pong=st.booleans(),
        code=u16,
        reason=st.text(max_size=20),
        which=st.sampled_from(["ping", "ping", "goaway", "error"]),
    )
    def peer_session_frame(
        self, data: st.DataObject, opaque: int, pong: bool, code: int, reason: str, which: str
    ) -> None:
        if self.session._resuming and not self.hostile(data):
            return  # only RESUME is valid now
        if which == "error" and not self.hostile(data):
            which = "ping"
        if which == "ping":
            self.feed(wire.encode_ping(opaque, pong))
        elif which == "goaway":
            self.feed(wire.encode_coded(FrameType.GOAWAY, 0, code, reason))
        else:
            self.feed(wire.encode_coded(FrameType.ERROR, 0, code, reason))

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), blob=st.binary(max_size=64))
    def peer_garbage(self, data: st.DataObject, blob: bytes) -> None:
        if not self.hostile(data):
            return
        # random bytes may happen to be DATA for a known stream: those bytes
        # are no longer accounted for
        self.tainted.update(self.session.streams)
        self.feed(blob)
        if self.alive and self.link is not None and self.link.decoder.buffered:
            # Part of a frame is buffered: what the peer sends next would be
            # read as its rest. Finish the job: no frame type is 0xff, and
            # this is longer than any frame, so the decoder must object.
            self.feed(b"\xff" * (PEER_MAX_FRAME + 2 * wire.HEADER_SIZE))
            assert not self.alive, "garbage after a partial frame was accepted"

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), cut=st.integers(1, 30))
    def peer_split_window(self, data: st.DataObject, cut: int) -> None:
        """A valid frame delivered in two pieces."""
        known = self.stream_ids()
        if not known or self.session._resuming:
            return
        stream = self.session.streams[data.draw(st.sampled_from(known))]
        frame = wire.encode_window(stream.id, stream.sent, 8192)
        cut = min(cut, len(frame) - 1)
        self.feed(frame[:cut])
        if self.alive:
            self.feed(frame[cut:])

    # ------------------------------------------------------------ local events

    def live_ends(self) -> list[int]:
        return [
            sid
            for sid, end in self.ends.items()
            if sid in self.session.streams and end.stream.local is not None
        ]

    @precondition(lambda self: not self.dead)
    @rule(tunnel=st.integers(1, 3))
    def local_open(self, tunnel: int) -> None:
        """Server: a visitor arrives. Client: the server opens a stream, or we
        bind a tunnel (a reliable frame to acknowledge)."""
        if self.IS_SERVER:
            if len(self.session.streams) >= SETTINGS["max_streams"] or not self.session.room_for_stream():
                return  # the visitor is refused
            stream = self.session.open_stream(tunnel, {"src": ["192.0.2.1", 1000], "dst": ["0.0.0.0", 4000]})
            self.ever_opened.add(stream.id)
            self.ends[stream.id] = LocalEnd(stream, chunk=1500)
        elif self.alive and not self.session._resuming and tunnel != 1:
            # a visitor reached the server, which opens a stream to us
            sid = self.next_peer_id
            self.next_peer_id += 2
            self.feed(wire.encode_open(sid, tunnel, {"src": ["192.0.2.1", 1000], "dst": ["0.0.0.0", 4000]}))
            if sid in self.session.streams:
                self.ever_opened.add(sid)
        else:
            self.session.send_json(FrameType.BIND, {"tunnel": tunnel, "host": "127.0.0.1", "port": 0})

    @precondition(lambda self: not self.dead and not self.IS_SERVER)
    @rule(data=st.data(), refuse=st.booleans())
    def local_connect(self, data: st.DataObject, refuse: bool) -> None:
        """Client: the target of a stream the server opened connects (or not)."""
        waiting = [sid for sid in self.stream_ids() if sid not in self.ends]
        if not waiting:
            return
        stream = self.session.streams[data.draw(st.sampled_from(waiting))]
        if refuse:
            stream.local_failed(ResetCode.REFUSED, "connection refused")
        else:
            self.ends[stream.id] = LocalEnd(stream, chunk=1500)

    @precondition(lambda self: not self.dead)
    @rule(data=st.data(), size=st.integers(1, 9000))
    def local_send(self, data: st.DataObject, size: int) -> None:
        live = self.live_ends()
        if live:
            end = self.ends[data.draw(st.sampled_from(live))]
            end.send(bytes([size % 251]) * size)
            end.feed()

    @precondition(lambda self: not self.dead)
    @rule(data=st.data(), event=st.sampled_from(["eof", "lost", "pause", "resume", "feed"]))
    def local_event(self, data: st.DataObject, event: str) -> None:
        live = self.live_ends()
        if not live:
            return
        end = self.ends[data.draw(st.sampled_from(live))]
        if event == "eof":
            end.shutdown_write()
            end.feed()
        elif event == "lost":
            end.lose()
        elif event == "pause":
            end.fill()
        elif event == "resume":
            end.drain()
        else:
            end.feed()

    @precondition(lambda self: self.alive)
    @rule(pause=st.booleans())
    def link_backpressure(self, pause: bool) -> None:
        if pause:
            self.session.pause_writing()
        else:
            self.session.resume_writing()
            for end in self.ends.values():
                if not end.stream.closed and end.stream.local is not None:
                    end.feed()

    @precondition(lambda self: not self.dead)
    @rule(seconds=st.sampled_from([0.0, 0.01, 0.05, 1.0, 5.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        link = self.link
        if link is not None and link.closing:
            # keepalive declared the link dead (abortConnection): a clean end
            link.connectionLost(Failure(ConnectionDone()))
            self.link = None

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def drop_link(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 3)):
            return  # links break, but not every few frames
        link = self.link
        assert link is not None
        link.connectionLost(Failure(ConnectionDone()))
        self.link = None
        assert self.session.link is None

    @precondition(lambda self: self.link is None and not self.dead)
    @rule(resuming=st.booleans())
    def relink(self, resuming: bool) -> None:
        """A new link; resuming: the session sends RESUME and waits for ours."""
        self.connect(resuming)
        if resuming:
            out = parse_all(self.link.transport.value(), PEER_MAX_FRAME)
            assert out and out[0].type is FrameType.RESUME, out
            state = wire.decode_resume(out[0])
            assert {e.stream_id for e in state.streams} == set(self.session.streams)

    @precondition(lambda self: self.alive and self.session._resuming)
    @rule()
    def peer_resume_valid(self) -> None:
        """The RESUME an honest peer that lost nothing would send."""
        entries = tuple(
            wire.ResumeEntry(s.id, s.sent, s.send_limit) for s in self.session.streams.values()
        )
        link = self.link
        self.feed(wire.encode_resume(wire.ResumeState(self.session.reliable.sent, entries)))
        if not self.alive:
            out = parse_all(link.transport.value(), PEER_MAX_FRAME)
            raise AssertionError(f"a valid RESUME was refused: {wire.decode_coded(out[-1])}")

    @precondition(lambda self: self.dead)
    @rule()
    def start_over(self) -> None:
        """The session ended on a violation: a new client, a new session."""
        self.fresh_session()

    # ------------------------------------------------------------ invariants

    @invariant()
    def output_is_valid_framing(self) -> None:
        if self.link is not None:
            parse_all(self.link.transport.value(), PEER_MAX_FRAME)

    @invariant()
    def stream_bounds(self) -> None:
        if not self.alive:
            return
        settings_ = self.session.settings
        grown = 0
        for sid, stream in self.session.streams.items():
            assert stream.id == sid
            assert not stream.closed, f"{stream} is closed but still listed"
            assert 0 <= stream.peer_consumed <= stream.sent <= stream.send_limit, (
                f"{stream}: acked {stream.peer_consumed}, sent {stream.sent}, limit {stream.send_limit}"
            )
            assert stream.sent - stream.peer_consumed <= settings_.max_stream_window, (
                f"{stream}: {stream.sent - stream.peer_consumed} bytes unacknowledged"
            )
            assert stream.received <= stream.recv_limit, f"{stream}: received past the limit"
            assert stream.window <= settings_.max_stream_window
            assert stream.buffered_out >= stream.sent - stream.peer_consumed
            grown += stream.window - settings_.initial_window + stream.reserved
        session = self.session
        # the budget's counters are what the streams and the outbox hold
        assert session.held_windows == grown, (session.held_windows, grown)
        assert session.held_windows <= settings_.session_window_budget * 3 // 4
        held_send = sum(s.buffered_out for s in session.streams.values())
        assert session.held_send == held_send, (session.held_send, held_send)
        outbox = sum(len(entry[3]) + mux.RELIABLE_ENTRY_OVERHEAD for entry in session._outbox)
        assert session.held_reliable == outbox, (session.held_reliable, outbox)

    @invariant()
    def bytes_arrive_intact(self) -> None:
        for sid, end in self.ends.items():
            if sid in self.tainted:
                continue
            got = end.received
            fed = bytes(self.fed.get(sid, b""))
            if sid in self.session.streams and end.stream.local is not None:
                assert got == fed, f"stream {sid}: {len(got)} bytes delivered, {len(fed)} received"
            else:
                assert fed.startswith(got)

    @invariant()
    def local_transports_not_misused(self) -> None:
        for end in self.ends.values():
            assert not end.transport.misuse, end.transport.misuse

    def teardown(self) -> None:
        if not self.dead:
            self.session.close(ResetCode.SHUTDOWN, "test over")
            if self.link is not None:
                self.link.lose()
                self.link.connectionLost(Failure(ConnectionDone()))
                self.link = None
            self.check_closed_session()


class ServerSessionMachine(SessionMachine):
    IS_SERVER = True


class ClientSessionMachine(SessionMachine):
    IS_SERVER = False


class SessionFuzzTests(SynchronousTestCase):
    """Trial only collects test_* methods, not the machines' runTest."""

    def test_server_session(self) -> None:
        run_state_machine_as_test(ServerSessionMachine, settings=FUZZ_SETTINGS)

    def test_client_session(self) -> None:
        run_state_machine_as_test(ClientSessionMachine, settings=FUZZ_SETTINGS)


# ---------------------------------------------------------------- bandwidth-limited


def tiny_pacer(clock: Clock, wake: str) -> Pacer:
    pacer = Pacer(clock, 2000, wake)
    pacer.bucket = TokenBucket(clock, 2000, burst=600)
    pacer.quantum = 300
    return pacer


class PacedSessionMachine(ServerSessionMachine):
    """The stateful fuzzer above on a server session with both directions
    bandwidth-limited (rtunnel.limits' Pacer): hostile frames and resumes must
    still end only in explained closes, with nothing left waiting."""

    def fresh_session(self) -> None:
        super().fresh_session()
        # a tiny bucket, so that the fuzzer's few kilobytes are held often
        self.session.send_pacer = tiny_pacer(self.clock, "paced_flush")
        self.session.recv_pacer = tiny_pacer(self.clock, "paced_grant")

    def teardown(self) -> None:
        super().teardown()
        for pacer in (self.session.send_pacer, self.session.recv_pacer):
            assert pacer.waiting == 0, f"{pacer.waiting} streams still wait after the session closed"
            assert pacer._timer is None, "a refill timer is left behind"


class PacedFuzzTests(SynchronousTestCase):
    """Trial only collects test_* methods, not the machine's runTest."""

    def test_paced_server_session(self) -> None:
        run_state_machine_as_test(PacedSessionMachine, settings=FUZZ_SETTINGS)
