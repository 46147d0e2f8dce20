"""What rtunnel needs of Twisted's TCP objects, typed.

Twisted types `Protocol.transport` as `ITransport | None` and a listening
port's address as `IAddress`; the connected TCP protocols and listening
ports rtunnel makes always have a TCP transport and an IPv4/IPv6 address.
These helpers say so once, for the type checker, and fail loudly if not.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, ITCPTransport, ITransport


def tcp_transport(transport: ITransport | None) -> ITCPTransport:
    """The TCP transport of a connected protocol (never None once connected)."""
    if transport is None:
        raise RuntimeError("the protocol is not connected")
    return cast(ITCPTransport, transport)


def port_number(port: IListeningPort) -> int:
    """The port number a TCP listening port is bound to."""
    address = port.getHost()
    if not isinstance(address, IPv4Address | IPv6Address):
        raise TypeError(f"not a TCP listening port: {address!r}")
    return address.port
