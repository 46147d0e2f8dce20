"""Datagrams in the sans-IO mux (rtunnel.mux.Session.send_datagram; docs/udp.md):
now or never. A datagram is written at once or dropped with a reason; it
takes no stream credit, is not a reliable frame, is never replayed; while
the link is backed up at most a small bound of them is written."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rtunnel import wire
from rtunnel.mux import SessionSettings
from rtunnel.wire import FrameType
from tests.memory import C2S, S2C, ManualTimers, Pair


class DatagramTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pair = Pair(clock=ManualTimers())
        self.pair.pump()

    def test_datagrams_go_both_ways_in_order_and_take_no_credit_or_reliable_slot(self) -> None:
        pair = self.pair
        server_end, client_end = pair.open()
        for n in range(50):
            self.assertIsNone(pair.server.send_datagram(1, 7, b"q%d" % n, ("198.51.100.7", 5353) if n == 0 else None))
        self.assertIsNone(pair.client.send_datagram(1, 7, b"answer"))
        self.assertEqual(pair.server.queued_reliable, 1)  # the OPEN only (not yet acknowledged)
        pair.pump()
        got = pair.client_delegate.datagrams
        self.assertEqual([d.payload for d in got], [b"q%d" % n for n in range(50)])
        self.assertEqual(got[0].address, ("198.51.100.7", 5353))
        self.assertTrue(all(d.address is None for d in got[1:]))
        self.assertEqual(pair.server_delegate.datagrams, [wire.Datagram(1, 7, None, b"answer")])
        self.assertEqual(pair.client.reliable.received, 1, "only the OPEN counts as a reliable frame")
        (entry,) = pair.client.resume_state().streams
        self.assertEqual((entry.stream_id, entry.received), (server_end.stream.id, 0), "no stream bytes counted")
        self.assertEqual(client_end.received, b"")

    def test_a_backed_up_link_takes_a_bounded_share_of_datagrams_then_drops_them(self) -> None:
        pair = self.pair
        settings = pair.server.settings
        pair.server.pause_writing()
        reasons: dict[str | None, int] = {}
        for flow in range(8):
            for _ in range(100):
                why = pair.server.send_datagram(1, flow, bytes(1200))
                reasons[why] = reasons.get(why, 0) + 1
        written = pair.in_flight(S2C)
        self.assertLessEqual(pair.server.datagram_backlog, settings.datagram_backlog)
        self.assertLess(written, settings.datagram_backlog + 800 * 40)  # the bound, plus frame heads
        self.assertGreater(reasons["backlog"], 0)
        self.assertGreater(reasons["flow_backlog"], 0, "one flow cannot take the whole share")
        self.assertEqual(reasons[None] * 1200, pair.server.datagram_backlog)
        pair.server.resume_writing()  # drained: the share is free again
        self.assertEqual(pair.server.datagram_backlog, 0)
        self.assertIsNone(pair.server.send_datagram(1, 0, b"again"))

    def test_without_a_link_datagrams_are_dropped_and_not_replayed_on_resume(self) -> None:
        pair = self.pair
        self.assertIsNone(pair.server.send_datagram(1, 1, b"before"))
        pair.sever()  # "before" was in flight: lost with the link
        self.assertEqual(pair.server.send_datagram(1, 1, b"during"), "link_down")
        self.assertEqual(pair.client.send_datagram(1, 1, b"during"), "link_down")
        epoch = pair.server.link_epoch
        pair.connect(resuming=True)
        self.assertEqual(pair.server.link_epoch, epoch + 1, "a new link: flows tell their address again")
        self.assertEqual(pair.server.send_datagram(1, 1, b"mid-resume"), "link_down")
        pair.pump()
        self.assertIsNone(pair.server.send_datagram(1, 1, b"after"))
        pair.pump()
        self.assertEqual([d.payload for d in pair.client_delegate.datagrams], [b"after"])
        self.assertEqual(pair.frames_of(S2C, FrameType.DATAGRAM)[-1].body[8:], b"after")
        self.assertEqual(len(pair.frames_of(C2S, FrameType.DATAGRAM)), 0)

    def test_a_datagram_over_the_peers_frame_limit_is_dropped_as_too_big(self) -> None:
        pair = Pair(SessionSettings(max_frame=wire.MIN_MAX_FRAME), clock=ManualTimers())
        pair.pump()
        largest = wire.max_datagram_payload(wire.MIN_MAX_FRAME)
        self.assertEqual(pair.server.send_datagram(1, 1, bytes(largest + 1)), "too_big")
        self.assertIsNone(pair.server.send_datagram(1, 1, bytes(largest), ("2001:db8::7", 9)))
        pair.pump()
        self.assertEqual(len(pair.client_delegate.datagrams[0].payload), largest)

    def test_held_datagrams_go_to_the_link_in_one_write_in_order_each_accepted_or_dropped_at_once(self) -> None:
        pair = self.pair
        link = pair.server_link
        writes: list[int] = []
        write, write_frame = link.write, link.write_frame

        def counted_write(frame: bytes) -> None:
            writes.append(len(frame))
            write(frame)

        def counted_write_frame(header: bytes, payload: bytes) -> None:
            writes.append(len(header) + len(payload))
            write_frame(header, payload)

        link.write, link.write_frame = counted_write, counted_write_frame  # type: ignore[method-assign]
        pair.server.hold_datagrams()  # one read of a UDP socket
        for n in range(8):
            self.assertIsNone(pair.server.send_datagram(1, 3, b"d%d" % n, ("192.0.2.9", 53) if n == 0 else None))
        self.assertEqual(pair.server.send_datagram(1, 3, bytes(70000)), "too_big", "decided at once, held or not")
        self.assertEqual(writes, [], "nothing is written while held")
        big = bytes(20000)  # a large one is written unjoined, after those held before it
        self.assertIsNone(pair.server.send_datagram(1, 3, big))
        self.assertIsNone(pair.server.send_datagram(1, 3, b"last"))
        pair.server.release_datagrams()
        self.assertEqual(len(writes), 3, "the eight held, the large one, the last")
        self.assertIsNone(pair.server.send_datagram(1, 3, b"not held"))
        self.assertEqual(len(writes), 4, "after release_datagrams each datagram is written at once again")
        pair.pump()
        got = pair.client_delegate.datagrams
        self.assertEqual([d.payload for d in got], [b"d%d" % n for n in range(8)] + [big, b"last", b"not held"])
        self.assertEqual(got[0].address, ("192.0.2.9", 53))
