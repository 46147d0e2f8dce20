"""rtunnel.transports: eager writes and larger reads on Twisted's TCP
transports, checked against Twisted's own write buffering."""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.trial import unittest

from rtunnel.transports import (
    READ_SIZE,
    close_write_now,
    set_read_size,
    write_now,
)


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
