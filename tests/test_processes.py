"""The installed twistd plugins, run as real processes on loopback.

These tests start `twistd --nodaemon --pidfile= rtunnel-server ...` and
`... rtunnel-client ...` with the interpreter running the tests (TWISTD
below: `python -m twisted` would be `twist`, not `twistd`), each in its own empty working
directory, so they exercise the *installed* copy of rtunnel (the one
`pip install .` put in site-packages), its plugin registration, its command
line, its log output and its exit codes -- what a user sees. They skip when
the plugins are not installed for this interpreter.

Each test bounds every wait with a short timeout and kills whatever it started
in its cleanups.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import free_port

# twistd, run by this interpreter whatever scripts are on PATH
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
START_TIMEOUT = 30.0  # an interpreter start plus Twisted and cryptography imports
EXIT_TIMEOUT = 20.0
BANNER = b"hello from the target\n"


def _clean_env() -> dict[str, str]:
    """Our environment, minus what would make a child use another rtunnel copy."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "RTUNNEL_TOKEN"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


_plugins_checked: str | None = None  # "" when installed, else the reason to skip


def _plugins_installed() -> str:
    """'' when `twistd --help` of this interpreter lists both plugins, else why not."""
    global _plugins_checked
    if _plugins_checked is None:
        _plugins_checked = _check_plugins()
    return _plugins_checked


def _check_plugins() -> str:
    argv = [*TWISTD, "--help"]
    cwd = tempfile.mkdtemp(prefix="rtunnel-plugin-check-")
    try:
        out = subprocess.run(
            argv, cwd=cwd, env=_clean_env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run twistd with {sys.executable}: {e}"
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    text = out.stdout.decode(errors="replace")
    missing = [name for name in ("rtunnel-server", "rtunnel-client") if name not in text]
    if missing:
        return (
            f"the twistd plugins {', '.join(missing)} are not installed for {sys.executable} "
            "('twistd --help' does not list them); run 'pip install .' first"
        )
    return ""


def _free_port() -> int:
    """A port free for the scripts' default dual-stack `::` bind too."""
    return free_port()


def _fingerprint(cert_path: Path) -> str:
    """Hex SHA-256 of the certificate's DER form, as the server prints it."""
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    return hashlib.sha256(der).hexdigest()


class Process:
    """One child process whose stdout and stderr go to a log file."""

    def __init__(
        self, test: SynchronousTestCase, name: str, argv: list[str], workdir: Path,
        pass_fds: tuple[int, ...] = (), extra_env: dict[str, str] | None = None,
    ) -> None:
        """Start `argv`; the child inherits the descriptors `pass_fds` and
        our environment (less what would pick another rtunnel) plus `extra_env`."""
        self.name = name
        self.argv = argv
        cwd = workdir / f"{name}-cwd"
        cwd.mkdir(exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env={**_clean_env(), **(extra_env or {})}, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds,
        )
        test.addCleanup(self.stop)

    @property
    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def describe(self) -> str:
        state = "running" if self.popen.poll() is None else f"exited with {self.popen.returncode}"
        return f"{self.name} ({state}); its output:\n{self.output}"

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of `pattern` in the output, waiting while the process runs."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output)
            if match:
                return match
            if self.popen.poll() is not None:
                match = regex.search(self.output)  # a last look: it may have just written it
                if match:
                    return match
                raise AssertionError(f"{pattern!r} never appeared: {self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} did not appear within {timeout:.0f} s: {self.describe()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f} s: {self.describe()}") from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


class _BannerEcho(socketserver.BaseRequestHandler):
    """Says BANNER, then echoes until the peer half-closes, then closes."""

    server: _TargetServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        count = 0
        try:
            sock.sendall(BANNER)
            while data := sock.recv(65536):
                sock.sendall(data)
                count += len(data)
            self.server.eofs.append(count)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _TargetServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _BannerEcho)
        self.eofs: list[int] = []  # bytes echoed, for each visitor whose EOF arrived


def serve_in_thread(test: Any, server: socketserver.BaseServer) -> None:
    """Run a socketserver in a daemon thread until `test`'s cleanup stops it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    test.addCleanup(stop)


class InstalledPluginTests(SynchronousTestCase):
    """rtunnel-server and rtunnel-client as a user runs them."""

    def setUp(self) -> None:
        reason = _plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-processes-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state_dir = self.workdir / "state"

    # ------------------------------------------------------------ helpers

    def start_server(self, port: int | None = None, name: str = "server") -> tuple[Process, int]:
        port = port or _free_port()
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
        return _fingerprint(self.state_dir / "server.crt")

    def start_client(self, control_port: int, *args: str, name: str = "client") -> Process:
        return Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client",
             "-c", f"127.0.0.1:{control_port}", *args],
            self.workdir,
        )

    def start_target(self) -> int:
        target = self.target = _TargetServer()
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
        client = self.start_client(_free_port(), "-f", "0", "-t", "9", "--token", "x")
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
