"""End to end: an honest client keeps working while hostile peers hit the
control port.

A real server and client run in this process on loopback (tests.harness).
While the honest client moves a few MiB through an echo tunnel, other
connections to the control port send random bytes, a plain HTTP request, a
TLS ClientHello and then nothing, nothing at all (500 idle connections), and
100 well-formed HELLOs with a wrong token. The hostile peers come from
127.0.0.2 (loopback on Linux) and the honest client from 127.0.0.1: the
failed-authentication rate limit is per source address, and while an address
is over it even a right token from there is refused unchecked (otherwise the
limit would not bound guessing). The honest transfer must arrive intact, the
silent connections must be dropped by the handshake deadline, the first wrong
tokens must be told `auth_failed` "wrong token" and, after the burst, the
rest "too many failed attempts" without their token being checked; no
session may be left behind and the server's memory must stay put.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from dataclasses import replace
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel import wire
from rtunnel.tls import PinnedCertificateCreator
from rtunnel.wire import ErrorCode, FrameType
from tests.harness import Echo, Tunnel, Visitor, listen_target, pattern, visit, wait_until, with_timeout

HANDSHAKE_TIMEOUT = 1.0
TRANSFER = 6 * 1024 * 1024  # bytes echoed through the tunnel per measurement
IDLE_CONNECTIONS = 500
WRONG_TOKENS = 100
ATTACKER = "127.0.0.2"  # loopback on Linux; the honest client stays on 127.0.0.1
FAILURE_BURST = 10  # the server's default --auth-failures
FAILURE_REFILL = 6.0  # the server's default --auth-failure-window
RSS_GROWTH_LIMIT = 50 * 1024 * 1024


def rss() -> int:
    """This process's resident set size in bytes (the server runs in it)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Raw(Protocol):
    """A hostile client: writes `payload` on connect, then stays silent.

    `closed` fires with the seconds the server kept the connection open."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        self.received = 0
        self.closed: defer.Deferred[float] = defer.Deferred()
        self.connected_at = 0.0

    def connectionMade(self) -> None:
        self.connected_at = time.monotonic()
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.closed.callback(time.monotonic() - self.connected_at)


class WrongToken(Protocol):
    """TLS (server pinned), then a HELLO with a wrong token; `done` fires
    with the frames the server sent before closing."""

    def __init__(self) -> None:
        self.decoder = wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME)
        self.frames: list[wire.Frame] = []
        self.done: defer.Deferred[list[wire.Frame]] = defer.Deferred()

    def connectionMade(self) -> None:
        hello = {"protocol": "rtunnel", "versions": [1], "token": "not-the-token", "max_frame": 1 << 20}
        self.transport.write(wire.encode_json(FrameType.HELLO, hello))

    def dataReceived(self, data: bytes) -> None:
        self.frames.extend(self.decoder.feed(data))

    def connectionLost(self, reason: Failure = None) -> None:
        self.done.callback(self.frames)


def client_hello() -> bytes:
    """The bytes of a TLS ClientHello (made in memory, never completed)."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def connect(port: int, protocol: Protocol) -> defer.Deferred[Any]:
    return connectProtocol(attacker_endpoint(port), protocol)


def attacker_endpoint(port: int) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5, bindAddress=(ATTACKER, 0))


def raise_fd_limit(test: unittest.TestCase, wanted: int) -> None:
    """Both ends of every connection live in this process: make room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise unittest.SkipTest(f"needs {wanted} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    test.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


class HostilePeersTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def echo_through(self, port: int, seed: int) -> Any:
        """Echo TRANSFER bytes through the tunnel; return bytes per second."""
        payload = pattern(seed, TRANSFER)
        started = time.monotonic()
        reply, _ = yield with_timeout(visit(port, Visitor(payload)), 60)
        elapsed = time.monotonic() - started
        self.assertEqual(len(reply), len(payload))
        self.assertEqual(hashlib.sha256(reply).hexdigest(), hashlib.sha256(payload).hexdigest())
        return len(payload) / elapsed

    @defer.inlineCallbacks
    def test_honest_client_unharmed_by_hostile_peers(self) -> Any:
        raise_fd_limit(self, 4096)
        tunnel = Tunnel(self)
        # backlog: with Twisted's default of 50 a burst of 600 connects
        # overflows the accept queue; the kernel then completes handshakes
        # the server never sees (SYN cookies), and those idle sockets stay
        # "connected" on our side forever, out of the server's reach.
        yield tunnel.start_server(listen="tcp:0:interface=127.0.0.1:backlog=1024")
        # harness.start_server() fixes handshake_timeout=5.0 and passes
        # **overrides next to it, so start_server(handshake_timeout=...) is a
        # TypeError; the server reads its config per connection, so swap it.
        server = tunnel.server
        server.config = replace(server.config, handshake_timeout=HANDSHAKE_TIMEOUT)
        # The unauthenticated cap (default 256) has its own test in
        # tests.test_guard; here every hostile connection must reach the
        # handshake, so that the deadline and the rate limiter are what is
        # exercised (603 connections at once).
        server.guard.max_unauthenticated = 1024
        _, target = listen_target(self, Echo)
        [public] = yield tunnel.connect([(0, target)])
        control = tunnel.control_port

        yield self.echo_through(public, 1)  # warm-up: buffers, TLS, code paths
        quiet = yield self.echo_through(public, 2)
        rss_before = rss()

        # ---- the hostile load, all at once
        deadline = HANDSHAKE_TIMEOUT + 1.0
        silent: list[tuple[str, Raw]] = []
        connecting = []
        for what, payload in [
            ("random bytes", os.urandom(3000)),
            ("plain HTTP", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\n\r\n"),
            ("ClientHello then silence", client_hello()),
        ]:
            proto = Raw(payload)
            silent.append((what, proto))
            connecting.append(connect(control, proto))
        for _ in range(IDLE_CONNECTIONS):
            proto = Raw()
            silent.append(("idle", proto))
            connecting.append(connect(control, proto))
        wrong = [WrongToken() for _ in range(WRONG_TOKENS)]
        creator = PinnedCertificateCreator(tunnel.fingerprint)
        endpoint = wrapClientTLS(creator, attacker_endpoint(control))
        connecting.extend(connectProtocol(endpoint, proto) for proto in wrong)

        attack_started = time.monotonic()
        try:
            loaded = yield self.echo_through(public, 3)
            yield with_timeout(defer.gatherResults(connecting, consumeErrors=True), 20)

            # ---- the silent ones are dropped by the handshake deadline
            held = yield with_timeout(defer.gatherResults([p.closed for _, p in silent]), 20)
            late = [(what, round(t, 2)) for (what, _), t in zip(silent, held, strict=True) if t > deadline]
            self.assertEqual(late, [], f"held open longer than {deadline} s")
            slowest = max(held)
            for what, proto in silent[:3]:
                self.assertLessEqual(proto.received, 64 * 1024, what)

            # ---- wrong tokens are told so; after the burst, unchecked
            answers = yield with_timeout(defer.gatherResults([p.done for p in wrong]), 30)
            attack_seconds = time.monotonic() - attack_started
            reasons = []
            for frames in answers:
                self.assertEqual([f.type for f in frames], [FrameType.ERROR])
                code, reason = wire.decode_coded(frames[0])
                self.assertEqual(code, ErrorCode.AUTH_FAILED, reason)
                reasons.append(reason)
            checked = [r for r in reasons if r.startswith("wrong token")]
            limited = [r for r in reasons if r.startswith(f"too many failed attempts from {ATTACKER}; wait ")]
            self.assertEqual(len(checked) + len(limited), WRONG_TOKENS, set(reasons))
            allowed = FAILURE_BURST + int(attack_seconds / FAILURE_REFILL) + 1
            self.assertLessEqual(len(checked), allowed, "tokens checked beyond the rate limit")
            self.assertGreaterEqual(len(checked), FAILURE_BURST)
            self.assertEqual(server.guard.failures, len(checked))
        finally:
            for _, proto in silent:
                if proto.transport is not None and proto.transport.connected:
                    proto.transport.abortConnection()
            for proto in wrong:
                if proto.transport is not None and proto.transport.connected:
                    proto.transport.abortConnection()

        # ---- afterwards: the honest client's session only, still working
        yield wait_until(lambda: len(server.links) == 1, 10)
        self.assertEqual(len(server.sessions), 1)
        again = yield self.echo_through(public, 4)
        growth = rss() - rss_before

        MiB = 1024 * 1024
        print(
            f"\nhonest echo throughput: {quiet / MiB:.1f} MiB/s quiet, {loaded / MiB:.1f} MiB/s "
            f"under hostile load, {again / MiB:.1f} MiB/s after; RSS growth {growth / MiB:.1f} MiB; "
            f"silent connections dropped after {slowest:.2f} s at most; {len(checked)} of "
            f"{WRONG_TOKENS} wrong tokens checked, {len(limited)} rate limited; loaded/quiet "
            f"throughput ratio {loaded / quiet:.2f} (must be >= 0.15)"
        )
        self.assertLess(growth, RSS_GROWTH_LIMIT)
        # Loose on purpose. Timings on this 2-core machine are noisy, and the
        # hostile peers are not elsewhere: their side of 603 connects and 100
        # TLS handshakes runs on this same reactor thread as the server, the
        # client, the echo target and the visitor, so the burst's fixed cost
        # is charged to a ~45 ms transfer. Observed: with 200 idle and 50
        # wrong tokens about 0.32-0.35 of quiet; with 500 and 100 (and the
        # attackers on 127.0.0.2) 0.20-0.21. 0.15 still leaves room for noise
        # and catches a server that stalls (e.g. blocks on a silent peer).
        # RSS growth observed: 33-40 MiB (603 TLS/TCP connections' buffers).
        self.assertGreaterEqual(loaded, 0.15 * quiet)
