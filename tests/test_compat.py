"""Wire compatibility across versions: this tree's server with the client of
an earlier commit, and the reverse, as real processes on loopback.

The earlier code is `git archive`d from this repository's history
(PROTOCOL_BASELINE: main before the restructure of #13, whose wire protocol
every later version must keep speaking) into a temporary directory and run
with PYTHONPATH pointing at it; the twistd plugin file is the installed one
(it only names `rtunnel.tap.server` / `rtunnel.tap.client`, which then load
from that directory). Each test pushes bytes both ways through a tunnel,
severs the control link in the middle of a visitor's connection, and checks
that the session resumes and the visitor's bytes arrive whole and in order.

Skips when this is not a git checkout holding the baseline commit.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import (
    BANNER,
    TWISTD,
    Process,
    TargetServer,
    cert_fingerprint,
    clean_env,
    free_port,
    plugins_installed,
    serve_in_thread,
)

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_BASELINE = "f7b1d32"  # main before #13's restructure (2026-12-03)
TOKEN = "compat-test-token-0123456789"


def _baseline_tree(into: Path) -> str | None:
    """Extract PROTOCOL_BASELINE's rtunnel package into `into`; why not, if it cannot."""
    if shutil.which("git") is None:
        return "git is not installed"
    check = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{PROTOCOL_BASELINE}^{{commit}}"],
        capture_output=True,
    )
    if check.returncode != 0:
        return f"commit {PROTOCOL_BASELINE} is not in this checkout's history (a shallow clone?)"
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", PROTOCOL_BASELINE, "rtunnel"],
        capture_output=True,
    )
    if archive.returncode != 0:
        return f"git archive failed: {archive.stderr.decode(errors='replace').strip()}"
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return None


class SeverableProxy(socketserver.ThreadingTCPServer):
    """A TCP relay to `upstream` whose live connections `sever()` cuts at once
    (both sockets closed), as a dropped link does; new ones pass again."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Relay)

    def sever(self) -> None:
        with self.lock:
            live, self.live = self.live, []
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class _Relay(socketserver.BaseRequestHandler):
    server: SeverableProxy

    def handle(self) -> None:
        try:
            upstream = socket.create_connection(self.server.upstream, timeout=10)
        except OSError:
            return
        upstream.settimeout(None)
        with self.server.lock:
            self.server.live += [self.request, upstream]

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        other = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
        other.start()
        pump(self.request, upstream)
        other.join(60)


class CompatibilityTests(SynchronousTestCase):
    """Each end of this tree against the other end of PROTOCOL_BASELINE."""

    def setUp(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-compat-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.old = self.workdir / "baseline"
        self.old.mkdir()
        reason = _baseline_tree(self.old)
        if reason:
            raise SkipTest(f"no earlier version to test against: {reason}")
        self.state_dir = self.workdir / "state"
        where = subprocess.run(
            [sys.executable, "-c", "import rtunnel.tap.server; print(rtunnel.__file__)"],
            env={**clean_env(), **self.old_env()}, capture_output=True, text=True, timeout=60,
        )
        self.assertTrue(Path(where.stdout.strip()).is_relative_to(self.old), where.stdout + where.stderr)

    def old_env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.old)}

    def start_server(self, old: bool) -> int:
        port = free_port()
        server = Process(
            self, "old-server" if old else "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(port),
             "--interface", "127.0.0.1", "--state-dir", str(self.state_dir), "--token", TOKEN],
            self.workdir, extra_env=self.old_env() if old else None,
        )
        server.wait_for(r"rtunnel_client -c \S+")
        self.server = server
        return port

    def start_client(self, old: bool, control_port: int, target_port: int) -> tuple[Process, int]:
        public = free_port()
        client = Process(
            self, "old-client" if old else "client",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{control_port}",
             "-f", f"127.0.0.1:{public}", "-t", f"127.0.0.1:{target_port}", "--token", TOKEN,
             "--fingerprint", cert_fingerprint(self.state_dir / "server.crt"), "--max-retry-delay", "1"],
            self.workdir, extra_env=self.old_env() if old else None,
        )
        client.wait_for(r"tunnel ready")
        return client, public

    def check_one_version_with_the_other(self, old_server: bool) -> None:
        """Bytes both ways through a tunnel, across a severed control link."""
        target = TargetServer()
        serve_in_thread(self, target)
        self.target = target
        control = self.start_server(old=old_server)
        proxy = SeverableProxy(("127.0.0.1", control))
        serve_in_thread(self, proxy)
        client, public = self.start_client(not old_server, proxy.server_address[1], target.server_address[1])
        first, second = bytes(range(256)) * 800, b"after the resume " * 6000
        with socket.create_connection(("127.0.0.1", public), timeout=30) as visitor:
            received = bytearray()

            def read_at_least(n: int) -> None:
                while len(received) < n:
                    chunk = visitor.recv(65536)
                    if not chunk:
                        return
                    received.extend(chunk)

            visitor.sendall(first)
            read_at_least(len(BANNER) + len(first))
            proxy.sever()
            client.wait_for(r"session resumed")
            visitor.sendall(second)
            visitor.shutdown(socket.SHUT_WR)
            read_at_least(len(BANNER) + len(first) + len(second) + 1)
        self.assertEqual(bytes(received[: len(BANNER)]), BANNER)
        echoed = bytes(received[len(BANNER):])
        self.assertEqual(
            hashlib.sha256(echoed).hexdigest(), hashlib.sha256(first + second).hexdigest(),
            f"{len(echoed)} bytes echoed of {len(first) + len(second)} sent",
        )
        deadline = time.monotonic() + 10
        while not target.eofs and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(target.eofs, [len(first) + len(second)])
        for process in (self.server, client):
            self.assertNotIn("Traceback", process.output, process.describe())

    def test_client_of_the_baseline_with_this_server(self) -> None:
        self.check_one_version_with_the_other(old_server=False)

    def test_this_client_with_the_server_of_the_baseline(self) -> None:
        self.check_one_version_with_the_other(old_server=True)
