"""Fleet members as real processes (twistd rtunnel-server --fleet-etcd ...)
sharing a real etcd, with real clients and visitors on loopback: the
ownership rules across members, a member killed, a member cut off from
etcd (fenced before its lease expires), etcd restarted (docs/fleet.md,
"Failures")."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.etcd import SKIP_NO_ETCD, start_cluster, start_etcd
from tests.harness import (
    BANNER,
    TWISTD,
    Process,
    TargetServer,
    cert_fingerprint,
    free_port,
    plugins_installed,
    serve_in_thread,
)

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab", "carol": "carol-token-0123456789"}
PREFIX = "/rtunnel/"


def etcd_get(url: str, key: str) -> dict[str, Any] | None:
    """The JSON value of `key` (None if absent), read with urllib."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    request = urllib.request.Request(url + "/v3/kv/range", body, {"Content-Type": "application/json"})
    deadline = time.monotonic() + 5
    while True:  # a node answers 503 while the cluster elects a leader
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                kvs = json.loads(answer.read()).get("kvs", [])
            return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
        except urllib.error.HTTPError as e:
            if e.code < 500 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples at a /metrics URL: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def wait(predicate: Any, timeout: float, what: str, step: float = 0.02) -> float:
    """Poll until true; the time.monotonic() it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


class FleetProcessTests(SynchronousTestCase):
    """Two or three members on 127.0.0.1/.2/.3."""

    def setUp(self) -> None:
        if SKIP_NO_ETCD:
            raise SkipTest(SKIP_NO_ETCD)
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        target = self.target = TargetServer()
        serve_in_thread(self, target)
        self.target_port = target.server_address[1]

    def start_member(
        self, index: int, etcd_urls: list[str], ttl: int = 5, metrics: int | None = None,
    ) -> tuple[Process, int]:
        host = f"127.0.0.{index}"
        port = free_port()
        more = ["--metrics", f"tcp:{metrics}:interface={host}"] if metrics else []
        clients = [arg for name, token in TOKENS.items() for arg in ("--client", f"{name}={token}")]
        member = Process(
            self, f"member{index}",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(port), "--interface", host,
             "--public-host", host, "--state-dir", str(self.workdir / f"state{index}"), "--token", "unused-0123456789",
             *clients, "--fleet-etcd", ",".join(etcd_urls), "--fleet-member", f"m{index}",
             "--fleet-listen", f"tcp:{free_port()}:interface={host}", "--fleet-lease-ttl", str(ttl), *more],
            self.workdir,
        )
        member.wait_for(r"Run on the client machine:")
        return member, port

    def start_client(self, index: int, control: int, credential: str, public: int, name: str) -> Process:
        fingerprint = cert_fingerprint(self.workdir / f"state{index}" / "server.crt")
        return Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.{index}:{control}",
             "-f", str(public), "-t", str(self.target_port), "--token", TOKENS[credential],
             "--fingerprint", fingerprint],
            self.workdir,
        )

    def visit(self, host: str, port: int, payload: bytes = b"ping") -> bytes:
        with socket.create_connection((host, port), timeout=10) as visitor:
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := visitor.recv(65536):
                chunks.append(chunk)
        reply = b"".join(chunks)
        self.assertEqual(reply, BANNER + payload)
        return reply

    def claim(self, url: str, port: int) -> dict[str, Any] | None:
        return etcd_get(url, f"{PREFIX}claims/tcp/default/{port}")

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

    # ------------------------------------------------------------ a member cut off from etcd

    def test_a_member_cut_off_from_etcd_is_fenced_before_its_lease_expires_and_its_tunnels_continue(self) -> None:
        nodes = start_cluster(self, self.workdir / "etcd")
        cut_node, others = nodes[0], nodes[1:]
        metrics = free_port()
        m1, p1 = self.start_member(1, [cut_node.url], metrics=metrics)  # it reaches etcd only through node 1
        m2, p2 = self.start_member(2, [n.url for n in others])
        public, other_public = free_port(), free_port()
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

    # ------------------------------------------------------------ etcd restarted, a node killed

    def test_one_of_three_etcd_nodes_killed_loses_no_session_and_no_claim(self) -> None:
        nodes = start_cluster(self, self.workdir / "etcd")
        m1, p1 = self.start_member(1, [n.url for n in nodes])
        public = free_port()
        a1 = self.start_client(1, p1, "alice", public, "alice1")
        a1.wait_for(rf"tunnel ready: \S+:{public} ")
        before = self.claim(nodes[1].url, public)
        nodes[0].kill()
        time.sleep(6)  # more than the lease TTL
        self.assertEqual(self.claim(nodes[1].url, public), before)
        self.visit("127.0.0.1", public)
        self.assertEqual(a1.output.count("tunnel ready"), 1)  # never re-bound: the session was not lost
        self.assertNotIn("expired at etcd", m1.output)
        self.assertNotIn("is fenced", m1.output)

    def test_etcd_restarted_loses_no_session_and_no_claim(self) -> None:
        node = start_etcd(self, self.workdir / "etcd")
        m1, p1 = self.start_member(1, [node.url])
        public = free_port()
        a1 = self.start_client(1, p1, "alice", public, "alice1")
        a1.wait_for(rf"tunnel ready: \S+:{public} ")
        before = self.claim(node.url, public)
        node.stop()
        node.start()
        node.wait_healthy()
        time.sleep(6)  # more than the lease TTL
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
        self.assertEqual(self.claim(others[0].url, public)["credential"], "bob")
        waiting.settimeout(10)
        try:
            got = waiting.recv(len(BANNER))
        except ConnectionResetError:
            got = b""
        self.assertEqual(got, b"")  # closed unserved: member 1 never acted as owner again
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", public), timeout=5).close()
        self.assertNotIn("Traceback", m1.output)
