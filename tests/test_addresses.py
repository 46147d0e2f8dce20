"""rtunnel.addresses: IPv4-mapped peers shown as IPv4, HOST:PORT as the rest
of rtunnel writes it, and "no IPv6 here" told apart from a busy port.

Pure functions on values and Twisted address objects; no sockets.
"""

from __future__ import annotations

import errno

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from rtunnel.addresses import (
    bracket,
    format_host_port,
    format_peer,
    host_port,
    ipv6_unavailable,
    is_ip_literal,
    known_host_port,
    public_address,
    unmap,
)


class AddressTests(unittest.SynchronousTestCase):
    def test_unmap_gives_ipv4_for_ipv4_mapped_addresses_only(self) -> None:
        self.assertEqual(unmap("::ffff:127.0.0.9"), "127.0.0.9")
        self.assertEqual(unmap("::FFFF:10.1.2.3"), "10.1.2.3")
        self.assertEqual(unmap("::ffff:7f00:1"), "127.0.0.1")
        self.assertEqual(unmap("0:0:0:0:0:ffff:7f00:3"), "127.0.0.3")
        for host in ("::1", "2001:db8::1", "127.0.0.1", "?", "::ffff:nonsense", "example.com"):
            self.assertEqual(unmap(host), host)

    def test_host_port_unmaps_twisted_addresses(self) -> None:
        self.assertEqual(host_port(IPv6Address("TCP", "::ffff:127.0.0.2", 5000)), ("127.0.0.2", 5000))
        self.assertEqual(host_port(IPv6Address("TCP", "::1", 5000)), ("::1", 5000))
        self.assertEqual(host_port(IPv4Address("TCP", "127.0.0.1", 80)), ("127.0.0.1", 80))
        self.assertEqual(host_port(UNIXAddress(b"/tmp/x")), ("?", 0))

    def test_ipv6_unavailable_means_no_ipv6_not_a_busy_port(self) -> None:
        no_af = CannotListenError("::", 1, OSError(errno.EAFNOSUPPORT, "no"))
        busy = CannotListenError("::", 1, OSError(errno.EADDRINUSE, "busy"))
        self.assertTrue(ipv6_unavailable(no_af))
        self.assertFalse(ipv6_unavailable(busy))

    def test_ipv6_unavailable_takes_a_bare_oserror_too(self) -> None:
        self.assertTrue(ipv6_unavailable(OSError(errno.EADDRNOTAVAIL, "not available")))
        self.assertFalse(ipv6_unavailable(OSError(errno.EACCES, "denied")))
        self.assertFalse(ipv6_unavailable(ValueError("no errno at all")))


class KnownHostPortTests(unittest.SynchronousTestCase):
    def test_an_address_with_host_and_port_is_unmapped(self) -> None:
        self.assertEqual(known_host_port(IPv6Address("TCP", "::ffff:127.0.0.2", 5000)), ("127.0.0.2", 5000))
        self.assertEqual(known_host_port(IPv4Address("TCP", "127.0.0.1", 80)), ("127.0.0.1", 80))

    def test_a_unix_socket_or_no_address_is_none_not_a_question_mark(self) -> None:
        self.assertIsNone(known_host_port(UNIXAddress(b"/tmp/x")))
        self.assertIsNone(known_host_port(None))


class IPLiteralTests(unittest.SynchronousTestCase):
    def test_addresses_of_both_families_are_literals_and_names_are_not(self) -> None:
        for host in ("127.0.0.1", "0.0.0.0", "::1", "::", "2001:db8::1", "::ffff:127.0.0.1"):
            self.assertTrue(is_ip_literal(host), host)
        for host in ("localhost", "example.com", "[::1]", "127.0.0.1:80", ""):
            self.assertFalse(is_ip_literal(host), host)


class FormatTests(unittest.SynchronousTestCase):
    def test_ipv6_hosts_are_bracketed_before_a_port_and_others_are_not(self) -> None:
        self.assertEqual(bracket("::1"), "[::1]")
        self.assertEqual(bracket("example.com"), "example.com")
        self.assertEqual(format_host_port("::1", 4000), "[::1]:4000")
        self.assertEqual(format_host_port("127.0.0.1", 4000), "127.0.0.1:4000")
        self.assertEqual(format_host_port("example.com", 80), "example.com:80")

    def test_a_port_bound_on_every_address_is_reached_at_the_servers_host(self) -> None:
        for wildcard in ("", "0.0.0.0", "::"):
            self.assertEqual(public_address(wildcard, 4000, "tunnel.example"), "tunnel.example:4000")
        self.assertEqual(public_address("::", 4000, "::1"), "[::1]:4000")

    def test_a_port_bound_on_one_address_is_reached_at_that_address(self) -> None:
        self.assertEqual(public_address("127.0.0.1", 4000, "tunnel.example"), "127.0.0.1:4000")
        self.assertEqual(public_address("::1", 4000, "tunnel.example"), "[::1]:4000")

    def test_an_open_frames_peer_is_written_host_port_or_a_question_mark(self) -> None:
        self.assertEqual(format_peer(["198.51.100.1", 5555]), "198.51.100.1:5555")
        self.assertEqual(format_peer(("2001:db8::1", 443)), "[2001:db8::1]:443")
        for malformed in (None, "198.51.100.1:5555", ["198.51.100.1"], ["198.51.100.1", "5555"], [1, 2, 3]):
            self.assertEqual(format_peer(malformed), "?", repr(malformed))
