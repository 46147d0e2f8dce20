"""UDP tunnels (#16) with real programs: the installed rtunnel server and
client (twistd) and a real service behind the tunnel.

* Debian's dnsmasq as the DNS server, queried with dnspython through the
  server's public UDP port from many source ports at once: every answer is
  right and reaches the asker that asked.
* iperf3 -u at a fixed rate through a TCP tunnel (iperf3's control
  connection) and a UDP tunnel of the same port number (its datagrams):
  loss and jitter as iperf3 reports them (--json).

They skip, saying why, when the plugins, dnsmasq or iperf3 are missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rdatatype
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import TWISTD, Process, free_port, plugins_installed

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
IPERF3 = shutil.which("iperf3") or "/usr/bin/iperf3"
ASKERS = 40


def free_udp_and_tcp_port(other_than: int = 0) -> int:
    """A port number free for TCP (every address) and for UDP on 127.0.0.1."""
    for _ in range(50):
        port = free_port()
        if port == other_than:  # the kernel may hand out the port it just gave
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free for both TCP and UDP")


class UdpProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-udp-processes-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state_dir = self.workdir / "state"
        port = free_port()
        self.server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(port),
             "--interface", "127.0.0.1", "--state-dir", str(self.state_dir)],
            self.workdir,
        )
        self.server.wait_for(r"Run on the client machine:")
        self.control_port = port

    def start_client(self, *tunnel_args: str) -> Process:
        token = (self.state_dir / "token").read_text().strip()
        client = Process(
            self, "client",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{self.control_port}",
             "--token", token, "--trust-on-first-use", "--known-servers", str(self.workdir / "known"),
             *tunnel_args],
            self.workdir,
        )
        return client

    def start_dnsmasq(self, port: int) -> Process:
        records = [f"--host-record=asker{i}.example.test,10.9.{i // 200}.{i % 200 + 1}" for i in range(ASKERS)]
        dnsmasq = Process(
            self, "dnsmasq",
            [DNSMASQ, "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
             "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file=", "--log-queries",
             "--log-facility=-", "--address=/example.test/10.1.2.3", *records],
            self.workdir,
        )
        dnsmasq.wait_for(r"started, version")
        return dnsmasq

    def test_dnsmasq_behind_a_udp_tunnel_answers_each_of_many_askers_correctly(self) -> None:
        if not Path(DNSMASQ).exists():
            raise SkipTest(f"dnsmasq is not installed ({DNSMASQ} missing; apt-get install dnsmasq)")
        dns_port = free_udp_and_tcp_port()
        self.start_dnsmasq(dns_port)
        client = self.start_client("-f", "udp:0", "-t", f"udp:127.0.0.1:{dns_port}", "--udp-idle-timeout", "30")
        public = int(client.wait_for(r"tunnel ready: udp:\S+:(\d+) -> udp:127\.0\.0\.1:").group(1))
        askers = []
        for i in range(ASKERS):  # every query is out before any answer is read: concurrent flows
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(sock.close)
            sock.bind(("127.0.0.1", 0))
            query = dns.message.make_query(f"asker{i}.example.test", dns.rdatatype.A)
            sock.sendto(query.to_wire(), ("127.0.0.1", public))
            askers.append((sock, query))
        answers = {}
        deadline = time.monotonic() + 15
        for i, (sock, query) in enumerate(askers):
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            while True:
                try:
                    wire, source = sock.recvfrom(4096)
                except TimeoutError:
                    break
                self.assertEqual(source, ("127.0.0.1", public), "the answer comes from the public port")
                answers[i] = dns.message.from_wire(wire)
                break
            if i not in answers:  # UDP may lose one: ask once more, as a resolver would
                sock.sendto(query.to_wire(), ("127.0.0.1", public))
                sock.settimeout(5)
                wire, _ = sock.recvfrom(4096)
                answers[i] = dns.message.from_wire(wire)
        for i, (_, query) in enumerate(askers):
            answer = answers[i]
            self.assertEqual(answer.id, query.id, f"asker {i} got an answer to its own query")
            self.assertTrue(answer.flags & dns.flags.QR)
            (rrset,) = answer.answer
            self.assertEqual(rrset.name.to_text(), f"asker{i}.example.test.")
            self.assertEqual([r.address for r in rrset], [f"10.9.{i // 200}.{i % 200 + 1}"])
        wildcard = dns.message.make_query("anything.example.test", dns.rdatatype.A)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(wildcard.to_wire(), ("127.0.0.1", public))
            (rrset,) = dns.message.from_wire(sock.recvfrom(4096)[0]).answer
        self.assertEqual([r.address for r in rrset], ["10.1.2.3"])
        self.assertIn("UDP flow 1 from 127.0.0.1:", self.server.output, "the server logs each visitor")
        self.assertIn(f"UDP flow {ASKERS} from 127.0.0.1:", client.output, "and so does the client")
        self.assertNotIn("Traceback", client.output + self.server.output)

    def test_iperf3_udp_at_a_fixed_rate_through_the_tunnel_reports_loss_and_jitter(self) -> None:
        if not Path(IPERF3).exists():
            raise SkipTest(f"iperf3 is not installed ({IPERF3} missing; apt-get install iperf3)")
        target = free_udp_and_tcp_port()
        Process(self, "iperf3-server", [IPERF3, "-s", "-1", "-B", "127.0.0.1", "-p", str(target)], self.workdir)
        public = free_udp_and_tcp_port(other_than=target)
        # iperf3's control connection is TCP, its datagrams UDP, on the same port number
        client = self.start_client(
            "-f", f"127.0.0.1:{public}", "-t", f"127.0.0.1:{target}",
            "-f", f"udp:127.0.0.1:{public}", "-t", f"udp:127.0.0.1:{target}",
        )
        client.wait_for(rf"tunnel ready: udp:127\.0\.0\.1:{public} -> ")
        client.wait_for(rf"tunnel ready: 127\.0\.0\.1:{public} -> ")
        time.sleep(0.2)
        run = subprocess.run(
            [IPERF3, "-c", "127.0.0.1", "-p", str(public), "-u", "-b", "20M", "-l", "1200", "-t", "3",
             "--json"],
            capture_output=True, timeout=40,
        )
        report = json.loads(run.stdout or b"{}")
        self.assertEqual(run.returncode, 0, f"iperf3 failed: {report.get('error')} {run.stderr!r}")
        received = report["end"]["sum"]
        loss, jitter = received["lost_percent"], received["jitter_ms"]
        mbits = received["bits_per_second"] / 1e6
        print(f"\niperf3 -u -b 20M -l 1200 through the tunnel: {mbits:.1f} Mbit/s, loss {loss:.2f} %, "
              f"jitter {jitter:.3f} ms, {received['packets']} datagrams")
        self.assertGreater(received["packets"], 5000)
        self.assertLess(loss, 5.0, "at 20 Mbit/s on loopback the tunnel loses (almost) nothing")
        self.assertLess(jitter, 20.0)
