"""rtunnel.proxyproto: PROXY protocol v1/v2 headers, read back by a parser
written here from the specification (HAProxy's proxy-protocol.txt), by
fixed byte vectors worked out by hand from it, and, through a real tunnel,
by Twisted's own PROXY protocol receiver (twisted.protocols.haproxy)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python import usage
from twisted.trial import unittest

from rtunnel import proxyproto
from rtunnel.proxyproto import header, v1_header, v2_header
from rtunnel.tap import client as tap_client
from rtunnel.tap.client import Options
from tests.harness import (
    TOKEN,
    Echo,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    pattern,
    wait_until,
    with_timeout,
)

SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


# ---------------------------------------------------------------- a reader from the spec


def parse_v1(data: bytes) -> tuple[str, ...]:
    """("UNKNOWN",) or (family, src, dst, sport, dport) of one v1 line; every
    rule of section 2.1 a sender must follow is checked."""
    end = data.find(b"\r\n")
    assert 0 < end and end + 2 <= 107, f"no CRLF within 107 bytes: {data!r}"
    assert end + 2 == len(data), "bytes after the line"
    line = data[:end].decode("ascii")
    assert "\r" not in line and "\n" not in line
    words = line.split(" ")
    assert words[0] == "PROXY"
    if words[1] == "UNKNOWN":
        return ("UNKNOWN",)
    assert len(words) == 6, f"v1 needs 6 words: {line!r}"
    _, family, src, dst, sport, dport = words
    assert family in ("TCP4", "TCP6")
    af = socket.AF_INET if family == "TCP4" else socket.AF_INET6
    for address in (src, dst):
        socket.inet_pton(af, address)  # raises unless it is of that family
        if af == socket.AF_INET:
            assert all(part == str(int(part)) for part in address.split(".")), "leading zero"
    for port in (sport, dport):
        assert port == str(int(port)) and 0 <= int(port) <= 65535, f"bad port {port!r}"
    assert len(line) + 2 <= (56 if family == "TCP4" else 104)
    return family, src, dst, sport, dport


def parse_v2(data: bytes) -> tuple[Any, ...]:
    """("LOCAL",) or (family, src, dst, sport, dport) of one v2 header."""
    assert data[:12] == SIGNATURE
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    assert ver_cmd >> 4 == 2, "version must be 2"
    assert len(data) == 16 + length, "length field does not match"
    body = data[16:]
    if ver_cmd & 0x0F == 0:
        assert fam == 0x00 and length == 0, "LOCAL is sent with AF_UNSPEC and no address"
        return ("LOCAL",)
    assert ver_cmd & 0x0F == 1, "command must be LOCAL or PROXY"
    if fam == 0x11:
        assert length == 12
        src, dst = socket.inet_ntop(socket.AF_INET, body[0:4]), socket.inet_ntop(socket.AF_INET, body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        return "TCP4", src, dst, sport, dport
    assert fam == 0x21, f"unexpected family/protocol {fam:#x}"
    assert length == 36
    src, dst = socket.inet_ntop(socket.AF_INET6, body[0:16]), socket.inet_ntop(socket.AF_INET6, body[16:32])
    sport, dport = struct.unpack("!HH", body[32:36])
    return "TCP6", src, dst, sport, dport


# ---------------------------------------------------------------- strategies

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)


def mapped(address: ipaddress.IPv4Address) -> str:
    return f"::ffff:{address}"


def canonical(family: str, text: str) -> str:
    af = socket.AF_INET if family == "TCP4" else socket.AF_INET6
    return socket.inet_ntop(af, socket.inet_pton(af, text))


class HeaderRoundTrip(unittest.TestCase):
    """What we build, the spec's reader reads back as the same addresses."""

    @given(ipv4, ipv4, ports, ports)
    def test_ipv4(self, src, dst, sport, dport):
        info = ([str(src), sport], [str(dst), dport])
        self.assertEqual(parse_v1(header("v1", *info)), ("TCP4", str(src), str(dst), str(sport), str(dport)))
        self.assertEqual(parse_v2(header("v2", *info)), ("TCP4", str(src), str(dst), sport, dport))

    @given(ipv6, ipv6, ports, ports)
    def test_ipv6(self, src, dst, sport, dport):
        info = ([str(src), sport], [str(dst), dport])
        family, s, d, sp, dp = parse_v1(header("v1", *info))
        self.assertEqual((family, sp, dp), ("TCP6", str(sport), str(dport)))
        self.assertEqual((ipaddress.ip_address(s), ipaddress.ip_address(d)), (src, dst))
        self.assertEqual(s, canonical("TCP6", s))  # the compressed form, as inet_ntop writes it
        v2 = parse_v2(header("v2", *info))
        self.assertEqual(v2, ("TCP6", canonical("TCP6", str(src)), canonical("TCP6", str(dst)), sport, dport))

    @given(ipv4, ipv4, ports, ports, st.booleans())
    def test_ipv4_mapped_addresses_are_sent_as_ipv4(self, src, dst, sport, dport, both):
        info = ([mapped(src), sport], [mapped(dst) if both else str(dst), dport])
        self.assertEqual(parse_v1(header("v1", *info)), ("TCP4", str(src), str(dst), str(sport), str(dport)))
        self.assertEqual(parse_v2(header("v2", *info)), ("TCP4", str(src), str(dst), sport, dport))

    @given(ipv4, ipv6, ports, ports, st.booleans())
    def test_mixed_families_are_unknown_or_local(self, v4, v6, p1, p2, v4_first):
        a, b = [str(v4), p1], [str(v6), p2]
        src, dst = (a, b) if v4_first else (b, a)
        self.assertEqual(header("v1", src, dst), b"PROXY UNKNOWN\r\n")
        self.assertEqual(parse_v2(header("v2", src, dst)), ("LOCAL",))

    @given(
        st.one_of(
            st.none(), st.text(max_size=20), st.integers(), st.lists(st.text(max_size=5), max_size=3),
            st.tuples(st.text(max_size=20), ports), st.tuples(st.just("192.0.2.1"), st.integers()),
            st.tuples(st.just("192.0.2.1"), st.booleans()), st.tuples(st.just("192.0.2.1"), st.text(max_size=5)),
        ),
        st.tuples(ipv4.map(str), ports),
    )
    def test_anything_that_is_not_an_address_gives_unknown_or_local(self, junk, good):
        if proxyproto.endpoint(junk) is not None:  # the text or tuple happened to be valid
            return
        for src, dst in ((junk, list(good)), (list(good), junk)):
            self.assertEqual(header("v1", src, dst), b"PROXY UNKNOWN\r\n")
            self.assertEqual(parse_v2(header("v2", src, dst)), ("LOCAL",))

    def test_off_sends_nothing_and_unknown_versions_are_refused(self):
        self.assertEqual(header("off", ["192.0.2.1", 1], ["192.0.2.2", 2]), b"")
        with self.assertRaises(ValueError):
            header("v3", ["192.0.2.1", 1], ["192.0.2.2", 2])

    def test_ipv6_zone_is_dropped(self):
        self.assertEqual(
            header("v1", ["fe80::1%eth0", 5000], ["fe80::2%eth0", 80]), b"PROXY TCP6 fe80::1 fe80::2 5000 80\r\n"
        )


class KnownVectors(unittest.TestCase):
    """Bytes worked out by hand from proxy-protocol.txt, sections 2.1 and 2.2."""

    def test_v1_tcp4_the_specs_example(self):
        self.assertEqual(
            header("v1", ["192.168.0.1", 56324], ["192.168.0.11", 443]),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        )

    def test_v1_tcp4_longest_line_is_56_bytes(self):
        line = header("v1", ["255.255.255.255", 65535], ["255.255.255.255", 65535])
        self.assertEqual(line, b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n")
        self.assertEqual(len(line), 56)

    def test_v1_tcp6_and_longest_line_is_104_bytes(self):
        self.assertEqual(
            header("v1", ["2001:db8::1", 1234], ["2001:DB8:0:0:0:0:0:2", 80]),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n",
        )
        full = "ffff:" * 7 + "ffff"
        self.assertEqual(len(header("v1", [full, 65535], [full, 65535])), 104)

    def test_v1_unknown(self):
        self.assertEqual(v1_header(None, None), b"PROXY UNKNOWN\r\n")

    def test_v2_tcp4(self):
        # 192.0.2.1:56324 -> 198.51.100.2:443; 56324 = 0xdc04, 443 = 0x01bb
        expected = bytes.fromhex(
            "0d0a0d0a000d0a515549540a"  # signature
            "21"  # version 2, command PROXY
            "11"  # AF_INET, STREAM
            "000c"  # 12 address bytes
            "c0000201" "c6336402"  # addresses
            "dc04" "01bb"  # ports
        )
        self.assertEqual(header("v2", ["192.0.2.1", 56324], ["198.51.100.2", 443]), expected)

    def test_v2_tcp6(self):
        expected = bytes.fromhex(
            "0d0a0d0a000d0a515549540a" "21" "21" "0024"  # PROXY, AF_INET6 STREAM, 36 bytes
            "20010db8000000000000000000000001"
            "20010db8000000000000000000000002"
            "04d2" "0050"  # 1234, 80
        )
        self.assertEqual(header("v2", ["2001:db8::1", 1234], ["2001:db8::2", 80]), expected)

    def test_v2_local(self):
        self.assertEqual(v2_header(None, None), bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000"))

    def test_v2_mapped_source_is_tcp4(self):
        self.assertEqual(
            header("v2", ["::ffff:192.0.2.1", 56324], ["::ffff:198.51.100.2", 443]),
            header("v2", ["192.0.2.1", 56324], ["198.51.100.2", 443]),
        )


# ---------------------------------------------------------------- through a tunnel


class PeerRecorder(Protocol):
    """Behind Twisted's PROXY protocol receiver: records the peer and host
    the header announced and every byte after it; echoes them back."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        if not self.received:
            self.factory.peers.append((self.transport.getPeer(), self.transport.getHost()))
        self.received += data
        self.transport.write(data)
        if len(self.received) >= self.factory.expect:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.remove(self)


class SourceVisitor(Visitor):
    """A Visitor that remembers its own (source) address and port."""

    def connectionMade(self) -> None:
        host = self.transport.getHost()
        self.source = (host.host, host.port)
        super().connectionMade()


def visit_from(source: str, port: int, visitor: Visitor) -> tuple[defer.Deferred[Any], Any]:
    """Connect `visitor` from `source` (an address of this host) to
    127.0.0.1:port; returns (done, connector)."""
    factory = ClientFactory.forProtocol(lambda: visitor)
    factory.noisy = False
    factory.clientConnectionFailed = lambda connector, reason: visitor.done.errback(reason)  # type: ignore[method-assign]
    connector = reactor.connectTCP("127.0.0.1", port, factory, bindAddress=(source, 0))
    return visitor.done, connector


class ThroughTheTunnel(unittest.TestCase):
    """The client writes the header before the visitor's bytes; a PROXY
    protocol receiver (Twisted's) sees the visitor's address and port."""

    timeout = 60

    @defer.inlineCallbacks
    def _visit(self, version: str, payload: bytes, bind_host: str) -> Any:
        inner = Factory.forProtocol(PeerRecorder)
        inner.connections, inner.peers, inner.expect = [], [], len(payload)
        port = yield proxyEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")).listen(inner)
        self.addCleanup(port.stopListening)
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        config = tunnel.client_config([(0, port.getHost().port)])
        # bound to 0.0.0.0 or ::, OPEN's dst must still be the address the visitor reached
        config = replace(config, tunnels=tuple(
            replace(t, bind_host=bind_host, proxy_protocol=version) for t in config.tunnels
        ))
        service = tunnel.start_client(config)
        bound = yield with_timeout(service.client.when_bound(), 10)
        public = bound[1][1]
        visitor = SourceVisitor(payload, half_close=False)
        done, connector = visit_from("127.0.0.2", public, visitor)
        reply, reason = yield with_timeout(done, 30)
        reason.trap(error.ConnectionDone)
        return inner.peers, reply, visitor.source, public

    @defer.inlineCallbacks
    def _check(self, version: str, bind_host: str = "0.0.0.0") -> Any:
        payload = pattern(7, 300_000)  # more than the first window: the header is not counted in it
        peers, reply, source, public = yield self._visit(version, payload, bind_host)
        self.assertEqual(reply, payload)
        [(peer, host)] = peers
        self.assertEqual(source[0], "127.0.0.2")
        self.assertEqual((peer.host, peer.port), source)
        self.assertEqual((host.host, host.port), ("127.0.0.1", public))  # dst: the address reached

    def test_v1_reaches_the_target_before_the_visitors_bytes(self):
        return self._check("v1")

    def test_v2_reaches_the_target_before_the_visitors_bytes(self):
        return self._check("v2")

    def test_ipv4_visitor_of_a_dual_stack_listener_is_sent_as_ipv4(self):
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::", 0))
        except OSError:
            raise unittest.SkipTest("this host has no IPv6: no dual-stack listener") from None
        return defer.gatherResults([self._check("v1", "::"), self._check("v2", "::")])


# ---------------------------------------------------------------- a reload


class Conversation(Protocol):
    """A visitor the test drives: it sends when told, keeps what comes back."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


class ReloadChangesTheHeader(unittest.TestCase):
    """A config file reload that changes only proxy_protocol keeps the
    tunnel and its port; new visitors get the new header, a connection
    already open gets none in the middle of its bytes."""

    timeout = 60

    @defer.inlineCallbacks
    def converse(self, port: int) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=("127.0.0.2", 0))
        conversation = yield connectProtocol(endpoint, Conversation())
        self.addCleanup(lambda: conversation.closed)
        self.addCleanup(conversation.transport.loseConnection)
        return conversation

    @defer.inlineCallbacks
    def test_reload_switches_the_header_for_new_visitors_only(self):
        _, target = listen_target(self, Echo)  # echoes the header too: the visitor sees it
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        public = free_port()
        path = Path(self.mktemp())

        def write(version: str) -> None:
            path.write_text(
                f'server = "127.0.0.1:{tunnel.control_port}"\ntoken = "{TOKEN}"\n'
                f'fingerprint = "{tunnel.fingerprint}"\n'
                f'[[tunnel]]\nforward = "127.0.0.1:{public}"\nto = "127.0.0.1:{target}"\n'
                f'proxy_protocol = "{version}"\n'
            )

        write("off")
        options = Options()
        options.parseOptions(["--config", str(path)])
        service = tap_client.ClientMainService(options.config, reactor, exit_on_fatal=False, reload_argv=options.argv)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        yield with_timeout(service.client.when_bound(), 10)

        before = yield self.converse(public)
        before.transport.write(b"before")
        yield wait_until(lambda: before.received == b"before")
        for version in ("v1", "v2"):
            write(version)
            service.reload()
            self.assertEqual(service.client.tunnels[1].proxy_protocol, version)
            self.assertEqual(service.client.bound[1][1], public)  # the same tunnel, the same port
            fresh = yield self.converse(public)
            fresh.transport.write(b"hello")
            source = fresh.transport.getHost()
            expected = header(version, [source.host, source.port], ["127.0.0.1", public]) + b"hello"
            yield wait_until(lambda: len(fresh.received) >= len(expected))  # noqa: B023 (waited for here, in this turn)
            self.assertEqual(fresh.received, expected)
            parsed = parse_v1(fresh.received[:-5]) if version == "v1" else parse_v2(fresh.received[:-5])
            self.assertEqual(parsed[1:3], ("127.0.0.2", "127.0.0.1"))
        before.transport.write(b" after")
        yield wait_until(lambda: before.received == b"before after")


# ---------------------------------------------------------------- the client's option

FP = "sha256:" + "ab" * 32


class ClientOption(unittest.TestCase):
    """--proxy-protocol sets the -f/-t tunnels' header; a config file sets it
    per [[tunnel]]."""

    def parse(self, *args: str) -> Any:
        options = Options()
        options.parseOptions(["-c", "127.0.0.1", "--token", "t", "--fingerprint", FP, *args])
        return options

    def test_off_by_default(self):
        options = self.parse("-f", "4000", "-t", "3000")
        self.assertEqual([t.proxy_protocol for t in options.config.tunnels], ["off"])

    def test_applies_to_every_command_line_tunnel(self):
        options = self.parse("--proxy-protocol", "v2", "-f", "4000", "-t", "3000", "-f", "4001", "-t", "3001")
        self.assertEqual([t.proxy_protocol for t in options.config.tunnels], ["v2", "v2"])

    def test_unknown_version_is_a_usage_error(self):
        e = self.assertRaises(usage.UsageError, self.parse, "--proxy-protocol", "v3", "-f", "4000", "-t", "3000")
        self.assertEqual(str(e), "--proxy-protocol v3: write off, v1 or v2")

    def test_file_tunnels_keep_their_own_and_top_level_key_is_refused(self):
        path = Path(self.mktemp())
        path.write_text(
            f'server = "127.0.0.1"\nfingerprint = "{FP}"\ntoken = "t"\n'
            '[[tunnel]]\nforward = "4000"\nto = "3000"\nproxy_protocol = "v1"\n'
        )
        options = Options()
        options.parseOptions(["--config", str(path), "--proxy-protocol", "v2", "-f", "4001", "-t", "3001"])
        self.assertEqual([t.proxy_protocol for t in options.config.tunnels], ["v1", "v2"])
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", str(path), "--proxy-protocol", "v2"])
        self.assertIn("--proxy-protocol applies to the -f/-t tunnels of the command line", str(e))
        path.write_text(f'server = "127.0.0.1"\nfingerprint = "{FP}"\ntoken = "t"\nproxy_protocol = "v2"\n')
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", str(path)])
        self.assertIn("line 4: proxy_protocol is a setting of each tunnel", str(e))


class DatagramHeaderTests(unittest.TestCase):
    """The v2 header of UDP tunnels (DGRAM), by hand from proxy-protocol.txt 2.2."""

    def test_udp_over_ipv6_and_ipv4(self):
        six = proxyproto.datagram_header(["2001:db8::1", 5353], ["2001:db8::2", 53])
        self.assertEqual(six[12:16], bytes((0x21, 0x22, 0, 36)))
        four = proxyproto.datagram_header(["::ffff:198.51.100.7", 40000], ["203.0.113.5", 53])
        self.assertEqual(
            four[12:], bytes((0x21, 0x12, 0, 12, 198, 51, 100, 7, 203, 0, 113, 5)) + struct.pack("!HH", 40000, 53),
        )

    def test_a_wildcard_public_address_becomes_the_unspecified_one_of_the_visitors_family(self):
        four = proxyproto.datagram_header(["198.51.100.7", 40000], ["::", 53])
        self.assertEqual(four[12:24], bytes((0x21, 0x12, 0, 12, 198, 51, 100, 7, 0, 0, 0, 0)))

    def test_an_unknown_visitor_gives_a_local_header(self):
        self.assertEqual(proxyproto.datagram_header(None, ["127.0.0.1", 53])[12:], bytes((0x20, 0, 0, 0)))
