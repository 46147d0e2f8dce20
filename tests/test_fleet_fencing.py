"""Fleet members as real processes (twistd rtunnel-server --fleet-etcd ...)
sharing a real etcd, with real clients and visitors on loopback: a member cut off from etcd is fenced before its lease expires
(docs/fleet.md, "Failures")."""

from __future__ import annotations

import socket
import time

from tests.etcd import PREFIX, FleetProcesses, etcd_get, scrape, start_cluster, wait
from tests.harness import BANNER, free_port, free_ports


class FleetFencingTests(FleetProcesses):
    # ------------------------------------------------------------ a member cut off from etcd

    def test_a_member_cut_off_from_etcd_is_fenced_before_its_lease_expires_and_its_tunnels_continue(self) -> None:
        nodes = start_cluster(self, self.workdir / "etcd")
        cut_node, others = nodes[0], nodes[1:]
        metrics = free_port()
        m1, p1 = self.start_member(1, [cut_node.url], metrics=metrics)  # it reaches etcd only through node 1
        m2, p2 = self.start_member(2, [n.url for n in others])
        public, other_public = free_ports(2)
        a1 = self.start_client(1, p1, "alice", public, "alice1")
        a1.wait_for(rf"tunnel ready: \S+:{public} ")
        lease_key = f"{PREFIX}members/m1"
        # a tunnelled connection open before the cut
        visitor = socket.create_connection(("127.0.0.1", public), timeout=10)
        self.addCleanup(visitor.close)
        self.assertEqual(visitor.recv(len(BANNER)), BANNER)
        visitor.sendall(b"before")
        self.assertEqual(visitor.recv(6), b"before")
        cut_node.pause()  # SIGSTOP: member 1's etcd stops answering; the other two keep the quorum
        self.addCleanup(cut_node.resume)
        cut_at = time.monotonic()
        fenced_at = expired_at = None
        deadline = time.monotonic() + 15
        while expired_at is None and time.monotonic() < deadline:
            if fenced_at is None and "is fenced" in m1.output:
                fenced_at = time.monotonic()
            if etcd_get(others[0].url, lease_key) is None:
                expired_at = time.monotonic()
            time.sleep(0.02)
        self.assertIsNotNone(fenced_at, f"member 1 never fenced: {m1.output}")
        self.assertIsNotNone(expired_at, "member 1's lease never expired at etcd")
        print(f"\nmember cut off from etcd: fenced after {fenced_at - cut_at:.2f} s, its lease expired "
              f"at etcd after {expired_at - cut_at:.2f} s")
        self.assertLess(fenced_at, expired_at)
        # existing tunnelled connection continues
        visitor.sendall(b"during")
        self.assertEqual(visitor.recv(6), b"during")
        # a new visitor is not accepted while fenced (it waits in the listen queue)
        waiting = socket.create_connection(("127.0.0.1", public), timeout=10)
        self.addCleanup(waiting.close)
        waiting.settimeout(1.0)
        with self.assertRaises(socket.timeout):
            waiting.recv(1)
        samples = scrape(f"http://127.0.0.1:{metrics}/metrics")
        self.assertEqual(samples[("rtunnel_fleet_fenced", (("member", "m1"),))], 1)
        self.assertGreater(samples[("rtunnel_fleet_etcd_errors_total", (("member", "m1"), ("op", "lease_keepalive")))], 0)
        self.assertEqual(samples[("rtunnel_fleet_members", (("member", "m1"),))], 2)
        # a new claim fails with the retryable error
        c1 = self.start_client(1, p1, "carol", other_public, "carol1")
        c1.wait_for(rf"refused to open port {other_public}: .*cannot reach etcd.*retrying in 5 s", 15)
        # etcd answers again: member 1 registers under a new lease and claims its port again
        cut_node.resume()
        wait(lambda: etcd_get(others[0].url, lease_key) is not None, 20, "member 1 registered again")
        wait(lambda: (self.claim(others[0].url, public) or {}).get("member") == "m1", 10, "the port claimed again")
        waiting.settimeout(10)
        self.assertEqual(waiting.recv(len(BANNER)), BANNER)  # the waiting visitor is served now
        visitor.sendall(b"after!")
        self.assertEqual(visitor.recv(6), b"after!")
        c1.wait_for(rf"tunnel ready: \S+:{other_public} ", 15)  # its retry succeeds
        self.assertNotIn("Traceback", m1.output)
        self.assertNotIn("Traceback", m2.output)

    def test_a_port_taken_by_another_credential_after_a_member_s_lease_expired_is_not_served_by_it_again(self) -> None:
        nodes = start_cluster(self, self.workdir / "etcd")
        cut_node, others = nodes[0], nodes[1:]
        m1, p1 = self.start_member(1, [cut_node.url])
        m2, p2 = self.start_member(2, [n.url for n in others])
        public = free_port()
        a1 = self.start_client(1, p1, "alice", public, "alice1")
        a1.wait_for(rf"tunnel ready: \S+:{public} ")
        cut_node.pause()
        self.addCleanup(cut_node.resume)
        wait(lambda: etcd_get(others[0].url, f"{PREFIX}members/m1") is None, 15, "member 1's lease expired")
        waiting = socket.create_connection(("127.0.0.1", public), timeout=10)  # queued at the fenced member
        self.addCleanup(waiting.close)
        b2 = self.start_client(2, p2, "bob", public, "bob2")  # the claim went with the lease: bob may take it
        b2.wait_for(rf"tunnel ready: \S+:{public} ", 15)
        self.visit("127.0.0.2", public)
        cut_node.resume()
        # member 1 registers again, finds bob's claim, and gives the port up instead of serving it
        a1.wait_for(rf"refused to open port {public}: .*held by another client now", 20)
        # bob's (a moment's absence is m2 renewing its own claims on a machine too loaded for its lease)
        wait(lambda: (self.claim(others[0].url, public) or {}).get("credential") == "bob", 15, "bob's claim")
        waiting.settimeout(10)
        try:
            got = waiting.recv(len(BANNER))
        except ConnectionResetError:
            got = b""
        self.assertEqual(got, b"")  # closed unserved: member 1 never acted as owner again
        # from now on member 1 serves bob's port as any member serves every tunnel: as an edge,
        # carrying its visitors to member 2 (never as the owner)
        m1.wait_for(rf"serving port {public} on default here for member m2", 15)
        self.visit("127.0.0.1", public)
        self.assertEqual(self.claim(others[0].url, public)["member"], "m2")
        self.assertNotIn("Traceback", m1.output)
