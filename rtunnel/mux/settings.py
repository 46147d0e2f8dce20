"""The tunable limits of one session (docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass

from rtunnel import wire

#: Bytes read per recv() on the link and the local sockets (Twisted's
#: default is 64 KiB): fewer syscalls and frames per byte in bulk. Twisted
#: also pauses a transport's producer once this much waits to be written,
#: which is why a stream reserves it in its session's budget
#: (`SessionSettings.local_buffer`).
READ_SIZE = 256 * 1024


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
    #: datagrams (UDP tunnels) written while the link is backed up, at most
    #: this many bytes per session and per flow until it drains; beyond, dropped
    datagram_backlog: int = 256 * 1024
    flow_backlog: int = 64 * 1024
