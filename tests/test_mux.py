"""rtunnel.mux (Session/Stream) and rtunnel.link (ControlLink) in memory.

Two Sessions talk over fake links (see tests/memory.py); local sockets are
fake LocalPorts; time is a Clock. No reactor, no sockets (and SansIOTests
runs the core with no Twisted at all). ControlLink runs on a StringTransport.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from rtunnel import link as link_module
from rtunnel import mux, wire
from rtunnel.link import ControlLink, Keepalive, LinkState
from rtunnel.mux import (
    IllegalTransition,
    LocalState,
    ProtocolViolation,
    RecvState,
    SendState,
    Session,
    SessionSettings,
)
from rtunnel.mux.states import LOCAL_TRANSITIONS, RECV_TRANSITIONS, SEND_TRANSITIONS, describe, move
from rtunnel.wire import ErrorCode, Frame, FrameType, ResetCode
from tests.memory import C2S, S2C, FakeLink, LocalEnd, LocalSocket, Pair, RecordingDelegate, pattern

KiB = 1024
MiB = 1024 * KiB
WINDOW = 256 * KiB  # the protocol's initial window


def frame(data: bytes) -> Frame:
    """Decode exactly one encoded frame."""
    [decoded] = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME).feed(data)
    return decoded


def partial_steps(pair: Pair, rounds: int, s2c: int, c2s: int) -> None:
    """Let the locals write, but deliver only part of what is on the link."""
    for _ in range(rounds):
        for end in pair.all_ends():
            end.feed()
        pair.transfer(S2C, s2c)
        pair.transfer(C2S, c2s)


class MuxTestCase(unittest.SynchronousTestCase):
    def assertNoMisuse(self, *ends: LocalEnd) -> None:
        for end in ends:
            self.assertEqual(end.transport.misuse, [])

    def assertForgotten(self, pair: Pair, stream_id: int) -> None:
        self.assertNotIn(stream_id, pair.server.streams)
        self.assertNotIn(stream_id, pair.client.streams)
        self.assertIn(stream_id, pair.server_delegate.closed)
        self.assertIn(stream_id, pair.client_delegate.closed)


# ---------------------------------------------------------------- data


class DataTests(MuxTestCase):
    def test_open_reaches_the_client_delegate(self):
        pair = Pair()
        server_end, client_end = pair.open(7, {"src": ["198.51.100.1", 5555]})
        sid = server_end.stream.id
        self.assertEqual(sid, 2)
        self.assertEqual(pair.client_delegate.opened, [(2, 7, {"src": ["198.51.100.1", 5555]})])
        self.assertEqual(client_end.stream.tunnel_id, 7)
        self.assertIs(client_end.transport.stream, client_end.stream)
        self.assertIs(server_end.transport.stream, server_end.stream)
        self.assertEqual(pair.open()[0].stream.id, 4)

    def test_data_flows_both_ways_byte_for_byte(self):
        pair = Pair()
        server_end, client_end = pair.open()
        down = pattern(1, 3 * MiB + 17)
        up = pattern(2, 2 * MiB + 5)
        server_end.send(down)
        client_end.send(up)
        pair.pump()
        self.assertEqual(client_end.received, down)
        self.assertEqual(server_end.received, up)
        sid = server_end.stream.id
        self.assertEqual(pair.data_bytes[S2C, sid], len(down))
        self.assertEqual(pair.data_bytes[C2S, sid], len(up))
        self.assertNoMisuse(server_end, client_end)

    def test_idle_stream_keeps_no_buffers_after_a_transfer(self):
        """Issue #6: an idle tunnelled connection costs its counters, not
        empty deques/lists (~1.5 KB a stream)."""
        pair = Pair()
        server_end, client_end = pair.open()
        for end in (server_end, client_end):
            self.assertEqual((end.stream._pending, end.stream._unacked, end.stream._early), ((), (), ()))
        server_end.send(pattern(5, 300 * KiB))
        client_end.send(b"x")
        pair.pump()
        pair.advance(1)  # the small leftover credit comes back after the credit delay
        self.assertEqual(len(client_end.received), 300 * KiB)
        self.assertEqual(server_end.received, b"x")
        for end in (server_end, client_end):
            stream = end.stream
            self.assertEqual(stream.buffered_out, 0)
            self.assertEqual((stream._pending, stream._unacked, stream._early), ((), (), ()))

    def test_stream_has_no_instance_dict(self):
        """Issue #6: Stream uses __slots__ (one per tunnelled connection)."""
        server_end, client_end = Pair().open()
        for stream in (server_end.stream, client_end.stream):
            self.assertFalse(hasattr(stream, "__dict__"))
            with self.assertRaises(AttributeError):
                stream.misspelt_field = 1  # type: ignore[attr-defined]

    def test_data_frames_respect_the_peer_max_frame(self):
        small = SessionSettings(max_frame=wire.MIN_MAX_FRAME)
        pair = Pair(settings=small)
        server_end, client_end = pair.open()
        down = pattern(3, 200 * KiB)
        server_end.chunk = 100 * KiB
        server_end.send(down)
        pair.pump()
        self.assertEqual(client_end.received, down)
        sizes = [len(f.body) for f in pair.frames_of(S2C, FrameType.DATA)]
        self.assertLessEqual(max(sizes), wire.MIN_MAX_FRAME)


# ---------------------------------------------------------------- flow control


class FlowControlTests(MuxTestCase):
    def test_sender_never_exceeds_the_granted_window(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        client_end.fill()  # the client's local socket is full
        data = pattern(4, 5 * MiB)
        server_end.send(data)
        pair.pump()
        self.assertEqual(pair.data_bytes[S2C, sid], WINDOW)
        self.assertEqual(server_end.stream.sent, WINDOW)
        self.assertEqual(len(client_end.received), WINDOW)
        self.assertFalse(server_end.transport.reading)
        self.assertEqual(pair.frames_of(C2S, FrameType.WINDOW, sid), [])
        # nothing changes however long we wait
        pair.advance(60)
        self.assertEqual(server_end.stream.sent, WINDOW)
        self.assertFalse(server_end.transport.reading)
        # the local socket drains: credit flows, everything arrives
        client_end.drain()
        pair.pump()
        self.assertEqual(client_end.received, data)
        self.assertTrue(server_end.transport.reading)
        # each grant allowed at most `limit` bytes and the sender respected it
        limits = [0, WINDOW]
        for f in pair.frames_of(C2S, FrameType.WINDOW, sid):
            consumed, window = wire.decode_window(f)
            limits.append(consumed + window)
        self.assertEqual(limits, sorted(limits))
        self.assertLessEqual(server_end.stream.sent, limits[-1])
        self.assertNoMisuse(server_end, client_end)

    def test_credit_only_after_delivery_to_the_local_socket(self):
        pair = Pair(auto_attach=False)
        server_end = pair.open_server_end()
        sid = server_end.stream.id
        pair.pump()
        client_stream = pair.client_delegate.streams[sid]
        server_end.send(pattern(5, 100 * KiB))
        pair.pump()
        # received but not delivered (no local socket yet): no credit
        self.assertEqual(client_stream.received, 100 * KiB)
        self.assertEqual(pair.frames_of(C2S, FrameType.WINDOW), [])
        self.assertEqual(server_end.stream.peer_consumed, 0)
        # the target connects: early bytes are delivered, then credited
        client_end = LocalEnd(client_stream)
        pair.client_delegate.ends[sid] = client_end
        pair.pump()
        self.assertEqual(client_end.received, pattern(5, 100 * KiB))
        [grant] = pair.frames_of(C2S, FrameType.WINDOW, sid)
        self.assertEqual(wire.decode_window(grant)[0], 100 * KiB)
        self.assertEqual(server_end.stream.peer_consumed, 100 * KiB)

    def test_no_credit_while_the_destination_is_paused(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        client_end.fill()
        server_end.send(pattern(6, 200 * KiB))
        pair.pump()
        self.assertEqual(len(client_end.received), 200 * KiB)  # delivered...
        self.assertEqual(pair.frames_of(C2S, FrameType.WINDOW, sid), [])  # ...but not credited
        self.assertEqual(server_end.stream.peer_consumed, 0)
        client_end.drain()
        pair.pump()
        [grant] = pair.frames_of(C2S, FrameType.WINDOW, sid)
        self.assertEqual(wire.decode_window(grant)[0], 200 * KiB)
        self.assertEqual(server_end.stream.peer_consumed, 200 * KiB)

    def test_credit_never_exceeds_what_was_delivered(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        delivered_at_grant = []
        original = pair.client_link.write

        def spy(data: bytes) -> None:
            if data[0] == FrameType.WINDOW:
                consumed, _ = wire.decode_window(frame(data))
                delivered_at_grant.append((consumed, len(client_end.received)))
            original(data)

        pair.client_link.write = spy  # type: ignore[method-assign]
        for i in range(20):
            if i % 3 == 0:
                client_end.fill()
            server_end.send(pattern(100 + i, 90 * KiB))
            pair.pump()
            client_end.drain()
            pair.pump()
        self.assertTrue(delivered_at_grant)
        for consumed, delivered in delivered_at_grant:
            self.assertLessEqual(consumed, delivered)
        self.assertEqual(len(client_end.received), 20 * 90 * KiB)
        self.assertTrue(pair.frames_of(C2S, FrameType.WINDOW, sid))

    def test_slow_stream_does_not_block_another_stream(self):
        pair = Pair()
        slow_server, slow_client = pair.open()
        fast_server, fast_client = pair.open()
        slow_client.fill()
        slow_data, fast_data = pattern(7, 2 * MiB), pattern(8, 2 * MiB)
        slow_server.send(slow_data)
        fast_server.send(fast_data)
        pair.pump()
        self.assertEqual(fast_client.received, fast_data)
        self.assertEqual(len(slow_client.received), WINDOW)
        self.assertFalse(slow_server.transport.reading)
        self.assertTrue(fast_server.transport.reading)
        # and in the other direction, on the same session, meanwhile
        up = pattern(9, MiB)
        slow_client.send(up)
        pair.pump()
        self.assertEqual(slow_server.received, up)
        slow_client.drain()
        pair.pump()
        self.assertEqual(slow_client.received, slow_data)

    def test_window_grows_when_the_window_is_the_bottleneck(self):
        pair = Pair()
        server_end, client_end = pair.open()
        server_end.send(pattern(10, 8 * MiB))
        pair.pump()  # the Clock does not move: grants come < 2 srtt apart
        self.assertGreater(client_end.stream.window, WINDOW)
        self.assertLessEqual(client_end.stream.window, SessionSettings().max_stream_window)

    def test_window_stays_within_the_session_budget(self):
        budget = 4 * MiB
        settings = SessionSettings(session_window_budget=budget)
        pair = Pair(settings=settings)
        opened = [pair.open() for _ in range(4)]
        reserved = 4 * (WINDOW + settings.local_buffer)  # each stream's initial window and local buffer
        self.assertEqual(pair.client.held_windows, reserved)
        for i, (server_end, _) in enumerate(opened):
            server_end.send(pattern(60 + i, 4 * MiB))
        pair.pump()
        for i, (_, client_end) in enumerate(opened):
            self.assertEqual(client_end.received, pattern(60 + i, 4 * MiB))
        grown = sum(client_end.stream.window - WINDOW for _, client_end in opened)
        self.assertGreater(grown, 0)
        self.assertLessEqual(reserved + grown, budget * 3 // 4)  # what windows may take of it
        self.assertEqual(pair.client.held_windows, reserved + grown)
        # finished streams give their share back
        for end in pair.all_ends():
            end.shutdown_write()
        pair.pump()
        self.assertEqual(pair.client.streams, {})
        self.assertEqual(pair.client.held_windows, 0)
        self.assertEqual(pair.server.held_windows, 0)
        self.assertEqual(pair.server.held_send, 0)

    def test_idle_stream_falls_back_to_the_initial_window(self):
        pair = Pair()
        server_end, client_end = pair.open()
        server_end.send(pattern(70, 4 * MiB))
        pair.pump()
        self.assertGreater(client_end.stream.window, WINDOW)
        pair.advance(31)
        server_end.send(b"after a pause")
        pair.pump()
        self.assertEqual(client_end.stream.window, WINDOW)
        self.assertEqual(pair.client.held_windows, client_end.stream.reserved)  # no growth left
        self.assertTrue(client_end.received.endswith(b"after a pause"))

    def test_small_leftover_credit_is_returned_after_the_credit_delay(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        server_end.send(b"x" * 1000)  # far below window / 4: not worth a frame at once
        pair.pump()
        self.assertEqual(client_end.received, b"x" * 1000)
        self.assertEqual(pair.frames_of(C2S, FrameType.WINDOW, sid), [])
        pair.advance(SessionSettings().credit_delay)
        [grant] = pair.frames_of(C2S, FrameType.WINDOW, sid)
        self.assertEqual(wire.decode_window(grant)[0], 1000)
        self.assertEqual(server_end.stream.peer_consumed, 1000)
        self.assertEqual(server_end.stream.buffered_out, 0)

    def test_leftover_credit_waits_while_the_destination_is_paused(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        server_end.send(b"x" * 1000)
        client_end.fill()
        pair.pump()
        pair.advance(5)
        self.assertEqual(pair.frames_of(C2S, FrameType.WINDOW, sid), [])
        client_end.drain()
        pair.pump()
        [grant] = pair.frames_of(C2S, FrameType.WINDOW, sid)
        self.assertEqual(wire.decode_window(grant)[0], 1000)


# ---------------------------------------------------------------- ending streams


class HalfCloseTests(MuxTestCase):
    def _half_close(self, first: str) -> None:
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        closer, other = (server_end, client_end) if first == "server" else (client_end, server_end)
        closer.send(b"last words")
        closer.shutdown_write()
        pair.pump()
        self.assertEqual(other.received, b"last words")
        self.assertTrue(other.transport.write_closed)
        self.assertFalse(closer.transport.write_closed)
        self.assertFalse(other.transport.aborted)
        fins = pair.frames_of(S2C if first == "server" else C2S, FrameType.FIN, sid)
        self.assertEqual([wire.decode_u64(f) for f in fins], [10])
        # the other direction keeps flowing
        reply = pattern(11, MiB)
        other.send(reply)
        pair.pump()
        self.assertEqual(closer.received, reply)
        self.assertIn(sid, pair.server.streams)
        self.assertIn(sid, pair.client.streams)
        # second FIN: both sides forget the stream
        other.shutdown_write()
        pair.pump()
        self.assertTrue(closer.transport.write_closed)
        self.assertForgotten(pair, sid)
        self.assertFalse(server_end.transport.aborted or client_end.transport.aborted)
        self.assertEqual(pair.frames_of(S2C, FrameType.RST) + pair.frames_of(C2S, FrameType.RST), [])
        self.assertNoMisuse(server_end, client_end)

    def test_half_close_from_the_server_side(self):
        self._half_close("server")

    def test_half_close_from_the_client_side(self):
        self._half_close("client")

    def test_empty_stream_closed_both_ways_is_forgotten(self):
        pair = Pair()
        server_end, client_end = pair.open()
        server_end.shutdown_write()
        client_end.shutdown_write()
        pair.pump()
        self.assertForgotten(pair, server_end.stream.id)

    def test_local_close_after_both_fins_does_not_reset(self):
        pair = Pair()
        server_end, client_end = pair.open()
        server_end.shutdown_write()
        client_end.shutdown_write()
        pair.pump()
        server_end.lose()
        client_end.lose()
        pair.pump()
        self.assertEqual(pair.frames_of(S2C, FrameType.RST) + pair.frames_of(C2S, FrameType.RST), [])

    def test_fin_while_destination_paused_is_credited_on_resume(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        client_end.fill()
        server_end.send(b"x" * 10)
        server_end.shutdown_write()
        pair.pump()
        self.assertTrue(client_end.transport.write_closed)
        client_end.drain()
        pair.pump()
        self.assertEqual(server_end.stream.peer_consumed, 10)
        client_end.shutdown_write()  # the client still had its direction open
        pair.pump()
        self.assertForgotten(pair, sid)

    def test_early_data_and_fin_before_the_local_socket_exists(self):
        pair = Pair(auto_attach=False)
        server_end = pair.open_server_end()
        sid = server_end.stream.id
        server_end.send(b"early bytes")
        server_end.shutdown_write()
        pair.pump()
        client_end = LocalEnd(pair.client_delegate.streams[sid])
        pair.client_delegate.ends[sid] = client_end
        pair.pump()
        self.assertEqual(client_end.received, b"early bytes")
        self.assertTrue(client_end.transport.write_closed)
        self.assertEqual(server_end.stream.peer_consumed, 11)
        client_end.send(b"reply")
        client_end.shutdown_write()
        pair.pump()
        self.assertEqual(server_end.received, b"reply")
        self.assertForgotten(pair, sid)

    def test_fin_completing_while_destination_paused_lets_the_sender_forget(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        client_end.shutdown_write()  # the client has finished sending
        pair.pump()
        client_end.fill()  # the client's local socket is slow
        server_end.send(b"x" * 10)
        server_end.shutdown_write()
        pair.pump()
        self.assertTrue(client_end.transport.write_closed)
        client_end.drain()  # it drains
        pair.advance(1.0)
        # Regression: the final WINDOW (consumed == final offset) must go out
        # even while the local socket is paused, or the server's stream would
        # stay FIN_SENT forever once the client forgets its side
        # (counting against max_streams) unless a resume happens.
        self.assertForgotten(pair, sid)


class ResetTests(MuxTestCase):
    def _reset(self, side: str) -> None:
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        server_end.send(pattern(12, 100 * KiB))
        client_end.send(pattern(13, 100 * KiB))
        pair.pump()
        resetter, other = (server_end, client_end) if side == "server" else (client_end, server_end)
        resetter.lose()  # the local socket breaks
        pair.pump()
        [rst] = pair.frames_of(S2C if side == "server" else C2S, FrameType.RST, sid)
        self.assertEqual(wire.decode_coded(rst)[0], ResetCode.ABORTED)
        self.assertTrue(other.transport.aborted)
        self.assertFalse(other.transport.write_closed)
        self.assertForgotten(pair, sid)
        # frames that crossed the RST are ignored, not protocol errors
        pair.client.frame_received(frame(wire.encode(FrameType.DATA, sid, b"late")))
        pair.server.frame_received(frame(wire.encode_window(sid, 0, WINDOW)))
        pair.server.frame_received(frame(wire.encode(FrameType.DATA, sid, b"late")))
        self.assertNoMisuse(server_end, client_end)

    def test_reset_from_the_server_side(self):
        self._reset("server")

    def test_reset_from_the_client_side(self):
        self._reset("client")

    def test_explicit_reset_with_code(self):
        pair = Pair()
        server_end, client_end = pair.open()
        client_end.stream.local_failed(ResetCode.REFUSED, "target refused")
        pair.pump()
        [rst] = pair.frames_of(C2S, FrameType.RST)
        self.assertEqual(wire.decode_coded(rst), (ResetCode.REFUSED, "target refused"))
        self.assertTrue(server_end.transport.aborted)
        self.assertForgotten(pair, server_end.stream.id)


# ---------------------------------------------------------------- link backpressure


class LinkBackpressureTests(MuxTestCase):
    def test_link_pause_stops_each_reader_at_its_next_read(self):
        """A paused link costs idle streams nothing; a stream that reads
        holds that read, pauses its socket, and sends it on resume."""
        pair = Pair()
        ends = [pair.open() for _ in range(3)]
        pair.server.pause_writing()  # the link's write buffer is full
        for server_end, client_end in ends:
            self.assertTrue(server_end.transport.reading)
            self.assertTrue(client_end.transport.reading)
        ends[0][0].send(b"waiting")
        pair.pump()
        self.assertEqual(ends[0][1].received, b"")  # held while the link is paused
        self.assertFalse(ends[0][0].transport.reading)
        self.assertTrue(ends[1][0].transport.reading)
        pair.server.resume_writing()
        for server_end, _ in ends:
            self.assertTrue(server_end.transport.reading)
        pair.pump()
        self.assertEqual(ends[0][1].received, b"waiting")

    def test_client_link_pause_holds_client_reads(self):
        pair = Pair()
        ends = [pair.open() for _ in range(2)]
        pair.client.pause_writing()
        for _server_end, client_end in ends:
            client_end.send(b"reply")
        pair.pump()
        for server_end, client_end in ends:
            self.assertFalse(client_end.transport.reading)
            self.assertTrue(server_end.transport.reading)
            self.assertEqual(server_end.received, b"")
        pair.client.resume_writing()
        pair.pump()
        for server_end, client_end in ends:
            self.assertTrue(client_end.transport.reading)
            self.assertEqual(server_end.received, b"reply")

    def test_session_watches_its_links_send_buffer(self):
        pair = Pair()
        self.assertIs(pair.server_link.watcher, pair.server)
        self.assertIs(pair.client_link.watcher, pair.client)

    def test_stream_opened_while_link_paused_does_not_read(self):
        pair = Pair()
        pair.server.pause_writing()
        server_end = pair.open_server_end()
        self.assertFalse(server_end.transport.reading)
        pair.server.resume_writing()
        self.assertTrue(server_end.transport.reading)

    def test_detach_lets_go_of_the_link(self):
        pair = Pair()
        old = pair.server_link
        pair.sever()
        self.assertIsNone(old.watcher)
        pair.connect(resuming=True)
        self.assertIsNone(old.watcher)
        self.assertIs(pair.server_link.watcher, pair.server)

    def test_detached_session_does_not_read_local_sockets(self):
        pair = Pair()
        server_end, client_end = pair.open()
        pair.sever()
        self.assertFalse(server_end.transport.reading)
        self.assertFalse(client_end.transport.reading)
        pair.server.resume_writing()  # a stale resume from the dead link
        self.assertFalse(server_end.transport.reading)


# ---------------------------------------------------------------- keepalive


class MemoryControlLink(ControlLink):
    def __init__(self, clock: Clock, keepalive: Keepalive) -> None:
        super().__init__(clock, keepalive)
        self.handshake: list[Frame] = []

    def handshake_frame(self, frame: Frame) -> None:
        self.handshake.append(frame)


class KeepaliveTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.link = MemoryControlLink(self.clock, Keepalive(interval=10.0, dead_after=30.0))
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.session = Session(self.clock, RecordingDelegate(), is_server=True)
        self.link.start_session(self.session, False, wire.DEFAULT_MAX_FRAME)
        self.decoder = wire.FrameDecoder(wire.DEFAULT_MAX_FRAME)

    def sent_frames(self) -> list[Frame]:
        data = self.transport.value()
        self.transport.clear()
        return list(self.decoder.feed(data))

    def pings(self) -> list[int]:
        return [
            wire.decode_u64(f)
            for f in self.sent_frames()
            if f.type is FrameType.PING and not f.flags & wire.FLAG_PONG
        ]

    def test_silent_link_is_aborted_after_dead_after(self):
        self.clock.advance(0)
        self.assertEqual(len(self.pings()), 1)
        self.clock.pump([0.1] * 299)  # 29.9 s, in small steps
        self.assertFalse(self.transport.disconnected)
        self.assertEqual(len(self.pings()), 2)  # at 10 s and 20 s
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)
        self.assertTrue(self.link.closing)

    def test_answered_pings_keep_the_link_up(self):
        for _ in range(12):
            self.clock.advance(9.95)
            for opaque in self.pings():
                self.clock.advance(0.05)
                self.link.dataReceived(wire.encode_ping(opaque, pong=True))
        self.assertGreaterEqual(self.clock.seconds(), 119)
        self.assertFalse(self.transport.disconnected)
        self.assertAlmostEqual(self.link.srtt, 0.05, places=6)

    def test_any_frame_counts_as_life(self):
        for _ in range(10):
            self.clock.pump([1] * 20)
            self.link.dataReceived(wire.encode_ack(0))
        self.assertFalse(self.transport.disconnected)
        self.clock.pump([1] * 29)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnected)

    def test_peer_ping_is_answered_with_pong(self):
        self.sent_frames()
        self.link.dataReceived(wire.encode_ping(0xDEADBEEF))
        [pong] = self.sent_frames()
        self.assertEqual(pong.type, FrameType.PING)
        self.assertEqual(pong.flags, wire.FLAG_PONG)
        self.assertEqual(wire.decode_u64(pong), 0xDEADBEEF)

    def test_protocol_violation_closes_the_link_with_its_code(self):
        self.sent_frames()
        self.link.dataReceived(wire.encode_ack(5))  # nothing reliable was sent
        [error] = [f for f in self.sent_frames() if f.type is FrameType.ERROR]
        self.assertEqual(wire.decode_coded(error)[0], ErrorCode.PROTOCOL_ERROR)
        self.assertTrue(self.transport.disconnecting)

    def test_flow_control_violation_closes_the_link_with_flow_control(self):
        stream = self.session.open_stream(1, {})
        self.sent_frames()
        self.link.dataReceived(wire.encode(FrameType.DATA, stream.id, b"x" * (WINDOW + 1)))
        [error] = [f for f in self.sent_frames() if f.type is FrameType.ERROR]
        self.assertEqual(wire.decode_coded(error)[0], ErrorCode.FLOW_CONTROL)

    def test_lost_connection_detaches_the_session(self):
        stream = self.session.open_stream(1, {})
        local = LocalEnd(stream)
        self.link.connectionLost()
        self.assertIsNone(self.session.link)
        self.assertIsNone(self.transport.producer)
        self.assertFalse(local.transport.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_error_frame_from_the_peer_closes_the_link(self):
        self.link.dataReceived(wire.encode_coded(FrameType.ERROR, 0, ErrorCode.AUTH_FAILED, "no"))
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.session.link)


# ---------------------------------------------------------------- reliable frames


class ReliableAckTests(MuxTestCase):
    def test_ack_after_32_reliable_frames(self):
        pair = Pair()
        for _ in range(32):
            pair.open_server_end()
        pair.pump()
        acks = [wire.decode_u64(f) for f in pair.frames_of(C2S, FrameType.ACK)]
        self.assertEqual(acks, [32])
        self.assertEqual(len(pair.server._outbox), 0)
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_ack_after_the_delay_with_fewer_frames(self):
        pair = Pair()
        for _ in range(3):
            pair.open_server_end()
        pair.pump()
        self.assertEqual(pair.frames_of(C2S, FrameType.ACK), [])
        self.assertEqual(len(pair.server._outbox), 3)
        pair.advance(0.99)
        self.assertEqual(pair.frames_of(C2S, FrameType.ACK), [])
        pair.advance(0.01)
        acks = [wire.decode_u64(f) for f in pair.frames_of(C2S, FrameType.ACK)]
        self.assertEqual(acks, [3])
        self.assertEqual(len(pair.server._outbox), 0)

    def test_acks_count_across_batches(self):
        pair = Pair()
        for _ in range(40):
            pair.open_server_end()
        pair.pump()
        pair.advance(1.0)
        acks = [wire.decode_u64(f) for f in pair.frames_of(C2S, FrameType.ACK)]
        self.assertEqual(acks, [32, 40])
        # FIN and RST are reliable too, from the client side
        ends = list(pair.client_delegate.ends.values())
        ends[0].eof_now()
        ends[1].lose()
        pair.pump()
        pair.advance(1.0)
        acks = [wire.decode_u64(f) for f in pair.frames_of(S2C, FrameType.ACK)]
        self.assertEqual(acks, [2])
        self.assertEqual(len(pair.client._outbox), 0)


# ---------------------------------------------------------------- resume


class ResumeTests(MuxTestCase):

    def test_a_goaway_between_the_resumes_is_taken_not_a_protocol_error(self):
        """Servers of before 2026-12 sent GOAWAY when shutting down even
        between their RESUME and the client's: the client takes it as the
        server leaving, not as a broken peer."""
        delegate = RecordingDelegate()
        session = Session(Clock(), delegate, is_server=False)
        session.attach(FakeLink(), resuming=True, peer_max_frame=wire.DEFAULT_MAX_FRAME)
        goaway = wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "server shutting down")
        [frame] = wire.FrameDecoder(1 << 20).feed(goaway)
        session.frame_received(frame)
        self.assertEqual([f.type for f in delegate.control], [FrameType.GOAWAY])
        [bound] = wire.FrameDecoder(1 << 20).feed(wire.encode_json(FrameType.BOUND, {"tunnel": 1}))
        self.assertRaises(ProtocolViolation, session.frame_received, bound)  # anything else still is
    def test_every_byte_arrives_once_and_in_order_across_drops(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        down, up = pattern(20, 3 * MiB), pattern(21, 3 * MiB)
        server_end.send(down)
        client_end.send(up)
        partial_steps(pair, 3, 200_000, 150_000)
        pair.reconnect(deliver_s2c=12_345, deliver_c2s=54_321)  # cut mid-frame
        partial_steps(pair, 5, 150_001, 199_999)
        pair.reconnect()
        partial_steps(pair, 2, 1_000, 1_000)
        pair.reconnect(deliver_s2c=100)
        pair.pump()
        # bytes really were lost at each drop...
        self.assertGreater(pair.dropped[S2C], MiB)
        self.assertGreater(pair.dropped[C2S], MiB)
        # ...yet every byte arrived once, in order
        self.assertEqual(client_end.received, down)
        self.assertEqual(server_end.received, up)
        self.assertEqual(pair.data_bytes[S2C, sid], len(down))
        self.assertEqual(pair.data_bytes[C2S, sid], len(up))
        # and the stream still ends cleanly
        server_end.shutdown_write()
        client_end.shutdown_write()
        pair.pump()
        self.assertForgotten(pair, sid)
        self.assertNoMisuse(server_end, client_end)

    def test_drop_while_destination_paused(self):
        pair = Pair()
        server_end, client_end = pair.open()
        client_end.fill()
        down = pattern(22, 2 * MiB)
        server_end.send(down)
        partial_steps(pair, 4, 60_000, 60_000)
        pair.reconnect(deliver_s2c=30_000)
        pair.pump()
        self.assertEqual(len(client_end.received), client_end.stream.received)
        self.assertLessEqual(server_end.stream.sent, WINDOW)
        client_end.drain()
        pair.pump()
        self.assertEqual(client_end.received, down)

    def test_frames_issued_while_detached_are_delivered_after_resume(self):
        pair = Pair()
        opens = [pair.open() for _ in range(4)]
        (fin_s, fin_c), (fin2_s, fin2_c), (rst_s, rst_c), (rst2_s, rst2_c) = opens
        for i, (server_end, client_end) in enumerate(opens):
            server_end.send(pattern(30 + i, 10 * KiB))
            client_end.send(pattern(40 + i, 10 * KiB))
        pair.pump()
        pair.sever()
        # while detached: a visitor arrives, and streams end in every way
        late = pair.open_server_end(9, {"late": True})
        late.send(b"sent while detached")
        fin_s.eof_now()
        fin2_c.eof_now()
        rst_s.lose()
        rst2_c.lose()
        self.assertNotIn(late.stream.id, pair.client.streams)
        self.assertFalse(fin_c.transport.write_closed or rst_c.transport.aborted)
        self.assertEqual(pair.server_link.value(), b"")
        pair.connect(resuming=True)
        pair.pump()
        self.assertIn((late.stream.id, 9, {"late": True}), pair.client_delegate.opened)
        self.assertEqual(pair.client_delegate.ends[late.stream.id].received, b"sent while detached")
        self.assertTrue(fin_c.transport.write_closed)
        self.assertTrue(fin2_s.transport.write_closed)
        self.assertTrue(rst_c.transport.aborted)
        self.assertTrue(rst2_s.transport.aborted)
        self.assertForgotten(pair, rst_s.stream.id)
        self.assertForgotten(pair, rst2_s.stream.id)
        # the half-closed streams still carry the other direction
        fin_c.send(b"reply")
        fin2_s.send(b"reply 2")
        pair.pump()
        self.assertEqual(fin_s.received[-5:], b"reply")
        self.assertEqual(fin2_c.received[-7:], b"reply 2")

    def test_open_lost_in_flight_is_replayed_with_its_data(self):
        pair = Pair()
        server_end = pair.open_server_end()
        server_end.send(pattern(50, 100 * KiB))
        server_end.feed()
        self.assertGreater(pair.in_flight(S2C), 100 * KiB)
        pair.reconnect()  # OPEN and DATA never arrived
        pair.pump()
        sid = server_end.stream.id
        self.assertEqual([o[0] for o in pair.client_delegate.opened], [sid])
        self.assertEqual(pair.client_delegate.ends[sid].received, pattern(50, 100 * KiB))

    def test_reliable_frames_are_not_duplicated_by_resume(self):
        pair = Pair()
        for _ in range(5):
            pair.open_server_end()
        pair.pump()  # received, but the ACK is still pending (1 s delay)
        pair.reconnect()
        pair.pump()
        self.assertEqual([o[0] for o in pair.client_delegate.opened], [2, 4, 6, 8, 10])
        self.assertEqual(len(pair.server._outbox), 0)

    def test_stream_finished_and_forgotten_by_peer_during_drop(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        server_end.send(b"abc")
        client_end.send(b"xyz")
        server_end.shutdown_write()
        client_end.shutdown_write()
        for end in pair.all_ends():
            end.feed()
        pair.transfer(S2C)  # client: received all, sends its final WINDOW, awaits one
        pair.transfer(C2S)  # server: done and forgotten; its final WINDOW is lost
        self.assertNotIn(sid, pair.server.streams)
        self.assertIn(sid, pair.client.streams)
        pair.reconnect()
        pair.pump()
        self.assertForgotten(pair, sid)

    def test_stream_is_forgotten_when_both_final_windows_are_lost(self):
        pair = Pair()
        server_end, client_end = pair.open()
        sid = server_end.stream.id
        server_end.send(b"a" * 10)
        client_end.send(b"b" * 10)
        server_end.shutdown_write()
        client_end.shutdown_write()
        for end in pair.all_ends():
            end.feed()
        # both sides receive DATA+FIN at once; both final WINDOWs are then lost
        pair.transfer(C2S, pair.in_flight(C2S))
        pair.transfer(S2C, pair.in_flight(S2C) - 22)  # not the server's WINDOW
        self.assertTrue(server_end.transport.write_closed and client_end.transport.write_closed)
        pair.reconnect()
        pair.pump()
        pair.advance(60)
        # Regression: RESUME acknowledges up to the peer's `received`, which
        # must let a finished stream be forgotten (no further WINDOW comes).
        self.assertForgotten(pair, sid)

    def test_resume_must_come_first(self):
        pair = Pair()
        pair.sever()
        pair.connect(resuming=True)
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_ack(0)))

    def test_resume_when_not_negotiated_is_a_violation(self):
        pair = Pair()
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_resume(wire.ResumeState(0, ()))))


# ---------------------------------------------------------------- violations


class ProtocolViolationTests(MuxTestCase):
    def test_data_beyond_the_window(self):
        pair = Pair()
        _, client_end = pair.open()
        sid = client_end.stream.id
        client_end.fill()  # no new credit: the limit stays at WINDOW
        pair.client.frame_received(frame(wire.encode(FrameType.DATA, sid, b"x" * WINDOW)))
        with self.assertRaises(ProtocolViolation) as caught:
            pair.client.frame_received(frame(wire.encode(FrameType.DATA, sid, b"y")))
        self.assertEqual(caught.exception.code, ErrorCode.FLOW_CONTROL)

    def test_data_for_a_never_opened_stream(self):
        pair = Pair()
        pair.open()
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode(FrameType.DATA, 4, b"x")))
        with self.assertRaises(ProtocolViolation):
            pair.server.frame_received(frame(wire.encode(FrameType.DATA, 4, b"x")))
        with self.assertRaises(ProtocolViolation):
            pair.server.frame_received(frame(wire.encode(FrameType.DATA, 3, b"x")))
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_window(1, 0, 1)))

    def test_open_from_the_client_side(self):
        pair = Pair()
        with self.assertRaises(ProtocolViolation):
            pair.server.frame_received(frame(wire.encode_open(1, 1, {})))
        with self.assertRaises(ProtocolViolation):
            pair.server.frame_received(frame(wire.encode_open(2, 1, {})))

    def test_open_with_an_odd_id_or_reused_id(self):
        pair = Pair()
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_open(3, 1, {})))
        pair.client.frame_received(frame(wire.encode_open(4, 1, {})))
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_open(2, 1, {})))

    def test_ack_beyond_what_was_sent(self):
        pair = Pair()
        pair.open()
        pair.client.frame_received(frame(wire.encode_ack(0)))
        pair.server.frame_received(frame(wire.encode_ack(1)))
        with self.assertRaises(ProtocolViolation):
            pair.server.frame_received(frame(wire.encode_ack(2)))
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_ack(1)))

    def test_window_acknowledging_unsent_bytes(self):
        pair = Pair()
        server_end, _ = pair.open()
        with self.assertRaises(ProtocolViolation):
            pair.server.frame_received(frame(wire.encode_window(server_end.stream.id, 1, WINDOW)))

    def test_data_after_fin(self):
        pair = Pair()
        _, client_end = pair.open()
        sid = client_end.stream.id
        pair.client.frame_received(frame(wire.encode_fin(sid, 0)))
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode(FrameType.DATA, sid, b"x")))

    def test_second_fin(self):
        pair = Pair()
        _, client_end = pair.open()
        sid = client_end.stream.id
        pair.client.frame_received(frame(wire.encode_fin(sid, 5)))
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_fin(sid, 5)))

    def test_handshake_frames_after_the_handshake(self):
        pair = Pair()
        with self.assertRaises(ProtocolViolation):
            pair.client.frame_received(frame(wire.encode_json(FrameType.WELCOME, {})))


# ---------------------------------------------------------------- property


SIDES = st.sampled_from([S2C, C2S])
STREAM = st.integers(0, 7)
OPS = st.one_of(
    st.tuples(st.just("write"), SIDES, STREAM, st.integers(1, 300_000)),
    st.tuples(st.just("eof"), SIDES, STREAM),
    st.tuples(st.just("pause"), SIDES, STREAM),
    st.tuples(st.just("resume"), SIDES, STREAM),
    st.tuples(st.just("open")),
    st.tuples(st.just("step"), st.integers(0, 200_000), st.integers(0, 200_000)),
    st.tuples(st.just("pump")),
    st.tuples(st.just("drop"), st.integers(0, 200_000), st.integers(0, 200_000)),
    st.tuples(st.just("reconnect")),
    st.tuples(st.just("link_pause"), SIDES),
    st.tuples(st.just("link_resume"), SIDES),
    st.tuples(st.just("reset"), SIDES, STREAM),
    st.tuples(st.just("tick"), st.sampled_from([0.01, 0.02, 0.5, 1.0, 31.0])),
)
#: Small windows and frames: more frames per byte, more resends split.
TIGHT = SessionSettings(
    initial_window=16 * KiB,
    max_stream_window=64 * KiB,
    session_window_budget=200 * KiB,
    max_frame=wire.MIN_MAX_FRAME,
    local_buffer=4 * KiB,
)
RANDOM_RUNS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same runs every time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class RandomRun:
    """Plays a list of OPS on a Pair, then lets everything drain.

    `write`/`eof` act on the sending end of one direction of one stream;
    `pause`/`resume` on the receiving stream (its local socket filling up or
    draining); `drop` severs the link (delivering a prefix of the bytes in
    flight) and `reconnect` resumes on a new link; `open` is a new visitor,
    possibly while detached; `reset` breaks one end's local socket (RST);
    `tick` lets time pass (credit and ACK timers, idle window reset).
    """

    def __init__(self, test: unittest.SynchronousTestCase, n_streams: int, tight: bool = False) -> None:
        self.test = test
        self.pair = Pair(settings=TIGHT if tight else None)
        self.server_ends = [self.pair.open()[0] for _ in range(n_streams)]
        self.connected = True
        self.seed = 0
        self.reset_by: dict[int, set[str]] = {}  # stream id -> sides that reset it

    def client_end(self, server_end: LocalEnd) -> LocalEnd | None:
        return self.pair.client_delegate.ends.get(server_end.stream.id)

    def ends(self, direction: str, index: int) -> tuple[LocalEnd | None, LocalEnd | None]:
        """(sender, receiver) of one direction of one stream."""
        server_end = self.server_ends[index % len(self.server_ends)]
        client_end = self.client_end(server_end)
        return (server_end, client_end) if direction == S2C else (client_end, server_end)

    def play(self, ops: list[tuple]) -> None:
        pair = self.pair
        for op in ops:
            kind = op[0]
            if kind in ("write", "eof"):
                sender = self.ends(op[1], op[2])[0]
                if sender is not None and not sender.eof_pending:
                    if kind == "eof":
                        sender.shutdown_write()
                    else:
                        self.seed += 1
                        sender.send(pattern(self.seed, op[3]))
            elif kind in ("pause", "resume"):
                receiver = self.ends(op[1], op[2])[1]
                if receiver is not None:
                    if kind == "pause":
                        receiver.fill()
                    else:
                        receiver.drain()
            elif kind == "reset":
                end = self.ends(op[1], op[2])[0]
                if end is not None and not end.stream.closed:
                    end.lose()
                    if end.stream.closed:  # not a graceful close after both FINs
                        self.reset_by.setdefault(end.stream.id, set()).add(op[1])
            elif kind == "open" and pair.server.room_for_stream():  # else the visitor is refused
                self.server_ends.append(pair.open_server_end())
            elif kind == "step":
                partial_steps(pair, 1, op[1], op[2])
            elif kind == "pump":
                pair.pump()
            elif kind == "drop" and self.connected:
                pair.sever(op[1], op[2])
                self.connected = False
            elif kind == "reconnect" and not self.connected:
                pair.connect(resuming=True)
                self.connected = True
            elif kind == "tick":
                pair.clock.advance(op[1])
            elif kind in ("link_pause", "link_resume"):
                session = pair.server if op[1] == S2C else pair.client
                if kind == "link_pause":
                    session.pause_writing()
                else:
                    session.resume_writing()
            for session in (pair.server, pair.client):
                for stream in session.streams.values():
                    self.test.assertLessEqual(stream.sent, stream.send_limit)

    def finish(self) -> None:
        """Reconnect, every end half-closes, then every local socket drains.

        The FINs arrive while some destinations may still be paused.
        """
        pair = self.pair
        if not self.connected:
            pair.connect(resuming=True)
            self.connected = True
        pair.server.resume_writing()
        pair.client.resume_writing()
        pair.advance(1.0)
        while not all(end.eof_pending for end in pair.all_ends()):
            for end in pair.all_ends():  # the client's ends appear with their OPEN
                end.shutdown_write()
            pair.pump()
        for end in pair.all_ends():
            end.drain()
        pair.pump()
        pair.advance(1.0)

    def pairs(self) -> list[tuple[LocalEnd, LocalEnd]]:
        result = []
        for server_end in self.server_ends:
            client_end = self.client_end(server_end)
            self.test.assertIsNotNone(client_end, f"stream {server_end.stream.id} never opened")
            result.append((server_end, client_end))
        return result


class PropertyTests(MuxTestCase):
    @RANDOM_RUNS
    @given(
        n_streams=st.integers(1, 3),
        tight=st.booleans(),
        ops=st.lists(OPS, min_size=5, max_size=40),
    )
    def test_random_interleavings_deliver_every_byte(self, n_streams, tight, ops):
        run = RandomRun(self, n_streams, tight)
        run.play(ops)
        run.finish()
        for server_end, client_end in run.pairs():
            resetters = run.reset_by.get(server_end.stream.id)
            if resetters:
                # what arrived is a prefix of what was sent, and the side that
                # did not reset was aborted (unless it had finished the stream
                # both ways already: then the RST crossed its last frames)
                self.assertTrue(bytes(server_end.sent).startswith(client_end.received))
                self.assertTrue(bytes(client_end.sent).startswith(server_end.received))
                if len(resetters) == 1:
                    other = client_end if resetters == {S2C} else server_end
                    finished = other.transport.write_closed and other.eof_delivered
                    self.assertTrue(other.transport.aborted or finished)
                continue
            self.assertEqual(client_end.received, bytes(server_end.sent))
            self.assertEqual(server_end.received, bytes(client_end.sent))
            self.assertTrue(server_end.transport.write_closed)
            self.assertTrue(client_end.transport.write_closed)
            self.assertFalse(server_end.transport.aborted or client_end.transport.aborted)
            self.assertNoMisuse(server_end, client_end)

    @RANDOM_RUNS
    @given(
        n_streams=st.integers(1, 3),
        tight=st.booleans(),
        ops=st.lists(OPS, min_size=5, max_size=40),
    )
    def test_random_interleavings_forget_every_finished_stream(self, n_streams, tight, ops):
        run = RandomRun(self, n_streams, tight)
        run.play(ops)
        run.finish()
        self.assertEqual(run.pair.server.streams, {})
        self.assertEqual(run.pair.client.streams, {})


# ---------------------------------------------------------------- bounds


class BoundTests(MuxTestCase):
    """What a session holds for a hostile peer stays within its budget
    (docs/security.md "Memory per session"): the peer floods, never reads,
    never acknowledges, never consumes."""

    BUDGET = 4 * MiB

    def settings(self, budget: int = BUDGET) -> SessionSettings:
        return SessionSettings(session_window_budget=budget)

    def test_reliable_frames_never_acknowledged_end_the_session_at_their_bound(self):
        for side in ("server", "client"):
            pair = Pair(settings=self.settings())
            session = getattr(pair, side)
            link = pair.server_link if side == "server" else pair.client_link
            for i in range(20_000):  # e.g. BIND_FAILED for each of a flood of bad BINDs
                session.send_json(FrameType.BIND_FAILED, {"tunnel": i, "code": "bad_address", "message": "x" * 60})
                if link.errors:
                    break
            # nothing was delivered: the peer never acknowledged a frame
            [(code, reason)] = link.errors
            self.assertEqual(code, ErrorCode.LIMIT_EXCEEDED)
            self.assertIn("waiting for an ACK", reason)
            limit = self.BUDGET // 16
            self.assertLessEqual(session.held_reliable, limit + 300)
            self.assertGreater(session.held_reliable, limit)

    def test_reliable_frames_of_a_peer_that_acknowledges_are_never_a_problem(self):
        pair = Pair(settings=self.settings(1 * MiB))
        for i in range(20_000):
            pair.server.send_json(FrameType.BIND_FAILED, {"tunnel": i, "code": "bad_address", "message": "x" * 60})
            if i % 100 == 0:
                pair.advance(1.0)  # the client ACKs every 32 frames, and after a second
        pair.pump()
        pair.advance(1.0)
        self.assertEqual(pair.server_link.errors, [])
        self.assertEqual(pair.server.held_reliable, 0)

    def test_visitors_are_refused_while_the_client_acknowledges_nothing(self):
        pair = Pair(settings=self.settings())
        refusal = None
        for _ in range(20_000):  # visitors connect and leave; their OPEN and RST wait for an ACK
            try:
                end = pair.open_server_end()
            except mux.SessionBufferFull as e:
                refusal = str(e)
                break
            end.lose()
        self.assertIsNotNone(refusal)
        self.assertIn("has not acknowledged", refusal)
        self.assertLessEqual(pair.server.held_reliable, self.BUDGET // 32 + 600)
        self.assertEqual(pair.server_link.errors, [])  # refused, not ended: the bound holds
        pair.pump()  # the client reads and acknowledges: visitors are welcome again
        self.assertTrue(pair.server.room_for_stream())

    def test_initial_windows_count_against_the_budget(self):
        """Visitors each send 256 KiB while the client never grants credit:
        only as many streams as the budget holds are opened."""
        pair = Pair(settings=self.settings())
        ends, refused = [], 0
        for _ in range(40):
            try:
                ends.append(pair.open_server_end())
            except mux.SessionBufferFull:
                refused += 1
        for i, end in enumerate(ends):
            end.send(pattern(300 + i, WINDOW))
            end.feed()
        held = sum(end.stream.buffered_out for end in ends)
        self.assertGreater(refused, 0)
        self.assertEqual(pair.server.held_send, held)
        # windows reserved and bytes read stop at 7/8 of the budget (+ one read)
        self.assertLessEqual(pair.server.held_windows + held, self.BUDGET * 7 // 8 + 16 * KiB)
        self.assertTrue(pair.server.streams_full)

    def test_send_buffers_stop_reading_at_the_bound_when_the_peer_never_consumes(self):
        pair = Pair(settings=self.settings())
        ends = [pair.open_server_end() for _ in range(4)]
        pair.pump()
        for end in ends:  # a hostile client grants 64 MiB on every stream and consumes nothing
            pair.server.frame_received(frame(wire.encode_window(end.stream.id, 0, 64 * MiB)))
            end.send(pattern(310, 8 * MiB))
        for _ in range(200):
            for end in ends:
                end.feed()
            pair.server_link.clear()  # sent, never read
        held = sum(end.stream.buffered_out for end in ends)
        self.assertLessEqual(held + pair.server.held_windows, self.BUDGET * 7 // 8 + 16 * KiB)  # + one read
        self.assertTrue(pair.server.streams_full)
        self.assertFalse(any(end.reading for end in ends))
        # the client consumes what it got: every stream reads again
        for end in ends:
            pair.server.frame_received(frame(wire.encode_window(end.stream.id, end.stream.sent, 64 * MiB)))
        self.assertFalse(pair.server.streams_full)
        self.assertTrue(all(end.reading for end in ends))

    def test_a_server_opening_more_streams_than_the_budget_holds_gets_them_reset(self):
        pair = Pair(settings=SessionSettings(), client_settings=self.settings())
        for _ in range(40):
            pair.open_server_end()
        pair.pump()
        admitted = len(pair.client.streams)
        per_stream = WINDOW + SessionSettings().local_buffer
        self.assertEqual(admitted, (self.BUDGET * 3 // 4) // per_stream)
        self.assertLessEqual(pair.client.held_windows, self.BUDGET * 3 // 4)
        resets = [wire.decode_coded(f) for f in pair.frames_of(C2S, FrameType.RST)]
        self.assertEqual(len(resets), 40 - admitted)
        self.assertTrue(all(code == ResetCode.LIMIT and "session buffer is full" in why for code, why in resets))

    def test_a_peer_that_floods_pings_and_never_reads_stops_being_read(self):
        clock = Clock()
        link = MemoryControlLink(clock, Keepalive(interval=10.0, dead_after=30.0))
        transport = StringTransport()
        link.makeConnection(transport)
        session = Session(clock, RecordingDelegate(), is_server=True, settings=self.settings(1 * MiB))
        link.start_session(session, False, wire.DEFAULT_MAX_FRAME)
        session.pause_writing()  # the transport's buffer is full: the peer does not read
        ping = wire.encode_ping(7)
        read = ping * 1000  # one read of the flood
        for _ in range(100):
            if transport.producerState == "paused":
                break
            link.dataReceived(read)
        self.assertEqual(transport.producerState, "paused")  # the link is not read any more
        self.assertLessEqual(session.reply_backlog, 1 * MiB // 16 + len(read))
        session.resume_writing()  # the peer read everything we sent
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(session.reply_backlog, 0)
        self.assertFalse(link.closing)


# ---------------------------------------------------------------- sans-IO core and state machines

ROOT = Path(__file__).resolve().parent.parent

NO_TWISTED_RUN = """
import sys
from tests.memory import ManualTimers, Pair, pattern

pair = Pair(clock=ManualTimers())
server_end, client_end = pair.open()
down, up = pattern(1, 3_000_000), pattern(2, 100_000)
server_end.send(down)
client_end.send(up)
pair.reconnect(deliver_s2c=50_000)
server_end.shutdown_write()
client_end.shutdown_write()
pair.pump()
pair.advance(2.0)
assert client_end.received == down and server_end.received == up
assert not pair.server.streams and not pair.client.streams
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("twisted", "zope", "OpenSSL"))
print("loaded:", loaded)
"""


class SansIOTests(MuxTestCase):
    def test_the_core_runs_without_twisted(self):
        """Sessions carry a stream both ways across a link drop, on the
        in-memory link, sockets and timers, with no Twisted module loaded."""
        result = subprocess.run(
            [sys.executable, "-c", NO_TWISTED_RUN], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "loaded: []")

    def test_a_socket_that_connects_after_its_stream_was_reset_is_dropped(self):
        pair = Pair(auto_attach=False)
        server_end = pair.open_server_end()
        pair.pump()
        stream = pair.client_delegate.streams[server_end.stream.id]
        stream.local_failed(ResetCode.TIMEOUT, "target timed out")
        socket = LocalSocket()
        stream.attach_local(socket)  # the target accepted just too late
        self.assertTrue(socket.aborted)
        self.assertIsNone(stream.local)

    def test_a_stream_is_closed_in_both_directions_when_reset(self):
        pair = Pair()
        server_end, client_end = pair.open()
        server_end.stream.reset(ResetCode.ABORTED, "test")
        pair.pump()
        for stream in (server_end.stream, client_end.stream):
            self.assertTrue(stream.closed)
            self.assertIs(stream.send_state, SendState.CLOSED)
            self.assertIs(stream.recv_state, RecvState.CLOSED)

    def test_a_stream_that_finishes_goes_through_every_state(self):
        pair = Pair()
        server_end, client_end = pair.open()
        stream = client_end.stream
        self.assertIs(stream.local_state, LocalState.WRITABLE)
        client_end.fill()
        self.assertIs(stream.local_state, LocalState.FULL)
        client_end.drain()
        client_end.send(b"x" * (WINDOW + 1))  # more than the server's credit: the socket is paused
        client_end.feed()
        self.assertIs(stream.send_state, SendState.PAUSED)
        pair.pump()
        self.assertIs(stream.send_state, SendState.READING)
        client_end.shutdown_write()
        client_end.feed()
        self.assertIs(stream.send_state, SendState.FIN_SENT)
        pair.pump()
        self.assertIs(stream.send_state, SendState.DONE)
        server_end.shutdown_write()
        pair.pump()
        self.assertIs(stream.recv_state, RecvState.CLOSED)  # DONE, then forgotten at once
        self.assertTrue(stream.closed and client_end.transport.closed)
        client_end.lose()
        self.assertIs(stream.local_state, LocalState.GONE)

    def test_an_impossible_transition_raises(self):
        for table, old, new in (
            (SEND_TRANSITIONS, SendState.CLOSED, SendState.READING),
            (SEND_TRANSITIONS, SendState.FIN_SENT, SendState.READING),
            (RECV_TRANSITIONS, RecvState.DONE, RecvState.OPEN),
            (LOCAL_TRANSITIONS, LocalState.GONE, LocalState.WRITABLE),
            (link_module.TRANSITIONS, LinkState.CLOSED, LinkState.OPEN),
        ):
            with self.assertRaises(IllegalTransition):
                move(table, old, new, "test")  # type: ignore[arg-type]

    def test_every_state_is_reachable_and_only_the_last_is_final(self):
        for table in (SEND_TRANSITIONS, RECV_TRANSITIONS, LOCAL_TRANSITIONS, link_module.TRANSITIONS):
            states = list(table)
            reached, todo = {states[0]}, [states[0]]
            while todo:
                for new in table[todo.pop()]:  # type: ignore[index]
                    if new not in reached:
                        reached.add(new)
                        todo.append(new)
            self.assertEqual(reached, set(states))
            self.assertEqual([s for s in states if not table[s]], [states[-1]])  # type: ignore[index]

    def test_architecture_doc_lists_the_transition_tables_of_the_code(self):
        text = (ROOT / "docs" / "architecture.md").read_text()
        documented = re.findall(r"^    (link|send|receive|local): (.+)$", text, re.MULTILINE)
        expected = [
            (name, line)
            for name, table in (
                ("link", link_module.TRANSITIONS),
                ("send", SEND_TRANSITIONS),
                ("receive", RECV_TRANSITIONS),
                ("local", LOCAL_TRANSITIONS),
            )
            for line in describe(table)  # type: ignore[arg-type]
        ]
        self.assertEqual(documented, expected)


class LinkStateTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.link = MemoryControlLink(self.clock, Keepalive())
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.session = Session(self.clock, RecordingDelegate(), is_server=True)

    def test_a_link_handshakes_opens_closes_and_is_closed(self):
        self.assertIs(self.link.state, LinkState.HANDSHAKING)
        self.link.dataReceived(wire.encode_json(FrameType.HELLO, {}))
        self.assertEqual([f.type for f in self.link.handshake], [FrameType.HELLO])
        self.link.start_session(self.session, False, wire.DEFAULT_MAX_FRAME)
        self.assertIs(self.link.state, LinkState.OPEN)
        self.link.lose()
        self.assertIs(self.link.state, LinkState.CLOSING)
        self.assertTrue(self.link.closing and self.transport.disconnecting)
        self.link.lose()  # twice is fine: still closing
        self.link.connectionLost()
        self.assertIs(self.link.state, LinkState.CLOSED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothing_is_read_once_closing(self):
        self.link.start_session(self.session, False, wire.DEFAULT_MAX_FRAME)
        self.link.abort()
        self.transport.clear()
        self.link.dataReceived(wire.encode_ping(1))
        self.assertEqual(self.transport.value(), b"")  # no PONG

    def test_a_session_cannot_start_on_a_closing_link(self):
        self.link.lose()
        with self.assertRaises(IllegalTransition):
            self.link.start_session(self.session, False, wire.DEFAULT_MAX_FRAME)

    def test_session_events_are_logged_through_the_link(self):
        events = []
        self.link.session_log = type("Log", (), {
            "info": lambda _, fmt, **kw: events.append(kw.get("event")),
            "debug": lambda _, fmt, **kw: events.append("debug"),
        })()
        session = Session(self.clock, RecordingDelegate(), True, SessionSettings(session_window_budget=1 * MiB))
        self.link.start_session(session, False, wire.DEFAULT_MAX_FRAME)
        session.pause_writing()
        self.link.dataReceived(wire.encode_ping(7) * 20_000)  # PONGs past the reply bound
        self.assertIn("link_backpressure", events)
