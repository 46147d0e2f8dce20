"""The multiplexer: one Session type used by both ends.

A Session outlives the links (TLS connections) it runs over. It owns the
streams (one per tunnelled TCP connection), their credit-based flow control,
the log of reliable frames kept for replay, and the resume procedure of
docs/protocol.md. It knows its link and the local sockets only through
Twisted interfaces, so it runs on memory transports with a fake clock.

Backpressure, end to end:

* a stream stops reading its local socket when it has no credit, when the
  link's transport asks the session to pause, or when there is no link;
* a stream grants credit only for bytes handed to its local socket while
  that socket is not asking it to pause.

Bounds: every byte a session holds on behalf of its peer counts against one
budget, `SessionSettings.session_window_budget` (--session-buffer), split
as docs/security.md ("Memory per session") describes: stream buffers and
reserved receive windows, reliable frames awaiting ACK, and replies queued
to a link whose peer does not read. At each share's bound the session stops
reading (local sockets, or the link) or ends with ERROR; it never grows.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel import wire
from rtunnel.transports import READ_SIZE, close_write_now, set_read_size, write_now
from rtunnel.wire import ErrorCode, Frame, FrameType, ResetCode

if TYPE_CHECKING:
    from rtunnel.limits import Pacer


class ProtocolViolation(Exception):
    """The peer broke the protocol; the link is closed with this reason."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class StreamIdsExhausted(Exception):
    """No stream id is left in this session (after 2**31 streams)."""


class SessionBufferFull(Exception):
    """A new stream would take the session past its buffer budget."""


#: What one reliable frame kept for replay costs beyond its bytes (the
#: outbox's tuple, ints and bytes header, as measured by sys.getsizeof).
RELIABLE_ENTRY_OVERHEAD = 192


@dataclass(frozen=True)
class SessionSettings:
    """Tunable limits of one session (see docs). Frozen: a per-client
    variant is `dataclasses.replace(settings, max_streams=...)`, and a live
    session is given a new object, never an edited one."""

    initial_window: int = 256 * 1024
    max_stream_window: int = 64 * 1024 * 1024
    session_window_budget: int = 128 * 1024 * 1024
    max_frame: int = wire.DEFAULT_MAX_FRAME
    max_streams: int = 4096
    idle_window_reset: float = 30.0
    ack_every: int = 32
    ack_delay: float = 1.0
    credit_delay: float = 0.02
    #: what a local socket's write buffer holds beyond its stream's window
    #: before it pauses the stream (Twisted's bufferSize): reserved per stream
    local_buffer: int = READ_SIZE


class SendState(enum.Enum):
    OPEN = "open"  # reading the local socket
    FIN_SENT = "fin-sent"  # local EOF seen; FIN queued, bytes may still be unsent
    DONE = "done"  # peer consumed every byte up to the FIN


class RecvState(enum.Enum):
    OPEN = "open"
    FIN_RECEIVED = "fin-received"  # final offset known, bytes still arriving
    DONE = "done"  # every byte delivered, local socket half-closed


class SessionDelegate(TypingProtocol):
    """What an end (server or client) does with session events."""

    def stream_opened(self, session: Session, stream: Stream, tunnel_id: int, info: dict[str, Any]) -> None: ...

    def control_frame(self, session: Session, frame: Frame) -> None: ...

    def stream_closed(self, session: Session, stream: Stream) -> None: ...


@implementer(IPushProducer)
class Stream:
    """One tunnelled TCP connection, both directions.

    The stream is the producer registered on its local transport (so a slow
    local reader pauses it, which withholds credit) and it pauses that
    transport's reading when it cannot send.

    Its byte buffers exist only while they hold bytes (an empty tuple
    otherwise): an idle stream keeps no buffer, only its counters.
    """

    # one per tunnelled connection: no per-instance __dict__
    __slots__ = (
        "session", "id", "tunnel_id",
        # send direction
        "send_state", "sent", "read_total", "peer_consumed", "send_limit", "_unacked", "_pending",
        "_reading", "blocked_seconds", "_blocked_since",
        # receive direction
        "recv_state", "received", "final_offset", "window", "recv_limit", "reported", "paid_limit",
        "unpaid_upto", "_last_grant", "_last_data", "_early", "_local_paused", "local", "closed",
        "reserved",
    )  # fmt: skip

    log = Logger()

    def __init__(self, session: Session, stream_id: int, tunnel_id: int) -> None:
        self.session = session
        self.id = stream_id
        self.tunnel_id = tunnel_id
        settings = session.settings
        # send direction
        self.send_state = SendState.OPEN
        self.sent = 0  # bytes put on a link (offset of the next byte)
        self.read_total = 0  # bytes read from the local socket
        self.peer_consumed = 0  # acknowledged; start of the resend buffer
        self.send_limit = settings.initial_window
        self._unacked: collections.deque[bytes] | tuple[()] = ()  # sent, kept for resend
        self._pending: list[bytes] | tuple[()] = ()  # read, not sent yet (at most a read or two)
        self._reading = True
        self.blocked_seconds = 0.0  # with bytes to send and no credit (ended spells)
        self._blocked_since: float | None = None
        # receive direction
        self.recv_state = RecvState.OPEN
        self.received = 0
        self.final_offset: int | None = None
        self.window = settings.initial_window
        self.recv_limit = settings.initial_window
        self.reported = 0  # consumed offset last sent in WINDOW
        self.paid_limit = 0  # receive offset paid from the session's recv_pacer (rtunnel.limits)
        self.unpaid_upto = 0  # granted before that pacer existed (a reload): not paid, never refunded
        self._last_grant: float | None = None
        self._last_data = session.clock.seconds()
        self._early: list[bytes] | tuple[()] = ()  # received before the local socket exists
        self._local_paused = False
        self.local: ITransport | None = None
        self.closed = False
        self.reserved = 0  # of the session's budget: initial window + local buffer (Session.admit)

    def __repr__(self) -> str:
        return f"<Stream {self.id} send={self.send_state.value} recv={self.recv_state.value}>"

    # ------------------------------------------------------------ local side

    def attach_local(self, transport: ITransport) -> None:
        """Connect the stream to its local socket (visitor or target)."""
        self.local = transport
        transport.registerProducer(self, True)
        early, self._early = self._early, ()
        for chunk in early:
            write_now(transport, chunk)
        self._reading = True
        self._finish_receive_if_done()
        self._grant_credit()
        self.update_reading()

    def local_data(self, data: bytes) -> None:
        if self.closed or self.send_state is not SendState.OPEN:
            return
        self.read_total += len(data)
        self.session.charge_send(len(data))
        if self._pending:
            self._pending.append(data)
        else:
            self._pending = [data]
        self.flush()
        self.update_reading()

    def local_eof(self) -> None:
        """The local socket half-closed its sending side."""
        if self.closed or self.send_state is not SendState.OPEN:
            return
        self.send_state = SendState.FIN_SENT
        self.session.send_reliable(FrameType.FIN, self.id, wire.encode_fin(self.id, self.read_total))
        self.update_reading()
        self._maybe_forget()

    def local_lost(self, reason: Failure) -> None:
        """The local socket is gone; reset the stream unless it had finished."""
        self.local = None
        if self.closed:
            return
        if self.send_state is not SendState.OPEN and self.recv_state is RecvState.DONE:
            return
        self.reset(ResetCode.ABORTED, f"local connection lost: {reason.getErrorMessage()}")

    def local_failed(self, code: ResetCode, reason: str) -> None:
        """The local socket could not be opened (e.g. target refused)."""
        self.reset(code, reason)

    # IPushProducer, called by the local transport about its write buffer
    def pauseProducing(self) -> None:
        self._local_paused = True

    def resumeProducing(self) -> None:
        self._local_paused = False
        self._grant_credit(force=True)

    def stopProducing(self) -> None:
        self._local_paused = True

    # ------------------------------------------------------------ send path

    def flush(self) -> None:
        """Send pending bytes within the peer's credit, if the link takes them.

        While the link's transport asks us to pause, bytes wait here (at most
        one read per stream) and the stream asks to be flushed on resume."""
        session = self.session
        if not session.can_read:
            if self._pending:
                session.wait_for_link(self)
            return
        max_frame = session.peer_max_frame
        pending = self._pending
        pacer = session.send_pacer
        while pending:
            credit = self.send_limit - self.sent
            if credit <= 0:
                break
            if pacer is not None:  # a bandwidth limit: its tokens are credit too
                credit = pacer.allowance(self, credit)
                if credit <= 0:
                    break  # queued; the pacer's refill timer calls paced_flush
            chunk = pending[0]
            if len(chunk) > credit or len(chunk) > max_frame:
                n = min(credit, max_frame)
                chunk, rest = chunk[:n], chunk[n:]
                pending[0] = rest
            else:
                del pending[0]
            unacked = self._unacked
            if not unacked:
                unacked = self._unacked = collections.deque()
            unacked.append(chunk)
            self.sent += len(chunk)
            if pacer is not None:
                pacer.spend(len(chunk))
            session.write_frame(wire.header(FrameType.DATA, self.id, len(chunk)), chunk)
        if not self._pending:
            self._pending = ()
        if self.sent >= self.send_limit and self._blocked_since is None and (
            pending or self.send_state is SendState.OPEN
        ):
            self._blocked_since = session.clock.seconds()  # out of credit: flow control holds us

    def paced_flush(self) -> None:
        """The send pacer's turn for this stream (rtunnel.limits)."""
        self.flush()
        self.update_reading()

    def paced_grant(self) -> None:
        """The receive pacer's turn for this stream (rtunnel.limits)."""
        self._grant_credit(force=True)

    def update_reading(self) -> None:
        """Pause or resume reading the local socket to match what we can send."""
        should_read = (
            self.send_state is SendState.OPEN
            and self.session.can_read
            and not self.session.streams_full
            and not self._pending
            and self.sent < self.send_limit
        )
        local = self.local
        if not should_read and self.session.link_paused:
            self.session.wait_for_link(self)
        if local is None or should_read == self._reading:
            return
        self._reading = should_read
        if should_read:
            local.resumeProducing()  # type: ignore[attr-defined]
        else:
            local.pauseProducing()  # type: ignore[attr-defined]

    def window_received(self, consumed: int, window: int) -> None:
        if consumed > self.sent or consumed < self.peer_consumed:
            raise ProtocolViolation(
                f"stream {self.id}: WINDOW acknowledges offset {consumed}, but "
                f"{self.peer_consumed}..{self.sent} is the valid range"
            )
        self._drop_acked(consumed)
        self._raise_limit(consumed + window)
        self.flush()
        self.update_reading()
        self._maybe_forget()

    def _raise_limit(self, limit: int) -> None:
        """Take the peer's credit, but never hold more than our own cap of
        unacknowledged bytes, whatever window the peer grants."""
        cap = self.peer_consumed + self.session.settings.max_stream_window
        self.send_limit = max(self.send_limit, min(limit, cap))
        if self._blocked_since is not None and self.send_limit > self.sent:
            self._end_blocked()

    def _end_blocked(self) -> None:
        since, self._blocked_since = self._blocked_since, None
        if since is not None:
            self.blocked_seconds += self.session.clock.seconds() - since

    def blocked_seconds_at(self, now: float) -> float:
        """Seconds this stream has spent with bytes to send and no credit
        from the peer (flow control), up to `now`."""
        since = self._blocked_since
        return self.blocked_seconds + (now - since if since is not None else 0.0)

    def _drop_acked(self, offset: int) -> None:
        unacked = self._unacked
        drop = offset - self.peer_consumed
        while drop > 0 and unacked:
            head = unacked[0]
            if len(head) <= drop:
                unacked.popleft()
                drop -= len(head)
            else:
                unacked[0] = head[drop:]
                drop = 0
        if not unacked:
            self._unacked = ()
        if offset > self.peer_consumed:
            released, self.peer_consumed = offset - self.peer_consumed, offset
            self.session.release_send(released)

    @property
    def buffered_out(self) -> int:
        """Bytes held for this stream's send direction (unacked + pending):
        read from the local socket and not yet acknowledged by the peer."""
        return 0 if self.closed else self.read_total - self.peer_consumed

    # ------------------------------------------------------------ receive path

    def data_received(self, data: bytes) -> None:
        n = len(data)
        if self.received + n > self.recv_limit:
            raise ProtocolViolation(
                f"stream {self.id}: {self.received + n} bytes received but only "
                f"{self.recv_limit} were granted",
                ErrorCode.FLOW_CONTROL,
            )
        if self.final_offset is not None and self.received + n > self.final_offset:
            raise ProtocolViolation(f"stream {self.id}: data after FIN at {self.final_offset}")
        self.received += n
        pacer = self.session.recv_pacer
        if pacer is not None and self.received > self.paid_limit:
            pacer.spend(self.received - self.paid_limit)  # e.g. the initial window's bytes
            self.paid_limit = self.received
        now = self.session.clock.seconds()
        if now - self._last_data > self.session.settings.idle_window_reset:
            self._shrink_window()
        self._last_data = now
        if self.local is None:
            if self._early:
                self._early.append(data)
            else:
                self._early = [data]
            return
        write_now(self.local, data)
        self._finish_receive_if_done()
        self._grant_credit()

    def fin_received(self, final_offset: int) -> None:
        if self.final_offset is not None or final_offset < self.received:
            raise ProtocolViolation(f"stream {self.id}: invalid FIN at offset {final_offset}")
        self.final_offset = final_offset
        self.recv_state = RecvState.FIN_RECEIVED
        self._finish_receive_if_done()

    def _finish_receive_if_done(self) -> None:
        if (
            self.recv_state is RecvState.FIN_RECEIVED
            and self.received == self.final_offset
            and self.local is not None
        ):
            self.recv_state = RecvState.DONE
            # A transport that paused its producer resumes it when its buffer
            # drains instead of shutting down: let go of it first.
            self.local.unregisterProducer()
            close_write_now(self.local)
            self._grant_credit(force=True)
            self._maybe_forget()

    def _grant_credit(self, force: bool = False) -> None:
        """Tell the peer what we consumed, if worth a frame and not paused."""
        session = self.session
        if self.local is None or self.closed:
            return
        if self._local_paused and self.recv_state is not RecvState.DONE:
            return  # credit waits for the consumer; the final ack does not
        unreported = self.received - self.reported
        if unreported <= 0 or not session.can_send:
            return
        if not force and unreported < self.window // 4:
            session.grant_later(self)
            return
        now = session.clock.seconds()
        if self._last_grant is not None and now - self._last_grant < 2 * session.srtt:
            self._grow_window()
        limit = self.received + self.window
        pacer = session.recv_pacer
        if pacer is not None and self.recv_state is not RecvState.DONE:
            # a bandwidth limit: new credit is paid from the pacer's tokens
            wanted = limit if self.final_offset is None else min(limit, self.final_offset)
            if wanted > self.paid_limit:
                allowed = pacer.allowance(self, wanted - self.paid_limit)
                if allowed <= 0:
                    return  # queued; the pacer's refill timer calls paced_grant
                pacer.spend(allowed)
                self.paid_limit += allowed
            limit = min(limit, self.paid_limit)
        self._last_grant = now
        self.reported = self.received
        self.recv_limit = max(self.recv_limit, limit)
        session.reply(wire.encode_window(self.id, self.received, self.recv_limit - self.received))

    def _grow_window(self) -> None:
        settings = self.session.settings
        extra = min(self.window, settings.max_stream_window - self.window)
        if extra > 0 and self.session.reserve_window(extra):
            self.window += extra

    def _shrink_window(self) -> None:
        initial = self.session.settings.initial_window
        if self.window > initial:
            self.session.release_window(self.window - initial)
            self.window = initial

    # ------------------------------------------------------------ ending

    def reset(self, code: ResetCode, reason: str, send: bool = True) -> None:
        """Abort both directions; tell the peer unless it told us."""
        if self.closed:
            return
        if send:
            self.session.send_reliable(
                FrameType.RST, self.id, wire.encode_coded(FrameType.RST, self.id, code, reason)
            )
        self._close()
        if self.local is not None:
            self.local.abortConnection()  # type: ignore[attr-defined]

    def hand_local_to(self, other: Stream) -> None:
        """Give this stream's local socket, with what was read from it and
        not sent, to `other` (a new stream, usually of another session), and
        reset this one towards its peer without touching the socket.

        Only for a stream none of whose bytes crossed a link either way (a
        visitor that arrived while its session was detached): the socket's
        peer has seen nothing, so starting over elsewhere loses nothing."""
        if self.sent or self.received:
            raise ValueError(f"stream {self.id} has carried bytes; it cannot change sessions")
        local, self.local = self.local, None
        pending, self._pending = self._pending, ()
        eof = self.send_state is not SendState.OPEN
        self.reset(ResetCode.ABORTED, "the visitor was handed to the tunnel owner's new session")
        if local is None:
            return
        local.unregisterProducer()
        local.resumeProducing()  # type: ignore[attr-defined]  # attach_local pauses it again if need be
        other.attach_local(local)
        for chunk in pending:
            other.local_data(chunk)
        if eof:
            other.local_eof()

    def _maybe_forget(self) -> None:
        if (
            self.send_state is SendState.FIN_SENT
            and not self._pending
            and self.peer_consumed == self.read_total
        ):
            self.send_state = SendState.DONE
        if self.send_state is SendState.DONE and self.recv_state is RecvState.DONE:
            self._close()
            if self.local is not None:
                # both halves are shut down; Twisted does not close the
                # socket by itself for a half-closeable protocol
                self.local.loseConnection()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._end_blocked()
        session = self.session
        if session.send_pacer is not None:
            session.send_pacer.forget(self)
        if session.recv_pacer is not None:
            session.recv_pacer.forget(self)
            # paid, never sent (credit granted before this pacer was not paid to it)
            session.recv_pacer.give_back(self.paid_limit - max(self.received, self.unpaid_upto))
        self._unacked = self._pending = self._early = ()
        self._shrink_window()
        session.release_send(self.read_total - self.peer_consumed)
        session.release_window(self.reserved)
        self.reserved = 0
        session.forget(self)

    # ------------------------------------------------------------ resume

    def resume_entry(self) -> wire.ResumeEntry:
        return wire.ResumeEntry(self.id, self.received, self.recv_limit)

    def resume_from(self, received: int, limit: int) -> None:
        """Re-send everything the peer has not received (after a resume)."""
        if received > self.sent or received < self.peer_consumed:
            raise ProtocolViolation(
                f"stream {self.id}: RESUME says {received} bytes received, but "
                f"{self.peer_consumed}..{self.sent} is the valid range"
            )
        self._drop_acked(received)
        self._raise_limit(limit)
        self._resend()
        self._maybe_forget()

    def resume_unknown_to_peer(self, open_replayed: bool) -> None:
        if open_replayed:
            self._resend()
        else:
            # The peer finished this stream and forgot it: all was received.
            self._drop_acked(self.sent)
            self._maybe_forget()

    def _resend(self) -> None:
        session = self.session
        max_frame = session.peer_max_frame
        for chunk in list(self._unacked):
            for i in range(0, len(chunk), max_frame):
                piece = chunk[i : i + max_frame]
                session.write_frame(wire.header(FrameType.DATA, self.id, len(piece)), piece)


class Link(TypingProtocol):
    """What a session needs of the connection it runs over."""

    transport: Any
    srtt: float

    def close_with_error(self, code: ErrorCode, reason: str) -> None: ...


@implementer(IPushProducer)
class Session:
    """The logical conversation between one client and the server.

    It lives across links: `attach` gives it a link, `detach` takes it away
    (streams keep their state and stop reading their local sockets).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        delegate: SessionDelegate,
        is_server: bool,
        settings: SessionSettings | None = None,
    ) -> None:
        self.clock = clock
        self.delegate = delegate
        self.is_server = is_server
        self.settings = settings or SessionSettings()
        self.streams: dict[int, Stream] = {}
        self.link: Link | None = None
        self.peer_max_frame = wire.DEFAULT_MAX_FRAME
        self._next_stream_id = 2 if is_server else 1
        self._highest_peer_stream = 0
        self._paused = False
        self._resuming = False
        # The budget (docs/security.md "Memory per session"): counters kept
        # as bytes move, never summed over streams.
        budget = self.settings.session_window_budget
        self.held_send = 0  # read from local sockets, not acknowledged by the peer
        self.held_windows = 0  # reserved receive windows and local buffers of open streams
        self.held_reliable = 0  # reliable frames kept until ACKed, with their overhead
        self.reply_backlog = 0  # written to the link since it last asked us to pause
        self.streams_full = False  # local sockets are not read until the streams' bytes fall
        self._admit_limit = budget * 3 // 4  # new streams and grown windows up to here
        self._streams_high = budget * 7 // 8  # ... and local sockets read up to here
        self._streams_low = self._streams_high - budget // 16  # ... and again from here
        self._reliable_limit = budget // 16  # beyond: ERROR (new streams refused from half)
        self._reply_limit = budget // 16  # beyond: the link is not read until it drains
        self._link_unread = False  # we paused the link's reading (reply_backlog)
        self._failing = False  # an ERROR for the budget is on its way
        # reliable frames: outbox holds (index, type, stream id, bytes)
        self._reliable_sent = 0
        self._outbox: collections.deque[tuple[int, FrameType, int, bytes]] = collections.deque()
        self._reliable_received = 0
        self._reliable_reported = 0
        self._ack_timer: IDelayedCall | None = None
        self._credit_timer: IDelayedCall | None = None
        self._credit_due: set[Stream] = set()
        self._link_waiters: dict[int, Stream] = {}
        self.goaway_received = False
        self.bytes_in = 0
        self.bytes_out = 0
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

    def attach(self, link: Link, resuming: bool, peer_max_frame: int) -> None:
        """Run over `link`. When `resuming`, wait for the peer's RESUME first."""
        self.link = link
        self.peer_max_frame = peer_max_frame
        self._resuming = resuming
        self._paused = False
        link.transport.registerProducer(self, True)
        if resuming:
            self.write(wire.encode_resume(self.resume_state()))
        else:
            self._update_all()

    def detach(self) -> None:
        """The link is gone; keep everything, stop reading local sockets."""
        link, self.link = self.link, None
        self.reply_backlog, self._link_unread = 0, False
        if link is not None:
            link.transport.unregisterProducer()
        self._cancel_timers()
        self._update_all()

    def close(self, code: ResetCode, reason: str) -> None:
        """End the session for good: reset every stream, stop every timer."""
        self.reset_all(code, reason)
        self.detach()
        self._outbox.clear()
        self.held_reliable = 0

    def grant_later(self, stream: Stream) -> None:
        """Return a stream's small leftover credit soon, not never: the peer
        keeps unacknowledged bytes for resend until we do."""
        self._credit_due.add(stream)
        if self._credit_timer is None:
            self._credit_timer = self.clock.callLater(self.settings.credit_delay, self._grant_due)

    def _grant_due(self) -> None:
        self._credit_timer = None
        due, self._credit_due = self._credit_due, set()
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
        return wire.ResumeState(self._reliable_received, entries)

    def _update_all(self) -> None:
        for stream in list(self.streams.values()):
            if self.can_send:
                stream.flush()
                stream._grant_credit()
            stream.update_reading()

    # IPushProducer, called by the link's transport
    @property
    def link_paused(self) -> bool:
        return self._paused and self.link is not None and not self._resuming

    def wait_for_link(self, stream: Stream) -> None:
        """`stream` has bytes or reading held back by a paused link."""
        self._link_waiters[stream.id] = stream

    def pauseProducing(self) -> None:
        # Called from inside our own writes: never write here. Streams stop
        # reading lazily: each one that reads while the link is paused holds
        # that read and pauses its socket (no epoll change for idle streams).
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.reply_backlog = 0  # the link's transport has sent everything
        if self._link_unread:
            self._link_unread = False
            if self.link is not None:
                self.link.transport.resumeProducing()
        waiters, self._link_waiters = self._link_waiters, {}
        for stream in waiters.values():  # oldest first; re-blocked ones go last
            if not stream.closed:
                stream.flush()
                stream.update_reading()

    def stopProducing(self) -> None:
        self._paused = True

    # ------------------------------------------------------------ writing

    def write(self, frame: bytes) -> None:
        if self.link is not None:
            self.bytes_out += len(frame)
            self.link.transport.write(frame)

    def reply(self, frame: bytes) -> None:
        """Write a frame the peer caused (PONG, WINDOW, ACK, a reliable
        frame). While the link's transport is backed up these count as its
        backlog; past the bound the link is not read until the peer has read
        what we sent (Session.resumeProducing). Replayed and DATA frames are
        not counted: flow control and the budget's other shares bound them,
        and a side that stopped reading for them could deadlock a resume."""
        link = self.link
        if link is None:
            return
        self.bytes_out += len(frame)
        if self._paused:
            self.reply_backlog += len(frame)
            if self.reply_backlog > self._reply_limit and not self._link_unread:
                self._link_unread = True
                link.transport.pauseProducing()
                self.log.info(
                    "not reading the link: {n} bytes of replies wait for the peer to read",
                    n=self.reply_backlog, event="link_backpressure", limit=self._reply_limit,
                )
        link.transport.write(frame)

    def write_frame(self, header: bytes, body: bytes) -> None:
        """Write a frame as its header and body, without joining them (the
        link's TLS layer encrypts a large body where it lies)."""
        if self.link is not None:
            self.bytes_out += len(header) + len(body)
            self.link.transport.writeSequence((header, body))

    def send_reliable(self, ftype: FrameType, stream_id: int, frame: bytes) -> None:
        """Send a frame that must survive a link drop (kept until ACKed)."""
        self._outbox.append((self._reliable_sent, ftype, stream_id, frame))
        self._reliable_sent += 1
        self.held_reliable += len(frame) + RELIABLE_ENTRY_OVERHEAD
        if self.can_send:
            self.reply(frame)
        if self.held_reliable > self._reliable_limit:
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
            f"{len(self._outbox)} reliable frames ({self.held_reliable} bytes) are waiting for an ACK, "
            f"more than the {self._reliable_limit} bytes allowed (1/16 of the session buffer); an rtunnel "
            "peer acknowledges at least once a second (docs/protocol.md), so this one is broken or hostile",
        )

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
        return len(self._outbox)

    def forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self.delegate.stream_closed(self, stream)

    # ------------------------------------------------------------ the budget

    @property
    def held(self) -> int:
        """Bytes this session holds on behalf of its peer, by the budget's
        count (reserved windows included; the link's backlog too)."""
        return self.held_send + self.held_windows + self.held_reliable + self.reply_backlog

    def stream_reservation(self) -> int:
        """What a new stream reserves: the initial window the peer may fill
        without a grant, and what its local socket may buffer beyond it."""
        return self.settings.initial_window + self.settings.local_buffer

    def room_for_stream(self) -> bool:
        """True if a new stream fits in the budget (its reservation, and the
        reliable frames its OPEN, FIN and RST will need)."""
        return (
            self.held_send + self.held_windows + self.stream_reservation() <= self._admit_limit
            and self.held_reliable <= self._reliable_limit // 2
        )

    def why_full(self) -> str:
        """The sentence for a refused stream."""
        if self.held_reliable > self._reliable_limit // 2:
            return (
                f"the peer has not acknowledged {len(self._outbox)} reliable frames "
                f"({self.held_reliable} bytes); no new connection until it does"
            )
        return (
            f"the session buffer is full: {len(self.streams)} connections hold "
            f"{self.held_send + self.held_windows} of the {self._admit_limit} bytes "
            f"they may use ({self.stream_reservation()} per connection); raise --session-buffer"
        )

    def admit(self, stream: Stream) -> None:
        """Reserve a new stream's receive window and local buffer."""
        stream.reserved = self.stream_reservation()
        self.held_windows += stream.reserved

    def charge_send(self, n: int) -> None:
        """`n` bytes were read from a local socket; stop reading every local
        socket once the streams' bytes reach their bound."""
        self.held_send += n
        if not self.streams_full and self.held_send + self.held_windows >= self._streams_high:
            self.streams_full = True
            for stream in list(self.streams.values()):
                stream.update_reading()

    def release_send(self, n: int) -> None:
        self.held_send -= n
        if self.streams_full:
            self._maybe_read_again()

    def _maybe_read_again(self) -> None:
        if self.held_send + self.held_windows <= self._streams_low:
            self.streams_full = False
            for stream in list(self.streams.values()):
                stream.update_reading()

    def reserve_window(self, extra: int) -> bool:
        if self.held_send + self.held_windows + extra > self._admit_limit:
            return False
        self.held_windows += extra
        return True

    def release_window(self, amount: int) -> None:
        self.held_windows -= amount
        if self.streams_full:
            self._maybe_read_again()

    def reset_all(self, code: ResetCode, reason: str) -> None:
        for stream in list(self.streams.values()):
            stream.reset(code, reason)

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
                self.log.debug("stream {id} reset by peer: {reason}", id=stream.id, reason=reason)
                stream.reset(ResetCode.ABORTED, reason, send=False)
        elif ftype is FrameType.ACK:
            self._ack_received(wire.decode_u64(frame))
        elif ftype is FrameType.RESUME:
            self._resume_received(frame)
        elif ftype is FrameType.GOAWAY:
            self.goaway_received = True
            self.delegate.control_frame(self, frame)
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
        self._reliable_received += 1
        if self._reliable_received - self._reliable_reported >= self.settings.ack_every:
            self._send_ack()
        elif self._ack_timer is None:
            self._ack_timer = self.clock.callLater(self.settings.ack_delay, self._send_ack)

    def _send_ack(self) -> None:
        timer, self._ack_timer = self._ack_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self.can_send and self._reliable_received > self._reliable_reported:
            self._reliable_reported = self._reliable_received
            self.reply(wire.encode_ack(self._reliable_received))

    def _cancel_timers(self) -> None:
        for timer in (self._ack_timer, self._credit_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._ack_timer = self._credit_timer = None
        self._credit_due.clear()

    def _ack_received(self, received: int) -> None:
        if received > self._reliable_sent:
            raise ProtocolViolation(
                f"ACK of {received} reliable frames, only {self._reliable_sent} sent"
            )
        outbox = self._outbox
        freed = 0
        while outbox and outbox[0][0] < received:
            freed += len(outbox.popleft()[3]) + RELIABLE_ENTRY_OVERHEAD
        self.held_reliable -= freed

    def _resume_received(self, frame: Frame) -> None:
        if not self._resuming:
            raise ProtocolViolation("RESUME when no resume was negotiated")
        state = wire.decode_resume(frame)
        self._ack_received(state.reliable_received)
        self._resuming = False
        self._reliable_reported = self._reliable_received
        replayed_opens = set()
        for _, ftype, stream_id, data in self._outbox:
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
        self.log.info(
            "session resumed: {streams} streams, {replayed} frames replayed",
            streams=len(self.streams),
            replayed=len(self._outbox),
            event="session_replayed",
        )


@implementer(IHalfCloseableProtocol)
class StreamProtocol(Protocol):
    """A local TCP connection (visitor or target) bound to one Stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        set_read_size(self.transport)
        self.stream.attach_local(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.stream.local_data(data)

    def readConnectionLost(self) -> None:
        self.stream.local_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.stream.local_lost(reason)




def set_nodelay(transport: Any) -> None:
    """Turn off Nagle's algorithm where the transport allows it."""
    setter: Callable[[bool], None] | None = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass
