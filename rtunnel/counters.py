"""Plain counters the ends keep for the metrics, without any metrics library.

The data path never touches prometheus_client: streams keep plain ints
(`Stream.read_total`, `Stream.received`, `Stream.blocked_seconds`), the
ends keep the event counts below, and when a stream closes its figures are
folded into `Traffic`. rtunnel.metrics reads all of it at scrape time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from rtunnel.addresses import format_host_port
from rtunnel.mux import Stream


def tunnel_name(host: str, port: int) -> str:
    """The label of a public port: `host:port`, `[v6]:port`."""
    return format_host_port(host, port)


@dataclass
class StreamTotals:
    """What the closed streams of one (client, tunnel) added up to."""

    streams: int = 0
    bytes_in: int = 0  # visitor -> service
    bytes_out: int = 0  # service -> visitor
    blocked_seconds: float = 0.0  # bytes to send and no credit from the peer


class Traffic:
    """Per-(client, tunnel) totals of the streams that have closed.

    Directions are named after the tunnelled service, the same at both
    ends: *in* is what visitors send towards the service, *out* what comes
    back. On the server the visitor is the stream's local socket, on the
    client the target is (`visitor_side`)."""

    def __init__(self, visitor_side: bool) -> None:
        self.visitor_side = visitor_side
        self.closed: dict[tuple[str, str], StreamTotals] = {}

    def directions(self, stream: Stream) -> tuple[int, int]:
        """(bytes in, bytes out) of one stream so far."""
        if self.visitor_side:
            return stream.read_total, stream.received
        return stream.received, stream.read_total

    def fold(self, client: str, tunnel: str, stream: Stream) -> None:
        """A stream closed: add its figures to its (client, tunnel) totals."""
        totals = self.closed.get((client, tunnel))
        if totals is None:
            totals = self.closed[(client, tunnel)] = StreamTotals()
        bytes_in, bytes_out = self.directions(stream)
        totals.streams += 1
        totals.bytes_in += bytes_in
        totals.bytes_out += bytes_out
        totals.blocked_seconds += stream.blocked_seconds


def _counter() -> Counter[str]:
    return Counter()


@dataclass
class ServerEvents:
    """Events of a TunnelServer's life, counted where they happen.

    Per-credential counters are keyed by the credential name."""

    links_accepted: int = 0  # control connections accepted (TCP)
    handshakes_expired: int = 0  # dropped: no authenticated HELLO in time
    sessions_started: Counter[str] = field(default_factory=_counter)
    reconnects: Counter[str] = field(default_factory=_counter)  # HELLOs asking to resume
    resumes: Counter[str] = field(default_factory=_counter)  # ...and granted


@dataclass
class ClientEvents:
    """Events of a TunnelClient's life, counted where they happen."""

    connect_attempts: int = 0  # every attempt to reach the server
    sessions_started: int = 0  # WELCOMEs that started a new session
    resumes: int = 0  # WELCOMEs that resumed the session
    links_lost: int = 0  # links that carried the session and went down


@implementer(IStreamClientEndpoint)
class CountingEndpoint:
    """A client endpoint that counts the connection attempts made through it."""

    def __init__(self, endpoint: Any, events: ClientEvents) -> None:
        self._endpoint = endpoint
        self._events = events

    def connect(self, factory: Any) -> Any:
        self._events.connect_attempts += 1
        return self._endpoint.connect(factory)
