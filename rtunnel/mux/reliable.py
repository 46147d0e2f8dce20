"""The reliable-frame log of one session (docs/protocol.md "Reliable frames").

OPEN, FIN, RST and the tunnel messages must survive a link drop: each is
numbered, kept until the peer's ACK covers it, and replayed on resume. The
log also counts the reliable frames received, which our ACKs report. It is
bookkeeping only: the Session writes the frames and runs the ACK timer.
"""

from __future__ import annotations

from rtunnel.mux.errors import ProtocolViolation
from rtunnel.wire import FrameType

#: What one reliable frame kept for replay costs beyond its bytes (the
#: outbox's tuple, ints and bytes header, as measured by sys.getsizeof).
RELIABLE_ENTRY_OVERHEAD = 192

#: One kept frame: (its number, its type, its stream id, its encoded bytes).
Entry = tuple[int, FrameType, int, bytes]


class ReliableLog:
    """Reliable frames sent and not yet acknowledged, and the count of
    those received. `held` is what the kept frames cost, by the session
    budget's count (their bytes plus RELIABLE_ENTRY_OVERHEAD each)."""

    __slots__ = ("sent", "outbox", "held", "received", "reported")

    def __init__(self) -> None:
        self.sent = 0  # reliable frames sent (the number of the next one)
        # a list, not a deque: an empty deque keeps a 64-slot block (760
        # bytes in every idle session); ACKs drop a run from the front at once
        self.outbox: list[Entry] = []
        self.held = 0
        self.received = 0  # reliable frames received from the peer
        self.reported = 0  # ... as of our last ACK

    def keep(self, ftype: FrameType, stream_id: int, frame: bytes) -> None:
        """Number `frame` and keep it until the peer acknowledges it."""
        self.outbox.append((self.sent, ftype, stream_id, frame))
        self.sent += 1
        self.held += len(frame) + RELIABLE_ENTRY_OVERHEAD

    def acknowledged(self, received: int) -> None:
        """The peer has received the first `received` reliable frames:
        forget them. Raises ProtocolViolation for frames never sent."""
        if received > self.sent:
            raise ProtocolViolation(f"ACK of {received} reliable frames, only {self.sent} sent")
        outbox = self.outbox
        if not outbox or outbox[0][0] >= received:
            return
        # numbered consecutively: the first `received - outbox[0][0]` are acknowledged
        done = min(received - outbox[0][0], len(outbox))
        self.held -= sum(len(entry[3]) for entry in outbox[:done]) + done * RELIABLE_ENTRY_OVERHEAD
        del outbox[:done]

    def count_received(self) -> int:
        """One more reliable frame arrived; return how many our ACKs have
        not reported yet."""
        self.received += 1
        return self.received - self.reported

    @property
    def ack_due(self) -> bool:
        return self.received > self.reported

    def take_ack(self) -> int:
        """The count to send in an ACK now (it is reported from here on)."""
        self.reported = self.received
        return self.received

    def clear(self) -> None:
        """Forget every kept frame (the session is over)."""
        self.outbox.clear()
        self.held = 0
