"""No secret in any log line, log file, output or error.

The secrets: the server's token (its state dir's `token`), the admin token
(`admin-token`), a clients-file client's token (printed once by add-client,
on purpose: that is a command's output, not a log) and every session's
resume secret. The process tests run real servers and clients (twistd with
the interpreter running the tests, as tests/test_processes.py does) the ways
the README shows -- in the foreground, as a daemon with --logfile, with the
JSON observer -- let a client connect with the command the server printed,
push bytes through, let a wrong token fail, and then read every byte those
processes wrote and every log file: the secrets, read from the state dir,
appear nowhere. The in-process test drops and resumes a link (the secret
crosses the wire in HELLO) and renders every log event as text and JSON.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet import defer
from twisted.logger import formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from rtunnel.logs import JSON_OBSERVER, create_private_log_file, event_as_json, twistd_log_file
from rtunnel.tap import server as tap_server
from tests.harness import (
    START_TIMEOUT,
    TOKEN,
    TWISTD,
    Echo,
    LogCapture,
    Tunnel,
    Visitor,
    clean_env,
    free_port,
    listen_target,
    visit,
    wait_until,
    with_timeout,
)

COMMAND = r"Run on the client machine:\s+(rtunnel_client [^\n]*--fingerprint sha256:[0-9a-f]{64})"


def plugins_or_skip() -> None:
    names = {getattr(p, "tapname", None) for p in getPlugins(IServiceMaker)}
    if not {"rtunnel-server", "rtunnel-client"} <= names:
        raise SkipTest("the rtunnel twistd plugins are not installed for this interpreter; run 'pip install .'")


def umask_022() -> None:
    """The usual login umask: what twistd would create a log file with."""
    os.umask(0o022)


class Child:
    """A process whose standard output and error go to one file."""

    def __init__(self, test: SynchronousTestCase, workdir: Path, name: str, argv: list[str]) -> None:
        self.path = workdir / f"{name}.out"
        self._out = open(self.path, "wb")
        self.popen = subprocess.Popen(
            argv, cwd=workdir, env=clean_env(), stdin=subprocess.DEVNULL, stdout=self._out,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=umask_022,
        )
        test.addCleanup(self.stop)

    @property
    def output(self) -> str:
        return self.path.read_bytes().decode(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._out.close()


def wait_for_text(read: Any, pattern: str, timeout: float = START_TIMEOUT) -> Any:
    import re

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, read())
        if match:
            return match
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} did not appear within {timeout:.0f} s in:\n{read()}")


def visit_echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


class EchoTarget:
    """A local echo service in a thread, for the client's -t."""

    def __init__(self, test: SynchronousTestCase) -> None:
        import socketserver
        import threading

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        self.port = server.server_address[1]

        def stop() -> None:
            server.shutdown()
            server.server_close()

        test.addCleanup(stop)


class NoSecretInProcessOutputTests(SynchronousTestCase):
    """Real processes, every log mode: the secrets never reach a log."""

    def setUp(self) -> None:
        plugins_or_skip()
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-secrets-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state = self.workdir / "state"
        self.port = free_port()
        self.target = EchoTarget(self)

    def server_args(self, *extra: str) -> list[str]:
        return [
            "rtunnel-server", "--port", str(self.port), "--interface", "127.0.0.1",
            "--state-dir", str(self.state), "--admin", str(free_port()), *extra,
        ]

    def secrets(self, names: tuple[str, ...] = ("token", "admin-token")) -> dict[str, str]:
        """The secrets in the state dir, by file name."""
        found = {name: (self.state / name).read_text().strip() for name in names}
        for name, value in found.items():
            self.assertGreaterEqual(len(value), 20, f"{name} looks too short to be a real secret")
        return found

    def run_printed_command(self, command: str, name: str, *twistd_options: str) -> Child:
        """Run the client command the server printed, as printed, but with a
        free public port and our echo target."""
        argv = shlex.split(command)
        self.assertEqual(argv[0], "rtunnel_client")
        forward = argv.index("-f") + 1
        argv[forward] = argv[forward].rpartition(":")[0] + ":0" if ":" in argv[forward] else "0"
        argv[argv.index("-t") + 1] = f"127.0.0.1:{self.target.port}"
        return Child(
            self, self.workdir, name,
            [*TWISTD, "--nodaemon", "--pidfile=", *twistd_options, "rtunnel-client", *argv[1:]],
        )

    def use_the_tunnel(self, client: Child) -> None:
        ready = r'tunnel ready: \S+:(\d+) -> |"event": "tunnel_ready".*"port": (\d+)'
        public = int(next(filter(None, wait_for_text(lambda: client.output, ready).groups())))
        self.assertEqual(visit_echo(public, b"x" * 300_000), b"x" * 300_000)

    def wrong_token(self, command: str) -> None:
        argv = shlex.split(command)
        at = argv.index("--token-file") if "--token-file" in argv else argv.index("--token")
        argv[at : at + 2] = ["--token", "not-the-token-at-all"]
        wrong = self.run_printed_command(shlex.join(argv), "wrong")
        self.assertEqual(wrong.popen.wait(START_TIMEOUT), 2, wrong.output)

    def assertNoSecret(self, secrets: dict[str, str], *texts: tuple[str, str]) -> None:
        for where, text in texts:
            self.assertTrue(text, f"{where} is empty: the test would prove nothing")
            for name, value in secrets.items():
                self.assertNotIn(value, text, f"the {name} appears in {where}")

    def test_foreground_first_start_prints_where_the_token_is_and_never_a_secret(self) -> None:
        server = Child(self, self.workdir, "server", [*TWISTD, "--nodaemon", "--pidfile=", *self.server_args()])
        command = wait_for_text(lambda: server.output, COMMAND).group(1)
        self.assertIn(f"--token-file {self.state / 'token'} ", command)
        self.assertIn("(new, mode 600); it is never logged", server.output)
        client = self.run_printed_command(command, "client")
        self.use_the_tunnel(client)
        self.wrong_token(command)
        wait_for_text(lambda: server.output, "authentication failed")
        client.stop()
        server.stop()
        self.assertNoSecret(self.secrets(), ("the server's output", server.output), ("the client's output", client.output))

    def test_daemon_log_file_is_0600_and_holds_no_secret(self) -> None:
        log = self.workdir / "server.log"
        pidfile = self.workdir / "server.pid"
        launcher = Child(
            self, self.workdir, "launcher",
            [*TWISTD, "--pidfile", str(pidfile), "--logfile", str(log), *self.server_args()],
        )
        self.assertEqual(launcher.popen.wait(START_TIMEOUT), 0, launcher.output)
        self.addCleanup(self.kill_daemon, pidfile)
        command = wait_for_text(lambda: log.read_text() if log.exists() else "", COMMAND).group(1)
        self.assertEqual(stat.S_IMODE(log.stat().st_mode), 0o600)
        client = self.run_printed_command(command, "client")
        self.use_the_tunnel(client)
        self.wrong_token(command)
        wait_for_text(log.read_text, "authentication failed")
        client.stop()
        self.kill_daemon(pidfile)
        wait_for_text(log.read_text, "Server Shut Down")
        self.assertNoSecret(
            self.secrets(), ("the log file", log.read_text()), ("the client's output", client.output),
        )
        self.assertNotIn("Traceback", launcher.output + log.read_text())

    def kill_daemon(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def test_json_logs_and_a_clients_file_client_hold_no_secret(self) -> None:
        clients = self.workdir / "clients.toml"
        added = subprocess.run(
            [sys.executable, "-c", "import sys; from rtunnel.scripts import server_main; sys.argv[0] = 'rtunnel_server'; server_main()",
             "add-client", "alice", "--ports", "1024-65535", "--bind", "127.0.0.1", "--clients", str(clients),
             "--state-dir", str(self.state), "--server", f"127.0.0.1:{self.port}"],
            env=clean_env(), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(added.returncode, 0, added.stderr)
        alice = next(line.strip() for line in added.stdout.splitlines() if line.startswith("    ") and " " not in line.strip())
        server = Child(
            self, self.workdir, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", f"--logger={JSON_OBSERVER}",
             *self.server_args("--clients", str(clients))],
        )
        listening = wait_for_text(lambda: server.output, r'"event": "server_listening".*')
        self.assertIn("--token TOKEN", listening.group(0))
        self.assertIn("add-client", listening.group(0))
        [command] = [line.strip() for line in added.stdout.splitlines() if "rtunnel_client" in line]
        self.assertIn(" -f 127.0.0.1:1024 ", command)  # alice may bind only 127.0.0.1
        # no certificate yet when add-client ran: it says where the fingerprint will come from
        self.assertIn("FINGERPRINT: there is no server certificate in", added.stdout)
        fingerprint = wait_for_text(lambda: server.output, r"sha256:[0-9a-f]{64}").group(0)
        command = command.replace("--fingerprint FINGERPRINT", f"--fingerprint {fingerprint}")
        client = self.run_printed_command(command, "client", f"--logger={JSON_OBSERVER}")
        self.use_the_tunnel(client)
        self.wrong_token(command)
        wait_for_text(lambda: server.output, '"event": "auth_failed"')
        client.stop()
        server.stop()
        secrets = {**self.secrets(("admin-token",)), "token of client alice": alice}
        self.assertFalse((self.state / "token").exists(), "with --clients alone the server makes no token")
        self.assertNoSecret(secrets, ("the server's JSON log", server.output), ("the client's output", client.output))


class NoSecretInEventsTests(TestCase):
    """In process: the session secret crosses the wire on every resume, and
    the token on every connection; neither is in any event's text or JSON."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_resumed_session_logs_neither_its_secret_nor_the_token(self) -> Any:
        events = LogCapture(self).events
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        [public] = yield tunnel.connect([(0, target)])
        [session] = tunnel.server.sessions.values()
        reply, _ = yield with_timeout(visit(public, Visitor(b"before")), 10)
        self.assertEqual(reply, b"before")
        client = tunnel.client_service.client
        link = client.link
        link.transport.abortConnection()  # the client resumes with the session's secret
        yield wait_until(lambda: any(e.get("event") == "session_resumed" for e in events), 20)
        reply, _ = yield with_timeout(visit(public, Visitor(b"after")), 10)
        self.assertEqual(reply, b"after")
        yield tunnel.stop_server()
        self.assertGreater(len(events), 10)
        rendered = "\n".join(formatEvent(e) + event_as_json(e) for e in events)
        self.assertIn("session_resumed", rendered)
        for name, value in (("session secret", session.secret), ("token", TOKEN)):
            self.assertNotIn(value, rendered, f"the {name} was logged")


class NoSecretInErrorsTests(SynchronousTestCase):
    def test_a_malformed_client_option_does_not_echo_its_token(self) -> None:
        for value in ("s3cr3t-t0ken-value", "=s3cr3t-t0ken-value", "default=s3cr3t-t0ken-value"):
            options = tap_server.Options()
            with self.assertRaises(usage.UsageError) as caught:
                options.parseOptions(["--client", value])
            self.assertNotIn("s3cr3t-t0ken-value", str(caught.exception))
            self.assertIn("NAME=TOKEN", str(caught.exception))


class PrivateLogFileTests(SynchronousTestCase):
    """twistd opens its log file before it sets a daemon's umask: the server
    makes the file first, 0600, and twistd keeps that mode (rotations too)."""

    def test_the_log_file_twistd_will_open(self) -> None:
        self.assertEqual(twistd_log_file({"logfile": "/var/log/r.log", "nodaemon": True}), "/var/log/r.log")
        self.assertEqual(twistd_log_file({"logfile": None, "nodaemon": False}), "twistd.log")
        self.assertIsNone(twistd_log_file({"logfile": None, "nodaemon": True}))  # standard output
        self.assertIsNone(twistd_log_file({"logfile": "-", "nodaemon": True}))
        self.assertIsNone(twistd_log_file({"logfile": "r.log", "logger": JSON_OBSERVER}))
        self.assertIsNone(twistd_log_file({"logfile": "r.log", "syslog": True}))
        self.assertIsNone(twistd_log_file(None))

    def test_made_0600_whatever_the_umask_and_an_existing_file_is_left_alone(self) -> None:
        from twisted.python.logfile import LogFile

        workdir = Path(tempfile.mkdtemp(prefix="rtunnel-logfile-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        path = workdir / "server.log"
        old = os.umask(0o022)
        try:
            self.assertTrue(create_private_log_file(str(path)))
            log = LogFile.fromFullPath(str(path), rotateLength=10)
            log.write("a line longer than ten bytes\n")
            log.rotate()
            log.write("another\n")
            log.close()
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE((workdir / "server.log.1").stat().st_mode), 0o600)
        os.chmod(path, 0o640)
        self.assertFalse(create_private_log_file(str(path)))
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o640)
        self.assertFalse(create_private_log_file(str(workdir / "no" / "such" / "dir.log")))
