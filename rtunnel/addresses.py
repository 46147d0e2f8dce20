"""IP addresses as the rest of rtunnel should see them.

A dual-stack listener (`::` with net.ipv6.bindv6only=0, the Linux default)
sees an IPv4 peer as `::ffff:a.b.c.d`. Everything that shows, sends or counts
a peer address (log lines, OPEN's src/dst, the auth rate limiter, PROXY
headers, the status page) calls `unmap` first, so an IPv4 peer is always
`a.b.c.d`, whichever socket it came through.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
from typing import Any

DUAL_STACK = "::"  # bound by default: every IPv6 and (dual stack) IPv4 address
IPV4_ANY = "0.0.0.0"  # the fallback on hosts without IPv6

# errnos of binding `::` on a host without IPv6: the kernel has no AF_INET6
# (booted with ipv6.disable=1), or IPv6 is configured off
NO_IPV6_ERRNOS = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})


def unmap(host: str) -> str:
    """`::ffff:a.b.c.d` -> `a.b.c.d`; any other host (IPv4, IPv6, a name,
    `?`) is returned unchanged."""
    if ":" not in host:
        return host
    return _unmap_ipv6(host)


@functools.lru_cache(maxsize=4096)
def _unmap_ipv6(host: str) -> str:
    # cached: every visitor through a dual-stack port asks, mostly for the
    # same few peers, and parsing an IPv6 address costs microseconds
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host


@functools.lru_cache(maxsize=256)
def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 address, False for a host name (cached:
    asked for every connection to a target)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_port(addr: Any) -> tuple[str, int]:
    """(host, port) of a Twisted address, IPv4-mapped hosts unmapped;
    ("?", 0) for addresses without them (e.g. Unix sockets)."""
    return unmap(str(getattr(addr, "host", "?"))), int(getattr(addr, "port", 0) or 0)


def known_host_port(addr: Any) -> tuple[str, int] | None:
    """(host, port) of a Twisted address as host_port gives it, or None if
    the address has no host and port (a Unix socket, or no address)."""
    if getattr(addr, "host", None) is None or getattr(addr, "port", None) is None:
        return None
    return host_port(addr)


def bracket(host: str) -> str:
    """A host as written before `:port`: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def format_host_port(host: str, port: int) -> str:
    """`a.b.c.d:port`, `[v6]:port`."""
    return f"{bracket(host)}:{port}"


WILDCARD_HOSTS = frozenset({"", IPV4_ANY, DUAL_STACK})  # bound on every address


def public_address(bound_host: str, port: int, server_host: str) -> str:
    """Where visitors reach a public port, as HOST:PORT: the address it is
    bound to, or the server's host when it is bound on every address."""
    return format_host_port(server_host if bound_host in WILDCARD_HOSTS else bound_host, port)


def format_peer(value: Any) -> str:
    """An address as OPEN's src and dst carry it ([host, port]) written as
    HOST:PORT; anything else (absent, malformed) as "?"."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int):
        return format_host_port(str(value[0]), value[1])
    return "?"


def ipv6_unavailable(exc: BaseException) -> bool:
    """True if a failed listen (a CannotListenError or an OSError) failed
    because this host has no IPv6, not because the port is taken."""
    err = getattr(exc, "socketError", exc)
    return getattr(err, "errno", None) in NO_IPV6_ERRNOS
