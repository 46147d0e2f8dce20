"""Fleet members as real processes (twistd rtunnel-server --fleet-etcd ...)
sharing a real etcd, with real clients and visitors on loopback: the ownership rules across members, a member killed, etcd restarted or one node of three killed
(docs/fleet.md, "Failures")."""

from __future__ import annotations

import signal
import time

from tests.etcd import PREFIX, FleetProcesses, etcd_get, start_cluster, start_etcd, wait
from tests.harness import free_port


class FleetMemberTests(FleetProcesses):
    # ------------------------------------------------------------ ownership across members

    def test_ownership_rules_hold_across_two_members_and_a_killed_member_s_port_comes_back(self) -> None:
        node = start_etcd(self, self.workdir / "etcd")
        m1, p1 = self.start_member(1, [node.url])
        m2, p2 = self.start_member(2, [node.url])
        public = free_port()
        a1 = self.start_client(1, p1, "alice", public, "alice1")
        a1.wait_for(rf"tunnel ready: \S+:{public} ")
        self.visit("127.0.0.1", public)
        self.assertEqual(self.claim(node.url, public)["member"], "m1")
        # another credential on another member: in_use (retried), never the port
        b2 = self.start_client(2, p2, "bob", public, "bob2")
        b2.wait_for(rf"refused to open port {public}: port {public} on 127\.0\.0\.2 is held by another client")
        self.assertEqual(self.claim(node.url, public)["credential"], "alice")
        b2.stop()
        # the same credential's newer session on member 2 takes it over; the first is told
        a2 = self.start_client(2, p2, "alice", public, "alice2")
        a2.wait_for(rf"tunnel ready: \S+:{public} ")
        a1.wait_for(rf"port {public} is not ours now: .*taken over by a newer session")
        self.assertEqual(self.claim(node.url, public)["member"], "m2")
        self.visit("127.0.0.2", public)
        a2.stop()  # its session ends: the claim goes at once
        wait(lambda: self.claim(node.url, public) is None, 10, "the claim freed after alice2 stopped")
        # alice1 keeps asking (every 5 s) and gets it back on member 1
        a1.wait_for(rf"tunnel ready: \S+:{public} .*(\n.*)*tunnel ready: \S+:{public} ", 15)
        self.assertEqual(self.claim(node.url, public)["member"], "m1")
        # SIGKILL of member 1: alice reconnecting to member 2 gets the port at once (same credential)
        killed = time.monotonic()
        m1.popen.send_signal(signal.SIGKILL)
        a3 = self.start_client(2, p2, "alice", public, "alice3")
        a3.wait_for(rf"tunnel ready: \S+:{public} ")
        self.visit("127.0.0.2", public)
        served = time.monotonic() - killed
        # and member 1's lease expires: its member key goes within the TTL
        gone = wait(lambda: etcd_get(node.url, f"{PREFIX}members/m1") is None, 10, "m1's member key gone") - killed
        print(f"\nSIGKILL of the home member: port served again at member 2 after {served:.2f} s "
              f"(a new client process included); m1's lease expired after {gone:.2f} s")
        self.assertLess(served, 10.0)
        self.assertLess(gone, 5 + 1.5)
        self.assertEqual(self.claim(node.url, public)["member"], "m2")
        self.assertNotIn("Traceback", m2.output)

    # ------------------------------------------------------------ etcd restarted, a node killed

    def test_one_of_three_etcd_nodes_killed_loses_no_session_and_no_claim(self) -> None:
        nodes = start_cluster(self, self.workdir / "etcd")
        # the default TTL (5 s): with 3 s a loaded machine can fence the member for a
        # moment while its keepalive moves to a live node (no session is lost either way)
        m1, p1 = self.start_member(1, [n.url for n in nodes], ttl=5)
        public = free_port()
        a1 = self.start_client(1, p1, "alice", public, "alice1")
        a1.wait_for(rf"tunnel ready: \S+:{public} ")
        before = self.claim(nodes[1].url, public)
        nodes[0].kill()
        time.sleep(6)  # more than the lease TTL (5 s)
        self.assertEqual(self.claim(nodes[1].url, public), before)
        self.visit("127.0.0.1", public)
        self.assertEqual(a1.output.count("tunnel ready"), 1)  # never re-bound: the session was not lost
        self.assertNotIn("expired at etcd", m1.output)
        self.assertNotIn("is fenced", m1.output)

    def test_etcd_restarted_loses_no_session_and_no_claim(self) -> None:
        node = start_etcd(self, self.workdir / "etcd")
        m1, p1 = self.start_member(1, [node.url], ttl=3)
        public = free_port()
        a1 = self.start_client(1, p1, "alice", public, "alice1")
        a1.wait_for(rf"tunnel ready: \S+:{public} ")
        before = self.claim(node.url, public)
        node.stop()
        node.start()
        node.wait_healthy()
        time.sleep(4)  # more than the lease TTL (3 s)
        self.assertEqual(self.claim(node.url, public), before)
        self.visit("127.0.0.1", public)
        self.assertEqual(a1.output.count("tunnel ready"), 1)
        self.assertNotIn("expired at etcd", m1.output)
        # a clean stop (SIGTERM) revokes the lease: the member's claims go at once, not after the TTL
        stopped = time.monotonic()
        m1.popen.terminate()
        m1.wait_exit()
        freed = wait(lambda: self.claim(node.url, public) is None, 10, "the claim freed by the clean stop") - stopped
        self.assertIsNone(etcd_get(node.url, f"{PREFIX}members/m1"))
        self.assertLess(freed, 3.0)

