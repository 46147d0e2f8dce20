"""End to end: a hostile server cannot grow a client's memory.

The server here (`HostileServer`, a TLS listener on loopback speaking
docs/protocol.md itself) answers HELLO with WELCOME and BIND with BOUND,
never resumes a session, and then runs one shape against the real client:

(a) an OPEN flood for the client's tunnel while it never ACKs, so the
    client's RST replies pile up;
(b) a PING flood while it never reads its socket;
(c) OPENs each followed by the initial window (256 KiB) of DATA, towards a
    target that accepts and never reads;
(d) OPENs granted a 4 GiB window whose bytes it reads and never
    acknowledges, towards targets that send as fast as they can.

`ClientBudgetTests` runs the client in this process with a small
`SessionSettings.session_window_budget` (--session-buffer) and samples what
its session holds (`Session.held`) every 10 ms. `ClientMemoryTests` runs
`rtunnel_client` as its own process with --session-buffer 4194304 and
measures its RSS (/proc/PID/status) through all four shapes.
"""

from __future__ import annotations

import collections
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from rtunnel import wire
from rtunnel.mux import SessionSettings
from rtunnel.tls import load_server_identity, server_context
from rtunnel.wire import ErrorCode, FrameType, ResetCode
from tests.harness import TOKEN, Target, Tunnel, free_port, listen_target, sleep, wait_until, with_timeout

KiB = 1024
MiB = 1024 * KiB
SHAPE_SECONDS = 4.0  # each shape, in process
ONE_READ = 256 * KiB  # what a session may take beyond a share in one read of its link
WINDOW = 256 * KiB  # the initial window of every stream (docs/protocol.md)
RESERVATION = 512 * KiB  # what a new stream reserves of the budget (docs/security.md)
VISITOR = {"src": ["127.0.0.1", 50000], "dst": ["127.0.0.1", 40001]}


# ---------------------------------------------------------------- the hostile server


@implementer(IPushProducer)
class HostileLink(protocol.Protocol):
    """One link of the hostile server: it completes the handshake and the
    BINDs, then writes what the test tells it to. It acknowledges reliable
    frames only when its factory says so, and floods only while its
    transport takes the bytes (a push producer), so its own memory stays put."""

    def __init__(self, factory: HostileServer) -> None:
        self.server = factory
        self.decoder = wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME)
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.counts: collections.Counter[FrameType] = collections.Counter()
        self.resets: collections.Counter[int] = collections.Counter()
        self.errors: list[tuple[int, str]] = []
        self.pongs: set[int] = set()
        self.reliable_received = 0
        self.data_bytes = 0
        self.next_stream = 2
        self.flooding = False
        self.flooded = 0  # frames written by flood()
        self.bound = False
        self.writable = True
        self.connected_now = False

    def connectionMade(self) -> None:
        self.connected_now = True
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        reliable_before, bound_before = self.reliable_received, self.bound
        for frame in self.decoder.feed(data):
            self.frame_received(frame)
        if self.server.acknowledges and self.reliable_received > reliable_before and self.connected_now:
            self.transport.write(wire.encode_ack(self.reliable_received))
        if self.bound and not bound_before:
            self.server.ready.put(self)  # after every BIND of this read is answered

    def frame_received(self, frame: wire.Frame) -> None:
        self.counts[frame.type] += 1
        if frame.type in wire.RELIABLE:
            self.reliable_received += 1
        if frame.type is FrameType.HELLO:
            welcome = {
                "version": 1, "session": "ab" * 16, "secret": "cd" * 32,
                "resumed": False, "max_frame": wire.DEFAULT_MAX_FRAME,
            }
            self.transport.write(wire.encode_json(FrameType.WELCOME, welcome))
            self.decoder.max_frame = wire.DEFAULT_MAX_FRAME
        elif frame.type is FrameType.BIND:
            tunnel = wire.decode_json(frame)["tunnel"]
            bound = {"tunnel": tunnel, "host": "127.0.0.1", "port": 40000 + tunnel}
            self.transport.write(wire.encode_json(FrameType.BOUND, bound))
            self.bound = True
        elif frame.type is FrameType.PING:
            opaque = wire.decode_u64(frame)
            if frame.flags & wire.FLAG_PONG:
                self.pongs.add(opaque)
            else:
                self.transport.write(wire.encode_ping(opaque, pong=True))
        elif frame.type is FrameType.RST:
            self.resets[wire.decode_coded(frame)[0]] += 1
        elif frame.type is FrameType.ERROR:
            self.errors.append(wire.decode_coded(frame))
        elif frame.type is FrameType.DATA:
            self.data_bytes += len(frame.body)

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected_now = False
        self.writable = False
        self.closed.callback(None)

    # IPushProducer: the transport's buffer is full / has room
    def pauseProducing(self) -> None:
        self.writable = False

    def resumeProducing(self) -> None:
        self.writable = True

    def stopProducing(self) -> None:
        self.writable = False

    def stop_reading(self) -> None:
        self.transport.pauseProducing()

    def read_again(self) -> None:
        self.transport.resumeProducing()

    def open_stream(self, tunnel: int, *then: bytes) -> bytes:
        """An OPEN for `tunnel` on the next even stream id, with `then`
        (frames made by the caller for that id) after it."""
        stream_id, self.next_stream = self.next_stream, self.next_stream + 2
        return wire.encode_open(stream_id, tunnel, VISITOR) + b"".join(then)

    def flood(
        self, make: Callable[[HostileLink], bytes], seconds: float, per_turn: int, limit: int | None = None
    ) -> defer.Deferred[None]:
        """Write `make(self)` frames while the transport takes them, for `seconds`,
        `limit` of them at most, until `stop_flooding`, or until the client
        closes the link."""
        stop_at = reactor.seconds() + seconds
        left = [limit if limit is not None else 10**9]
        self.flooding = True

        def turn() -> None:
            if not (self.connected_now and self.flooding) or reactor.seconds() > stop_at or left[0] <= 0:
                self.flooding = False
                loop.stop()
                return
            if self.writable:
                n = min(per_turn, left[0])
                left[0] -= n
                self.flooded += n
                self.transport.write(b"".join(make(self) for _ in range(n)))

        loop = task.LoopingCall(turn)
        return loop.start(0.002).addCallback(lambda _: None)

    def stop_flooding(self) -> None:
        self.flooding = False

    def abort(self) -> None:
        if self.connected_now:
            self.transport.abortConnection()


def ping(link: HostileLink) -> bytes:
    return wire.encode_ping(7)


def open_only(link: HostileLink, tunnel: int = 1) -> bytes:
    return link.open_stream(tunnel)


def open_with_initial_window(link: HostileLink, tunnel: int = 1) -> bytes:
    """An OPEN followed by all the DATA the client must accept without a grant."""
    return link.open_stream(tunnel, wire.encode(FrameType.DATA, link.next_stream, b"s" * WINDOW))


def open_granting_everything(link: HostileLink, tunnel: int = 1) -> bytes:
    """An OPEN and a WINDOW granting the client 4 GiB on it at offset 0: the
    client may send that much, and keeps every byte until acknowledged."""
    return link.open_stream(tunnel, wire.encode_window(link.next_stream, 0, wire.MAX_U32))


class HostileServer(protocol.Factory):
    """A TLS listener on 127.0.0.1; `ready` yields each link once it has
    answered the client's BINDs (all sent at once, after WELCOME)."""

    noisy = False

    def __init__(self) -> None:
        self.ready: defer.DeferredQueue[HostileLink] = defer.DeferredQueue()
        self.links: list[HostileLink] = []
        self.acknowledges = False

    def buildProtocol(self, addr: Any) -> HostileLink:
        link = HostileLink(self)
        self.links.append(link)
        return link

    def next_link(self) -> defer.Deferred[HostileLink]:
        return with_timeout(self.ready.get(), 15)


def listen_hostile(test: unittest.TestCase, state_dir: Path) -> tuple[HostileServer, int]:
    """Start a hostile server with the certificate of `state_dir` (made there
    as a real server makes it, so the harness's fingerprint is its own)."""
    server = HostileServer()
    port = reactor.listenSSL(0, server, server_context(load_server_identity(state_dir)), interface="127.0.0.1")

    def stop() -> defer.Deferred[Any]:
        for link in server.links:
            link.abort()
        return defer.gatherResults([port.stopListening(), *(link.closed for link in server.links)])

    test.addCleanup(stop)
    return server, port.getHost().port


# ---------------------------------------------------------------- targets


class Silent(Target):
    """Accepts and never reads (its socket's buffers fill, then the client's)."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()


@implementer(IPushProducer)
class Pump(Target):
    """Sends as fast as the client reads, up to 256 MiB."""

    CHUNK = b"p" * (64 * KiB)
    LIMIT = 256 * MiB

    def connectionMade(self) -> None:
        super().connectionMade()
        self.sent = 0
        self.paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.LIMIT and self.transport.connected:
            self.transport.write(self.CHUNK)
            self.sent += len(self.CHUNK)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


def drop_connections_at_cleanup(test: unittest.TestCase, factory: Any) -> None:
    def drop() -> defer.Deferred[Any]:
        for target in list(factory.connections):
            target.transport.abortConnection()
        return wait_until(lambda: not factory.connections, 10)

    test.addCleanup(drop)


# ---------------------------------------------------------------- in process


class Sampler:
    """The largest counts of the client's session, every 10 ms."""

    def __init__(self, test: unittest.TestCase, client: Any) -> None:
        self.client = client
        self.max_held = self.max_reliable = self.max_reply_backlog = self.max_streams = 0
        self.link_unread_seen = False
        self.loop = task.LoopingCall(self.sample)
        self.loop.start(0.01)
        test.addCleanup(lambda: self.loop.running and self.loop.stop())

    def sample(self) -> None:
        session = self.client.session
        if session is None:
            return
        self.max_held = max(self.max_held, session.held)
        self.max_reliable = max(self.max_reliable, session.held_reliable)
        self.max_reply_backlog = max(self.max_reply_backlog, session.reply_backlog)
        self.max_streams = max(self.max_streams, len(session.streams))
        self.link_unread_seen = self.link_unread_seen or session._link_unread


class ClientBudgetTests(unittest.TestCase):
    """What the client's session accounts stays within its budget (in process)."""

    timeout = 60

    @defer.inlineCallbacks
    def start(self, budget: int, target: type[Target]) -> Any:
        """A hostile server, a `target` and a client with `budget` between them;
        fires with the server's first link once the client's tunnel is bound."""
        tunnel = Tunnel(self)
        self.hostile, tunnel.control_port = listen_hostile(self, tunnel.state_dir)
        self.targets, target_port = listen_target(self, target)
        drop_connections_at_cleanup(self, self.targets)
        config = tunnel.client_config([(0, target_port)], session=SessionSettings(session_window_budget=budget))
        self.client = tunnel.start_client(config).client
        link = yield self.hostile.next_link()
        self.sampler = Sampler(self, self.client)
        return link

    @defer.inlineCallbacks
    def test_open_flood_never_acknowledged_is_reset_with_limit_then_ended_with_an_error(self) -> Any:
        budget = 2 * MiB
        link = yield self.start(budget, Silent)
        fits = (budget * 3 // 4) // RESERVATION
        yield link.flood(open_only, SHAPE_SECONDS, per_turn=200)
        yield wait_until(lambda: link.closed.called, 5)
        [(code, reason)] = link.errors
        self.assertEqual(code, ErrorCode.LIMIT_EXCEEDED)
        self.assertIn("waiting for an ACK", reason)
        self.assertGreater(link.resets[ResetCode.LIMIT], 100)
        self.assertLessEqual(self.sampler.max_streams, fits)
        self.assertLessEqual(len(self.targets.connections), fits)
        self.assertLessEqual(self.sampler.max_reliable, budget // 16 + 2 * KiB)
        self.assertLessEqual(self.sampler.max_held, budget)

    @defer.inlineCallbacks
    def test_ping_flood_from_a_server_that_never_reads_stops_being_read(self) -> Any:
        budget = 2 * MiB
        link = yield self.start(budget, Silent)
        session = self.client.session
        link.stop_reading()
        # how long the client takes to stop depends on the kernel's socket buffers and the machine's
        # load: flood until it stops (20 s at most), then a while longer
        flood = link.flood(ping, 20, per_turn=2000)
        yield wait_until(lambda: session._link_unread or not link.flooding, 20, step=0.1)
        yield sleep(SHAPE_SECONDS / 4)
        link.stop_flooding()
        yield flood
        self.assertTrue(session._link_unread, f"the client still reads after {link.flooded} PINGs")
        self.assertTrue(self.sampler.link_unread_seen)
        self.assertLessEqual(self.sampler.max_reply_backlog, budget // 16 + ONE_READ)
        self.assertLessEqual(self.sampler.max_held, budget)
        # the server reads what it was sent: the client reads it again
        link.read_again()
        yield wait_until(lambda: not session._link_unread, 10)
        link.transport.write(wire.encode_ping(424242))
        yield wait_until(lambda: 424242 in link.pongs, 10)
        self.assertEqual(link.errors, [])
        self.assertIs(self.client.session, session)

    @defer.inlineCallbacks
    def test_streams_sent_their_initial_window_towards_a_target_that_never_reads_hold_at_most_the_budget(
        self,
    ) -> Any:
        budget = 8 * MiB
        link = yield self.start(budget, Silent)
        self.hostile.acknowledges = True  # only the streams' share is at stake
        session = self.client.session
        fits = (budget * 3 // 4) // RESERVATION
        opens = 300
        yield link.flood(open_with_initial_window, SHAPE_SECONDS * 2, per_turn=4, limit=opens)
        yield wait_until(lambda: link.resets[ResetCode.LIMIT] + len(session.streams) >= opens, 10)
        yield sleep(SHAPE_SECONDS / 4)
        self.assertEqual(link.next_stream, 2 + 2 * opens)
        self.assertGreaterEqual(link.resets[ResetCode.LIMIT], opens - fits)
        self.assertLessEqual(len(self.targets.connections), fits)
        self.assertEqual(session.stream_reservation(), RESERVATION)
        self.assertLessEqual(self.sampler.max_streams, fits)
        self.assertLessEqual(self.sampler.max_held, budget)
        self.assertEqual(link.errors, [])
        self.assertIs(self.client.session, session)

    @defer.inlineCallbacks
    def test_a_server_granting_credit_and_never_acknowledging_stops_the_client_reading_its_targets(self) -> Any:
        budget = 4 * MiB
        link = yield self.start(budget, Pump)
        session = self.client.session
        link.transport.write(b"".join(open_granting_everything(link) for _ in range(4)))
        # the client sends until its bound, then stops reading its targets: what the server reads stops growing
        deadline, received = reactor.seconds() + SHAPE_SECONDS * 2, -1
        while link.data_bytes != received and reactor.seconds() < deadline:
            received = link.data_bytes
            yield sleep(SHAPE_SECONDS / 8)
        self.assertEqual(link.data_bytes, received, "the client kept reading its targets")
        self.assertGreaterEqual(received, budget // 4)  # the bytes flowed until the bound
        self.assertLessEqual(received, budget)
        self.assertEqual(len(session.streams), 4)
        self.assertTrue(session.streams_full)
        self.assertLessEqual(session.held_send + session.held_windows, budget * 7 // 8 + ONE_READ)
        self.assertLessEqual(self.sampler.max_held, budget)
        self.assertEqual(link.errors, [])


# ---------------------------------------------------------------- a client process


class ClientProcess(protocol.ProcessProtocol):
    """An rtunnel client in its own process (its RSS is its own)."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    def rss(self) -> int:
        status = Path(f"/proc/{self.transport.pid}/status").read_text()
        [line] = [ln for ln in status.splitlines() if ln.startswith("VmRSS:")]
        return int(line.split()[1]) * KiB


class ClientMemoryTests(unittest.TestCase):
    """The client process's RSS stays within its bound under shapes (a)-(d)."""

    timeout = 120
    BUDGET = 4 * MiB
    SECONDS = 4.0  # per shape
    # what else the process may grow by: at most 18 target sockets and their
    # transports, TLS and Twisted buffers, Python's allocator keeping freed memory
    # (measured: under 2 MiB of growth in all)
    SLACK = 8 * MiB

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        tunnel = Tunnel(self)  # only its state dir: the hostile server's certificate
        self.hostile, port = listen_hostile(self, tunnel.state_dir)
        self.silent, silent_port = listen_target(self, Silent)
        self.pumps, pump_port = listen_target(self, Pump)
        for targets in (self.silent, self.pumps):
            drop_connections_at_cleanup(self, targets)
        self.client = ClientProcess()
        argv = [
            sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{port}",
            "--token", TOKEN, "--fingerprint", tunnel.fingerprint,
            # tunnel 1 to a port where nothing listens (refused), 2 to a target that never
            # reads, 3 to targets that send as fast as they can
            "-f", "0", "-t", f"127.0.0.1:{free_port()}", "-f", "0", "-t", f"127.0.0.1:{silent_port}",
            "-f", "0", "-t", f"127.0.0.1:{pump_port}",
            "--session-buffer", str(self.BUDGET), "--max-stream-window", str(self.BUDGET),
            "--max-retry-delay", "1",
        ]
        cwd = tempfile.mkdtemp(prefix="rtunnel-client-bounds-")
        reactor.spawnProcess(self.client, sys.executable, argv, path=cwd, env=None)
        self.addCleanup(self.stop_client)
        try:
            self.link = yield self.hostile.next_link()
        except defer.TimeoutError:
            raise AssertionError(f"the client did not bind: {self.client.output.decode(errors='replace')}") from None
        self.peak = 0
        self.sampler = task.LoopingCall(self.sample)

    def stop_client(self) -> defer.Deferred[None]:
        if not self.client.ended.called:
            self.client.transport.signalProcess("KILL")
        return self.client.ended

    def sample(self) -> None:
        self.peak = max(self.peak, self.client.rss())

    @defer.inlineCallbacks
    def next_link(self, previous: HostileLink) -> Any:
        """Drop `previous`; the client comes back, in a new session."""
        previous.abort()
        yield previous.closed
        link = yield self.hostile.next_link()
        return link

    @defer.inlineCallbacks
    def test_client_memory_stays_within_the_session_buffer_under_a_hostile_server(self) -> Any:
        # warm up: a second session, so that the baseline includes what any session costs
        link = yield self.next_link(self.link)
        yield sleep(0.5)
        baseline = self.client.rss()
        self.sampler.start(0.1)
        self.addCleanup(lambda: self.sampler.running and self.sampler.stop())
        growth_after: list[str] = []  # the peak's growth after each shape, for the report

        def shape_done(name: str) -> None:
            self.sample()
            growth_after.append(f"{name} +{(self.peak - baseline) / MiB:.1f}")

        # (a) OPENs towards a refused target, never an ACK: ended with ERROR; the client comes back, again
        stop_at = reactor.seconds() + self.SECONDS
        errors = 0
        while reactor.seconds() < stop_at:
            yield link.flood(open_only, stop_at - reactor.seconds(), per_turn=200)
            errors += len(link.errors)
            link = yield self.next_link(link)
        shape_done("(a)")
        # (b) a PING flood that never reads
        link.stop_reading()
        yield link.flood(ping, self.SECONDS, per_turn=2000)
        link = yield self.next_link(link)
        shape_done("(b)")
        # (c) 300 OPENs on tunnel 2, each with 256 KiB, towards a target that never reads
        self.hostile.acknowledges = True
        yield link.flood(lambda link: open_with_initial_window(link, 2), self.SECONDS, per_turn=4, limit=300)
        yield sleep(self.SECONDS / 4)
        link = yield self.next_link(link)
        shape_done("(c)")
        # (d) 16 OPENs on tunnel 3, granted 4 GiB each, towards targets that send as fast
        # as they can; the server reads the bytes and never acknowledges them
        self.hostile.acknowledges = False
        link.transport.write(b"".join(open_granting_everything(link, 3) for _ in range(16)))
        yield sleep(self.SECONDS)
        pumped = sum(pump.sent for pump in self.pumps.connections)
        link.abort()
        yield link.closed
        shape_done("(d)")
        growth = self.peak - baseline
        print(
            f"\nclient RSS {baseline / MiB:.1f} MiB, peak {self.peak / MiB:.1f} MiB "
            f"(+{growth / MiB:.1f} MiB; bound {self.BUDGET / MiB:.0f} MiB + {self.SLACK / MiB:.0f} MiB; "
            f"peak growth after {', '.join(growth_after)} MiB); "
            f"{errors} sessions ended with ERROR; (d) {link.data_bytes / MiB:.1f} MiB read of "
            f"{pumped / MiB:.1f} MiB the targets sent"
        )
        self.assertLessEqual(growth, self.BUDGET + self.SLACK)
        self.assertGreaterEqual(errors, 1)
