"""A fleet of real `rtunnel_server --fleet-etcd` processes, wired as the
README runs it: three members on 127.0.0.1/.2/.3 sharing one real etcd,
each with its member links (certificates from the fleet CA), a real
`rtunnel_client`; a visitor at every member reaches the client's tunnel;
SIGKILL of the home with the client behind a real haproxy moves the client
to another member and the port is served fleet-wide again (the time from
the kill is printed and bounded: 10 s, docs/fleet.md "Failures")."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Any

from twisted.trial.unittest import SkipTest

from tests.chromium import CHROMIUM, chromium_missing
from tests.etcd import (
    PREFIX,
    SKIP_NO_HAPROXY,
    TOKENS,
    FleetProcesses,
    etcd_get,
    scrape,
    start_etcd,
    start_haproxy,
    wait,
)
from tests.harness import BANNER, TWISTD, PageReader, Process, cert_fingerprint, free_port, free_ports

FAILOVER_TARGET = 10.0  # seconds from the kill to the port served at every surviving member


class FleetWiringTests(FleetProcesses):
    def try_visit(self, host: str, port: int, payload: bytes = b"ping", timeout: float = 2.0) -> bool:
        """One visitor at host:port: True if it got the target's banner and its
        payload echoed, then a clean end (bytes both ways)."""
        try:
            with socket.create_connection((host, port), timeout=timeout) as visitor:
                visitor.settimeout(timeout)
                visitor.sendall(payload)
                visitor.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := visitor.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return False
        return b"".join(chunks) == BANNER + payload

    def api(self, index: int, admin: int, path: str) -> dict[str, Any]:
        token = (self.workdir / f"state{index}" / "admin-token").read_text().strip()
        request = urllib.request.Request(f"http://127.0.0.{index}:{admin}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())

    def test_a_visitor_at_each_of_three_member_processes_reaches_a_client_at_one_of_them(self) -> None:
        node = start_etcd(self, self.workdir / "etcd")
        chosen = free_ports(6)
        admin, metrics = {i: chosen[i - 1] for i in (1, 2, 3)}, {i: chosen[i + 2] for i in (1, 2, 3)}
        members = [
            self.start_member(i, [node.url], metrics=metrics[i], more=("--admin", f"tcp:{admin[i]}:interface=127.0.0.{i}"))
            for i in (1, 2, 3)
        ]
        for member, _ in members:
            member.wait_for(r"member links on tcp:\d+:interface=127\.0\.0\.\d, serving")
        public = free_port()
        client = self.start_client(1, members[0][1], "alice", public, "alice")
        client.wait_for(rf"tunnel ready: \S+:{public} ")
        self.assertEqual(self.claim(node.url, public)["member"], "m1")
        for index in (1, 2, 3):  # the edges learn the claim from their watch: at most a moment later
            payload = f"visitor at member {index} ".encode() * 1000
            wait(lambda index=index, payload=payload: self.try_visit(f"127.0.0.{index}", public, payload),
                 10, f"a visitor at member {index} served")
        members[1][0].wait_for(rf"serving port {public} .*for member m1|serving .*{public}.* here for member m1")
        self.check_operations(admin, metrics, public)
        self.check_status_page(admin, public)
        # a clean stop (SIGTERM) of a member with member links: it shuts down whole and leaves the fleet
        for index, (member, _) in enumerate(members[1:], 2):
            member.popen.terminate()
            self.assertIn(member.wait_exit(), (0, -signal.SIGTERM), member.describe())  # twistd ends by the signal
            self.assertIn("Server Shut Down.", member.output)
            self.assertNotIn("Traceback", member.output)
            self.assertIsNone(etcd_get(node.url, f"{PREFIX}members/m{index}"))
        self.assertTrue(self.try_visit("127.0.0.1", public))

    def check_operations(self, admin: dict[int, int], metrics: dict[int, int], public: int) -> None:
        """The admin API and the metrics show the fleet (docs/admin.md, docs/metrics.md "Fleet metrics")."""
        fleet = self.api(2, admin[2], "/api/fleet")
        self.assertEqual(fleet["member"], "m2")
        self.assertFalse(fleet["fenced"])
        self.assertEqual([m["name"] for m in fleet["members"]], ["m1", "m2", "m3"])
        self.assertEqual([m["name"] for m in fleet["members"] if m["this"]], ["m2"])
        claim = {c["key"]: c for c in fleet["claims"]}[f"claims/tcp/default/{public}"]
        self.assertEqual((claim["home"], claim["credential"], claim["here"]), ("m1", "alice", False))
        self.assertEqual(fleet["edge_names"], [{"name": f"port {public} on default", "home": "m1", "listening": True}])
        self.assertGreaterEqual(fleet["visitors"]["to_home"]["m1"], 1)
        self.assertGreater({row["member"]: row for row in fleet["member_links"]}["m1"]["bytes_out"], 0)
        page = self.api(1, admin[1], "/api/sessions")
        self.assertEqual(page["fleet"]["member"], "m1")
        self.assertTrue({c["key"]: c for c in page["fleet"]["claims"]}[f"claims/tcp/default/{public}"]["here"])
        self.assertGreaterEqual(page["fleet"]["visitors"]["from_edge"]["m2"], 1)
        edge = scrape(f"http://127.0.0.2:{metrics[2]}/metrics")
        home = scrape(f"http://127.0.0.1:{metrics[1]}/metrics")
        for peer in ("m1", "m2", "m3"):
            self.assertEqual(edge[("rtunnel_fleet_member_up", (("member", "m2"), ("peer", peer)))], 1)
        self.assertEqual(edge[("rtunnel_fleet_edge_names", (("home", "m1"), ("member", "m2")))], 1)
        self.assertEqual(edge[("rtunnel_fleet_forwarded_visitors", (("member", "m2"),))], 0)
        self.assertGreaterEqual(edge[("rtunnel_fleet_visitors_forwarded_total", (("home", "m1"),))], 1)
        self.assertGreater(edge[("rtunnel_fleet_member_link_bytes_total", (("direction", "out"), ("member", "m1")))], 0)
        self.assertGreaterEqual(home[("rtunnel_fleet_visitors_received_total", (("edge", "m2"),))], 1)
        self.assertEqual(home[("rtunnel_fleet_claims", (("holder", "m1"), ("member", "m1")))], 1)
        self.assertGreater(home[("rtunnel_fleet_etcd_calls_total", (("member", "m1"), ("op", "txn")))], 0)
        self.assertIn(("rtunnel_fleet_etcd_latency_seconds_count", (("member", "m1"), ("op", "txn"))), home)

    def check_status_page(self, admin: dict[int, int], public: int) -> None:
        """The status page of an edge member shows the fleet (headless Chromium, when installed)."""
        if chromium_missing():
            return  # the API checks above stand; the page needs Debian's chromium
        token = (self.workdir / "state2" / "admin-token").read_text().strip()
        profile = self.workdir / "chromium"
        home = profile / "home"
        home.mkdir(parents=True)
        dumped = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile / 'data'}", "--dump-dom",
             "--virtual-time-budget=3000", f"http://127.0.0.2:{admin[2]}/?token={token}"],
            capture_output=True, timeout=60, start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"},
        )
        self.assertEqual(dumped.returncode, 0, dumped.stderr[-2000:])
        page = PageReader()
        page.feed(dumped.stdout.decode())
        self.assertEqual(page.attrs("data-member", "tr"), ["m1", "m2", "m3"])
        self.assertEqual(page.attrs("data-claim", "tr"), [f"claims/tcp/default/{public}"])
        self.assertIn("Fleet: member m2", page.texts("name"))

    def test_sigkill_of_the_home_behind_haproxy_moves_the_client_and_the_port_is_served_fleet_wide_again(self) -> None:
        if SKIP_NO_HAPROXY:
            raise SkipTest(SKIP_NO_HAPROXY)
        node = start_etcd(self, self.workdir / "etcd")
        first, p1 = self.start_member(1, [node.url])
        shared = self.workdir / "state1"  # one server certificate for the three (the client pins it)
        members = {1: (first, p1)}
        for index in (2, 3):
            members[index] = self.start_member(index, [node.url], server_identity=shared)
        haproxy, front = start_haproxy(self, self.workdir, [f"127.0.0.{i}:{members[i][1]}" for i in (1, 2, 3)])
        public = free_port()
        client = Process(self, "client", [
            *TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{front}",
            "-f", str(public), "-t", str(self.target_port), "--token", TOKENS["alice"],
            "--fingerprint", cert_fingerprint(shared / "server.crt"),
        ], self.workdir)
        client.wait_for(rf"tunnel ready: \S+:{public} ")
        home = int(self.claim(node.url, public)["member"][1:])
        for index in (1, 2, 3):
            wait(lambda index=index: self.try_visit(f"127.0.0.{index}", public), 10, f"a visitor at member {index}")
        killed = time.monotonic()
        members[home][0].popen.send_signal(signal.SIGKILL)
        survivors = [i for i in (1, 2, 3) if i != home]
        served = {
            index: wait(lambda index=index: self.try_visit(f"127.0.0.{index}", public, timeout=1.0),
                        FAILOVER_TARGET + 5, f"a visitor at member {index} after the kill", step=0.05) - killed
            for index in survivors
        }
        new_home = self.claim(node.url, public)["member"]
        print(f"\nSIGKILL of home m{home}: the client moved to {new_home} through haproxy; port {public} "
              + ", ".join(f"served at m{i} after {t:.2f} s" for i, t in served.items()))
        self.assertIn(new_home, {f"m{i}" for i in survivors})
        self.assertLess(max(served.values()), FAILOVER_TARGET)
        client.wait_for(rf"tunnel ready: \S+:{public} (.*\n)+.*tunnel ready: \S+:{public} ")
        self.assertEqual(client.popen.poll(), None)
        self.assertNotIn("Traceback", haproxy.output)


class MemberStartFailureTests(FleetProcesses):
    def test_a_member_without_its_certificate_or_with_its_member_link_port_taken_does_not_start_and_says_why(self) -> None:
        node = start_etcd(self, self.workdir / "etcd")
        self.member_files(1)
        (self.workdir / "state1" / "m1.crt").unlink()
        member = self.start_member_process(1, [node.url], free_port())
        self.assertEqual(member.wait_exit(), 1, member.describe())
        self.assertIn("member m1 has no certificate in", member.output)
        self.assertIsNone(etcd_get(node.url, f"{PREFIX}members/m1"))  # it never joined
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.2", 0))
        taken.listen(1)
        self.member_files(2)
        member = self.start_member_process(2, [node.url], taken.getsockname()[1])
        self.assertEqual(member.wait_exit(), 1, member.describe())
        self.assertRegex(member.output, r"cannot listen for member links on --fleet-listen tcp:\d+:interface=127\.0\.0\.2")
        self.assertNotIn("Choose another --port/--listen", member.output)
        wait(lambda: etcd_get(node.url, f"{PREFIX}members/m2") is None, 3, "m2's lease revoked at once")

    def start_member_process(self, index: int, urls: list[str], link_port: int) -> Process:
        host = f"127.0.0.{index}"
        return Process(self, f"member{index}", [
            *TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(free_port()), "--interface", host,
            "--public-host", host, "--state-dir", str(self.workdir / f"state{index}"), "--token", "unused-0123456789",
            "--fleet-etcd", ",".join(urls), "--fleet-member", f"m{index}",
            "--fleet-listen", f"tcp:{link_port}:interface={host}",
        ], self.workdir)
