"""Many short visitors through a real tunnel on loopback: each sends a few
bytes and half-closes at once, to a target that speaks first (BannerEcho),
and each must get the banner, its echo and a clean close."""

from __future__ import annotations

import socket
import time

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.faultproxy import FaultProxy
from tests.harness import BANNER, TargetServer, Tunnel, serve_in_thread, with_timeout

VISITORS = 200
AT_ONCE = 10  # the reactor's thread pool runs 10 visitors at a time
SECONDS = 30.0


class _RoomyTargetServer(TargetServer):
    """TargetServer with a backlog for every visitor in flight (its default
    of 5 would make some of them wait a SYN retransmit)."""

    request_queue_size = 64


def _visit(port: int, payload: bytes) -> tuple[bytes, OSError | None]:
    """As a program would: connect, send, half-close, read to EOF (in a
    thread, so all of it is on the socket before the server accepts)."""
    chunks: list[bytes] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as visitor:
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)
            while data := visitor.recv(65536):
                chunks.append(data)
    except OSError as e:
        return b"".join(chunks), e
    return b"".join(chunks), None


class QuickVisitorTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_visitors_that_half_close_at_once_each_get_banner_echo_and_a_clean_close(self) -> None:
        """The link goes through a proxy holding each chunk 20 ms, so that
        OPEN, DATA and FIN reach the client together, before its target
        connection exists (as they do for a busy client process). The target
        answers at once; its connect and its banner then arrive in one
        reactor event. Before the fix ~10 % of the visitors got a reset
        instead (the client called its target connection lost)."""
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        target = _RoomyTargetServer()
        serve_in_thread(self, target)
        proxy = FaultProxy(reactor, "127.0.0.1", tunnel.control_port, delay=0.02)
        proxy.listen()
        self.addCleanup(proxy.stop)
        [public] = yield tunnel.connect([(0, target.server_address[1])], server_port=proxy.port)
        failed: list[tuple[bytes, OSError | None]] = []
        visited = 0
        started = time.monotonic()
        while visited < VISITORS and time.monotonic() - started < SECONDS:
            batch = [threads.deferToThread(_visit, public, b"8 bytes!") for _ in range(AT_ONCE)]
            for reply, err in (yield with_timeout(defer.gatherResults(batch), SECONDS)):
                visited += 1
                if reply != BANNER + b"8 bytes!" or err is not None:
                    failed.append((reply, err))
        self.assertGreaterEqual(visited, VISITORS // 2, f"only {visited} visitors in {SECONDS} s")
        self.assertEqual(len(failed), 0, f"{len(failed)} of {visited} visitors failed, e.g. {failed[:3]}")
