"""Link drops end to end: real server and client, the control link through a
FaultProxy that severs (RST, FIN), blackholes or refuses it.

Every test is bounded in time and leaves the reactor clean. The session must
survive every drop: tunnelled connections carry on with no byte lost or
duplicated, stream events that happen while the link is down are delivered
after the resume, and only an expired grace or a new session ends them.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from rtunnel import wire
from rtunnel.link import Keepalive
from rtunnel.server import SessionState
from rtunnel.tls import PinnedCertificateCreator
from rtunnel.wire import ErrorCode, FrameType
from tests.faultproxy import FaultProxy
from tests.harness import (
    TOKEN,
    Echo,
    HashReply,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    pattern,
    sleep,
    visit,
    wait_until,
    with_timeout,
)

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent

#: Nobody notices a blackhole within a test.
LONG = Keepalive(interval=10, dead_after=30)
#: Both ends notice a blackhole within about 0.6 s.
SHORT = Keepalive(interval=0.2, dead_after=0.6)

RST, FIN, BLACKHOLE = "rst", "fin", "blackhole"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def abort_with_rst(transport: Any) -> None:
    """Close a TCP connection with a RST (SO_LINGER 0), not a FIN."""
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


def mirror(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A new Deferred with d's result (a timeout on it leaves d alone)."""
    out: defer.Deferred[Any] = defer.Deferred()

    def passon(result: Any) -> None:
        if out.called:
            return
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(passon)
    return out


class ProgressVisitor(Visitor):
    """A Visitor that calls `on_progress` once, when `at` bytes came back."""

    def __init__(self, payload: bytes, at: int, on_progress: Any) -> None:
        super().__init__(payload)
        self.at = at
        self.on_progress = on_progress

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.on_progress is not None and self.received >= self.at:
            callback, self.on_progress = self.on_progress, None
            callback()


@implementer(IHalfCloseableProtocol)
class StagedVisitor(Protocol):
    """Sends `size` bytes of pattern(seed) when told to (`send_up_to`),
    half-closes after the last byte, and hashes what comes back (calling
    `on_data` after each chunk).

    `early_close` records any end of the reply (EOF or connection lost)
    before every byte came back."""

    def __init__(self, seed: int, size: int) -> None:
        self.payload = pattern(seed, size)
        self.size = size
        self.sent = 0
        self.received = 0
        self.hash = hashlib.sha256()
        self.early_close: str | None = None
        self.on_data: Any = None
        self.connected = False
        self.done: defer.Deferred[tuple[int, str, Failure]] = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected = True

    def send_up_to(self, allowed: int) -> None:
        allowed = min(allowed, self.size)
        if not self.connected or self.sent >= allowed:
            return
        self.transport.write(self.payload[self.sent : allowed])
        self.sent = allowed
        if self.sent == self.size:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.hash.update(data)
        if self.on_data is not None:
            self.on_data()

    def readConnectionLost(self) -> None:
        if self.received != self.size and self.early_close is None:
            self.early_close = f"EOF after {self.received} of {self.size} bytes"
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected = False
        if self.received != self.size and self.early_close is None:
            self.early_close = f"closed after {self.received} of {self.size} bytes: {reason.value!r}"
        self.done.callback((self.received, self.hash.hexdigest(), reason))


def _connect(port: int, visitor: StagedVisitor) -> defer.Deferred[Any]:
    reactor.connectTCP("127.0.0.1", port, _ClientFactory(visitor))
    return visitor.done


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, visitor: StagedVisitor) -> None:
        self.visitor = visitor

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.visitor

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.visitor.done.errback(reason)


@implementer(IHalfCloseableProtocol)
class EchoThenClose(Protocol):
    """Echoes; on EOF closes its socket completely (the harness's Echo
    only half-closes and so keeps its socket)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class RawLink(Protocol):
    """A hand-made rtunnel client link: sends one HELLO, records frames."""

    def __init__(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        self.decoder = wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME)
        self.frames: list[wire.Frame] = []
        self.first: defer.Deferred[wire.Frame] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(wire.encode_json(FrameType.HELLO, self.hello))

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            if not self.first.called:
                self.first.callback(frame)

    def connectionLost(self, reason: Failure = None) -> None:
        self.reason = reason
        if not self.first.called:
            self.first.errback(reason)
        self.lost.callback(None)


class ClientProcess(ProcessProtocol):
    """An `rtunnel-client` child process (`twist` runner); collects its output."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.running = False

    def connectionMade(self) -> None:
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self.reason = reason
        self.ended.callback(None)


class LinkDropTests(unittest.TestCase):
    timeout = 120

    # ------------------------------------------------------------ fixture

    @defer.inlineCallbacks
    def start(
        self,
        targets: list[tuple[int, int]],
        keepalive: Keepalive = LONG,
        resume_grace: float = 120.0,
    ) -> Any:
        """Server, FaultProxy in front of its control port, client through
        the proxy; fires with the bound public ports."""
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server(resume_grace=resume_grace, keepalive=keepalive)
        self.proxy = FaultProxy(reactor, "127.0.0.1", self.tunnel.control_port)
        self.proxy_port = self.proxy.listen()
        self.addCleanup(self.proxy.stop)
        ports = yield self.tunnel.connect(targets, server_port=self.proxy_port, keepalive=keepalive)
        # Runs before the client is stopped: a link stuck in its TLS handshake
        # in a blackhole cannot be closed cleanly (Twisted waits for the
        # handshake), so cut those first; otherwise stopping would hang.
        self.addCleanup(self.proxy.sever_rst)
        return ports

    def visit(self, port: int, visitor: Any) -> defer.Deferred[Any]:
        """Connect `visitor`; a visitor still open when the test ends is
        aborted then. The Deferred fires with its result (may time out)."""
        done = visit(port, visitor) if isinstance(visitor, Visitor) else _connect(port, visitor)
        result = mirror(done)  # the result goes there; done keeps None

        def cleanup() -> Any:
            transport = getattr(visitor, "transport", None)
            if transport is not None and not done.called:
                transport.abortConnection()
            return done

        self.addCleanup(cleanup)
        return result

    @property
    def client(self) -> Any:
        return self.tunnel.client_service.client

    def server_session(self) -> Any:
        return self.tunnel.server.sessions.get(self.client.session_id)

    def links(self) -> tuple[Any, Any]:
        """The current (client link, server link) of the session."""
        return self.client.link, self.server_session().link

    def link_resumed(self, old: tuple[Any, Any]) -> bool:
        """Both ends carry the session over a new link, RESUME done."""
        old_client, old_server = old
        client = self.client
        link = client.link
        if link is None or link is old_client or client.session is None:
            return False
        if client.session.link is not link or not client.session.can_send:
            return False
        ss = self.tunnel.server.sessions.get(client.session_id)
        return (
            ss is not None
            and ss.state is SessionState.CONNECTED
            and ss.link is not None
            and ss.link is not old_server
            and ss.mux_session.can_send
        )

    def both_noticed(self, old: tuple[Any, Any]) -> bool:
        old_client, old_server = old
        return self.client.link is not old_client and old_server.closed.called

    def cut(self, kind: str) -> tuple[Any, Any]:
        """Break the link now; returns the links that were up."""
        old = self.links()
        if kind == RST:
            self.proxy.sever_rst()
        elif kind == FIN:
            self.proxy.sever_fin()
        else:
            # Nothing goes through any more and nothing is closed; new
            # connections are refused until both ends have noticed.
            self.proxy.refuse_new(True)
            self.proxy.blackhole()
        return old

    @defer.inlineCallbacks
    def restore(self, kind: str, old: tuple[Any, Any], notice_within: float = 5.0) -> Any:
        """Let the client reconnect; fires once the session is resumed."""
        if kind == BLACKHOLE:
            yield wait_until(lambda: self.both_noticed(old), notice_within)
            self.proxy.heal()
            self.proxy.refuse_new(False)
        yield wait_until(lambda: self.link_resumed(old), 10)

    @defer.inlineCallbacks
    def streams_forgotten(self) -> Any:
        """Both ends forget every finished stream."""
        ss = self.server_session()
        yield wait_until(lambda: not self.client.session.streams and not ss.mux_session.streams, 5)

    # ------------------------------------------------------------ 1. one drop mid-transfer

    @defer.inlineCallbacks
    def _transfer_survives(self, kind: str) -> Any:
        _, target = listen_target(self, Echo)
        keepalive = SHORT if kind == BLACKHOLE else LONG
        [public] = yield self.start([(0, target)], keepalive=keepalive)
        session_id = self.client.session_id
        ss = self.server_session()
        payload = pattern(11, 8 * MiB)
        cut_at: list[tuple[Any, Any]] = []
        visitor = ProgressVisitor(payload, len(payload) // 4, lambda: cut_at.append(self.cut(kind)))
        done = self.visit(public, visitor)
        yield wait_until(lambda: cut_at, 30)
        self.assertLess(visitor.received, len(payload), "the link was not cut mid-transfer")
        yield self.restore(kind, cut_at[0])
        try:
            reply, reason = yield with_timeout(done, 15)
        except defer.TimeoutError:
            self.fail(
                f"the visitor did not finish after the resume: it got {visitor.received} of "
                f"{len(payload)} bytes, EOF seen: {visitor.read_closed}"
            )
        self.assertEqual(len(reply), len(payload))
        self.assertEqual(sha(reply), sha(payload))
        self.assertIsInstance(reason.value, error.ConnectionDone)
        # The same session carried on over a new link.
        self.assertEqual(self.client.session_id, session_id)
        self.assertEqual(list(self.tunnel.server.sessions), [session_id])
        self.assertIs(self.server_session(), ss)
        self.assertIsNot(ss.link, cut_at[0][1])
        self.assertGreaterEqual(self.proxy.connections_accepted, 2)
        yield self.streams_forgotten()

    def test_connections_survive_rst(self):
        return self._transfer_survives(RST)

    def test_connections_survive_fin(self):
        return self._transfer_survives(FIN)

    def test_connections_survive_blackhole(self):
        return self._transfer_survives(BLACKHOLE)

    # ------------------------------------------------------------ 2. stress

    @defer.inlineCallbacks
    def test_ten_bidirectional_streams_survive_twenty_link_drops(self):
        """10 streams echo 10 MiB each (100 MiB each way) while the link is
        severed 20 times (RST, FIN, blackhole in turn).

        The payloads go out in 21 slices. Each sever fires from a visitor's
        dataReceived at a random point of the bytes still in flight (sent by
        the visitors, not yet echoed back), so both directions are busy; the
        next slice is written while the link is down; after the client has
        resumed the session the next sever point is drawn."""
        streams, size, severs = 10, 10 * MiB, 20
        seed = int(os.environ.get("RTUNNEL_STRESS_SEED", random.randrange(1 << 30)))
        print(f"\nstress seed {seed} (set RTUNNEL_STRESS_SEED to repeat)")
        rng = random.Random(seed)
        _, target = listen_target(self, Echo)
        [public] = yield self.start([(0, target)], keepalive=SHORT)
        session_id = self.client.session_id
        ss = self.server_session()
        visitors = [StagedVisitor(i, size) for i in range(streams)]
        dones = [self.visit(public, v) for v in visitors]
        yield wait_until(lambda: all(v.connected for v in visitors), 10)

        def totals() -> tuple[int, int]:
            return sum(v.sent for v in visitors), sum(v.received for v in visitors)

        def release(k: int) -> None:
            for v in visitors:
                v.send_up_to(size * k // (severs + 1))

        trigger: dict[str, Any] = {}

        def maybe_cut() -> None:
            at = trigger.get("at")
            if at is None:
                return
            sent, received = totals()
            if received >= at:
                del trigger["at"]
                trigger["in_flight"] = sent - received
                trigger["old"] = self.cut(trigger["kind"])

        for v in visitors:
            v.on_data = maybe_cut

        started = time.monotonic()
        in_flight: list[int] = []
        release(1)
        for i in range(severs):
            kind = (RST, FIN, BLACKHOLE)[i % 3]
            sent, received = totals()
            self.assertGreater(sent, received, f"sever {i + 1}: nothing in flight")
            trigger.update(at=received + int(rng.uniform(0.05, 0.95) * (sent - received)), kind=kind)
            maybe_cut()
            yield wait_until(lambda: "old" in trigger, 30, step=0.005)
            old = trigger.pop("old")
            in_flight.append(trigger.pop("in_flight"))
            release(i + 2)  # written while the link is down
            yield self.restore(kind, old)
            self.assertEqual(self.client.session_id, session_id, f"sever {i + 1} ({kind}): new session")
            self.assertIs(self.server_session(), ss, f"sever {i + 1} ({kind}): new server session")
        severed_at = time.monotonic() - started
        self.assertTrue(any(v.received < size for v in visitors), "the transfer ended before the last sever")
        release(severs + 1)
        try:
            results = yield with_timeout(defer.gatherResults(dones, consumeErrors=True), 60)
        except defer.TimeoutError:
            self.fail(
                "streams did not finish: "
                + "; ".join(
                    f"{i}: sent {v.sent}, got back {v.received}, early close {v.early_close}"
                    for i, v in enumerate(visitors)
                    if not v.done.called
                )
            )
        elapsed = time.monotonic() - started
        for i, (v, (received, digest, reason)) in enumerate(zip(visitors, results, strict=True)):
            self.assertIsNone(v.early_close, f"stream {i}")
            self.assertEqual(received, size, f"stream {i}")
            self.assertEqual(digest, sha(v.payload), f"stream {i}")
            self.assertIsInstance(reason.value, error.ConnectionDone, f"stream {i}")
        self.assertEqual(list(self.tunnel.server.sessions), [session_id])
        yield self.streams_forgotten()
        print(
            f"\n{len(in_flight)} severs survived (seed {seed}) in {severed_at:.1f} s; "
            f"{streams} x {size // MiB} MiB echoed ({streams * size // MiB} MiB each way) in "
            f"{elapsed:.1f} s; KiB in flight at the severs: min {min(in_flight) // 1024}, "
            f"median {sorted(in_flight)[len(in_flight) // 2] // 1024}, max {max(in_flight) // 1024}; "
            f"{self.proxy.connections_accepted} control connections"
        )

    # ------------------------------------------------------------ 3. events while down

    @defer.inlineCallbacks
    def _events_while_down_are_delivered(self, detached: bool) -> Any:
        hash_factory, hash_target = listen_target(self, HashReply)
        echo_factory, echo_target = listen_target(self, Echo)
        hash_port, echo_port = yield self.start([(0, hash_target), (0, echo_target)])
        session_id = self.client.session_id
        # A: open to HashReply (answers only after EOF); B: open to Echo.
        a = Visitor(b"a" * 1000, half_close=False)
        a_done = self.visit(hash_port, a)
        b = Visitor(b"b" * 1000, half_close=False)
        b_done = self.visit(echo_port, b)
        yield wait_until(
            lambda: b.received == 1000 and [c.count for c in hash_factory.connections] == [1000], 10
        )

        if detached:
            # Both ends know the link is gone; reconnects are refused.
            self.proxy.refuse_new(True)
            old = self.cut(RST)
            yield wait_until(lambda: self.both_noticed(old), 5)
            self.assertIs(self.server_session().state, SessionState.DETACHED)
        else:
            # Nobody notices: frames go into the void and must be replayed.
            old = self.cut(BLACKHOLE)
            self.proxy.refuse_new(False)
            self.proxy.heal()  # only new connections get through

        c_payload = pattern(5, 300_000)
        c = Visitor(c_payload)  # a new visitor: sends, half-closes
        c_done = self.visit(hash_port, c)
        a.transport.write(b"tail")
        a.transport.loseWriteConnection()
        abort_with_rst(b.transport)
        _, b_reason = yield with_timeout(b_done, 5)
        yield sleep(0.5)
        # Nothing reached the client's side yet.
        self.assertEqual(len(hash_factory.connections), 1, "C reached its target while the link was down")
        self.assertEqual(len(echo_factory.connections), 1, "B's reset arrived while the link was down")
        self.assertFalse(c.done.called, "C was answered or closed while the link was down")
        self.assertFalse(a.done.called, "A was answered or closed while the link was down")

        if detached:
            self.proxy.refuse_new(False)
        else:
            self.proxy.sever_rst()  # the blackholed link dies; the client reconnects
        yield wait_until(lambda: self.link_resumed(old), 10)
        self.assertEqual(self.client.session_id, session_id)

        c_reply, c_reason = yield with_timeout(c_done, 10)
        self.assertEqual(c_reply.decode(), f"{len(c_payload)} {sha(c_payload)}", "new visitor C")
        self.assertIsInstance(c_reason.value, error.ConnectionDone)
        a_reply, a_reason = yield with_timeout(a_done, 10)
        self.assertEqual(a_reply.decode(), f"1004 {sha(b'a' * 1000 + b'tail')}", "half-close of A")
        self.assertIsInstance(a_reason.value, error.ConnectionDone)
        # B's reset reached the target: its connection was closed.
        yield wait_until(lambda: not echo_factory.connections, 5)
        self.assertEqual(len(echo_factory.lost), 1)
        self.assertEqual(b.received, 1000)
        self.assertIsInstance(b_reason.value, (error.ConnectionAborted, error.ConnectionLost))
        yield self.streams_forgotten()

    def test_stream_events_while_blackholed_are_not_lost(self):
        return self._events_while_down_are_delivered(detached=False)

    def test_stream_events_while_detached_are_not_lost(self):
        return self._events_while_down_are_delivered(detached=True)

    # ------------------------------------------------------------ 4. keepalive

    @defer.inlineCallbacks
    def test_keepalive_detects_blackhole_within_deadline(self):
        keepalive = Keepalive(interval=0.5, dead_after=1.5)
        _, target = listen_target(self, Echo)
        yield self.start([(0, target)], keepalive=keepalive)
        yield sleep(1.2)  # a few pings each way
        ss = self.server_session()
        old = self.cut(BLACKHOLE)  # also refuses reconnects
        started = reactor.seconds()
        seen: dict[str, float] = {}

        def check() -> bool:
            now = reactor.seconds() - started
            if "server" not in seen and ss.state is SessionState.DETACHED:
                seen["server"] = now
            if "client" not in seen and self.client.link is not old[0]:
                seen["client"] = now
            return len(seen) == 2

        deadline = keepalive.dead_after + keepalive.interval + 0.5
        yield wait_until(check, deadline + 2, step=0.01)
        print(f"\nblackhole noticed by the server after {seen['server']:.2f} s, by the client after {seen['client']:.2f} s")
        for side, t in seen.items():
            self.assertLessEqual(t, deadline, f"{side} noticed too late")
            self.assertGreaterEqual(t, keepalive.dead_after - keepalive.interval - 0.1, f"{side} noticed too early")
        self.assertIsNone(self.client.link)
        yield self.restore(BLACKHOLE, old)

    # ------------------------------------------------------------ 5. restart

    def spawn_client(self, public: int, target: int) -> ClientProcess:
        proto = ClientProcess()
        args = [
            # `python -m twisted` is the `twist` runner (twistd's options do not apply)
            sys.executable, "-m", "twisted", "--log-format", "text", "rtunnel-client",
            "-c", f"127.0.0.1:{self.tunnel.control_port}",
            "-f", f"127.0.0.1:{public}", "-t", f"127.0.0.1:{target}",
            "--token", TOKEN, "--fingerprint", self.tunnel.fingerprint,
            "--max-retry-delay", "0.5",
        ]  # fmt: skip
        env = dict(os.environ)
        # The working tree, not the venv's installed (possibly stale) copy.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        reactor.spawnProcess(proto, sys.executable, args, env=env, path=str(REPO))

        @defer.inlineCallbacks
        def reap() -> Any:
            if proto.running:
                proto.transport.signalProcess("KILL")
            yield proto.ended

        self.addCleanup(reap)
        return proto

    @defer.inlineCallbacks
    def test_killed_client_process_restarts_onto_its_fixed_port(self):
        """kill -9 the client process, start a new one (same token, same
        fixed port): the port is bound to the new session at once."""
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server()
        server = self.tunnel.server
        _, target = listen_target(self, Echo)
        fixed = free_port()
        first = self.spawn_client(fixed, target)
        yield wait_until(lambda: b"tunnel ready" in first.output, 15)
        [old_session] = server.sessions.values()
        v1 = Visitor(b"x" * 100, half_close=False)
        v1_done = self.visit(fixed, v1)
        yield wait_until(lambda: v1.received == 100, 5)

        first.transport.signalProcess(signal.SIGKILL)
        yield with_timeout(first.ended, 5)
        started = time.monotonic()
        second = self.spawn_client(fixed, target)

        def rebound() -> bool:
            listener = server.listeners.get(("127.0.0.1", fixed))
            return (
                listener is not None
                and listener.owner is not None
                and listener.owner is not old_session
                and listener.owner.state is SessionState.CONNECTED
                and b"tunnel ready" in second.output
            )

        yield wait_until(rebound, 10, step=0.01)
        elapsed = time.monotonic() - started
        print(f"\nnew client process had the fixed port after {elapsed:.2f} s (process start included)")
        self.assertNotIn(b"in use", second.output)
        # at once: a new process's start (0.7-3 s on this machine, loaded) and its bind, never the old
        # session's grace (120 s) nor a bind retry
        self.assertLess(elapsed, 6.0)
        reply, reason = yield with_timeout(self.visit(fixed, Visitor(b"after restart")), 10)
        self.assertEqual(reply, b"after restart")
        # The old session's visitor is closed (its session ended), not left hanging.
        yield with_timeout(v1_done, 5)
        self.assertIs(old_session.state, SessionState.EXPIRED)
        second.transport.signalProcess("TERM")
        yield with_timeout(second.ended, 10)

    @defer.inlineCallbacks
    def test_restarted_client_gets_fixed_port_while_old_link_looks_alive(self):
        """The old client vanished without a goodbye and the server has not
        noticed (its link is blackholed): a new client gets the port."""
        _, target = listen_target(self, Echo)
        fixed = free_port()
        [public] = yield self.start([(fixed, target)])
        self.assertEqual(public, fixed)
        old_service = self.tunnel.client_service
        old_session = self.server_session()
        self.proxy.blackhole()
        self.proxy.heal()
        # "kill -9": drop the link and the tunnelled sockets, say nothing.
        old_service.client.link.transport.abortConnection()
        yield old_service.stopService()
        self.assertIs(old_session.state, SessionState.CONNECTED)  # the server did not notice
        started = time.monotonic()
        new_service = self.tunnel.start_client(self.tunnel.client_config([(fixed, target)], server_port=self.proxy_port))
        bound = yield with_timeout(new_service.client.when_bound(), 5)
        elapsed = time.monotonic() - started
        print(f"\nnew client had the fixed port after {elapsed:.2f} s")
        self.assertEqual(bound[1][1], fixed)
        self.assertLess(elapsed, 2.0)
        self.assertNotEqual(new_service.client.session_id, old_session.id)
        reply, _ = yield with_timeout(self.visit(fixed, Visitor(b"new owner")), 10)
        self.assertEqual(reply, b"new owner")

    # ------------------------------------------------------------ 6. grace expiry

    @defer.inlineCallbacks
    def test_grace_expiry_resets_streams_frees_port_and_client_starts_afresh(self):
        echo_factory, target = listen_target(self, Echo)
        fixed = free_port()
        [public] = yield self.start([(fixed, target)], resume_grace=1.0)
        self.assertEqual(public, fixed)
        old_id = self.client.session_id
        v = Visitor(b"v" * 1000, half_close=False)
        v_done = self.visit(fixed, v)
        yield wait_until(lambda: v.received == 1000, 5)

        self.proxy.refuse_new(True)
        cut_at = reactor.seconds()
        old = self.cut(RST)
        _, reason = yield with_timeout(v_done, 5)
        closed_after = reactor.seconds() - cut_at
        self.assertGreaterEqual(closed_after, 0.9, "the visitor was closed before the grace ran out")
        self.assertLess(closed_after, 1.9)
        # The server forgot the session and freed the port.
        self.assertNotIn(old_id, self.tunnel.server.sessions)
        self.assertNotIn(("127.0.0.1", fixed), self.tunnel.server.listeners)
        probe = socket.socket()
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", fixed))
            probe.listen(1)
        finally:
            probe.close()
        # The client's target socket is still open: it cannot know yet.
        self.assertEqual(len(echo_factory.connections), 1)

        yield sleep(max(0.0, 2.0 - (reactor.seconds() - cut_at)))
        self.proxy.refuse_new(False)
        client = self.client
        yield wait_until(lambda: client.session_id != old_id and 1 in client.bound, 10)
        self.assertIsNotNone(client.link)
        self.assertIsNot(client.link, old[0])
        self.assertEqual(client.bound[1][1], fixed)
        self.assertEqual(list(self.tunnel.server.sessions), [client.session_id])
        # The old stream's target socket was closed by the fresh start.
        yield wait_until(lambda: not echo_factory.connections, 5)
        reply, _ = yield with_timeout(self.visit(fixed, Visitor(b"fresh session")), 10)
        self.assertEqual(reply, b"fresh session")

    # ------------------------------------------------------------ 7. stolen session id

    @defer.inlineCallbacks
    def raw_hello(self, hello: dict[str, Any]) -> Any:
        creator = PinnedCertificateCreator(self.tunnel.fingerprint)
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.tunnel.control_port))
        link = RawLink(hello)
        yield endpoint.connect(Factory.forProtocol(lambda: link))
        # Cleanups run last-in first-out: abort (if still open), then wait.
        self.addCleanup(lambda: link.lost)
        self.addCleanup(lambda: link.lost.called or link.transport.abortConnection())
        frame = yield with_timeout(link.first, 5)
        return link, frame

    @defer.inlineCallbacks
    def test_resume_with_stolen_session_needs_same_credential_and_secret(self):
        _, target = listen_target(self, Echo)
        [public] = yield self.start([(0, target)])
        client = self.client
        ss = self.server_session()
        real = {"session": client.session_id, "secret": client.session_secret}
        v = Visitor(b"q" * 100, half_close=False)
        v_done = self.visit(public, v)
        yield wait_until(lambda: v.received == 100, 5)
        server_link = ss.link
        n_streams = len(ss.mux_session.streams)
        self.assertEqual(n_streams, 1)

        def untouched() -> None:
            self.assertIs(ss.state, SessionState.CONNECTED)
            self.assertIs(ss.link, server_link)
            self.assertIs(self.tunnel.server.sessions.get(real["session"]), ss)
            self.assertEqual(len(ss.mux_session.streams), n_streams)

        hello = {"protocol": "rtunnel", "versions": [1], "max_frame": wire.DEFAULT_MAX_FRAME}
        # Another credential (wrong token) with the real id and secret.
        link, frame = yield self.raw_hello({**hello, "token": "wrong", "resume": real})
        self.assertIs(frame.type, FrameType.ERROR)
        code, _ = wire.decode_coded(frame)
        self.assertEqual(code, ErrorCode.AUTH_FAILED)
        yield with_timeout(link.lost, 5)
        untouched()

        # The right token but a wrong secret: a fresh session, not this one.
        link, frame = yield self.raw_hello({**hello, "token": TOKEN, "resume": {**real, "secret": "0" * 64}})
        self.assertIs(frame.type, FrameType.WELCOME)
        welcome = wire.decode_json(frame)
        self.assertIs(welcome["resumed"], False)
        self.assertNotEqual(welcome["session"], real["session"])
        self.assertNotEqual(welcome["secret"], real["secret"])
        untouched()
        link.transport.loseConnection()
        yield with_timeout(link.lost, 5)
        untouched()

        # The original session still carries its stream.
        v.transport.write(b"still here")
        v.transport.loseWriteConnection()
        reply, _ = yield with_timeout(v_done, 5)
        self.assertEqual(reply, b"q" * 100 + b"still here")

    # ------------------------------------------------------------ extra

    @defer.inlineCallbacks
    def test_finished_streams_release_their_sockets(self):
        """Streams that finish (across a link drop) close both local sockets:
        the visitor's on the server and the target's on the client, not only
        when the garbage collector happens to break their reference cycle."""
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        _, target = listen_target(self, EchoThenClose)
        [public] = yield self.start([(0, target)])
        reply, _ = yield with_timeout(self.visit(public, Visitor(b"warm-up")), 10)
        self.assertEqual(reply, b"warm-up")
        yield self.streams_forgotten()
        yield sleep(0.1)
        before = open_fds()
        payloads = [pattern(100 + i, 256 * 1024) for i in range(20)]
        visitors = [Visitor(p) for p in payloads]
        dones = [self.visit(public, v) for v in visitors]
        yield wait_until(lambda: all(v.received > 0 for v in visitors), 10)
        old = self.cut(RST)
        yield self.restore(RST, old)
        results = yield with_timeout(defer.gatherResults(dones), 20)
        for payload, (reply, reason) in zip(payloads, results, strict=True):
            self.assertEqual(sha(reply), sha(payload))
            self.assertIsInstance(reason.value, error.ConnectionDone)
        yield self.streams_forgotten()
        yield sleep(0.2)
        # The link's four sockets (proxy pair, client, server) were replaced
        # one for one; the visitors and targets closed theirs.
        leaked = open_fds() - before
        self.assertLessEqual(leaked, 2, f"{leaked} sockets still open after {len(visitors)} streams finished")

    @defer.inlineCallbacks
    def test_reconnect_attempt_into_blackhole_is_abandoned(self):
        """A reconnect whose TCP connect succeeds but that never gets an
        answer (the path dies again during the handshake) must not hang the
        client forever: after the path heals it reconnects and resumes."""
        _, target = listen_target(self, Echo)
        yield self.start([(0, target)], keepalive=SHORT)
        self.proxy.blackhole()  # new connections are accepted, then dropped
        old = self.cut(RST)
        yield wait_until(lambda: self.both_noticed(old), 5)
        yield wait_until(lambda: self.proxy.connections_accepted >= 2, 5)
        yield sleep(1.0)
        self.proxy.heal()
        healed = time.monotonic()
        # Generous: a handshake deadline as long as the server's default (10 s).
        try:
            yield wait_until(lambda: self.link_resumed(old), 12)
        except AssertionError:
            self.fail(
                "the client did not resume within 12 s of the path healing: its reconnect "
                "attempt into the blackhole (no WELCOME ever) was never abandoned"
            )
        print(f"\nresumed {time.monotonic() - healed:.2f} s after the path healed")


class OwnershipTests(unittest.TestCase):
    """Ports belong to credentials; a server restart means a fresh session."""

    timeout = 60

    @defer.inlineCallbacks
    def test_other_credential_cannot_take_a_held_or_just_lost_port(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server(extra_clients=(("bob", "bob-token"),))
        _, target = listen_target(self, Echo)
        wanted = free_port()
        owner = tunnel.start_client(tunnel.client_config([(wanted, target)]))
        yield with_timeout(owner.client.when_bound(), 10)
        intruder = tunnel.start_client(tunnel.client_config([(wanted, target)], token="bob-token"))
        yield sleep(1.0)
        self.assertEqual(intruder.client.bound, {}, "another credential took a held port")
        self.assertIsNone(intruder.fatal_error)  # in_use is retried, not fatal
        yield intruder.stopService()
        # The owner's link drops (no goodbye, as in a crash): the port stays
        # reserved for the grace period.
        self.patch(owner.client, "say_goodbye", lambda: None)
        yield owner.stopService()
        yield wait_until(
            lambda: all(
                s.state is SessionState.DETACHED
                for s in tunnel.server.sessions.values()
                if s.credential == "default"
            )
        )
        late = tunnel.start_client(tunnel.client_config([(wanted, target)], token="bob-token"))
        yield sleep(1.0)
        self.assertEqual(late.client.bound, {}, "another credential took a just-lost port")
        self.assertIn((("127.0.0.1", wanted)), tunnel.server.listeners)
        yield late.stopService()

    @defer.inlineCallbacks
    def test_server_restart_gives_a_fresh_session_and_the_ports_back(self):
        control = free_port()
        tunnel = Tunnel(self)
        yield tunnel.start_server(listen=f"tcp:{control}:interface=127.0.0.1")
        _, target = listen_target(self, Echo)
        wanted = free_port()
        service = tunnel.start_client(tunnel.client_config([(wanted, target)]))
        yield with_timeout(service.client.when_bound(), 10)
        first_session = service.client.session_id
        yield tunnel.stop_server()
        yield tunnel.start_server(listen=f"tcp:{control}:interface=127.0.0.1")
        yield wait_until(
            lambda: service.client.session_id != first_session and service.client.bound, 15
        )
        reply, reason = yield with_timeout(visit(wanted, Visitor(b"after restart")), 10)
        self.assertEqual(reply, b"after restart")

    @defer.inlineCallbacks
    def test_clean_client_stop_frees_its_session_and_ports_at_once(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        wanted = free_port()
        service = tunnel.start_client(tunnel.client_config([(wanted, target)]))
        yield with_timeout(service.client.when_bound(), 10)
        yield service.stopService()
        yield wait_until(lambda: not tunnel.server.sessions and not tunnel.server.listeners, 5)
