"""What the mux raises."""

from __future__ import annotations

from rtunnel.wire import ErrorCode


class ProtocolViolation(Exception):
    """The peer broke the protocol; the link is closed with this reason."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class StreamIdsExhausted(Exception):
    """No stream id is left in this session (after 2**31 streams)."""


class SessionBufferFull(Exception):
    """A new stream would take the session past its buffer budget."""
