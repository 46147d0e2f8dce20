"""PROXY protocol headers (HAProxy's proxy-protocol.txt, versions 1 and 2).

With a tunnel's `proxy_protocol` set to v1 or v2, the client writes one of
these headers to the target before any of the visitor's bytes, so the local
service (nginx, HAProxy, Postfix, ...) sees the visitor's address and port
instead of the client's. Pure functions: addresses in, bytes out.

An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack listener
reports for an IPv4 visitor) is sent as IPv4. When an address is missing or
not an IP address, or source and destination are of different families, the
header says so instead of guessing: v1 `PROXY UNKNOWN`, v2 `LOCAL` (the
receiver then uses the connection's own addresses).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Any

from rtunnel.addresses import unmap

OFF, V1, V2 = "off", "v1", "v2"
VERSIONS = (OFF, V1, V2)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
_V2_HEAD = struct.Struct("!12sBBH")  # signature, version|command, family|protocol, length
_V2_LOCAL, _V2_PROXY = 0x20, 0x21  # version 2, command LOCAL / PROXY
_V2_UNSPEC, _V2_TCP4, _V2_TCP6 = 0x00, 0x11, 0x21  # family|protocol: unspec, TCP over IPv4 / IPv6
_V2_UDP4, _V2_UDP6 = 0x12, 0x22  # DGRAM (UDP) over IPv4 / IPv6
_PORTS = struct.Struct("!HH")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]


def endpoint(value: Any) -> Endpoint | None:
    """An OPEN `src`/`dst` value ([host, port]) as (IP address, port), or
    None if it is not an IP literal and a port in 0-65535. IPv4-mapped
    addresses are unmapped; an IPv6 zone (`fe80::1%eth0`) is dropped."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or len(value) != 2:
        return None
    host, port = value
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
        return None
    if not 0 <= port <= 65535:
        return None
    try:
        address = ipaddress.ip_address(unmap(host.partition("%")[0]))
    except ValueError:
        return None
    return address, port


def _same_family(src: Endpoint | None, dst: Endpoint | None) -> tuple[Endpoint, Endpoint] | None:
    if src is None or dst is None or src[0].version != dst[0].version:
        return None
    return src, dst


def v1_header(src: Endpoint | None, dst: Endpoint | None) -> bytes:
    """The version 1 text line: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`,
    or `PROXY UNKNOWN\\r\\n` when the addresses are unknown or mixed."""
    pair = _same_family(src, dst)
    if pair is None:
        return V1_UNKNOWN
    (src_ip, src_port), (dst_ip, dst_port) = pair
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    # str() of ipaddress is the canonical form the spec asks for: no leading
    # zeroes in IPv4, the longest run of zero groups compressed in IPv6
    return f"PROXY {family} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def v2_header(src: Endpoint | None, dst: Endpoint | None, datagram: bool = False) -> bytes:
    """The version 2 binary header: PROXY command, TCP (or with `datagram`,
    UDP: DGRAM) over IPv4 or IPv6, no TLVs; a LOCAL command with no
    addresses when they are unknown or mixed."""
    pair = _same_family(src, dst)
    if pair is None:
        return _V2_HEAD.pack(V2_SIGNATURE, _V2_LOCAL, _V2_UNSPEC, 0)
    (src_ip, src_port), (dst_ip, dst_port) = pair
    body = src_ip.packed + dst_ip.packed + _PORTS.pack(src_port, dst_port)
    if datagram:
        family = _V2_UDP4 if src_ip.version == 4 else _V2_UDP6
    else:
        family = _V2_TCP4 if src_ip.version == 4 else _V2_TCP6
    return _V2_HEAD.pack(V2_SIGNATURE, _V2_PROXY, family, len(body)) + body


def header(version: str, src: Any, dst: Any) -> bytes:
    """The header of `version` ("off": none) for OPEN's `src` and `dst`
    values ([host, port] each, as the server sends them)."""
    if version == OFF:
        return b""
    if version == V1:
        return v1_header(endpoint(src), endpoint(dst))
    if version == V2:
        return v2_header(endpoint(src), endpoint(dst))
    raise ValueError(f"PROXY protocol version {version!r} is not one of {', '.join(VERSIONS)}")


def datagram_header(src: Any, dst: Any) -> bytes:
    """The v2 header a UDP tunnel puts in front of each datagram to its
    target (HAProxy's DGRAM): the visitor `src` and the server's public
    port `dst` ([host, port] each). A wildcard `dst` host (`::`,
    `0.0.0.0`: the port is bound on every address and the server does not
    say which one the visitor reached) becomes the unspecified address of
    the visitor's family; an unknown `src` gives a LOCAL header."""
    source, destination = endpoint(src), endpoint(dst)
    if source is not None and destination is not None and destination[0].is_unspecified:
        unspecified = ipaddress.ip_address("0.0.0.0" if source[0].version == 4 else "::")
        destination = (unspecified, destination[1])
    return v2_header(source, destination, datagram=True)


__all__ = ["OFF", "V1", "V2", "VERSIONS", "datagram_header", "endpoint", "header", "v1_header", "v2_header"]
