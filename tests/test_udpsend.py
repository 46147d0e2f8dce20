"""rtunnel.udpsend: a run of datagrams in one system call, delivered as the
same datagrams (real sockets on loopback)."""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Sequence

from twisted.trial import unittest

from rtunnel.udpsend import MAX_SEGMENTS, BatchSender, can_segment


class Pair:
    """A receiving socket and a sending one connected to it."""

    def __init__(self) -> None:
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.bind(("127.0.0.1", 0))
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.rx.settimeout(2)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx.connect(self.rx.getsockname())
        self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.drops: Counter[str] = Counter()

    def dropped(self, reason: str, datagrams: Sequence[bytes]) -> None:
        self.drops[reason] += len(datagrams)

    def receive(self, count: int) -> list[bytes]:
        return [self.rx.recv(70000) for _ in range(count)]

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


def mixed_datagrams() -> list[bytes]:
    """Runs of equal sizes, shorter last ones, empty ones, single ones."""
    sizes = [1200] * 10 + [700] + [64] * 3 + [0, 0] + [1200, 1200, 1199] + [9000] * 5 + [1] + [512] * (MAX_SEGMENTS + 7)
    return [os.urandom(size) for size in sizes]


class BatchSenderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.pair = Pair()
        self.addCleanup(self.pair.close)

    def check_delivery(self, sender: BatchSender) -> None:
        datagrams = mixed_datagrams()
        sent = sender.send_batch(self.pair.tx, datagrams, self.pair.dropped)
        self.assertEqual(sent, len(datagrams))
        self.assertEqual(self.pair.receive(len(datagrams)), datagrams)
        self.assertEqual(self.pair.drops, Counter())

    def test_every_datagram_arrives_alone_in_order_with_its_own_boundaries(self) -> None:
        self.check_delivery(BatchSender())

    def test_without_gso_the_same_datagrams_arrive_one_send_each(self) -> None:
        sender = BatchSender(gso=False)
        self.check_delivery(sender)
        self.assertEqual(sender.syscalls, len(mixed_datagrams()))

    def test_a_run_of_equal_datagrams_takes_one_system_call_with_gso(self) -> None:
        if not can_segment():
            raise unittest.SkipTest("this kernel has no UDP GSO (UDP_SEGMENT)")
        sender = BatchSender()
        datagrams = [os.urandom(1200) for _ in range(40)] + [os.urandom(300)]
        self.assertEqual(sender.send_batch(self.pair.tx, datagrams, self.pair.dropped), 41)
        self.assertEqual(sender.syscalls, 1)
        self.assertEqual(self.pair.receive(41), datagrams)

    def test_an_oversized_datagram_in_a_run_is_dropped_as_too_big_and_the_rest_arrive(self) -> None:
        datagrams = [b"a" * 100, b"b" * 100, bytes(65508), b"c" * 100]
        sent = BatchSender().send_batch(self.pair.tx, datagrams, self.pair.dropped)
        self.assertEqual(sent, 3)
        self.assertEqual(self.pair.drops, Counter({"too_big": 1}))
        self.assertEqual(self.pair.receive(3), [b"a" * 100, b"b" * 100, b"c" * 100])

    def test_datagrams_to_a_port_nobody_listens_on_are_counted_as_refused(self) -> None:
        self.pair.rx.close()  # the port answers ICMP port unreachable from now on
        sender = BatchSender()
        sender.send_batch(self.pair.tx, [b"x" * 10], self.pair.dropped)  # its ICMP makes the next send fail
        sent = sender.send_batch(self.pair.tx, [b"y" * 10] * 4, self.pair.dropped)
        self.assertEqual(sent + self.pair.drops["refused"], 4)
        self.assertGreater(self.pair.drops["refused"], 0)

    def test_an_unconnected_socket_sends_a_run_to_the_address_given(self) -> None:
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(tx.close)
        datagrams = [os.urandom(1000) for _ in range(12)]
        sent = BatchSender().send_batch(tx, datagrams, self.pair.dropped, self.pair.rx.getsockname())
        self.assertEqual(sent, 12)
        self.assertEqual(self.pair.receive(12), datagrams)
