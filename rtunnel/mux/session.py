"""The session: one logical conversation between a client and the server.

A Session outlives the links (control connections) it runs over. It owns
the streams, the budget (rtunnel.mux.budget), the reliable-frame log
(rtunnel.mux.reliable) and the resume procedure of docs/protocol.md. It is
sans-IO: frames come in through `frame_received`, go out through its
`LinkPort`, and time comes from its `Timers` (rtunnel.mux.ports).

Backpressure, end to end:

* a stream stops reading its local socket when it has no credit, when the
  link asks the session to pause writing, or when there is no link;
* a stream grants credit only for bytes handed to its local socket while
  that socket is not asking it to pause.

Bounds: at each share of the budget's bound the session stops reading
(local sockets, or the link) or ends with ERROR; it never grows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from rtunnel import wire
from rtunnel.mux.budget import Budget
from rtunnel.mux.errors import ProtocolViolation, SessionBufferFull, StreamIdsExhausted
from rtunnel.mux.ports import Cancellable, LinkPort, ReactorClock, Timers, as_timers, cancel_call
from rtunnel.mux.reliable import Entry, ReliableLog
from rtunnel.mux.settings import SessionSettings
from rtunnel.mux.stream import Stream
from rtunnel.wire import ErrorCode, Frame, FrameType, ResetCode

if TYPE_CHECKING:
    from rtunnel.limits import Pacer


class SessionDelegate(TypingProtocol):
    """What an end (server or client) does with session events."""

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None: ...

    def control_frame(self, session: Session, frame: Frame) -> None: ...

    def stream_closed(self, session: Session, stream: Stream) -> None: ...

    def datagram_received(self, session: Session, datagram: wire.Datagram) -> None: ...


#: Datagrams below this size are joined with their header (and their read's
#: other datagrams) into one write to the link; larger ones are written as
#: header and payload, unjoined (the TLS layer encrypts them where they lie).
HELD_DATAGRAM = 16 * 1024

#: The name the ends used for the link interface before it was LinkPort.
Link = LinkPort


class Session:
    """The logical conversation between one client and the server.

    It lives across links: `attach` gives it a link, `detach` takes it away
    (streams keep their state and stop reading their local sockets).
    `clock` is `Timers`, or a Twisted reactor or Clock (see
    rtunnel.mux.ports.as_timers).
    """

    def __init__(
        self,
        clock: Timers | ReactorClock,
        delegate: SessionDelegate,
        is_server: bool,
        settings: SessionSettings | None = None,
    ) -> None:
        self.timers = as_timers(clock)
        self.delegate = delegate
        self.is_server = is_server
        self.settings = settings or SessionSettings()
        self.streams: dict[int, Stream] = {}
        self.link: LinkPort | None = None
        self.peer_max_frame = wire.DEFAULT_MAX_FRAME
        self._next_stream_id = 2 if is_server else 1
        self._highest_peer_stream = 0
        self._paused = False  # the link asked us to pause writing
        self._resuming = False  # attached, waiting for the peer's RESUME
        self.budget = Budget(self.settings)
        self.reliable = ReliableLog()
        self._link_unread = False  # we paused the link's reading (reply_backlog)
        self._failing = False  # an ERROR for the budget is on its way
        self._ack_timer: Cancellable | None = None
        self._credit_timer: Cancellable | None = None
        self._credit_due: dict[Stream, None] = {}  # a set in order (an empty dict costs 64 bytes, a set 216)
        self._link_waiters: dict[int, Stream] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        # datagrams (UDP tunnels): never queued, never replayed (docs/udp.md)
        self.link_epoch = 0  # one more per attached link: a flow's address is told once per link
        self.datagram_backlog = 0  # bytes of datagrams written since the link backed up
        self._flow_backlog: dict[tuple[int, int], int] = {}
        self._held_datagrams: list[bytes] | None = None  # frames of one socket read (hold_datagrams)
        # bandwidth limits (rtunnel.limits.Pacer), set by the server per client
        self.send_pacer: Pacer | None = None
        self.recv_pacer: Pacer | None = None

    # ------------------------------------------------------------ link state

    @property
    def can_send(self) -> bool:
        return self.link is not None and not self._resuming

    @property
    def can_read(self) -> bool:
        return self.link is not None and not self._resuming and not self._paused

    @property
    def srtt(self) -> float:
        return self.link.srtt if self.link is not None else 0.1

    def attach(self, link: LinkPort, resuming: bool, peer_max_frame: int) -> None:
        """Run over `link`. When `resuming`, wait for the peer's RESUME first."""
        self.link = link
        self.link_epoch += 1
        self.peer_max_frame = peer_max_frame
        self._resuming = resuming
        self._clear_datagram_backlog()
        self._paused = False
        link.watch_writes(self)
        if resuming:
            self.write(wire.encode_resume(self.resume_state()))
        else:
            self._update_all()

    def detach(self) -> None:
        """The link is gone; keep everything, stop reading local sockets."""
        link, self.link = self.link, None
        self.budget.reply_backlog, self._link_unread = 0, False
        if link is not None:
            link.unwatch_writes()
        self._cancel_timers()
        self._update_all()

    def close(self, code: ResetCode, reason: str) -> None:
        """End the session for good: reset every stream, stop every timer."""
        self.reset_all(code, reason)
        self.detach()
        self.reliable.clear()

    def grant_later(self, stream: Stream) -> None:
        """Return a stream's small leftover credit soon, not never: the peer
        keeps unacknowledged bytes for resend until we do."""
        self._credit_due[stream] = None
        if self._credit_timer is None:
            self._credit_timer = self.timers.call_later(self.settings.credit_delay, self._grant_due)

    def _grant_due(self) -> None:
        self._credit_timer = None
        due, self._credit_due = self._credit_due, {}
        for stream in due:
            stream._grant_credit(force=True)

    def replace_pacers(self, send_pacer: Pacer | None, recv_pacer: Pacer | None) -> None:
        """Switch to new bandwidth pacers (a reload changed the client's
        limits). Credit granted before counts as paid, but not to the new
        receive pacer, so it never refunds what it did not take; streams the
        old pacers held back go on at once."""
        self.send_pacer, self.recv_pacer = send_pacer, recv_pacer
        for stream in self.streams.values():
            stream.paid_limit = max(stream.paid_limit, stream.recv_limit)
            stream.unpaid_upto = stream.paid_limit
        self._update_all()

    def resume_state(self) -> wire.ResumeState:
        entries = tuple(s.resume_entry() for s in self.streams.values())
        return wire.ResumeState(self.reliable.received, entries)

    def _update_all(self) -> None:
        for stream in list(self.streams.values()):
            if self.can_send:
                stream.flush()
                stream._grant_credit()
            stream.update_reading()

    def _update_reading_all(self) -> None:
        for stream in list(self.streams.values()):
            stream.update_reading()

    # the link's send buffer, reported by the link (LinkPort.watch_writes)
    @property
    def link_paused(self) -> bool:
        return self._paused and self.link is not None and not self._resuming

    def wait_for_link(self, stream: Stream) -> None:
        """`stream` has bytes or reading held back by a paused link."""
        self._link_waiters[stream.id] = stream

    def pause_writing(self) -> None:
        """The link's send buffer is full. Called from inside our own
        writes: never write here. Streams stop reading lazily: each one that
        reads while the link is paused holds that read and pauses its socket
        (no epoll change for idle streams)."""
        self._paused = True

    def resume_writing(self) -> None:
        """The link sent everything it buffered."""
        self._paused = False
        self.budget.reply_backlog = 0
        self._clear_datagram_backlog()
        if self._link_unread:
            self._link_unread = False
            if self.link is not None:
                self.link.resume_reading()
        waiters, self._link_waiters = self._link_waiters, {}
        for stream in waiters.values():  # oldest first; re-blocked ones go last
            if not stream.closed:
                stream.flush()
                stream.update_reading()

    # ------------------------------------------------------------ writing

    def write(self, frame: bytes) -> None:
        if self.link is not None:
            self.bytes_out += len(frame)
            self.link.write(frame)

    def reply(self, frame: bytes) -> None:
        """Write a frame the peer caused (PONG, WINDOW, ACK, a reliable
        frame). While the link is backed up these count as its backlog; past
        the bound the link is not read until the peer has read what we sent
        (`resume_writing`). Replayed and DATA frames are not counted: flow
        control and the budget's other shares bound them, and a side that
        stopped reading for them could deadlock a resume."""
        link = self.link
        if link is None:
            return
        self.bytes_out += len(frame)
        if self._paused:
            budget = self.budget
            budget.reply_backlog += len(frame)
            if budget.reply_backlog > budget.reply_limit and not self._link_unread:
                self._link_unread = True
                link.pause_reading()
                link.session_log.info(
                    "not reading the link: {n} bytes of replies wait for the peer to read",
                    n=budget.reply_backlog, event="link_backpressure", limit=budget.reply_limit,
                )
        link.write(frame)

    def write_frame(self, header: bytes, body: bytes) -> None:
        """Write a frame as its header and body, without joining them (the
        link's TLS layer encrypts a large body where it lies)."""
        link = self.link
        if link is not None:
            self.bytes_out += len(header) + len(body)
            link.write_frame(header, body)

    def send_reliable(self, ftype: FrameType, stream_id: int, frame: bytes) -> None:
        """Send a frame that must survive a link drop (kept until ACKed)."""
        reliable = self.reliable
        reliable.keep(ftype, stream_id, frame)
        if self.can_send:
            self.reply(frame)
        if reliable.held > self.budget.reliable_limit:
            self._reliable_overflow()

    def _reliable_overflow(self) -> None:
        """The peer acknowledges too little of what we keep for it: end the
        session (an rtunnel peer ACKs at least once a second). Without a link
        nothing new arrives from the peer, and streams are refused long before."""
        link = self.link
        if link is None or self._failing:
            return
        self._failing = True
        link.close_with_error(
            ErrorCode.LIMIT_EXCEEDED,
            f"{len(self.reliable.outbox)} reliable frames ({self.reliable.held} bytes) are waiting for an "
            f"ACK, more than the {self.budget.reliable_limit} bytes allowed (1/16 of the session buffer); "
            "an rtunnel peer acknowledges at least once a second (docs/protocol.md), so this one is broken "
            "or hostile",
        )

    # ------------------------------------------------------------ datagrams

    def send_datagram(
        self, tunnel_id: int, flow_id: int, payload: bytes, address: tuple[str, int] | None = None,
    ) -> str | None:
        """Send one datagram now or never: None if it was written, else why
        it was dropped ("link_down": no link or a resume under way;
        "too_big": over the peer's max_frame; "backlog"/"flow_backlog": the
        link is backed up and the session's, or this flow's, share of
        datagrams written since is used up). Datagrams are never kept for
        later, take no stream credit and are not replayed on resume."""
        link = self.link
        if link is None or self._resuming:
            return "link_down"
        size = len(payload)
        if size > wire.max_datagram_payload(self.peer_max_frame):
            return "too_big"
        if self._paused:
            settings = self.settings
            if self.datagram_backlog + size > settings.datagram_backlog:
                return "backlog"
            key = (tunnel_id, flow_id)
            held = self._flow_backlog.get(key, 0) + size
            if held > settings.flow_backlog:
                return "flow_backlog"
            self._flow_backlog[key] = held
            self.datagram_backlog += size
        header = wire.datagram_header(tunnel_id, flow_id, size, address)
        frames = self._held_datagrams
        if frames is not None and size < HELD_DATAGRAM:
            frames += (header, payload)
            self.bytes_out += len(header) + size
            return None
        if frames:
            self.release_datagrams(hold=True)  # a large one goes after those before it
        self.write_frame(header, payload)
        return None

    def hold_datagrams(self) -> None:
        """The datagrams sent from now until `release_datagrams` (those of
        one read of a UDP socket) go to the link in one write. Each is still
        sent or dropped when `send_datagram` is called: only the write to
        the link is put together."""
        if self._held_datagrams is None:
            self._held_datagrams = []

    def release_datagrams(self, hold: bool = False) -> None:
        """Write the held datagrams to the link; hold no more unless `hold`."""
        frames = self._held_datagrams
        self._held_datagrams = [] if hold else None
        if frames and self.link is not None:
            self.link.write(b"".join(frames))

    def _clear_datagram_backlog(self) -> None:
        self.datagram_backlog = 0
        if self._flow_backlog:
            self._flow_backlog = {}

    def send_json(self, ftype: FrameType, obj: dict[str, Any]) -> None:
        self.send_reliable(ftype, 0, wire.encode_json(ftype, obj))

    # ------------------------------------------------------------ streams

    def open_stream(self, tunnel_id: int, info: dict[str, Any]) -> Stream:
        """Open a stream towards the peer (server: a visitor arrived)."""
        stream_id = self._next_stream_id
        if stream_id > wire.MAX_U32:
            raise StreamIdsExhausted("this session has used every stream id; a new session is needed")
        if not self.room_for_stream():
            raise SessionBufferFull(self.why_full())
        self._next_stream_id += 2
        stream = Stream(self, stream_id, tunnel_id)
        self.admit(stream)
        self.streams[stream_id] = stream
        self.send_reliable(FrameType.OPEN, stream_id, wire.encode_open(stream_id, tunnel_id, info))
        return stream

    @property
    def queued_reliable(self) -> int:
        """Reliable frames kept until the peer acknowledges them."""
        return len(self.reliable.outbox)

    @property
    def _outbox(self) -> list[Entry]:
        """The reliable frames kept for replay (for tests and tools)."""
        return self.reliable.outbox

    def forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self.delegate.stream_closed(self, stream)

    def reset_all(self, code: ResetCode, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream.reset(code, reason)

    # ------------------------------------------------------------ the budget

    @property
    def held_send(self) -> int:
        return self.budget.held_send

    @property
    def held_windows(self) -> int:
        return self.budget.held_windows

    @property
    def held_reliable(self) -> int:
        return self.reliable.held

    @property
    def reply_backlog(self) -> int:
        return self.budget.reply_backlog

    @property
    def streams_full(self) -> bool:
        return self.budget.streams_full

    @property
    def held(self) -> int:
        """Bytes this session holds on behalf of its peer, by the budget's
        count (reserved windows included; the link's backlog too)."""
        budget = self.budget
        return budget.held_send + budget.held_windows + self.reliable.held + budget.reply_backlog

    def stream_reservation(self) -> int:
        """What a new stream reserves: the initial window the peer may fill
        without a grant, and what its local socket may buffer beyond it."""
        return self.budget.reservation

    def room_for_stream(self) -> bool:
        """True if a new stream fits in the budget (its reservation, and the
        reliable frames its OPEN, FIN and RST will need)."""
        return self.budget.room_for_stream(self.reliable.held)

    def why_full(self) -> str:
        """The sentence for a refused stream."""
        budget = self.budget
        if self.reliable.held > budget.reliable_limit // 2:
            return (
                f"the peer has not acknowledged {len(self.reliable.outbox)} reliable frames "
                f"({self.reliable.held} bytes); no new connection until it does"
            )
        return (
            f"the session buffer is full: {len(self.streams)} connections hold "
            f"{budget.held_streams} of the {budget.admit_limit} bytes "
            f"they may use ({budget.reservation} per connection); raise --session-buffer"
        )

    def admit(self, stream: Stream) -> None:
        """Reserve a new stream's receive window and local buffer."""
        stream.reserved = self.budget.reservation
        self.budget.held_windows += stream.reserved

    def charge_send(self, n: int) -> None:
        """`n` bytes were read from a local socket; stop reading every local
        socket once the streams' bytes reach their bound."""
        if self.budget.charge_send(n):
            self.streams_reached_bound()

    def streams_reached_bound(self) -> None:
        """The streams' share of the budget reached its high mark."""
        self._update_reading_all()

    def release_send(self, n: int) -> None:
        if self.budget.release_send(n):
            self._update_reading_all()

    def reserve_window(self, extra: int) -> bool:
        return self.budget.reserve_window(extra)

    def release_window(self, amount: int) -> None:
        if self.budget.release_window(amount):
            self._update_reading_all()

    # ------------------------------------------------------------ reading

    def frame_received(self, frame: Frame) -> None:
        """Handle one frame from the link. Raises ProtocolViolation."""
        ftype = frame.type
        if self._resuming and ftype is not FrameType.RESUME:
            if ftype is FrameType.GOAWAY:  # sent by peers of before 2026-12 during a resume: harmless
                self.delegate.control_frame(self, frame)
                return
            raise ProtocolViolation(f"expected RESUME, got {ftype.name}")
        if ftype is FrameType.DATA:
            stream = self._stream_for(frame)
            if stream is not None:
                self.bytes_in += len(frame.body)
                stream.data_received(frame.body)
            return
        if ftype is FrameType.DATAGRAM:
            self.delegate.datagram_received(self, wire.decode_datagram(frame))
            return
        if ftype is FrameType.WINDOW:
            stream = self._stream_for(frame)
            if stream is not None:
                stream.window_received(*wire.decode_window(frame))
            return
        if ftype in wire.RELIABLE:
            self._count_reliable()
        if ftype is FrameType.OPEN:
            self._open_received(frame)
        elif ftype is FrameType.FIN:
            stream = self._stream_for(frame)
            if stream is not None:
                stream.fin_received(wire.decode_u64(frame))
        elif ftype is FrameType.RST:
            stream = self._stream_for(frame)
            if stream is not None:
                code, reason = wire.decode_coded(frame)
                if self.link is not None:
                    self.link.session_log.debug("stream {id} reset by peer: {reason}", id=stream.id, reason=reason)
                stream.reset(ResetCode.ABORTED, reason, send=False)
        elif ftype is FrameType.ACK:
            self.reliable.acknowledged(wire.decode_u64(frame))
        elif ftype is FrameType.RESUME:
            self._resume_received(frame)
        elif ftype in (FrameType.HELLO, FrameType.WELCOME):
            raise ProtocolViolation(f"{ftype.name} after the handshake")
        else:
            self.delegate.control_frame(self, frame)

    def _stream_for(self, frame: Frame) -> Stream | None:
        stream = self.streams.get(frame.stream_id)
        if stream is not None:
            return stream
        mine = (frame.stream_id % 2 == 0) == self.is_server
        highest = self._next_stream_id - 2 if mine else self._highest_peer_stream
        if frame.stream_id > highest:
            raise ProtocolViolation(f"{frame.type.name} for stream {frame.stream_id}, never opened")
        return None  # a stream already finished or reset: ignore

    def _open_received(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if self.is_server or stream_id % 2 != 0:
            raise ProtocolViolation(f"OPEN for stream {stream_id} from the wrong side")
        if stream_id <= self._highest_peer_stream:
            raise ProtocolViolation(f"OPEN reuses stream id {stream_id}")
        tunnel_id, info = wire.decode_open(frame)
        self._highest_peer_stream = stream_id
        stream = Stream(self, stream_id, tunnel_id)
        room = self.room_for_stream()
        if room:
            self.admit(stream)
        self.streams[stream_id] = stream
        if len(self.streams) > self.settings.max_streams:
            stream.reset(ResetCode.LIMIT, f"more than {self.settings.max_streams} connections open")
            return
        if not room:
            stream.reset(ResetCode.LIMIT, self.why_full())
            return
        self.delegate.stream_opened(self, stream, tunnel_id, info)

    # ------------------------------------------------------------ reliability

    def _count_reliable(self) -> None:
        if self.reliable.count_received() >= self.settings.ack_every:
            self._send_ack()
        elif self._ack_timer is None:
            self._ack_timer = self.timers.call_later(self.settings.ack_delay, self._send_ack)

    def _send_ack(self) -> None:
        timer, self._ack_timer = self._ack_timer, None
        cancel_call(timer)
        if self.can_send and self.reliable.ack_due:
            self.reply(wire.encode_ack(self.reliable.take_ack()))

    def _cancel_timers(self) -> None:
        cancel_call(self._ack_timer)
        cancel_call(self._credit_timer)
        self._ack_timer = self._credit_timer = None
        self._credit_due.clear()

    def _resume_received(self, frame: Frame) -> None:
        if not self._resuming:
            raise ProtocolViolation("RESUME when no resume was negotiated")
        state = wire.decode_resume(frame)
        self.reliable.acknowledged(state.reliable_received)
        self._resuming = False
        self.reliable.reported = self.reliable.received
        replayed_opens = set()
        for _, ftype, stream_id, data in self.reliable.outbox:
            if ftype is FrameType.OPEN:
                replayed_opens.add(stream_id)
            self.write(data)
        listed = {entry.stream_id: entry for entry in state.streams}
        for stream in list(self.streams.values()):
            entry = listed.get(stream.id)
            if entry is not None:
                stream.resume_from(entry.received, entry.limit)
            else:
                stream.resume_unknown_to_peer(stream.id in replayed_opens)
        self._update_all()
        if self.link is not None:
            self.link.session_log.info(
                "session resumed: {streams} streams, {replayed} frames replayed",
                streams=len(self.streams),
                replayed=len(self.reliable.outbox),
                event="session_replayed",
            )
