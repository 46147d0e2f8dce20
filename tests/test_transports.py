"""rtunnel.transports: eager writes and larger reads on Twisted's TCP
transports, checked against Twisted's own write buffering."""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

from twisted.internet import defer, error, reactor, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from rtunnel.mux import RecvState, SendState, StreamProtocol
from rtunnel.transports import (
    READ_SIZE,
    close_write_now,
    set_read_size,
    write_now,
)
from rtunnel.wire import FrameType
from tests.harness import BANNER, wait_until, with_timeout
from tests.memory import C2S, Pair


class HalfCloseable(StringTransport):
    """A StringTransport that records a half-close."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class ReadSizeTests(unittest.SynchronousTestCase):
    def test_read_size_is_set_on_the_socket_under_a_wrapper(self) -> None:
        socket_transport = tcp.Connection.__new__(tcp.Connection)  # no real socket
        wrapper = ProtocolWrapper(None, Protocol())  # e.g. TLS over the socket
        wrapper.transport = socket_transport
        set_read_size(wrapper)
        self.assertEqual(socket_transport.bufferSize, READ_SIZE)
        self.assertNotIn("bufferSize", vars(wrapper))

    def test_transports_without_a_socket_are_left_alone(self) -> None:
        transport = StringTransport()
        set_read_size(transport)
        self.assertFalse(hasattr(transport, "bufferSize"))


class SocketLike(FileDescriptor):
    """Twisted's write buffering over a fake socket that takes `room` bytes."""

    def __init__(self, reactor: MemoryReactor, room: int) -> None:
        super().__init__(reactor)
        self.connected = 1
        self.room = room
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int:
        n = min(len(data), self.room)
        self.room -= n
        self.sent.append(bytes(data[:n]))
        return n

    write_closed_at: int | None = None

    def _closeWriteConnection(self) -> None:  # tcp.Connection's: shutdown(SHUT_WR)
        self.write_closed_at = len(self.sent)


class WriteNowTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()

    def test_sends_at_once_when_nothing_is_queued(self) -> None:
        transport = SocketLike(self.reactor, room=100)
        write_now(transport, b"hello")
        self.assertEqual(transport.sent, [b"hello"])
        self.assertNotIn(transport, self.reactor.getWriters())

    def test_what_the_socket_does_not_take_is_queued(self) -> None:
        transport = SocketLike(self.reactor, room=3)
        write_now(transport, b"hello")
        self.assertEqual(transport.sent, [b"hel"])
        self.assertIn(transport, self.reactor.getWriters())
        transport.room = 100
        transport.doWrite()
        self.assertEqual(transport.sent, [b"hel", b"lo"])

    def test_queues_behind_bytes_already_queued(self) -> None:
        transport = SocketLike(self.reactor, room=100)
        transport.write(b"first ")
        write_now(transport, b"second")
        self.assertEqual(transport.sent, [])
        transport.doWrite()
        self.assertEqual(transport.sent, [b"first second"])

    def test_a_half_closed_transport_only_queues(self) -> None:
        transport = SocketLike(self.reactor, room=100)
        transport.loseWriteConnection()
        write_now(transport, b"late")
        self.assertEqual(transport.sent, [])

    def test_a_full_socket_pauses_the_producer_as_write_does(self) -> None:
        transport = SocketLike(self.reactor, room=0)
        transport.bufferSize = 4
        producer = Pausable()
        transport.registerProducer(producer, True)
        write_now(transport, b"hello")
        self.assertTrue(producer.paused)

    def test_other_transports_get_a_plain_write(self) -> None:
        transport = StringTransport()
        write_now(transport, b"hello")
        self.assertEqual(transport.value(), b"hello")


class CloseWriteNowTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()

    def test_half_closes_at_once_when_nothing_is_queued(self) -> None:
        transport = SocketLike(self.reactor, room=100)
        write_now(transport, b"all of it")
        close_write_now(transport)
        self.assertEqual(transport.write_closed_at, 1)  # after the one send
        self.assertNotIn(transport, self.reactor.getWriters())
        transport.write(b"late")  # as after Twisted's own half-close: dropped
        self.assertEqual(transport.sent, [b"all of it"])

    def test_waits_for_queued_bytes_as_twisted_does(self) -> None:
        transport = SocketLike(self.reactor, room=3)
        write_now(transport, b"hello")
        close_write_now(transport)
        self.assertIsNone(transport.write_closed_at)
        transport.room = 100
        transport.doWrite()
        self.assertEqual(transport.sent, [b"hel", b"lo"])
        self.assertEqual(transport.write_closed_at, 2)

    def test_a_registered_producer_gets_twisteds_own_order(self) -> None:
        transport = SocketLike(self.reactor, room=100)
        transport.registerProducer(Pausable(), True)
        close_write_now(transport)
        self.assertIsNone(transport.write_closed_at)
        self.assertIn(transport, self.reactor.getWriters())

    def test_other_transports_get_a_plain_half_close(self) -> None:
        transport = HalfCloseable()
        close_write_now(transport)
        self.assertTrue(transport.write_closed)


class Pausable:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


# ---------------------------------------------------------------- on real sockets


class SpeaksFirst:
    """A target on 127.0.0.1 (plain sockets, so the test decides when it
    answers) that says BANNER, echoes until EOF, then half-closes and closes,
    as tests/harness.py's BannerEcho does.

    `answer_before_next_poll` makes the connect the reactor is about to
    start complete with BANNER already in the connecting socket: the one
    event that reports the connect then also says "readable", and Twisted
    runs connectionMade from inside that event's read handling."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(5)
        test.addCleanup(self.listener.close)
        self.port: int = self.listener.getsockname()[1]
        self.echoed: bytes | None = None  # what it echoed, once it read EOF
        self.finished = threading.Event()
        self._thread: threading.Thread | None = None
        test.addCleanup(self._join)

    def answer_before_next_poll(self, connector: Any) -> None:
        """Call right after connectTCP: `_greet` runs in the same reactor
        turn as Twisted's first doConnect (its call is due strictly later),
        i.e. after connect() and before the reactor polls."""
        time.sleep(0.002)
        reactor.callLater(0, self._greet, connector)

    def _greet(self, connector: Any) -> None:
        conn, _ = self.listener.accept()
        conn.sendall(BANNER)
        # BANNER has reached the client's socket before the reactor polls it
        select.select([connector.transport.getHandle()], [], [], 5)
        self._thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
        self._thread.start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        echoed = b""
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
                echoed += data
            self.echoed = echoed
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()
            self.finished.set()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join(5)


@implementer(IHalfCloseableProtocol)
class HalfClosesAtOnce(Protocol):
    """Sends `payload` and half-closes (close_write_now) in connectionMade,
    then reads until EOF and closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.readable_at_connect = False
        self.eof = False
        self.reason: Failure | None = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        readable, _, _ = select.select([self.transport.getHandle()], [], [], 0)
        self.readable_at_connect = bool(readable)
        write_now(self.transport, self.payload)
        close_write_now(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self.reason = reason
        self.done.callback(None)


class HalfCloseAsTheConnectFinishesTests(unittest.TestCase):
    """close_write_now from connectionMade of an outgoing connection whose
    peer has already spoken: the reactor event that reported the connect
    also carries a write event, which Twisted handles after connectionMade
    returns. That must not find the socket shut down and call the
    connection lost (it did: an empty send() on it failed with EPIPE)."""

    timeout = 30

    @defer.inlineCallbacks
    def test_the_connection_reads_the_peers_reply_and_ends_cleanly(self) -> None:
        target = SpeaksFirst(self)
        protocol = HalfClosesAtOnce(b"8 bytes!")
        connector = reactor.connectTCP("127.0.0.1", target.port, ClientFactory.forProtocol(lambda: protocol))
        self.addCleanup(connector.disconnect)
        target.answer_before_next_poll(connector)
        yield with_timeout(protocol.done, 10)
        reason = protocol.reason
        assert reason is not None
        self.assertTrue(protocol.readable_at_connect, "the target's bytes were not there at connect: no race")
        self.assertEqual(protocol.received, BANNER + b"8 bytes!")
        self.assertTrue(protocol.eof, f"no EOF from the target; the connection ended with {reason.value!r}")
        reason.trap(error.ConnectionDone)
        yield wait_until(target.finished.is_set, 5)
        self.assertEqual(target.echoed, b"8 bytes!")

    @defer.inlineCallbacks
    def test_a_stream_finished_before_its_target_connected_gets_the_whole_reply(self) -> None:
        """The client's case: a visitor sent 8 bytes and half-closed, so the
        stream has its DATA and FIN before its target connection exists; the
        target says its banner at once. The stream must carry banner, echo
        and FIN back, and never reset (it did: "local connection lost")."""
        pair = Pair(auto_attach=False)
        visitor = pair.open_server_end()
        visitor.send(b"8 bytes!")
        visitor.shutdown_write()
        pair.pump()
        stream = pair.client_delegate.streams[visitor.stream.id]
        self.assertEqual(stream.recv_state, RecvState.FIN_RECEIVED)  # early DATA and FIN, no socket yet
        target = SpeaksFirst(self)
        connector = reactor.connectTCP(
            "127.0.0.1", target.port, ClientFactory.forProtocol(lambda: StreamProtocol(stream))
        )
        self.addCleanup(connector.disconnect)
        target.answer_before_next_poll(connector)

        def settled() -> bool:
            pair.pump()
            return stream.closed

        yield wait_until(settled, 10)
        self.assertEqual(pair.frames_of(C2S, FrameType.RST), [])
        self.assertEqual(visitor.received, BANNER + b"8 bytes!")
        self.assertTrue(visitor.transport.write_closed, "the visitor did not get the target's FIN")
        # both directions finished (not reset): the stream is closed and forgotten
        self.assertEqual((stream.send_state, stream.recv_state), (SendState.CLOSED, RecvState.CLOSED))
        self.assertNotIn(stream.id, stream.session.streams)
        yield wait_until(target.finished.is_set, 5)
        self.assertEqual(target.echoed, b"8 bytes!")
