"""One control connection (a *link*): framing, keepalive, handshake hook.

A link carries one Session after its handshake, as the session's
`LinkPort` (rtunnel.mux.ports): the session writes frames through it, and
the link reports its send buffer's fill and drain to the session. The
server and client ends subclass ControlLink and implement `handshake_frame`
and `link_lost`.

Its lifecycle is `LinkState`: HANDSHAKING (frames go to `handshake_frame`)
-> OPEN (a session runs here) -> CLOSING (lose, abort or an ERROR: nothing
more is read) -> CLOSED (the connection is gone). `TRANSITIONS` lists
every change; any other raises IllegalTransition.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel import wire
from rtunnel.addresses import format_host_port, host_port
from rtunnel.config import Keepalive  # defined with the other config values; imported from here too
from rtunnel.mux import ProtocolViolation, Session, cancel_call
from rtunnel.mux.states import IllegalTransition, move
from rtunnel.transports import set_nodelay, set_read_size
from rtunnel.wire import ErrorCode, Frame, FrameError, FrameType

__all__ = ["TRANSITIONS", "ControlLink", "IllegalTransition", "Keepalive", "LinkState"]


class LinkState(enum.Enum):
    HANDSHAKING = "handshaking"  # connected; HELLO / WELCOME not done yet
    OPEN = "open"  # a session runs over the link
    CLOSING = "closing"  # closed by us (lose, abort, ERROR): nothing more is read
    CLOSED = "closed"  # the connection is gone


HANDSHAKING, OPEN, CLOSING, CLOSED = LinkState.HANDSHAKING, LinkState.OPEN, LinkState.CLOSING, LinkState.CLOSED

TRANSITIONS: Mapping[LinkState, frozenset[LinkState]] = {
    HANDSHAKING: frozenset({OPEN, CLOSING, CLOSED}),
    OPEN: frozenset({CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}

#: Where sessions log (the namespace they always had).
SESSION_LOG = Logger(namespace="rtunnel.mux.Session")


@implementer(IPushProducer)
class ControlLink(Protocol):
    """A control connection; once its session runs, that session's LinkPort
    (and the producer registered on its transport, on the session's behalf)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, keepalive: Keepalive) -> None:
        self.clock = clock
        self.keepalive = keepalive
        self.state = HANDSHAKING
        self.decoder = wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME)
        self.session: Session | None = None
        self.session_log = SESSION_LOG
        self.srtt = 0.1
        self.connected_at = clock.seconds()
        self._last_received = self.connected_at
        self._writes_watcher: Session | None = None
        self._keepalive_call: IDelayedCall | None = None  # one timer: pings and the dead check
        self._next_ping = 0.0
        self._ping_seq = 0
        self._ping_sent_at: float | None = None
        self._rtt_sampled = False

    @property
    def closing(self) -> bool:
        """Closed or closing: nothing more is read or handled."""
        return self.state is CLOSING or self.state is CLOSED

    def _move(self, new: LinkState) -> None:
        self.state = move(TRANSITIONS, self.state, new, self)

    # ------------------------------------------------------------ Twisted

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        set_read_size(self.transport)
        transport = self.transport
        assert transport is not None
        self.write = transport.write  # type: ignore[method-assign,assignment]  # bound once: no call of ours per write

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is CLOSING or state is CLOSED:
            return
        self._last_received = self.clock.seconds()
        try:
            for frame in self.decoder.feed(data):
                state = self.state
                if state is CLOSING or state is CLOSED:
                    return
                self.frame_received(frame)
        except (FrameError, struct.error) as e:
            self.close_with_error(ErrorCode.PROTOCOL_ERROR, str(e))
        except ProtocolViolation as e:
            self.close_with_error(e.code, str(e))
        except Exception:
            self.log.failure("internal error while handling a frame; closing the link", event="internal_error", peer=self.peer_description())
            self.close_with_error(ErrorCode.INTERNAL, "internal error in the peer")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self._move(CLOSED)
        self._stop_keepalive()
        session, self.session = self.session, None
        if session is not None and session.link is self:
            session.detach()
        self.link_lost(session, reason)

    # IPushProducer: the transport's send buffer, for the session watching it
    def pauseProducing(self) -> None:
        if self._writes_watcher is not None:
            self._writes_watcher.pause_writing()

    def resumeProducing(self) -> None:
        if self._writes_watcher is not None:
            self._writes_watcher.resume_writing()

    def stopProducing(self) -> None:
        if self._writes_watcher is not None:
            self._writes_watcher.pause_writing()

    # ------------------------------------------------------------ LinkPort (for the session)

    def write(self, frame: bytes) -> None:
        self.transport.write(frame)  # type: ignore[union-attr]

    def write_frame(self, header: bytes, payload: bytes) -> None:
        self.transport.writeSequence((header, payload))  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def watch_writes(self, session: Session) -> None:
        self._writes_watcher = session
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def unwatch_writes(self) -> None:
        self._writes_watcher = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]

    # ------------------------------------------------------------ frames

    def frame_received(self, frame: Frame) -> None:
        if frame.type is FrameType.PING:
            if self.state is HANDSHAKING:
                raise ProtocolViolation("PING before the handshake")
            self._ping_received(frame)
        elif frame.type is FrameType.ERROR:
            code, reason = wire.decode_coded(frame)
            reason = reason[:300].encode("unicode_escape").decode()
            self.error_received(code, reason)
            self.session_failed()
            self.lose()
        elif self.state is HANDSHAKING:
            self.handshake_frame(frame)
        elif self.session is not None:
            self.session.frame_received(frame)

    def handshake_frame(self, frame: Frame) -> None:
        raise NotImplementedError

    def error_received(self, code: int, reason: str) -> None:
        self.log.error("peer closed the link: {reason} (code {code})", reason=reason, code=code, event="peer_error", peer=self.peer_description())

    def link_lost(self, session: Session | None, reason: Failure) -> None:
        pass

    def send(self, frame: bytes) -> None:
        """Write a frame of the link's own (HELLO, PING, PONG, GOAWAY). Once a
        session runs here it writes them, so a PONG counts against the
        session's bound on replies to a peer that does not read."""
        session = self.session
        if session is not None and session.link is self:
            session.reply(frame)
        else:
            self.transport.write(frame)  # type: ignore[union-attr]

    def close_with_error(self, code: ErrorCode, reason: str) -> None:
        """Log, tell the peer why, then close the link and end its session."""
        if self.closing:
            return
        self.log.warn(
            "closing link to {peer}: {reason}", peer=self.peer_description(), reason=reason,
            event="link_error", code=code.name,
        )
        self.send_error_and_close(code, reason)

    def send_error_and_close(self, code: ErrorCode, reason: str) -> None:
        self.transport.write(wire.encode_coded(FrameType.ERROR, 0, code, reason))  # type: ignore[union-attr]
        self.session_failed()
        self.lose()

    def session_failed(self) -> None:
        """An ERROR ends the session too (both sides forget it): resuming
        into the state that caused the error would only repeat it."""

    def _to_closing(self) -> None:
        if not self.closing:
            self._move(CLOSING)

    def lose(self) -> None:
        """Close cleanly. The session lets go of the link first: TLS does not
        finish closing while a producer is registered."""
        self._to_closing()
        session = self.session
        if session is not None and session.link is self:
            session.detach()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        self._to_closing()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def peer_description(self) -> str:
        try:
            return format_host_port(*host_port(self.transport.getPeer()))  # type: ignore[union-attr]
        except Exception:
            return "peer"

    # ------------------------------------------------------------ session

    def start_session(self, session: Session, resuming: bool, peer_max_frame: int) -> None:
        """Handshake done: carry `session` from now on, start keepalive."""
        self._move(OPEN)
        self.session = session
        self.decoder.max_frame = session.settings.max_frame
        session.attach(self, resuming, peer_max_frame)
        self._next_ping = self.clock.seconds()  # the first ping goes out at once
        self._keepalive_call = self.clock.callLater(0, self._keepalive_tick)

    # ------------------------------------------------------------ keepalive

    def _keepalive_tick(self) -> None:
        """Both keepalive jobs on one timer per link (a timer costs memory
        in every idle session): end the link after `dead_after` of silence,
        ping every `interval`; then wait for whichever is due first."""
        self._keepalive_call = None
        now = self.clock.seconds()
        silent = now - self._last_received
        if silent >= self.keepalive.dead_after:
            self.log.warn(
                "link to {peer} is dead: nothing received for {silent:.1f} s",
                peer=self.peer_description(),
                silent=silent,
                event="link_dead",
            )
            self.abort()
            return
        ping = now >= self._next_ping
        if ping:
            self._next_ping = now + self.keepalive.interval
        # the next tick is set first: nothing the ping does (a write, a close)
        # can leave the link without its dead check, closing links included
        due = min(self._next_ping, self._last_received + self.keepalive.dead_after)
        self._keepalive_call = self.clock.callLater(max(due - now, 0.0), self._keepalive_tick)
        if ping:
            self._send_ping()

    def _send_ping(self) -> None:
        # once a keepalive interval (the first tick follows the handshake):
        # the TLS layer gives back buffers a past burst grew (rtunnel.tlslink)
        release = getattr(self.transport, "release_idle_buffers", None)
        if release is not None:
            release()
        self._ping_seq += 1
        self._ping_sent_at = self.clock.seconds()
        self.send(wire.encode_ping(self._ping_seq))

    def _ping_received(self, frame: Frame) -> None:
        opaque = wire.decode_u64(frame)
        if not frame.flags & wire.FLAG_PONG:
            self.send(wire.encode_ping(opaque, pong=True))
        elif opaque == self._ping_seq and self._ping_sent_at is not None:
            rtt = max(self.clock.seconds() - self._ping_sent_at, 1e-4)
            self.srtt = rtt if not self._rtt_sampled else 0.875 * self.srtt + 0.125 * rtt
            self._rtt_sampled = True
            self._ping_sent_at = None

    def _stop_keepalive(self) -> None:
        call, self._keepalive_call = self._keepalive_call, None
        cancel_call(call)
