"""One tunnelled TCP connection, both directions (sans-IO).

A stream reads its local socket (`LocalPort`) into DATA frames within the
peer's credit, and writes the peer's DATA to the socket, granting credit
only for bytes the socket took while it is not asking to pause. Its three
state machines (rtunnel.mux.states) are the send direction, the receive
direction and the local socket; the stream is CLOSED (and forgotten by its
session) when both directions are DONE, or on a reset.

Its byte buffers exist only while they hold bytes (an empty tuple
otherwise): an idle stream keeps no buffer, only its counters.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from rtunnel import wire
from rtunnel.mux.errors import ProtocolViolation
from rtunnel.mux.states import (
    LOCAL_TRANSITIONS,
    RECV_TRANSITIONS,
    SEND_TRANSITIONS,
    LocalState,
    RecvState,
    SendState,
    move,
)
from rtunnel.wire import ErrorCode, FrameType, ResetCode

if TYPE_CHECKING:
    from rtunnel.mux.ports import LocalPort
    from rtunnel.mux.session import Session

READING, PAUSED, FIN_SENT, SEND_DONE, SEND_CLOSED = (
    SendState.READING, SendState.PAUSED, SendState.FIN_SENT, SendState.DONE, SendState.CLOSED,
)  # fmt: skip
RECV_OPEN, FIN_RECEIVED, RECV_DONE, RECV_CLOSED = (
    RecvState.OPEN, RecvState.FIN_RECEIVED, RecvState.DONE, RecvState.CLOSED,
)  # fmt: skip


class Stream:
    """One tunnelled TCP connection, both directions."""

    # one per tunnelled connection: no per-instance __dict__
    __slots__ = (
        "session", "id", "tunnel_id",
        # send direction
        "send_state", "sent", "read_total", "peer_consumed", "send_limit", "_unacked", "_pending",
        "blocked_seconds", "_blocked_since",
        # receive direction
        "recv_state", "received", "final_offset", "window", "recv_limit", "reported", "paid_limit",
        "unpaid_upto", "_last_grant", "_last_data", "_early",
        # local socket
        "local_state", "local", "reserved",
    )  # fmt: skip

    def __init__(self, session: Session, stream_id: int, tunnel_id: int) -> None:
        self.session = session
        self.id = stream_id
        self.tunnel_id = tunnel_id
        settings = session.settings
        # send direction
        self.send_state = READING  # a new local socket reads (until update_reading says otherwise)
        self.sent = 0  # bytes put on a link (offset of the next byte)
        self.read_total = 0  # bytes read from the local socket
        self.peer_consumed = 0  # acknowledged; start of the resend buffer
        self.send_limit = settings.initial_window
        self._unacked: collections.deque[bytes] | tuple[()] = ()  # sent, kept for resend
        self._pending: list[bytes] | tuple[()] = ()  # read, not sent yet (at most a read or two)
        self.blocked_seconds = 0.0  # with bytes to send and no credit (ended spells)
        self._blocked_since: float | None = None
        # receive direction
        self.recv_state = RECV_OPEN
        self.received = 0
        self.final_offset: int | None = None
        self.window = settings.initial_window
        self.recv_limit = settings.initial_window
        self.reported = 0  # consumed offset last sent in WINDOW
        self.paid_limit = 0  # receive offset paid from the session's recv_pacer (rtunnel.limits)
        self.unpaid_upto = 0  # granted before that pacer existed (a reload): not paid, never refunded
        self._last_grant: float | None = None
        self._last_data = session.timers.now()
        self._early: list[bytes] | tuple[()] = ()  # received before the local socket exists
        # local socket
        self.local_state = LocalState.PENDING
        self.local: LocalPort | None = None
        self.reserved = 0  # of the session's budget: initial window + local buffer (Session.admit)

    def __repr__(self) -> str:
        return f"<Stream {self.id} send={self.send_state.value} recv={self.recv_state.value}>"

    @property
    def closed(self) -> bool:
        """The stream is over (both directions done, or reset)."""
        return self.send_state is SEND_CLOSED

    def _send_to(self, new: SendState) -> None:
        self.send_state = move(SEND_TRANSITIONS, self.send_state, new, self)

    def _recv_to(self, new: RecvState) -> None:
        self.recv_state = move(RECV_TRANSITIONS, self.recv_state, new, self)

    def _local_to(self, new: LocalState) -> None:
        self.local_state = move(LOCAL_TRANSITIONS, self.local_state, new, self)

    # ------------------------------------------------------------ local side

    def attach_local(self, local: LocalPort) -> None:
        """Connect the stream to its local socket (visitor or target), which
        reports to it from now on. A socket that arrives for a stream
        already over is dropped."""
        if self.send_state is SEND_CLOSED:
            local.abort()
            return
        self.local = local
        self._local_to(LocalState.WRITABLE)
        local.bind(self)
        early, self._early = self._early, ()
        for chunk in early:
            local.write(chunk)
        if self.send_state is PAUSED:
            self._send_to(READING)  # a new socket reads; update_reading pauses it if need be
        self._finish_receive_if_done()
        self._grant_credit()
        self.update_reading()

    def local_data(self, data: bytes) -> None:
        """Bytes read from the local socket."""
        state = self.send_state
        if state is not READING and state is not PAUSED:
            return
        self.read_total += len(data)
        if self.session.budget.charge_send(len(data)):  # (Session.charge_send, one call less per read)
            self.session.streams_reached_bound()
        if self._pending:
            self._pending.append(data)
        else:
            self._pending = [data]
        self.flush()
        self.update_reading()

    def local_eof(self) -> None:
        """The local socket half-closed its sending side."""
        state = self.send_state
        if state is not READING and state is not PAUSED:
            return
        self._send_to(FIN_SENT)
        self.session.send_reliable(FrameType.FIN, self.id, wire.encode_fin(self.id, self.read_total))
        self.update_reading()
        if state is READING and self.local is not None:
            self.local.pause_reading()
        self._maybe_forget()

    def local_lost(self, why: str) -> None:
        """The local socket is gone; reset the stream unless it had finished."""
        self.local = None
        if self.local_state is not LocalState.GONE and self.local_state is not LocalState.PENDING:
            self._local_to(LocalState.GONE)
        if self.send_state is SEND_CLOSED:
            return
        if self.send_state is not READING and self.send_state is not PAUSED and self.recv_state is RECV_DONE:
            return
        self.reset(ResetCode.ABORTED, f"local connection lost: {why}")

    def local_failed(self, code: ResetCode, reason: str) -> None:
        """The local socket could not be opened (e.g. target refused)."""
        self.reset(code, reason)

    def local_buffer_full(self) -> None:
        """The local socket's send buffer is full: grant no credit until it drains."""
        if self.local_state is LocalState.WRITABLE:
            self._local_to(LocalState.FULL)

    def local_buffer_drained(self) -> None:
        """The local socket sent what it buffered: credit may flow again."""
        if self.local_state is LocalState.FULL:
            self._local_to(LocalState.WRITABLE)
        self._grant_credit(force=True)

    # ------------------------------------------------------------ send path

    def flush(self) -> None:
        """Send pending bytes within the peer's credit, if the link takes them.

        While the link asks us to pause, bytes wait here (at most one read
        per stream) and the stream asks to be flushed on resume."""
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
        if self.sent >= self.send_limit and self._blocked_since is None:
            state = self.send_state
            if pending or state is READING or state is PAUSED:
                self._blocked_since = session.timers.now()  # out of credit: flow control holds us

    def paced_flush(self) -> None:
        """The send pacer's turn for this stream (rtunnel.limits)."""
        self.flush()
        self.update_reading()

    def paced_grant(self) -> None:
        """The receive pacer's turn for this stream (rtunnel.limits)."""
        self._grant_credit(force=True)

    def update_reading(self) -> None:
        """Pause or resume reading the local socket to match what we can send."""
        state = self.send_state
        session = self.session
        if state is READING or state is PAUSED:
            should_read = (
                session.can_read and not session.streams_full and not self._pending and self.sent < self.send_limit
            )
        else:
            should_read = False
        if not should_read and session.link_paused:
            session.wait_for_link(self)
        local = self.local
        if local is None:
            return
        if should_read:
            if state is PAUSED:
                self._send_to(READING)
                local.resume_reading()
        elif state is READING:
            self._send_to(PAUSED)
            local.pause_reading()

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
            self.blocked_seconds += self.session.timers.now() - since

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
        return 0 if self.send_state is SEND_CLOSED else self.read_total - self.peer_consumed

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
        session = self.session
        pacer = session.recv_pacer
        if pacer is not None and self.received > self.paid_limit:
            pacer.spend(self.received - self.paid_limit)  # e.g. the initial window's bytes
            self.paid_limit = self.received
        now = session.timers.now()
        if now - self._last_data > session.settings.idle_window_reset:
            self._shrink_window()
        self._last_data = now
        local = self.local
        if local is None:
            if self._early:
                self._early.append(data)
            else:
                self._early = [data]
            return
        local.write(data)
        self._finish_receive_if_done()
        self._grant_credit()

    def fin_received(self, final_offset: int) -> None:
        if self.final_offset is not None or final_offset < self.received:
            raise ProtocolViolation(f"stream {self.id}: invalid FIN at offset {final_offset}")
        self.final_offset = final_offset
        self._recv_to(FIN_RECEIVED)
        self._finish_receive_if_done()

    def _finish_receive_if_done(self) -> None:
        if self.recv_state is FIN_RECEIVED and self.received == self.final_offset and self.local is not None:
            self._recv_to(RECV_DONE)
            self.local.half_close()
            self._grant_credit(force=True)
            self._maybe_forget()

    def _grant_credit(self, force: bool = False) -> None:
        """Tell the peer what we consumed, if worth a frame and not paused."""
        session = self.session
        if self.local is None or self.send_state is SEND_CLOSED:
            return
        if self.local_state is LocalState.FULL and self.recv_state is not RECV_DONE:
            return  # credit waits for the consumer; the final ack does not
        unreported = self.received - self.reported
        if unreported <= 0 or not session.can_send:
            return
        if not force and unreported < self.window // 4:
            session.grant_later(self)
            return
        now = session.timers.now()
        if self._last_grant is not None and now - self._last_grant < 2 * session.srtt:
            self._grow_window()
        limit = self.received + self.window
        pacer = session.recv_pacer
        if pacer is not None and self.recv_state is not RECV_DONE:
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
        if self.send_state is SEND_CLOSED:
            return
        if send:
            self.session.send_reliable(
                FrameType.RST, self.id, wire.encode_coded(FrameType.RST, self.id, code, reason)
            )
        self._close()
        if self.local is not None:
            self.local.abort()

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
        eof = self.send_state is not READING and self.send_state is not PAUSED
        if local is not None:
            self._local_to(LocalState.GONE)
        self.reset(ResetCode.ABORTED, "the visitor was handed to the tunnel owner's new session")
        if local is None:
            return
        local.resume_reading()  # other.attach_local pauses it again if need be
        other.attach_local(local)
        for chunk in pending:
            other.local_data(chunk)
        if eof:
            other.local_eof()

    def _maybe_forget(self) -> None:
        if self.send_state is FIN_SENT and not self._pending and self.peer_consumed == self.read_total:
            self._send_to(SEND_DONE)
        if self.send_state is SEND_DONE and self.recv_state is RECV_DONE:
            self._close()
            if self.local is not None:
                # both halves are shut down; the socket is not closed by itself
                self.local.close()

    def _close(self) -> None:
        """Both directions to CLOSED; give back all the stream holds."""
        if self.send_state is SEND_CLOSED:
            return
        self._send_to(SEND_CLOSED)
        self._recv_to(RECV_CLOSED)
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
