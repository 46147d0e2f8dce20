"""The memory bound of one session (docs/security.md "Memory per session").

Every byte a session holds on behalf of its peer counts against one budget,
`SessionSettings.session_window_budget` (--session-buffer), split into
shares: stream buffers and reserved receive windows (`held_send`,
`held_windows`), reliable frames awaiting ACK (the ReliableLog's `held`),
and replies queued to a link whose peer does not read (`reply_backlog`).
The counters move with the bytes; nothing is ever summed over streams. The
Budget only counts and compares: the Session acts on what it answers (stop
reading local sockets, stop reading the link, refuse a stream, end with
ERROR).
"""

from __future__ import annotations

from rtunnel.mux.settings import SessionSettings


class Budget:
    """The counters and marks of one session's budget."""

    __slots__ = (
        "held_send", "held_windows", "reply_backlog", "streams_full", "reservation",
        "admit_limit", "streams_high", "streams_low", "reliable_limit", "reply_limit",
    )  # fmt: skip

    def __init__(self, settings: SessionSettings) -> None:
        budget = settings.session_window_budget
        self.held_send = 0  # read from local sockets, not acknowledged by the peer
        self.held_windows = 0  # reserved receive windows and local buffers of open streams
        self.reply_backlog = 0  # written to the link since it last asked us to pause
        self.streams_full = False  # local sockets are not read until the streams' bytes fall
        #: what a new stream reserves: the initial window the peer may fill
        #: without a grant, and what its local socket may buffer beyond it
        self.reservation = settings.initial_window + settings.local_buffer
        self.admit_limit = budget * 3 // 4  # new streams and grown windows up to here
        self.streams_high = budget * 7 // 8  # ... and local sockets read up to here
        self.streams_low = self.streams_high - budget // 16  # ... and again from here
        self.reliable_limit = budget // 16  # beyond: ERROR (new streams refused from half)
        self.reply_limit = budget // 16  # beyond: the link is not read until it drains

    @property
    def held_streams(self) -> int:
        """The streams' share: their buffered bytes and reservations."""
        return self.held_send + self.held_windows

    def room_for_stream(self, held_reliable: int) -> bool:
        """True if a new stream fits: its reservation, and the reliable
        frames its OPEN, FIN and RST will need."""
        return (
            self.held_send + self.held_windows + self.reservation <= self.admit_limit
            and held_reliable <= self.reliable_limit // 2
        )

    def charge_send(self, n: int) -> bool:
        """`n` bytes were read from a local socket. True when the streams'
        share just reached its high mark: stop reading every local socket."""
        self.held_send += n
        if not self.streams_full and self.held_send + self.held_windows >= self.streams_high:
            self.streams_full = True
            return True
        return False

    def release_send(self, n: int) -> bool:
        """The peer acknowledged `n` bytes. True when the local sockets may
        be read again."""
        self.held_send -= n
        return self.streams_full and self._read_again()

    def reserve_window(self, extra: int) -> bool:
        """Reserve `extra` bytes to grow a receive window; False if they
        do not fit."""
        if self.held_send + self.held_windows + extra > self.admit_limit:
            return False
        self.held_windows += extra
        return True

    def release_window(self, amount: int) -> bool:
        """Give back a reservation. True when the local sockets may be read
        again."""
        self.held_windows -= amount
        return self.streams_full and self._read_again()

    def _read_again(self) -> bool:
        if self.held_send + self.held_windows <= self.streams_low:
            self.streams_full = False
            return True
        return False
