"""The installed twistd plugins, run as real processes on loopback.

These tests start `twistd --nodaemon --pidfile= rtunnel-server ...` and
`... rtunnel-client ...` with the interpreter running the tests (TWISTD
in tests/harness.py: `python -m twisted` would be `twist`, not `twistd`), each in its own empty working
directory, so they exercise the *installed* copy of rtunnel (the one
`pip install .` put in site-packages), its plugin registration, its command
line, its log output and its exit codes -- what a user sees. They skip when
the plugins are not installed for this interpreter.

Each test bounds every wait with a short timeout and kills whatever it started
in its cleanups.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import (
    BANNER,
    START_TIMEOUT,
    TWISTD,
    Process,
    TargetServer,
    cert_fingerprint,
    free_port,
    plugins_installed,
    serve_in_thread,
)


class InstalledPluginTests(SynchronousTestCase):
    """rtunnel-server and rtunnel-client as a user runs them."""

    def setUp(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-processes-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state_dir = self.workdir / "state"

    # ------------------------------------------------------------ helpers

    def start_server(self, port: int | None = None, name: str = "server") -> tuple[Process, int]:
        port = port or free_port()
        server = Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server",
             "--port", str(port), "--interface", "127.0.0.1", "--state-dir", str(self.state_dir)],
            self.workdir,
        )
        server.wait_for(r"Run on the client machine:\s+rtunnel_client .*--fingerprint sha256:[0-9a-f]{64}")
        return server, port

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.state_dir / "server.crt")

    def start_client(self, control_port: int, *args: str, name: str = "client") -> Process:
        return Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client",
             "-c", f"127.0.0.1:{control_port}", *args],
            self.workdir,
        )

    def start_target(self) -> int:
        target = self.target = TargetServer()
        serve_in_thread(self, target)
        return target.server_address[1]

    def tunnel_port(self, client: Process) -> int:
        return int(client.wait_for(r"tunnel ready: \S+:(\d+) -> ").group(1))

    def exchange(self, port: int, payload: bytes, timeout: float = 20.0) -> bytes:
        """Visit 127.0.0.1:port: send payload, half-close, read everything to EOF.

        Returns what came back after the target's banner (the echo).
        """
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as visitor:
            chunks: list[bytes] = []
            problems: list[str] = []

            def read() -> None:
                try:
                    while chunk := visitor.recv(65536):
                        chunks.append(chunk)
                except OSError as e:
                    problems.append(repr(e))

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)
            reader.join(timeout + 1)
        reply = b"".join(chunks)
        if problems or reader.is_alive():
            self.fail(
                f"visitor sent {len(payload)} bytes and half-closed; it got {len(reply)} bytes back "
                f"(banner included) and then {problems or ['no EOF']}; the target saw EOF after "
                f"echoing {self.target.eofs or 'nothing'}"
            )
        self.assertEqual(reply[: len(BANNER)], BANNER)
        return reply[len(BANNER) :]

    def assertNoTraceback(self, process: Process) -> None:
        self.assertNotIn("Traceback", process.output, process.describe())

    def assertCleanExit(self, process: Process, code: int) -> None:
        """A clean stop on SIGTERM: twistd logs its shutdown, no traceback, and exits 0.

        twistd (Twisted >= 21.2) re-raises the signal that stopped it once it
        has shut down cleanly, so that its parent sees how it ended; that
        death by SIGTERM (-15 here, 143 in a shell) is a clean exit too.
        """
        self.assertIn(code, (0, -signal.SIGTERM), process.describe())
        self.assertIn("Server Shut Down.", process.output)
        self.assertNoTraceback(process)

    # ------------------------------------------------------------ tests

    def test_server_prints_the_client_command_with_its_fingerprint(self) -> None:
        server, port = self.start_server()
        fp = self.fingerprint
        line = server.wait_for(r"rtunnel_client -c \S+ .*").group(0)
        self.assertIn(f":{port} ", line)
        self.assertIn(f"--fingerprint sha256:{fp}", line)
        # the token is never logged: the command names the file that holds it
        self.assertIn(f"--token-file {self.state_dir / 'token'} ", line)
        self.assertNotIn(self.token, server.output)
        self.assertIn(f"rtunnel_client -c 127.0.0.1:{port} ", line)  # the address it listens on
        self.assertIn(f"certificate fingerprint sha256:{fp}", server.output)
        self.assertEqual(
            sorted(p.name for p in self.state_dir.iterdir()), ["server.crt", "server.key", "token"]
        )
        self.assertEqual(os.stat(self.state_dir / "server.key").st_mode & 0o077, 0)
        self.assertEqual(os.stat(self.state_dir / "token").st_mode & 0o077, 0)

    def test_bytes_go_through_the_tunnel_both_ways(self) -> None:
        target = self.start_target()
        server, port = self.start_server()
        client = self.start_client(
            port, "-f", "0", "-t", str(target), "--token", self.token, "--fingerprint", self.fingerprint
        )
        public = self.tunnel_port(client)
        payload = os.urandom(256 * 1024 + 17)  # past the initial 256 KiB window
        self.assertEqual(self.exchange(public, payload), payload)
        self.assertEqual(self.exchange(public, b"second visitor"), b"second visitor")
        server.wait_for(rf"tunnel bound: \S+:{public} ")
        self.assertNoTraceback(server)
        self.assertNoTraceback(client)

    def test_wrong_token_exits_2_with_a_clear_message(self) -> None:
        server, port = self.start_server()
        client = self.start_client(
            port, "-f", "0", "-t", "9", "--token", "not-the-token", "--fingerprint", self.fingerprint
        )
        self.assertEqual(client.wait_exit(), 2, client.describe())
        self.assertIn("wrong token", client.output)
        self.assertNoTraceback(client)
        server.wait_for(r"authentication failed.*wrong token")
        self.assertIsNone(server.popen.poll(), "a bad client must not stop the server")

    def test_wrong_fingerprint_exits_2_naming_both_fingerprints(self) -> None:
        server, port = self.start_server()
        wrong = "0" * 64
        client = self.start_client(
            port, "-f", "0", "-t", "9", "--token", self.token, "--fingerprint", f"sha256:{wrong}"
        )
        self.assertEqual(client.wait_exit(), 2, client.describe())
        self.assertIn(f"sha256:{self.fingerprint}", client.output)
        self.assertIn(f"sha256:{wrong}", client.output)
        self.assertNoTraceback(client)
        self.assertIsNone(server.popen.poll(), "a bad client must not stop the server")

    def test_client_without_fingerprint_or_ca_refuses_and_says_how_to_get_it(self) -> None:
        client = self.start_client(free_port(), "-f", "0", "-t", "9", "--token", "x")
        code = client.wait_exit()
        self.assertNotEqual(code, 0, client.describe())
        output = client.output
        self.assertIn("--fingerprint", output)
        self.assertIn("--ca", output)
        # it says where the fingerprint comes from
        self.assertTrue("server prints" in output or "sha256sum" in output, output)
        self.assertNoTraceback(client)

    def test_sigterm_stops_the_server_cleanly_and_the_client_retries(self) -> None:
        target = self.start_target()
        server, port = self.start_server()
        client = self.start_client(
            port, "-f", "0", "-t", str(target), "--token", self.token,
            "--fingerprint", self.fingerprint, "--max-retry-delay", "1",
        )
        self.tunnel_port(client)
        server.popen.send_signal(signal.SIGTERM)
        self.assertCleanExit(server, server.wait_exit(10))

        # The server is gone: the client keeps trying, it does not give up.
        client.wait_for(r"cannot reach the rtunnel server at 127\.0\.0\.1:\d+: .*retrying", 15)
        self.assertIsNone(client.popen.poll(), client.describe())

        # Same state dir (same key and token): the client gets a tunnel again.
        self.start_server(port, name="server2")
        log_before = len(client.output)
        deadline = time.monotonic() + START_TIMEOUT
        while "tunnel ready" not in client.output[log_before:]:
            self.assertLess(time.monotonic(), deadline, client.describe())
            self.assertIsNone(client.popen.poll(), client.describe())
            time.sleep(0.05)
        public = int(re.findall(r"tunnel ready: \S+:(\d+) -> ", client.output)[-1])
        self.assertEqual(self.exchange(public, b"after the restart"), b"after the restart")

        client.popen.send_signal(signal.SIGTERM)
        self.assertCleanExit(client, client.wait_exit(10))
