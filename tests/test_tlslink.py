"""rtunnel.tlslink: the control link's TLS layer, on memory transports.

Two LinkTLSProtocols (a real pyOpenSSL handshake with the server's
certificate pinned by the client) are joined by twisted.test.iosim; the
fake clock decides when a reactor turn ends.
"""

from __future__ import annotations

import ctypes
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from rtunnel.tls import PinnedCertificateCreator, load_server_identity, server_context
from rtunnel.tlslink import FLUSH_AT, RECORD_PLAINTEXT, LinkTLSFactory, LinkTLSProtocol, _segments
from tests.harness import Echo, Tunnel, Visitor, listen_target, visit, wait_until, with_timeout


class Recorder(Protocol):
    """Keeps every dataReceived call apart, and how the connection ended."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.lost: Failure | None = None

    @property
    def received(self) -> bytes:
        return b"".join(self.calls)

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = reason


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloc_in_use() -> int:
    """glibc's bytes in use: heap chunks and mmapped ones (large buffers)."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class LinkTLSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        identity = load_server_identity(Path(self.mktemp()).absolute().joinpath("state"))
        server_factory = LinkTLSFactory(
            server_context(identity), False, Factory.forProtocol(Recorder), self.clock
        )
        client_factory = LinkTLSFactory(
            PinnedCertificateCreator(identity.fingerprint), True, Factory.forProtocol(Recorder), self.clock
        )
        self.client: LinkTLSProtocol
        self.server: LinkTLSProtocol
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )
        # kept here: a wrapper lets go of its protocol when the connection ends
        self.apps = {id(self.client): self.client.wrappedProtocol, id(self.server): self.server.wrappedProtocol}

    def handshake(self) -> None:
        self.pump.flush()
        self.assertTrue(self.client.tls_ready and self.server.tls_ready)

    def app(self, side: LinkTLSProtocol) -> Recorder:
        app = self.apps[id(side)]
        assert isinstance(app, Recorder)
        return app

    def test_bytes_arrive_intact_in_order_both_ways(self) -> None:
        self.handshake()
        rng = random.Random(7)
        up = [rng.randbytes(n) for n in (1, 100, 16384, 16385, 300_000, 1 << 20, 5)]
        down = [rng.randbytes(n) for n in (70_000, 3, 2 * FLUSH_AT + 1)]
        for chunk in up:
            self.client.write(chunk)
        for chunk in down:
            self.server.write(chunk)
        self.pump.flush()
        self.assertEqual(self.app(self.server).received, b"".join(up))
        self.assertEqual(self.app(self.client).received, b"".join(down))

    def test_a_frame_written_as_header_and_payload_arrives_whole(self) -> None:
        self.handshake()
        header, payload = b"H" * 9, random.Random(5).randbytes(200_000)
        self.client.writeSequence((b"small", header, payload, b"tail"))
        self.pump.flush()
        self.assertEqual(self.app(self.server).received, b"small" + header + payload + b"tail")

    def test_small_writes_of_one_turn_leave_together_at_its_end(self) -> None:
        self.handshake()
        sent_before = len(self.client.transport.stream)
        frames = [b"frame %d;" % i for i in range(10)]
        for frame in frames:
            self.client.write(frame)
        self.assertEqual(len(self.client.transport.stream), sent_before)  # nothing yet
        self.clock.advance(0)  # the end of the reactor turn
        self.assertEqual(len(self.client.transport.stream), sent_before + 1)  # one write
        self.pump.flush()
        # and the peer gets them in one call, not one per record or write
        self.assertEqual(self.app(self.server).calls, [b"".join(frames)])

    def test_a_large_turn_is_sent_without_waiting_for_its_end(self) -> None:
        self.handshake()
        sent_before = len(self.client.transport.stream)
        self.client.write(b"x" * FLUSH_AT)
        self.assertGreater(len(self.client.transport.stream), sent_before)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_records_read_at_once_are_delivered_in_one_call(self) -> None:
        self.handshake()
        payload = random.Random(3).randbytes(5 * 16384 + 10)  # six records
        self.client.write(payload)
        self.pump.flush()
        self.assertEqual(self.app(self.server).calls, [payload])

    def test_writes_before_the_handshake_are_delivered_after_it(self) -> None:
        self.client.write(b"hello before the handshake")
        self.server.write(b"and a reply")
        self.pump.flush()
        self.assertEqual(self.app(self.server).received, b"hello before the handshake")
        self.assertEqual(self.app(self.client).received, b"and a reply")

    def test_lose_connection_sends_the_turns_writes_first(self) -> None:
        self.handshake()
        self.client.write(b"last words")
        self.client.loseConnection()  # before the turn ends
        self.pump.flush()
        self.assertEqual(self.app(self.server).received, b"last words")
        server_lost = self.app(self.server).lost
        assert server_lost is not None
        server_lost.trap(ConnectionDone)

    def test_abort_drops_the_turns_writes_and_their_timer(self) -> None:
        self.handshake()
        self.client.write(b"never sent")
        self.client.abortConnection()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.pump.flush()
        self.assertEqual(self.app(self.server).received, b"")

    def test_writes_after_lose_connection_are_dropped(self) -> None:
        self.handshake()
        self.client.loseConnection()
        self.client.write(b"too late")
        self.pump.flush()
        self.assertEqual(self.app(self.server).received, b"")

    def test_a_corrupted_record_ends_the_connection_with_an_error(self) -> None:
        self.handshake()
        self.client.write(b"y" * 1000)
        self.clock.advance(0)
        record = bytearray(b"".join(self.client.transport.stream))
        record[-1] ^= 0xFF  # breaks the AEAD tag
        self.client.transport.stream = [bytes(record)]
        self.pump.flush()
        self.assertEqual(self.app(self.server).received, b"")
        lost = self.app(self.server).lost
        self.assertIsNotNone(lost)
        self.assertFalse(lost.check(ConnectionDone))


    def exchange(self, up: bytes, down: bytes) -> None:
        """Send `up` and `down` and check both arrive whole."""
        before_up, before_down = len(self.app(self.server).received), len(self.app(self.client).received)
        self.client.write(up)
        self.server.write(down)
        self.pump.flush()
        self.assertEqual(self.app(self.server).received[before_up:], up)
        self.assertEqual(self.app(self.client).received[before_down:], down)

    def test_buffers_a_burst_grew_are_given_back_once_idle(self) -> None:
        self.handshake()
        burst = random.Random(11).randbytes(1 << 20)
        self.exchange(burst, burst)  # each memory BIO grows to hundreds of KB
        in_use = malloc_in_use()
        self.assertTrue(self.client.release_idle_buffers())
        self.assertTrue(self.server.release_idle_buffers())
        given_back = in_use - malloc_in_use()
        self.assertGreater(given_back, 1 << 20, f"only {given_back} bytes given back")
        self.exchange(b"still works" * 1000, b"both ways" * 1000)

    def test_the_handshakes_buffers_are_given_back_at_the_first_release(self) -> None:
        self.handshake()
        self.assertTrue(self.server.release_idle_buffers())
        self.assertTrue(self.client.release_idle_buffers())
        self.exchange(b"after", b"the release")
        # small traffic grows nothing: the next release has nothing to do
        self.assertFalse(self.server.release_idle_buffers())
        self.exchange(b"x" * 100_000, b"")
        self.assertTrue(self.server.release_idle_buffers())

    def test_ciphertext_waiting_in_a_bio_is_never_dropped(self) -> None:
        self.handshake()
        self.client.write(b"not yet read by the server")
        self.clock.advance(0)
        ciphertext = b"".join(self.client.transport.stream)
        self.client.transport.stream.clear()
        handle = self.server.getHandle()
        handle.bio_write(ciphertext)  # in the receive BIO, not decrypted yet
        self.assertFalse(self.server.release_idle_buffers())
        self.server.decrypt_received()  # what the next read does first
        self.assertEqual(self.app(self.server).received, b"not yet read by the server")
        self.assertTrue(self.server.release_idle_buffers())


class RealLinkTests(unittest.TestCase):
    """A real server and client on loopback: the control link's keepalive
    gives the TLS buffers back on both ends."""

    @defer.inlineCallbacks
    def test_both_ends_give_the_handshakes_buffers_back_and_keep_carrying_bytes(self) -> object:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        (public,) = yield tunnel.connect([(0, target)])
        client_tls = tunnel.client_service.client.link.transport  # type: ignore[union-attr]
        [server_link] = [link for link in tunnel.server.links if link.session is not None]
        ends = [client_tls, server_link.transport]
        self.assertTrue(all(isinstance(end, LinkTLSProtocol) for end in ends))
        # the first keepalive tick follows the handshake: both ends renewed their BIOs
        yield wait_until(lambda: not any(end.bios_grown for end in ends), 5)
        payload = random.Random(9).randbytes(200_000)  # grows them again
        received, _ = yield with_timeout(visit(public, Visitor(payload)), 10)
        self.assertEqual(received, payload)
        self.assertTrue(all(end.bios_grown for end in ends))


class SegmentTests(unittest.SynchronousTestCase):
    """How a turn's writes are cut into buffers for SSL_write."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=3 * RECORD_PLAINTEXT), max_size=12))
    def test_segments_cover_the_pieces_and_copy_no_large_payload(self, sizes: list[int]) -> None:
        pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
        segments = list(_segments(pieces))
        self.assertEqual(b"".join(segments), b"".join(pieces))
        for piece in pieces:
            if len(piece) >= RECORD_PLAINTEXT:
                # encrypted where it lies, all but a head that tops up a record
                views = [s for s in segments if isinstance(s, memoryview) and s.obj is piece]
                self.assertEqual(len(views), 1)
                self.assertGreater(len(views[0]), len(piece) - RECORD_PLAINTEXT)

    def test_empty_writes_make_no_segment(self) -> None:
        big = b"x" * RECORD_PLAINTEXT
        segments = list(_segments([b"", big, b"", b""]))
        self.assertEqual([len(s) for s in segments], [RECORD_PLAINTEXT])

    def test_small_writes_are_joined_into_full_records(self) -> None:
        pieces = [b"h" * 9, b"x" * 1000] * 40  # 40 small frames, 40,360 bytes
        segments = list(_segments(pieces))
        self.assertEqual(len(segments), 3)
        self.assertTrue(all(len(s) >= RECORD_PLAINTEXT for s in segments[:-1]))
