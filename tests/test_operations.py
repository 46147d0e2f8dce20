"""Running rtunnel as a service: JSON logs, --max-retries, socket activation,
twistd's privilege drop, SIGHUP with nothing to reload (docs/operations.md).

The process tests run the console scripts of the interpreter running the
tests (`.venv/bin/rtunnel_server`, installed by `pip install .`) and skip
when they are not installed; each bounds its waits and kills what it started.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from rtunnel.errors import ConfigError, StateDirError
from rtunnel.link import Keepalive
from rtunnel.logs import (
    JSON_OBSERVER,
    TEXT_OBSERVER,
    event_as_json,
    json_observer,
    text_observer,
)
from rtunnel.scripts import twistd_argv
from rtunnel.systemd import check_inherited_socket
from rtunnel.tap import client as tap_client
from tests.harness import (
    BANNER,
    TWISTD,
    LogCapture,
    Process,
    TargetServer,
    Tunnel,
    cert_fingerprint,
    clean_env,
    free_port,
    plugins_installed,
    serve_in_thread,
    wait_until,
    with_timeout,
)

BIN = Path(sys.executable).parent
SERVER = BIN / "rtunnel_server"
CLIENT = BIN / "rtunnel_client"
NO_FINGERPRINT = "sha256:" + "0" * 64


def _scripts_or_skip() -> None:
    missing = [str(p) for p in (SERVER, CLIENT) if not p.exists()]
    if missing:
        raise SkipTest(f"{', '.join(missing)} not installed for this interpreter; run 'pip install .' first")


def _events(text: str) -> list[dict[str, Any]]:
    """Every line of a --log-format json output, parsed (a line that is not
    JSON fails the test)."""
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}\nwhole output:\n{text}") from None
    return events


def _named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


def _visit(port: int, payload: bytes, timeout: float = 20.0) -> bytes:
    """Send `payload` to 127.0.0.1:port, half-close, return what came back
    after the echo target's banner."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as visitor:
        chunks: list[bytes] = []
        reader = threading.Thread(
            target=lambda: chunks.extend(iter(lambda: visitor.recv(65536), b"")), daemon=True
        )
        reader.start()
        visitor.sendall(payload)
        visitor.shutdown(socket.SHUT_WR)
        reader.join(timeout)
    reply = b"".join(chunks)
    assert reply.startswith(BANNER), f"no banner from the target through the tunnel: {reply[:100]!r}"
    return reply[len(BANNER) :]


class _Processes(SynchronousTestCase):
    """A work directory, an echo target and helpers for process tests."""

    def setUp(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-operations-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state_dir = self.workdir / "state"

    def start_target(self) -> int:
        target = TargetServer()
        serve_in_thread(self, target)
        return target.server_address[1]

    def start_client(self, port: int, target: int) -> int:
        """rtunnel_client to the server on `port`, forwarding a port the
        server picks to `target`; returns that public port once ready."""
        client = Process(
            self, "client",
            [str(CLIENT), "-c", f"127.0.0.1:{port}", "-f", "0", "-t", f"127.0.0.1:{target}",
             "--token", self.token, "--fingerprint", self.fingerprint],
            self.workdir,
        )  # fmt: skip
        return int(client.wait_for(r"tunnel ready: \S+:(\d+) -> ").group(1))

    @property
    def token(self) -> str:
        return (self.state_dir / "token").read_text().strip()

    @property
    def fingerprint(self) -> str:
        return "sha256:" + cert_fingerprint(self.state_dir / "server.crt")


# ---------------------------------------------------------------- JSON logs


class _Unprintable:
    def __repr__(self) -> str:
        return "<unprintable>"


class JsonFormatTests(SynchronousTestCase):
    """rtunnel.logs: one JSON object a line, whatever the event holds."""

    def log_one(self, **fields: Any) -> dict[str, Any]:
        out = io.StringIO()
        Logger(namespace="rtunnel.test", observer=json_observer(out)).warn(
            "bound {host}:{port}", **fields
        )
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1, out.getvalue())
        return json.loads(lines[0])

    def test_an_event_has_time_level_namespace_event_text_and_fields(self) -> None:
        record = self.log_one(event="tunnel_bound", host="0.0.0.0", port=4000, session="0123abcd")
        self.assertEqual(record["event"], "tunnel_bound")
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "rtunnel.test")
        self.assertEqual(record["text"], "bound 0.0.0.0:4000")
        self.assertEqual(record["fields"], {"host": "0.0.0.0", "port": 4000, "session": "0123abcd"})
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_fields_json_cannot_hold_become_their_repr(self) -> None:
        loop: list[Any] = []
        loop.append(loop)
        record = self.log_one(
            host=_Unprintable(), port=float("nan"), by_tuple={(1, 2): "x"}, loop=loop, raw=b"\xff"
        )
        self.assertEqual(record["fields"]["host"], "<unprintable>")
        self.assertEqual(record["fields"]["port"], "nan")
        self.assertEqual(record["fields"]["by_tuple"], "{(1, 2): 'x'}")
        self.assertEqual(record["fields"]["raw"], "b'\\xff'")
        self.assertEqual(record["text"], "bound <unprintable>:nan")
        self.assertIsNone(record["event"])

    def test_a_failure_carries_its_traceback_and_newlines_stay_escaped(self) -> None:
        try:
            raise ValueError("broken\nacross lines")
        except ValueError:
            failure = Failure()
        line = event_as_json({
            "log_format": "it failed", "log_level": LogLevel.critical, "log_failure": failure,
            "log_namespace": "x", "log_time": 0.0, "event": "internal_error",
        })
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(record["time"], "1970-01-01T00:00:00.000Z")
        self.assertIn("ValueError: broken", record["traceback"])
        self.assertEqual(record["event"], "internal_error")

    def test_client_services_retry_line_is_left_out_in_both_formats(self) -> None:
        for factory in (json_observer, text_observer):
            out = io.StringIO()
            observer = factory(out)
            retry = Logger(namespace="twisted.application._client_service.ClientService", observer=observer)
            retry.info("Scheduling retry {attempt} to connect {endpoint} in {delay} seconds.", attempt=1, endpoint="h", delay=0.5)
            retry.info("Duplicate ClientService.startService")
            Logger(namespace="rtunnel.tap.client.ClientMainService", observer=observer).warn("Scheduling retry")
            lines = out.getvalue().splitlines()
            self.assertEqual(len(lines), 2, out.getvalue())
            self.assertIn("Duplicate ClientService.startService", lines[0])
            self.assertIn("rtunnel.tap.client.ClientMainService", lines[1])

    def test_an_event_that_cannot_be_formatted_still_makes_a_line(self) -> None:
        record = json.loads(event_as_json({"log_format": "{missing", "log_level": LogLevel.info}))
        self.assertIn("Unable to format event", record["text"])
        self.assertIsNone(record["time"])


class LogFormatOptionTests(SynchronousTestCase):
    """The console scripts' --log-format becomes twistd's --logger."""

    def test_json_becomes_twistds_logger_before_the_plugin_name(self) -> None:
        argv = twistd_argv(["--port", "1", "--log-format", "json", "-s", "x"], "rtunnel-server")
        self.assertEqual(
            argv,
            ["--nodaemon", "--pidfile=", f"--logger={JSON_OBSERVER}", "rtunnel-server", "--port", "1", "-s", "x"],
        )
        self.assertEqual(
            twistd_argv(["--log-format=json"], "rtunnel-client")[2:], [f"--logger={JSON_OBSERVER}", "rtunnel-client"]
        )

    def test_text_is_twistds_own_format(self) -> None:
        expected = ["--nodaemon", "--pidfile=", f"--logger={TEXT_OBSERVER}", "rtunnel-client", "-c", "h"]
        self.assertEqual(twistd_argv(["--log-format=text", "-c", "h"], "rtunnel-client"), expected)
        self.assertEqual(twistd_argv(["-c", "h"], "rtunnel-client"), expected)

    def test_an_unknown_format_is_refused(self) -> None:
        with self.assertRaises(ValueError) as caught:
            twistd_argv(["--log-format", "xml"], "rtunnel-client")
        self.assertIn("expected json or text", str(caught.exception))
        with self.assertRaises(ValueError):
            twistd_argv(["--log-format"], "rtunnel-client")


class JsonLogProcessTests(_Processes):
    """Real server and clients with --log-format json."""

    def setUp(self) -> None:
        _scripts_or_skip()
        super().setUp()

    def test_every_line_is_json_and_sessions_tunnels_and_auth_failures_have_fields(self) -> None:
        target = self.start_target()
        port = free_port()
        server = Process(
            self, "server",
            [str(SERVER), "--log-format", "json", "--port", str(port), "--interface", "127.0.0.1",
             "--state-dir", str(self.state_dir)],
            self.workdir,
        )
        server.wait_for(r'"event": "server_listening"')
        client = Process(
            self, "client",
            [str(CLIENT), "--log-format=json", "-c", f"127.0.0.1:{port}", "-f", "0", "-t", f"127.0.0.1:{target}",
             "--token", self.token, "--fingerprint", self.fingerprint],
            self.workdir,
        )
        client.wait_for(r'"event": "tunnel_ready"')
        ready = _named(_events(client.output), "tunnel_ready")[0]
        public = ready["fields"]["port"]
        self.assertEqual(_visit(public, b"through the tunnel"), b"through the tunnel")
        intruder = Process(
            self, "intruder",
            [str(CLIENT), "--log-format", "json", "-c", f"127.0.0.1:{port}", "-f", "0", "-t", "9",
             "--token", "not-the-token", "--fingerprint", self.fingerprint],
            self.workdir,
        )
        self.assertEqual(intruder.wait_exit(), 2, intruder.describe())
        server.wait_for(r'"event": "auth_failed"')
        client.stop()  # a clean stop: the server ends the session at once
        server.wait_for(r'"event": "session_expired"')
        server.stop()

        events = _events(server.output)
        started = _named(events, "session_started")
        self.assertEqual(len(started), 1, server.output)
        session = started[0]["fields"]["session"]
        self.assertRegex(session, r"^[0-9a-f]{8}$")
        self.assertEqual(started[0]["fields"]["credential"], "default")
        self.assertRegex(started[0]["fields"]["peer"], r"^127\.0\.0\.1:\d+$")
        self.assertEqual(started[0]["level"], "info")
        [bound] = _named(events, "tunnel_bound")
        self.assertEqual(
            {k: bound["fields"][k] for k in ("session", "credential", "host", "port", "tunnel")},
            {"session": session, "credential": "default", "host": "::", "port": public, "tunnel": 1},
        )
        [refused] = _named(events, "auth_failed")
        self.assertEqual(refused["level"], "warn")
        self.assertEqual(refused["fields"]["host"], "127.0.0.1")
        self.assertIn("wrong token", refused["fields"]["reason"])
        self.assertEqual(refused["fields"]["code"], "AUTH_FAILED")
        [expired] = _named(events, "session_expired")
        self.assertEqual(expired["fields"]["session"], session)
        self.assertEqual(expired["fields"]["reason"], "the client stopped")
        self.assertIn("Server Shut Down.", [e["text"] for e in events])

        client_events = _events(client.output)
        [connected] = _named(client_events, "connected")
        self.assertEqual(connected["fields"]["session"], session)
        self.assertEqual(connected["fields"]["server"], f"127.0.0.1:{port}")
        self.assertEqual(ready["fields"]["tunnel"], 1)
        [fatal] = _named(_events(intruder.output), "fatal")
        self.assertIn("wrong token", fatal["fields"]["reason"])
        self.assertEqual(fatal["level"], "critical")

    def test_twistd_takes_the_observer_with_its_own_logger_option(self) -> None:
        if plugins_installed():
            raise SkipTest(plugins_installed())
        port = free_port()
        server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", f"--logger={JSON_OBSERVER}", "rtunnel-server",
             "--port", str(port), "--interface", "127.0.0.1", "--state-dir", str(self.state_dir)],
            self.workdir,
        )
        server.wait_for(r'"event": "server_listening"')
        server.stop()
        [listening] = _named(_events(server.output), "server_listening")
        self.assertEqual(listening["fields"]["port"], port)

    def test_an_unknown_log_format_is_a_usage_error(self) -> None:
        out = subprocess.run(
            [str(CLIENT), "--log-format", "yaml"], capture_output=True, timeout=60, cwd=self.workdir
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn(b"--log-format 'yaml': expected json or text", out.stderr)


# ---------------------------------------------------------------- --max-retries


class MaxRetriesOptionTests(SynchronousTestCase):
    def options(self, *args: str) -> tap_client.Options:
        options = tap_client.Options()
        options.parseOptions(
            ["-c", "h", "-f", "0", "-t", "1", "--token", "t", "--fingerprint", NO_FINGERPRINT, *args]
        )
        return options

    def test_default_is_never_give_up(self) -> None:
        self.assertIsNone(self.options().config.max_retries)
        self.assertEqual(self.options("--max-retries", "5").config.max_retries, 5)

    def test_zero_is_refused(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.options("--max-retries", "0")
        self.assertIn("--max-retries must be at least 1", str(caught.exception))


class MaxRetriesProcessTests(_Processes):
    def setUp(self) -> None:
        _scripts_or_skip()
        super().setUp()

    def test_the_client_gives_up_after_n_failed_attempts_with_status_3(self) -> None:
        closed = free_port()  # nothing listens there
        started = time.monotonic()
        client = Process(
            self, "client",
            [str(CLIENT), "-c", f"127.0.0.1:{closed}", "-f", "0", "-t", "9", "--token", "t",
             "--fingerprint", NO_FINGERPRINT, "--max-retries", "3", "--max-retry-delay", "0.5"],
            self.workdir,
        )
        self.assertEqual(client.wait_exit(timeout=60), 3, client.describe())
        elapsed = time.monotonic() - started
        output = client.output
        # one line per attempt, with the wait before the next (none after the last)
        attempts = re.findall(rf"cannot reach the rtunnel server at 127\.0\.0\.1:{closed}: .*", output)
        self.assertEqual(len(attempts), 3, output)
        for line in attempts[:2]:
            self.assertRegex(line, r"; retrying in \d+\.\d s$")
        self.assertNotIn("retrying", attempts[2])
        self.assertNotIn("Scheduling retry", output)
        self.assertIn(
            f"giving up after 3 failed attempts in a row to connect to the rtunnel server at "
            f"127.0.0.1:{closed} (--max-retries 3)",
            output,
        )
        self.assertNotIn("Traceback", output)
        self.assertLess(elapsed, 60)


class MaxRetriesInProcessTests(TestCase):
    """In process: what counts as a failed attempt, and what resets the count."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_session_resets_the_count_of_failed_attempts(self) -> None:
        tunnel = Tunnel(self)
        listen = f"tcp:{free_port()}:interface=127.0.0.1"
        yield tunnel.start_server(listen=listen)  # makes the certificate
        config = tunnel.client_config(
            [(0, free_port())], max_retries=2, initial_retry_delay=1.0, max_retry_delay=1.0
        )
        yield tunnel.stop_server()
        service = tunnel.start_client(config)
        client = service.client
        yield wait_until(lambda: client.failed_attempts == 1, 20)
        yield tunnel.start_server(listen=listen)  # before the second attempt, >= 0.8 s later
        yield wait_until(lambda: len(client.bound) == 1, 20)
        first = client.session_id
        self.assertEqual(client.failed_attempts, 0)
        yield tunnel.stop_server()
        yield wait_until(lambda: client.failed_attempts == 1, 20)  # one more would be fatal...
        yield tunnel.start_server(listen=listen)
        yield wait_until(lambda: client.session_id != first and len(client.bound) == 1, 20)
        self.assertIsNone(service.fatal_error)  # ...had the session not reset the count
        self.assertEqual(client.failed_attempts, 0)

    @defer.inlineCallbacks
    def test_a_server_that_never_answers_the_handshake_counts_as_a_failed_attempt(self) -> None:
        silent = socket.socket()  # the kernel accepts; nobody ever answers TLS
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        tunnel = Tunnel(self)
        config = tunnel.client_config(
            [(0, free_port())], fingerprint=NO_FINGERPRINT, max_retries=2,
            initial_retry_delay=0.1, max_retry_delay=0.2,
            keepalive=Keepalive(interval=0.2, dead_after=0.5),
        )
        config = replace(config, server_port=silent.getsockname()[1])
        service = tunnel.start_client(config)
        message = yield with_timeout(service.when_fatal(), 20)
        self.assertIn("giving up after 2 failed attempts in a row", message)
        self.assertEqual(service.exit_code, 3)


# ---------------------------------------------------------------- systemd, twistd --uid


class SocketActivationTests(_Processes):
    """The control port handed over as systemd does: fd 3, LISTEN_FDS,
    LISTEN_PID (the server's own pid) and LISTEN_FDNAMES."""

    def setUp(self) -> None:
        _scripts_or_skip()
        super().setUp()

    def start_activated_server(self, listener: socket.socket, listen: str) -> Process:
        # exec keeps the pid, so the wrapper can name it in LISTEN_PID
        wrapper = (
            "import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "if fd != 3:\n"
            "    os.dup2(fd, 3, inheritable=True)\n"
            "    os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='control')\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n"
        )
        fd = listener.fileno()
        return Process(
            self, "server",
            [sys.executable, "-c", wrapper, str(fd), str(SERVER), "--listen", listen,
             "--state-dir", str(self.state_dir)],
            self.workdir,
            pass_fds=(fd,),
        )

    def test_the_server_takes_its_control_port_from_systemd_and_a_tunnel_works(self) -> None:
        target = self.start_target()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        early = socket.create_connection(("127.0.0.1", port), timeout=10)  # queued before the server runs
        self.addCleanup(early.close)
        server = self.start_activated_server(listener, "systemd:domain=INET:index=0")
        listener.close()  # the server holds the only copy now
        server.wait_for(r"rtunnel server listening on systemd:domain=INET:index=0 \(port (\d+)\)")
        self.assertIn(f"(port {port})", server.output)
        public = self.start_client(port, target)
        payload = os.urandom(100_000)
        self.assertEqual(_visit(public, payload), payload)
        # the connection queued before the server started reached it too: it
        # answers bytes that are not TLS by closing the connection
        early.sendall(b"not TLS\r\n\r\n")
        try:
            self.assertEqual(early.recv(100), b"")
        except ConnectionResetError:
            pass
        self.assertNotIn("Traceback", server.output)

    def test_the_descriptor_can_be_named(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        server = self.start_activated_server(listener, "systemd:domain=INET:name=control")
        listener.close()
        server.wait_for(rf"rtunnel server listening on systemd:domain=INET:name=control \(port {port}\)")


class InheritedSocketCheckTests(SynchronousTestCase):
    """`--listen systemd:…` without the socket says what is missing instead
    of a bare IndexError (this test process inherited no sockets)."""

    def test_a_socket_that_was_not_passed_is_a_clear_error(self) -> None:
        for listen in ("systemd:domain=INET:index=0", "systemd:domain=INET6:name=control"):
            with self.assertRaises(ConfigError) as caught:
                check_inherited_socket(listen)
            self.assertIn(f"--listen {listen}: this process did not inherit that socket", str(caught.exception))
            self.assertIn("FileDescriptorName=", str(caught.exception))

    def test_the_server_refuses_to_start_without_its_socket(self) -> None:
        from rtunnel.tap import server as tap_server

        with self.assertRaises(usage.UsageError) as caught:
            tap_server.Options().parseOptions(["--listen", "systemd:domain=INET:index=0"])
        self.assertIn("did not inherit that socket", str(caught.exception))


ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"


class UnitFileTests(SynchronousTestCase):
    """contrib/systemd: what docs/operations.md shows, and what systemd accepts."""

    def unit_files(self) -> list[Path]:
        files = sorted(p for p in UNITS.rglob("*") if p.is_file())
        self.assertEqual(
            [str(p.relative_to(UNITS)) for p in files],
            ["rtunnel-client@.service", "rtunnel-server.service",
             "rtunnel-server.service.d/socket-activation.conf", "rtunnel-server.socket"],
        )
        return files

    def test_the_docs_show_each_unit_file_as_it_is(self) -> None:
        docs = (ROOT / "docs" / "operations.md").read_text()
        for path in self.unit_files():
            self.assertIn(f"```ini\n{path.read_text()}```", docs, f"{path} differs from docs/operations.md")

    def test_systemd_analyze_verify_accepts_the_units(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (Debian: systemd)")
        _scripts_or_skip()
        units = Path(tempfile.mkdtemp(prefix="rtunnel-units-"))
        self.addCleanup(shutil.rmtree, units, True)
        for path in self.unit_files():
            name = str(path.relative_to(UNITS)).replace("@.service", "@web.service")
            (units / name).parent.mkdir(parents=True, exist_ok=True)
            # systemd checks that ExecStart's program exists: use this tree's
            (units / name).write_text(path.read_text().replace("/opt/rtunnel/bin/", f"{BIN}/"))
        names = ["rtunnel-server.service", "rtunnel-server.socket", "rtunnel-client@web.service"]
        out = subprocess.run(
            [analyze, "verify", *names], cwd=units, capture_output=True, timeout=60,
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},  # trailing ':' keeps the defaults
        )
        self.assertEqual((out.returncode, out.stderr.decode(), out.stdout.decode()), (0, "", ""))


class PrivilegeDropTests(_Processes):
    """twistd --uid/--gid: the control port is bound as root, then the
    server runs as nobody."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("the privilege drop test needs root (it binds a port below 1024, then drops to nobody)")
        try:
            self.nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise SkipTest("no user 'nobody' on this machine") from None
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        _scripts_or_skip()
        super().setUp()

    def low_port(self) -> int:
        for candidate in range(700, 1000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", candidate))
                except OSError:
                    continue
                return candidate
        raise SkipTest("no free port in 700-999 on 127.0.0.1")

    def test_binds_a_port_below_1024_then_runs_as_nobody_and_a_tunnel_works(self) -> None:
        import grp

        group = grp.getgrgid(self.nobody.pw_gid).gr_name
        target = self.start_target()
        port = self.low_port()
        server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "--uid", "nobody", "--gid", group, "rtunnel-server",
             "--port", str(port), "--interface", "127.0.0.1", "--state-dir", str(self.state_dir)],
            self.workdir,
        )
        server.wait_for(r"set uid/gid \d+/\d+")
        status = Path(f"/proc/{server.popen.pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
        gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
        groups = re.search(r"^Groups:\s*(.*)$", status, re.M)
        assert uids and gids and groups
        self.assertEqual(uids.group(1).split(), [str(self.nobody.pw_uid)] * 4, status)
        self.assertEqual(gids.group(1).split(), [str(self.nobody.pw_gid)] * 4, status)
        self.assertNotIn("0", groups.group(1).split(), status)
        public = self.start_client(port, target)
        self.assertEqual(_visit(public, b"as nobody"), b"as nobody")
        self.assertGreaterEqual(public, 1024)
        self.assertNotIn("Traceback", server.output)


class DocumentedEventTests(SynchronousTestCase):
    """Every event name the code logs is in docs/operations.md's event tables."""

    def test_every_event_name_in_the_code_is_documented(self) -> None:
        docs = (ROOT / "docs" / "operations.md").read_text()
        names = set()
        for path in (ROOT / "rtunnel").rglob("*.py"):
            names.update(re.findall(r'event="([a-z0-9_]+)"', path.read_text()))
        self.assertIn("tunnel_closed", names)  # the pattern still finds events
        missing = sorted(name for name in names if f"| `{name}`" not in docs)
        self.assertEqual(missing, [], "events logged but not in docs/operations.md's tables")


class StartFailureTests(SynchronousTestCase):
    """A server that cannot start says why, where its operator looks, and
    leaves no pidfile (docs/operations.md "Exit status")."""

    def setUp(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-start-failure-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.busy = socket.socket()
        self.busy.bind(("127.0.0.1", 0))
        self.busy.listen(1)
        self.addCleanup(self.busy.close)

    def server_argv(self, *twistd_options: str) -> list[str]:
        return [
            *TWISTD, *twistd_options, "rtunnel-server", "--port", str(self.busy.getsockname()[1]),
            "--interface", "127.0.0.1", "--state-dir", str(self.workdir / "state"),
        ]

    def test_daemon_that_cannot_listen_exits_1_with_the_reason_on_stderr_and_no_pidfile(self) -> None:
        pidfile = self.workdir / "server.pid"
        done = subprocess.run(
            self.server_argv(f"--pidfile={pidfile}", f"--logfile={self.workdir / 'server.log'}"),
            cwd=self.workdir, env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )
        stderr = done.stderr.decode(errors="replace")
        self.assertEqual(done.returncode, 1, stderr)
        self.assertIn("Address already in use", stderr)
        time.sleep(0.5)  # the daemon's own exit follows its parent's
        self.assertFalse(pidfile.exists(), "a stale pidfile is left")
        log = (self.workdir / "server.log").read_text()
        self.assertIn("Address already in use. Choose another --port/--listen", log)

    def test_foreground_server_that_cannot_listen_exits_1_without_a_traceback(self) -> None:
        done = subprocess.run(
            self.server_argv("--nodaemon", "--pidfile="), cwd=self.workdir, env=clean_env(),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )
        output = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        self.assertEqual(done.returncode, 1, output)
        self.assertIn("Address already in use. Choose another --port/--listen", output)  # one period
        self.assertNotIn("Traceback", output)


class UnreadableStateDirTests(TestCase):
    """A state directory the server may not read is reported as such, not
    as a port it cannot listen on."""

    def test_unreadable_state_dir_is_named_as_the_problem(self) -> Any:
        from rtunnel.tap import server as tap_server

        state_dir = Path(tempfile.mkdtemp(prefix="rtunnel-state-"))
        self.addCleanup(shutil.rmtree, state_dir, True)
        tunnel = Tunnel(self)
        tunnel.state_dir = state_dir
        d = tunnel.start_server()  # makes the key and certificate
        d.addCallback(lambda _: tunnel.stop_server())
        d.addCallback(lambda _: self._start_unreadable(tap_server, state_dir))
        return d

    def _start_unreadable(self, tap_server: Any, state_dir: Path) -> Any:
        from twisted.internet import reactor

        from rtunnel.config import ServerConfig

        events = LogCapture(self).events
        self.patch(tap_server, "exit_process", lambda _reactor, _code: None)
        os.chmod(state_dir, 0o700)
        service = tap_server.ServerService(
            ServerConfig(listen="tcp:0:interface=127.0.0.1", state_dir=state_dir, token="t"), reactor
        )
        with _unprivileged():  # as root, the directory's mode stops no one
            service.startService()
        d = self.assertFailure(service.ready, StateDirError)

        def check(_: object) -> None:
            [failed] = [e for e in events if e.get("event") == "start_failed"]
            reason = failed["reason"]
            self.assertIn(str(state_dir), reason)
            self.assertIn("Permission denied", reason)
            self.assertIn("--state-dir", reason)
            self.assertNotIn("listen", reason)

        return d.addCallback(check)


class _unprivileged:
    """Run as the user nobody (effective uid only) inside the block, if root."""

    def __enter__(self) -> None:
        self.uid = os.geteuid()
        if self.uid == 0:
            try:
                nobody = pwd.getpwnam("nobody")
            except KeyError:
                raise SkipTest("no user 'nobody' on this machine") from None
            os.setegid(nobody.pw_gid)
            os.seteuid(nobody.pw_uid)

    def __exit__(self, *exc: object) -> None:
        if self.uid == 0:
            os.seteuid(0)
            os.setegid(0)


class OptionErrorTests(SynchronousTestCase):
    """A bad option is answered with the problem in one line and where the
    usage is, not 60 lines of usage and twistd's internals."""

    def setUp(self) -> None:
        _scripts_or_skip()
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-options-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def run_command(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.workdir, env=clean_env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=60, text=True,
        )

    def client_args(self, *args: str) -> list[str]:
        return ["-c", "127.0.0.1", "--token", "t", "--fingerprint", NO_FINGERPRINT, *args]

    def assertOneLineError(self, done: subprocess.CompletedProcess[str], prefix: str, problem: str) -> None:
        everything = done.stdout + done.stderr
        self.assertEqual(done.returncode, 1, everything)
        lines = done.stderr.splitlines()
        self.assertTrue(lines and lines[0].startswith(prefix), everything)
        self.assertIn(problem, lines[0])
        self.assertLessEqual(len(everything.splitlines()), 2, everything)
        self.assertIn("--help", everything)
        for internal in ("Usage:", "--nodaemon:", "--pidfile:", "Traceback"):
            self.assertNotIn(internal, everything)

    def test_console_script_says_the_problem_first_without_the_usage(self) -> None:
        done = self.run_command([str(CLIENT), *self.client_args("-f", "4000")])
        self.assertOneLineError(done, "rtunnel_client: ", "-t/--to in pairs")

    def test_server_console_script_too(self) -> None:
        done = self.run_command([str(SERVER), "--port", "x"])
        self.assertOneLineError(done, "rtunnel_server: ", "--port")

    def test_twistd_with_its_own_options_first_names_the_plugin_not_an_option(self) -> None:
        done = self.run_command([*TWISTD, "--pidfile=", "--nodaemon", "rtunnel-client", *self.client_args("-f", "4000")])
        self.assertOneLineError(done, "twistd rtunnel-client: ", "-t/--to in pairs")

    def test_a_target_with_two_colons_is_not_called_ipv6(self) -> None:
        done = self.run_command([str(CLIENT), *self.client_args("-f", "4000", "-t", "bad_host:3000:1")])
        self.assertOneLineError(done, "rtunnel_client: ", "-t/--to")
        self.assertNotIn("IPv6", done.stderr)
        self.assertIn("'bad_host:3000:1'", done.stderr)

    def test_help_lists_log_format(self) -> None:
        for command in (CLIENT, SERVER):
            done = self.run_command([str(command), "--help"])
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("--log-format", done.stdout)

    def test_log_format_under_twistd_says_to_use_logger(self) -> None:
        done = self.run_command([*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", *self.client_args("--log-format", "json")])
        self.assertOneLineError(done, "twistd rtunnel-client: ", "--logger rtunnel.logs.json_observer")


# ---------------------------------------------------------------- SIGHUP


class NothingToReloadTests(SynchronousTestCase):
    """SIGHUP to a server without --clients and a client without --config
    (real twistd processes) is logged, not fatal: both stay up and the
    tunnel still carries bytes."""

    def setUp(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-sighup-processes-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def test_sighup_without_clients_file_or_config_file_is_logged_not_fatal(self) -> None:
        state = self.workdir / "state"
        control = free_port()
        server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(control),
             "--interface", "127.0.0.1", "--state-dir", str(state)],
            self.workdir,
        )
        server.wait_for(r"Run on the client machine")
        target = TargetServer()
        serve_in_thread(self, target)
        client = Process(
            self, "client",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{control}",
             "-f", "0", "-t", f"127.0.0.1:{target.server_address[1]}",
             "--token", (state / "token").read_text().strip(),
             "--fingerprint", cert_fingerprint(state / "server.crt")],
            self.workdir,
        )
        public = int(client.wait_for(r"tunnel ready: \S+:(\d+) -> ").group(1))

        for process, option in ((server, "--clients"), (client, "--config")):
            os.kill(process.popen.pid, signal.SIGHUP)
            process.wait_for(rf"SIGHUP: nothing to reload \(no {option}\)")
        time.sleep(0.5)  # a process the signal killed would be gone by now
        self.assertIsNone(server.popen.poll(), server.describe())
        self.assertIsNone(client.popen.poll(), client.describe())

        with socket.create_connection(("127.0.0.1", public), timeout=20) as visitor:
            visitor.sendall(b"still up")
            visitor.shutdown(socket.SHUT_WR)
            reply = bytearray()
            while part := visitor.recv(65536):
                reply.extend(part)
        self.assertEqual(bytes(reply), BANNER + b"still up")
        for process in (server, client):
            self.assertNotIn("Traceback", process.output)
