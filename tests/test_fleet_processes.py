"""Member links between real processes: three members on 127.0.0.1, .2 and
.3, each its own process (benchmarks/fleet_member.py: an rtunnel server
with member links whose directory is a JSON file, the test-only stand-in
for etcd), their certificates made by the installed `rtunnel_server
fleet-init` / `fleet-add-member`, and a real `rtunnel_client` process at
m1. A visitor at each member reaches the client's target; SIGKILL of the
home in the middle of a visitor's connection at an edge resets that
visitor, never ends it as if it were complete. (tests/test_fleet_links.py
has the in-process tests of every other behaviour.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import BANNER, TOKEN, TWISTD, Process, TargetServer, cert_fingerprint, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MEMBERS = {"m1": "127.0.0.1", "m2": "127.0.0.2", "m3": "127.0.0.3"}


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free on every loopback address just now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("0.0.0.0", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class FleetProcessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-procs-"))
        ca_dir = self.workdir / "ca"
        made = subprocess.run([BIN / "rtunnel_server", "fleet-init", "-s", ca_dir], capture_output=True, text=True)
        self.assertEqual(made.returncode, 0, made.stderr)
        ports = _free_ports(7)
        self.public_port = ports.pop()
        control = {m: ports.pop() for m in MEMBERS}
        links = {m: ports.pop() for m in MEMBERS}
        directory = self.workdir / "directory.json"
        directory.write_text(json.dumps({
            "endpoints": {m: f"tcp:host={address}:port={links[m]}" for m, address in MEMBERS.items()},
            "homes": [["default", self.public_port, "m1"]],
        }))
        self.members: dict[str, Process] = {}
        for member, address in MEMBERS.items():
            state = self.workdir / member
            issued = subprocess.run(
                [BIN / "rtunnel_server", "fleet-add-member", member, "-s", ca_dir, "--out", state],
                capture_output=True, text=True,
            )
            self.assertEqual(issued.returncode, 0, issued.stderr)
            self.members[member] = Process(self, member, [
                sys.executable, str(ROOT / "benchmarks" / "fleet_member.py"), "--member", member,
                "--address", address, "--control-port", str(control[member]), "--link-port", str(links[member]),
                "--state-dir", str(state), "--directory", str(directory), "--token", TOKEN,
            ], self.workdir)
        for process in self.members.values():
            process.wait_for("MEMBER READY")
        target = TargetServer()
        serve_in_thread(self, target)
        self.client = Process(self, "client", [
            *TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{control['m1']}",
            "-f", str(self.public_port), "-t", f"127.0.0.1:{target.server_address[1]}", "--token", TOKEN,
            "--fingerprint", cert_fingerprint(self.workdir / "m1" / "server.crt"),
        ], self.workdir)
        self.client.wait_for(rf"tunnel ready: \S+:{self.public_port} -> ")

    def connect(self, member: str) -> socket.socket:
        visitor = socket.create_connection((MEMBERS[member], self.public_port), timeout=20)
        self.addCleanup(visitor.close)
        banner = b""
        while len(banner) < len(BANNER):
            chunk = visitor.recv(len(BANNER) - len(banner))
            self.assertTrue(chunk, f"closed before the banner: {self.members[member].describe()}")
            banner += chunk
        self.assertEqual(banner, BANNER)
        return visitor

    def test_a_visitor_at_each_member_process_reaches_the_client_at_m1(self) -> None:
        for member in MEMBERS:
            visitor = self.connect(member)
            payload = os.urandom(200_000)
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)
            echoed = b""
            while chunk := visitor.recv(65536):
                echoed += chunk
            self.assertEqual(echoed, payload, member)

    def test_killing_the_home_resets_a_visitor_carried_from_an_edge(self) -> None:
        visitor = self.connect("m2")
        visitor.sendall(b"x" * 1000)
        echoed = b""
        while len(echoed) < 1000:
            echoed += visitor.recv(65536)
        os.kill(self.members["m1"].popen.pid, signal.SIGKILL)
        started = time.monotonic()
        with self.assertRaises(ConnectionResetError):  # not b"": a cut connection never looks complete
            while visitor.recv(65536):
                pass
        self.assertLess(time.monotonic() - started, 10)
        self.members["m2"].wait_for(r"member link to m1 down; visitors it carried \(reset\): 1")
