"""The MOVED hint (docs/protocol.md "MOVED"): an ERROR or GOAWAY with code
MOVED whose reason starts with the control address (`HOST:PORT`, IPv6 in
brackets) of the fleet member the client should go to, then a space and a
sentence for people. Both ends use these two functions, so the format is
defined once."""

from __future__ import annotations

from rtunnel.addresses import format_host_port
from rtunnel.config import parse_host_port
from rtunnel.errors import ConfigError


def moved_reason(host: str, port: int, text: str) -> str:
    """The reason of a MOVED frame pointing at `host:port`."""
    return f"{format_host_port(host, port)} {text}"


def parse_moved(reason: str) -> tuple[str, int] | None:
    """The (host, port) a MOVED reason points at; None if it names none
    (the client then reconnects as after any other goodbye)."""
    first = reason.split(" ", 1)[0]
    if not first:
        return None
    try:
        host, port = parse_host_port(first, "MOVED", None, None)
    except (ConfigError, ValueError):
        return None
    if not host or not port:
        return None
    return host, port
