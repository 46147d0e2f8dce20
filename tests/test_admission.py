"""One address flooding the control port cannot keep honest clients out.

A real server and real clients run in this process; the flood runs in
another: 1,000 idle TCP connections from 127.0.0.2, each opened again as
soon as the server drops it, for a bounded time. The honest clients come
from 127.0.0.1. What rtunnel.guard promises (docs/security.md, "Against
connection floods before authentication"): an address gets at most
--max-unauthenticated-per-address waiting connections, and at
--max-unauthenticated a newcomer takes the place of the oldest waiting
connection of the address holding the most.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rtunnel.server import SessionState
from tests.harness import Conversation, Echo, Tunnel, listen_target, wait_until, with_timeout

FLOOD_SOURCE = "127.0.0.2"
FLOOD_CONNECTIONS = 1000
FLOOD_SECONDS = 12.0  # an upper bound: each test stops its flood when done
# the accept queue of the real server's control port (tap.server), so that
# connections wait for the server rather than for SYN retransmits
LISTEN = "tcp:0:interface=127.0.0.1:backlog=1024"
CONNECT_WITHIN = 2.0  # the target: an honest client is in within this, flood or not

# The flood: `count` non-blocking connections from `source`, each opened
# again as soon as it is closed, until `seconds` have passed or stdin closes.
# Prints "ready" once all are opened, then a JSON report at the end.
FLOOD = r"""
import json, os, selectors, socket, sys, time
host, port, count, seconds, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
sel = selectors.DefaultSelector()
stats = {"opened": 0, "dropped": 0, "failed": 0}
def open_one():
    s = socket.socket()
    s.setblocking(False)
    s.bind((source, 0))
    s.connect_ex((host, port))
    stats["opened"] += 1
    sel.register(s, selectors.EVENT_READ)
for _ in range(count):
    open_one()
sel.register(sys.stdin, selectors.EVENT_READ)
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for key, _ in sel.select(0.1):
        if key.fileobj is sys.stdin:
            end = 0
            break
        s = key.fileobj
        try:
            if s.recv(4096):
                continue
        except BlockingIOError:
            continue
        except OSError:
            stats["failed"] += 1
        sel.unregister(s)
        s.close()
        stats["dropped"] += 1
        open_one()
print(json.dumps(stats), flush=True)
"""


class Flood(ProcessProtocol):
    """The flood process: `ready` fires once its connections are opened,
    `ended` with its report (opened, dropped) when it exits."""

    def __init__(self) -> None:
        self.output = b""
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[dict[str, int]] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready\n" in self.output and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(AssertionError(f"the flood process ended early: {self.output!r}"))
        lines = self.output.decode(errors="replace").strip().splitlines()
        try:
            self.ended.callback(json.loads(lines[-1]))
        except (IndexError, ValueError):
            self.ended.errback(AssertionError(f"no report from the flood process: {self.output!r}"))

    def stop(self) -> defer.Deferred[dict[str, int]]:
        """End the flood (close its stdin) and wait for its report."""
        if self.transport is not None and self.transport.pid is not None:
            self.transport.closeStdin()
        return with_timeout(self.ended, 20)


@defer.inlineCallbacks
def start_flood(test: unittest.TestCase, port: int, connections: int = FLOOD_CONNECTIONS) -> Any:
    flood = Flood()
    reactor.spawnProcess(
        flood, sys.executable,
        [sys.executable, "-c", FLOOD, "127.0.0.1", str(port), str(connections), str(FLOOD_SECONDS), FLOOD_SOURCE],
        env=None,
    )
    # whatever happens to the test, the process ends and its report is read
    test.addCleanup(lambda: flood.stop().addErrback(lambda _: None))
    yield with_timeout(flood.ready, 30)
    return flood


class OneAddressFloodTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def flooded(self, hold: int, **server: Any) -> Any:
        """A server (with `server` settings) and a flood holding `hold`
        waiting connections of it from FLOOD_SOURCE."""
        tunnel = Tunnel(self)
        yield tunnel.start_server(listen=LISTEN, **server)
        flood = yield start_flood(self, tunnel.control_port)
        guard = tunnel.server.guard
        yield wait_until(lambda: guard.waiting_from(FLOOD_SOURCE) >= hold, 20)
        return tunnel, flood

    @defer.inlineCallbacks
    def connect_timed(self, tunnel: Tunnel, target: int) -> Any:
        """Start an honest client; fire with the seconds until its tunnel was ready."""
        started = reactor.seconds()
        service = tunnel.start_client(tunnel.client_config([(0, target)]))
        yield with_timeout(service.client.when_bound(), 20)
        return reactor.seconds() - started

    @defer.inlineCallbacks
    def test_a_new_client_gets_in_within_2_s_while_one_address_holds_1000_idle_connections(self) -> Any:
        tunnel, flood = yield self.flooded(hold=32)
        guard = tunnel.server.guard
        _, target = listen_target(self, Echo)
        elapsed = yield self.connect_timed(tunnel, target)
        self.assertLess(elapsed, CONNECT_WITHIN)
        self.assertEqual(len(tunnel.server.sessions), 1)
        self.assertLessEqual(guard.waiting_from(FLOOD_SOURCE), 32)
        report = yield flood.stop()
        # the flood really was one: most of its connections were refused
        # (closed at once), and it opened them again
        self.assertGreater(report["dropped"], FLOOD_CONNECTIONS // 2, report)
        self.assertGreater(guard.refused_per_address, FLOOD_CONNECTIONS // 2)

    @defer.inlineCallbacks
    def test_at_the_global_cap_a_newcomer_takes_the_place_of_the_oldest_flood_connection(self) -> Any:
        # the per-address share as large as the flood: the flood fills every
        # unauthenticated slot, and only the fair drop lets the client in
        tunnel, flood = yield self.flooded(
            hold=64, max_unauthenticated=64, max_unauthenticated_per_address=FLOOD_CONNECTIONS,
        )
        guard = tunnel.server.guard
        self.assertEqual(guard.unauthenticated, 64)
        _, target = listen_target(self, Echo)
        elapsed = yield self.connect_timed(tunnel, target)
        self.assertLess(elapsed, CONNECT_WITHIN)
        self.assertGreaterEqual(guard.evicted, 1)
        self.assertGreater(guard.refused_connections, 0, "the flood's own newcomers were refused")
        yield flood.stop()

    @defer.inlineCallbacks
    def test_a_client_whose_link_drops_during_the_flood_resumes_its_session(self) -> Any:
        tunnel = Tunnel(self)
        yield tunnel.start_server(listen=LISTEN)
        server = tunnel.server
        _, target = listen_target(self, Echo)
        [public] = yield tunnel.connect([(0, target)])
        visitor = Conversation()
        yield _connect(public, visitor)
        visitor.transport.write(b"before the flood;")
        yield wait_until(lambda: visitor.received == b"before the flood;", 10)
        [session] = server.sessions.values()

        flood = yield start_flood(self, tunnel.control_port)
        yield wait_until(lambda: server.guard.waiting_from(FLOOD_SOURCE) >= 32, 20)
        old_link = session.link
        dropped_at = reactor.seconds()
        old_link.transport.abortConnection()
        yield wait_until(
            lambda: session.link not in (None, old_link) and session.state is SessionState.CONNECTED, 10,
        )
        resumed_in = reactor.seconds() - dropped_at
        # the client retries after 0.1 to 0.5 s (harness), then gets in as a newcomer does
        self.assertLess(resumed_in, CONNECT_WITHIN + 0.5)
        self.assertEqual(list(server.sessions.values()), [session], "resumed, not a new session")
        visitor.transport.write(b"after the drop")
        yield wait_until(lambda: visitor.received == b"before the flood;after the drop", 10)
        yield flood.stop()
        visitor.transport.loseConnection()
        yield with_timeout(visitor.closed, 10)


def _connect(port: int, protocol: Conversation) -> defer.Deferred[Any]:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
