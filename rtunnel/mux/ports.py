"""What the sans-IO core needs of the outside world: three small interfaces.

The mux (`rtunnel.mux`) imports no Twisted and owns no socket, reactor or
clock. It is handed:

* a **link** (`LinkPort`) for each stretch of time it runs over a control
  connection: frames go out through it, and it is told to stop or restart
  reading when the session's bounds say so;
* for each stream, its **local socket** (`LocalPort`): the visitor's
  connection on the server, the target's on the client;
* **time** (`Timers`): the current time and a way to call something later.

In the other direction the adapters call the core's own entry points:
`Session.frame_received`, `Session.pause_writing` / `resume_writing`, and
`Stream.local_data` / `local_eof` / `local_lost` / `local_buffer_full` /
`local_buffer_drained`.

The Twisted implementations live in `rtunnel.link` (`ControlLink` is a
`LinkPort`; `ReactorTimers`) and `rtunnel.localsocket` (`StreamProtocol` is
a `LocalPort`); tests/memory.py has in-memory ones.

Logging is the link's: the few events the core reports (a stream reset by
the peer, a link no longer read, a resume replayed) happen while a link is
attached, and go to `LinkPort.session_log`, an `EventLog` (Twisted's
`Logger` is one, structurally).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from rtunnel.wire import ErrorCode

if TYPE_CHECKING:
    from rtunnel.mux.session import Session
    from rtunnel.mux.stream import Stream


class EventLog(Protocol):
    """Where the core's log events go: a format string with fields, as
    Twisted's `Logger` takes them (`event=` names the event)."""

    def debug(self, format: str, **fields: Any) -> None: ...

    def info(self, format: str, **fields: Any) -> None: ...


class LinkPort(Protocol):
    """What a session needs of the control connection it runs over.

    Frames are written whole and in order; the link may buffer them. While
    its send buffer is full it calls the session's `pause_writing`, and
    `resume_writing` once it has sent everything, for as long as the
    session is registered with `watch_writes`.
    """

    #: smoothed round-trip time of the link, in seconds (for window growth)
    srtt: float
    @property
    def session_log(self) -> EventLog:
        """Where the session's log events go while it runs over this link."""

    def write(self, frame: bytes) -> None:
        """Send one encoded frame (or several, joined)."""

    def write_frame(self, header: bytes, payload: bytes) -> None:
        """Send a frame as its header and payload, never joined: the link's
        TLS layer encrypts a large payload where it lies (no copy)."""

    def pause_reading(self) -> None:
        """Stop reading the link (the peer does not read our replies)."""

    def resume_reading(self) -> None:
        """Read the link again."""

    def watch_writes(self, session: Session) -> None:
        """Report the send buffer's fill and drain to `session` from now on."""

    def unwatch_writes(self) -> None:
        """Stop reporting to the session (it let go of this link: a TLS link
        can then finish closing)."""

    def close_with_error(self, code: ErrorCode, reason: str) -> None:
        """Tell the peer why with ERROR, close the link, end the session."""


class LocalPort(Protocol):
    """What a stream needs of its local socket (visitor or target).

    The socket reports to the stream it is bound to: its bytes
    (`local_data`), its EOF (`local_eof`), its loss (`local_lost`) and the
    fill and drain of its send buffer (`local_buffer_full`,
    `local_buffer_drained`); a stream binds it in `Stream.attach_local`.
    """

    def bind(self, stream: Stream) -> None:
        """Report to `stream` from now on (a socket can change streams once,
        see `Stream.hand_local_to`)."""

    def write(self, data: bytes) -> None:
        """Send `data` (buffering what the socket does not take at once)."""

    def half_close(self) -> None:
        """Shut down sending once everything written is sent; stop reporting
        the send buffer's fill and drain (nothing more will be written)."""

    def abort(self) -> None:
        """Drop the connection at once (a reset)."""

    def close(self) -> None:
        """Close the connection once written bytes are sent (both halves done)."""

    def pause_reading(self) -> None:
        """Stop reading the socket."""

    def resume_reading(self) -> None:
        """Read the socket again."""


class Cancellable(Protocol):
    """A call scheduled by `Timers.call_later`."""

    def active(self) -> bool:
        """True until the call has run or was cancelled."""

    def cancel(self) -> None:
        """Do not run the call (only while `active()`)."""


class Timers(Protocol):
    """Time, as the core sees it: what time it is, and calls for later."""

    def now(self) -> float:
        """Seconds on a monotonic-enough clock (only differences are used)."""

    def call_later(self, delay: float, f: Callable[..., object], *args: object) -> Cancellable:
        """Call `f(*args)` after `delay` seconds."""


class ReactorClock(Protocol):
    """The shape of a Twisted reactor or `task.Clock` (IReactorTime), which
    a Session also accepts in place of `Timers` (see `as_timers`)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., object], *args: object) -> Cancellable: ...


class ClockTimers:
    """`Timers` over a `ReactorClock`. Plain attribute forwarding: it needs
    no import of Twisted, and `now` costs what `clock.seconds()` did."""

    __slots__ = ("clock", "now", "call_later")

    def __init__(self, clock: ReactorClock) -> None:
        self.clock = clock
        self.now: Callable[[], float] = clock.seconds
        self.call_later: Callable[..., Cancellable] = clock.callLater


def as_timers(clock: Timers | ReactorClock) -> Timers:
    """`clock` as `Timers`: itself if it is one, else a `ClockTimers`."""
    if hasattr(clock, "call_later") and hasattr(clock, "now"):
        return clock  # type: ignore[return-value]
    return ClockTimers(clock)


def cancel_call(call: Cancellable | None) -> None:
    """Cancel `call` if it is still to run (None and spent calls are fine)."""
    if call is not None and call.active():
        call.cancel()
