"""How the client process ends, seen as a supervisor sees it: exit status,
the server's view of the session, the pidfile of a daemon, and signals.

Real `twistd` processes on loopback (tests.test_processes' Process); each
wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import TWISTD, Process
from tests.harness import cert_fingerprint as _fingerprint
from tests.harness import clean_env as _clean_env
from tests.harness import free_port as _free_port
from tests.harness import plugins_installed as _plugins_installed

EXIT_TIMEOUT = 20.0


class ClientProcessTestCase(SynchronousTestCase):
    """A server process and helpers to start clients against it."""

    def setUp(self) -> None:
        reason = _plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-client-exit-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state_dir = self.workdir / "state"

    def start_server(self, *args: str) -> tuple[Process, int]:
        port = _free_port()
        server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(port),
             "--interface", "127.0.0.1", "--state-dir", str(self.state_dir), *args],
            self.workdir,
        )
        server.wait_for(r"Run on the client machine")
        return server, port

    def client_args(self, port: int, *args: str) -> list[str]:
        token = (self.state_dir / "token").read_text().strip()
        return [
            "-c", f"127.0.0.1:{port}", "--token", token,
            "--fingerprint", _fingerprint(self.state_dir / "server.crt"), *args,
        ]

    def start_client(self, port: int, *args: str, name: str = "client") -> Process:
        return Process(
            self, name, [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", *self.client_args(port, *args)],
            self.workdir,
        )

    def assertSessionEndedAtOnce(self, server: Process, client: Process) -> None:
        """The server ended the client's session because the client said
        goodbye (GOAWAY), not because its link dropped: no detached session
        kept for the resume grace."""
        session = client.wait_for(r"session (\w+) started").group(1)
        server.wait_for(rf"session {session} expired: the client stopped", timeout=10)
        self.assertNotIn(f"session {session} detached", server.output)


class FatalRefusalTests(ClientProcessTestCase):
    """A BIND the server refuses for good ends the client with status 2 and
    its session closed on the server (README "Port refused")."""

    def check_fatal_exit(self, server: Process, client: Process, reason: str) -> None:
        self.assertEqual(client.wait_exit(EXIT_TIMEOUT), 2, client.describe())
        self.assertIn(reason, client.output)
        self.assertNotIn("Traceback", client.output)
        self.assertSessionEndedAtOnce(server, client)

    def test_port_outside_allow_ports_exits_2_and_closes_the_session(self) -> None:
        server, port = self.start_server("--allow-ports", "5000-6000")
        client = self.start_client(port, "-f", "80", "-t", "3000")
        self.check_fatal_exit(server, client, "port 80 is not permitted on this server")

    def test_address_not_of_the_server_exits_2(self) -> None:
        server, port = self.start_server()
        client = self.start_client(port, "-f", f"10.1.2.3:{_free_port()}", "-t", "3000")
        self.check_fatal_exit(server, client, "10.1.2.3 is not an address of the server")

    def test_more_tunnels_than_max_tunnels_exits_2_though_one_was_bound(self) -> None:
        server, port = self.start_server("--max-tunnels", "1")
        client = self.start_client(port, "-f", "0", "-t", "3000", "-f", "0", "-t", "3001")
        self.check_fatal_exit(server, client, "at most 1 tunnels per session")
        self.assertIn("tunnel ready", client.output)  # the first one was bound, and is closed again


class DaemonTests(ClientProcessTestCase):
    """`twistd rtunnel-client` without --nodaemon, as an init script runs it."""

    def test_daemon_with_a_refused_port_ends_and_removes_its_pidfile(self) -> None:
        server, port = self.start_server("--allow-ports", "5000-6000")
        pidfile = self.workdir / "client.pid"
        logfile = self.workdir / "client-daemon.log"
        started = subprocess.run(
            [*TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "rtunnel-client",
             *self.client_args(port, "-f", "80", "-t", "3000")],
            cwd=self.workdir, env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )
        self.assertEqual(started.returncode, 0, started.stderr)
        deadline = time.monotonic() + EXIT_TIMEOUT
        pid = None
        while time.monotonic() < deadline:
            if pid is None and pidfile.exists():
                pid = int(pidfile.read_text().strip() or 0) or None
            if logfile.exists() and "Server Shut Down" in logfile.read_text() and not pidfile.exists():
                break
            time.sleep(0.05)
        log = logfile.read_text() if logfile.exists() else "(no log)"
        self.assertFalse(pidfile.exists(), f"the pidfile is left behind; the daemon's log:\n{log}")
        self.assertIn("port 80 is not permitted on this server", log)
        if pid is not None:  # the daemon is gone, not just its pidfile
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            self.assertFalse(_alive(pid), f"the daemon {pid} still runs; its log:\n{log}")
        session = re.search(r"session (\w+) started", log)
        assert session is not None, log
        server.wait_for(rf"session {session.group(1)} expired: the client stopped", timeout=10)

    def test_daemon_that_cannot_start_exits_1_with_the_reason_on_stderr_and_no_pidfile(self) -> None:
        server, port = self.start_server()
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        pidfile = self.workdir / "client.pid"
        done = subprocess.run(
            [*TWISTD, f"--pidfile={pidfile}", f"--logfile={self.workdir / 'client.log'}", "rtunnel-client",
             *self.client_args(port, "-f", "0", "-t", "3000", "--metrics", f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1")],
            cwd=self.workdir, env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )
        stderr = done.stderr.decode(errors="replace")
        self.assertEqual(done.returncode, 1, stderr)
        self.assertIn("cannot serve metrics on", stderr)  # twistd passes on 100 bytes of it
        time.sleep(0.5)  # the daemon's own exit follows its parent's
        self.assertFalse(pidfile.exists(), "a stale pidfile is left")
        self.assertIn("Address already in use", (self.workdir / "client.log").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purpose (its parent, init, reaps it)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True




# Two SIGTERMs before the reactor has stopped, delivered for certain: the
# handler of the first runs between the two os.kill calls
TWO_SIGTERMS = """
import os, signal, sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from rtunnel.tap import stop_once_on_signals
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
stop_once_on_signals(reactor)
def twice():
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
reactor.callWhenRunning(reactor.callLater, 0.1, twice)
reactor.run()
print("reactor stopped")
"""


class SignalTests(ClientProcessTestCase):
    def test_two_sigterms_stop_the_reactor_once_without_a_traceback(self) -> None:
        done = subprocess.run(
            [sys.executable, "-c", TWO_SIGTERMS], env=_clean_env(), cwd=self.workdir,
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )
        output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        self.assertIn("reactor stopped", output)
        self.assertEqual(output.count("Received SIGTERM"), 1, output)
        self.assertIn("already stopping", output)
        self.assertNotIn("Traceback", output)

    def test_client_stopped_by_two_quick_sigterms_exits_cleanly(self) -> None:
        """As `timeout` stops it: two SIGTERMs half a millisecond apart."""
        server, port = self.start_server()
        for run in range(3):
            client = self.start_client(port, "-f", "0", "-t", "3000", name=f"client{run}")
            client.wait_for("tunnel ready")
            os.kill(client.popen.pid, signal.SIGTERM)
            time.sleep(0.0005)
            os.kill(client.popen.pid, signal.SIGTERM)
            self.assertIn(client.wait_exit(EXIT_TIMEOUT), (0, -signal.SIGTERM), client.describe())
            self.assertNotIn("Traceback", client.output)
            self.assertIn("Server Shut Down.", client.output)
