"""Config files (rtunnel.configfile): valid and invalid files for both ends,
flags overriding the file, and the client's SIGHUP reload of its tunnels."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from rtunnel.config import TunnelSpec
from rtunnel.configfile import FileOptions, plan_tunnel_changes
from rtunnel.tap import client as tap_client
from rtunnel.tap import server as tap_server
from tests.harness import (
    TOKEN,
    Echo,
    Tunnel,
    Visitor,
    converse,
    listen_target,
    pattern,
    sleep,
    visit,
    wait_until,
    with_timeout,
)

FP = "sha256:" + "ab" * 32


class FileTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-configfile-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, text: str, name: str = "client.toml") -> Path:
        path = self.dir / name
        path.write_text(textwrap.dedent(text))
        return path

    def client(self, text: str, *args: str) -> tap_client.Options:
        options = tap_client.Options()
        options.parseOptions(["--config", str(self.write(text)), *args])
        return options

    def server(self, text: str, *args: str) -> tap_server.Options:
        options = tap_server.Options()
        options.parseOptions(["--config", str(self.write(text, "server.toml")), *args])
        return options

    def client_error(self, text: str, *args: str) -> str:
        e = self.assertRaises(usage.UsageError, self.client, text, *args)
        return str(e)

    def server_error(self, text: str, *args: str) -> str:
        e = self.assertRaises(usage.UsageError, self.server, text, *args)
        return str(e)


MINIMAL = f"""\
    server = "127.0.0.1:19050"
    token = "tok"
    fingerprint = "{FP}"

    [[tunnel]]
    forward = "4000"
    to = "localhost:3000"
    """


def top(extra: str) -> str:
    """MINIMAL with `extra` top-level lines (at line 4, before the first [[tunnel]])."""
    return MINIMAL.replace(f'fingerprint = "{FP}"\n', f'fingerprint = "{FP}"\n' + extra, 1)


class ValidFileTests(FileTestCase):
    def test_client_file_with_every_key(self) -> None:
        (self.dir / "token").write_text("s3cret\n")
        options = self.client(f"""\
            # a complete client file
            server = "tunnel.example.com"
            token_file = "token"              # relative to this file's directory
            fingerprint = "{FP}"
            max_retry_delay = 12              # an integer is a number too
            ping_interval = 5.5
            dead_after = 20
            connect_timeout = 3

            [[tunnel]]
            forward = "4000"
            to = "localhost:3000"

            [[tunnel]]
            forward = "127.0.0.1:0"
            to = "db.lan:5432"
            proxy_protocol = "v2"

            [[tunnel]]
            forward = 4002
            to = 3002
            proxy_protocol = "v1"
            """)
        config = options.config
        self.assertEqual((config.server_host, config.server_port), ("tunnel.example.com", 19050))
        self.assertEqual(config.token, "s3cret")
        self.assertEqual(config.fingerprint, "ab" * 32)
        self.assertEqual(config.max_retry_delay, 12.0)
        self.assertEqual((config.keepalive.interval, config.keepalive.dead_after), (5.5, 20.0))
        self.assertEqual(config.connect_timeout, 3.0)
        self.assertEqual(
            config.tunnels,
            (
                TunnelSpec(1, "", 4000, "localhost", 3000, "off"),
                TunnelSpec(2, "127.0.0.1", 0, "db.lan", 5432, "v2"),
                TunnelSpec(3, "", 4002, "localhost", 3002, "v1"),
            ),
        )

    def test_client_trust_settings(self) -> None:
        known = self.dir / "known"
        options = self.client("""\
            server = "127.0.0.1"
            token = "tok"
            trust_on_first_use = true
            known_servers = "known"

            [[tunnel]]
            forward = "0"
            to = "3000"
            """)
        self.assertEqual(options.known_servers, known)
        self.assertIsNone(options.config.fingerprint)

    def test_client_token_file_tilde_is_expanded(self) -> None:
        home = self.dir / "home"
        (home / ".config" / "rtunnel").mkdir(parents=True)
        (home / ".config" / "rtunnel" / "token").write_text("from-home")
        self.patch(tap_client.os, "environ", {"HOME": str(home)})
        options = self.client(MINIMAL.replace('token = "tok"', 'token_file = "~/.config/rtunnel/token"'))
        self.assertEqual(options.config.token, "from-home")

    def test_token_file_flag(self) -> None:
        (self.dir / "t").write_text("flag-token")
        options = tap_client.Options()
        options.parseOptions(
            ["-c", "127.0.0.1", "-f", "4000", "-t", "3000", "--fingerprint", FP, "--token-file", str(self.dir / "t")]
        )
        self.assertEqual(options.config.token, "flag-token")

    def test_server_file_with_options(self) -> None:
        options = self.server("""\
            port = 19099
            interface = "127.0.0.1"
            state_dir = "state"
            token = "server-token"
            client = ["alice=alice-token", "bob=bob-token"]
            allow_ports = "4000-4099,8080"
            resume_grace = 30
            handshake_timeout = 2.5
            ping_interval = 4
            dead_after = 12
            max_streams = 100
            max_tunnels = 5
            max_frame = 65536
            bind_default = "127.0.0.1"
            """)
        config = options.config
        self.assertEqual(config.listen, "tcp:19099:backlog=1024:interface=127.0.0.1")
        self.assertEqual(config.state_dir, self.dir / "state")
        self.assertEqual(config.token, "server-token")
        self.assertEqual(config.extra_clients, (("alice", "alice-token"), ("bob", "bob-token")))
        self.assertEqual(config.allow_ports, ((4000, 4099), (8080, 8080)))
        self.assertEqual((config.resume_grace, config.handshake_timeout), (30.0, 2.5))
        self.assertEqual((config.keepalive.interval, config.keepalive.dead_after), (4.0, 12.0))
        self.assertEqual((config.session.max_streams, config.session.max_frame), (100, 65536))
        self.assertEqual(config.max_tunnels, 5)
        self.assertEqual(config.bind_default, ("127.0.0.1",))

    def test_server_single_client_string(self) -> None:
        options = self.server('client = "carol=carol-token"\n')
        self.assertEqual(options.config.extra_clients, (("carol", "carol-token"),))


class FlagsOverrideTests(FileTestCase):
    def test_client_flags_override_the_file(self) -> None:
        options = self.client(
            top("max_retry_delay = 3\nping_interval = 2\ndead_after = 9\n"),
            "-c", "10.0.0.1:2000", "--max-retry-delay", "8", "--token", "flag-token",
        )
        config = options.config
        self.assertEqual((config.server_host, config.server_port), ("10.0.0.1", 2000))
        self.assertEqual(config.max_retry_delay, 8.0)
        self.assertEqual(config.token, "flag-token")
        self.assertEqual(config.keepalive.interval, 2.0)  # not given as a flag: the file's

    def test_command_line_tunnels_are_added_after_the_files(self) -> None:
        options = self.client(MINIMAL, "-f", "5000", "-t", "22")
        self.assertEqual(
            options.config.tunnels,
            (
                TunnelSpec(1, "", 4000, "localhost", 3000),
                TunnelSpec(2, "", 5000, "localhost", 22),
            ),
        )

    def test_command_line_tunnel_duplicating_the_files_is_an_error(self) -> None:
        self.assertIn("-f/--forward 4000 is given twice", self.client_error(MINIMAL, "-f", "4000", "-t", "22"))

    def test_token_flag_overrides_the_files_token_file(self) -> None:
        # the file's token_file is not even read when --token is given
        options = self.client(MINIMAL.replace('token = "tok"', 'token_file = "missing"'), "--token", "t2")
        self.assertEqual(options.config.token, "t2")

    def test_token_file_flag_overrides_the_files_token(self) -> None:
        (self.dir / "t").write_text("from-flag-file")
        options = self.client(MINIMAL, "--token-file", str(self.dir / "t"))
        self.assertEqual(options.config.token, "from-flag-file")

    def test_file_token_beats_environment(self) -> None:
        self.patch(tap_client.os, "environ", {"RTUNNEL_TOKEN": "env"})
        self.assertEqual(self.client(MINIMAL).config.token, "tok")

    def test_server_flags_override_the_file(self) -> None:
        options = self.server("port = 19099\nmax_streams = 10\n", "--port", "19100")
        self.assertEqual(options.config.listen, r"tcp:19100:backlog=1024:interface=\:\:")
        self.assertEqual(options.config.session.max_streams, 10)

    def test_without_a_server_key_c_is_required(self) -> None:
        error = self.client_error(MINIMAL.replace('server = "127.0.0.1:19050"', ""))
        self.assertIn('-c/--connect HOST[:PORT] is required', error)
        self.assertIn('or server = "HOST:PORT" in', error)
        options = self.client(MINIMAL.replace('server = "127.0.0.1:19050"', ""), "-c", "127.0.0.2")
        self.assertEqual(options.config.server_host, "127.0.0.2")


class InvalidFileTests(FileTestCase):
    """Every kind of mistake gives one sentence: file, line, key, problem, fix."""

    def assertMessage(self, error: str, *parts: str) -> None:
        for part in parts:
            self.assertIn(part, error)

    def test_missing_file(self) -> None:
        e = self.assertRaises(usage.UsageError, tap_client.Options().parseOptions, ["--config", str(self.dir / "no.toml")])
        self.assertMessage(str(e), f"--config {self.dir / 'no.toml'}: no such file")

    def test_toml_syntax_error_has_line_and_column(self) -> None:
        error = self.client_error('server = "127.0.0.1"\ntoken = tok\n')
        self.assertMessage(error, f"{self.dir / 'client.toml'} line 2, column 9: TOML syntax error: Invalid value")
        self.assertMessage(error, "values need quotes")

    def test_not_utf8(self) -> None:
        path = self.dir / "client.toml"
        path.write_bytes(b'token = "\xff"\n')
        e = self.assertRaises(usage.UsageError, tap_client.Options().parseOptions, ["--config", str(path)])
        self.assertMessage(str(e), "not UTF-8 text", "save it as UTF-8")

    def test_unknown_key_suggests_the_closest(self) -> None:
        error = self.client_error(MINIMAL.replace("fingerprint =", "fingerprnt ="))
        self.assertMessage(error, "client.toml line 3: unknown key 'fingerprnt'; did you mean 'fingerprint'?")

    def test_unknown_key_with_dashes(self) -> None:
        error = self.client_error(top("max-retry-delay = 3\n"))
        self.assertMessage(error, "line 4: unknown key 'max-retry-delay'; write it 'max_retry_delay' ('_', not '-')")

    def test_unknown_key_far_from_any_lists_them(self) -> None:
        error = self.client_error(top("zzzz = 1\n"))
        self.assertMessage(error, "unknown key 'zzzz'; the known keys are ", "server", "token_file", "tunnel")

    def test_command_line_only_options_are_unknown_keys(self) -> None:
        self.assertMessage(self.client_error(top('connect = "x"\n')), "line 4: unknown key 'connect'")
        self.assertMessage(self.server_error('forward = "4000"\n'), "line 1: unknown key 'forward'")

    def test_top_level_forward_or_to_belongs_under_a_tunnel(self) -> None:
        error = self.client_error(top('forward = "4100"\nto = "localhost:3100"\n'))
        self.assertMessage(
            error, "client.toml line 4: forward is a setting of each tunnel: it belongs under [[tunnel]], "
            'e.g. [[tunnel]] forward = "4100" to = "localhost:3100"',
        )
        error = self.client_error(top('to = "localhost:3100"\n'))
        self.assertMessage(
            error, "client.toml line 4: to is a setting of each tunnel: it belongs under [[tunnel]], "
            'e.g. [[tunnel]] forward = "4000" to = "localhost:3100"',
        )

    def test_top_level_key_written_inside_a_tunnel(self) -> None:
        error = self.client_error(MINIMAL + "max_retry_delay = 3\n")
        self.assertMessage(
            error, "client.toml line 8: [[tunnel]] #1: 'max_retry_delay' is not a tunnel setting, but every key "
            "after a [[tunnel]] line belongs to that tunnel; move max_retry_delay above the first [[tunnel]]",
        )

    def test_wrong_type_number(self) -> None:
        error = self.client_error(MINIMAL.replace('token = "tok"', 'token = "tok"\nmax_retry_delay = "30"'))
        self.assertMessage(
            error, "client.toml line 3: max_retry_delay is a string ('30'); it must be a number, e.g. max_retry_delay = 30.0"
        )

    def test_wrong_type_string(self) -> None:
        error = self.client_error(MINIMAL.replace('token = "tok"', "token = 1234"))
        self.assertMessage(error, "line 2: token is an integer (1234); it must be a string")

    def test_a_port_number_where_an_endpoint_string_belongs(self) -> None:
        error = self.server_error("admin = 9119\n")
        self.assertMessage(error, 'server.toml line 1: admin is an integer (9119); it must be a string, e.g. admin = "9119"')
        error = self.server_error('state_dir = "/tmp/x"\nmetrics = 9120\n')
        self.assertMessage(error, 'server.toml line 2: metrics is an integer (9120); it must be a string, e.g. metrics = "9120"')
        error = self.client_error(top("metrics = 9121\n"))
        self.assertMessage(error, 'client.toml line 4: metrics is an integer (9121); it must be a string, e.g. metrics = "9121"')

    def test_wrong_type_integer(self) -> None:
        error = self.server_error("max_streams = 1.5\n")
        self.assertMessage(error, "server.toml line 1: max_streams is a number (1.5); it must be an integer, e.g. max_streams = 4096")

    def test_wrong_type_boolean(self) -> None:
        error = self.client_error(top('trust_on_first_use = "yes"\n'))
        self.assertMessage(error, "trust_on_first_use is a string; write trust_on_first_use = true or trust_on_first_use = false")

    def test_a_table_where_a_value_belongs(self) -> None:
        error = self.client_error(MINIMAL.replace('token = "tok"', "[token]\nvalue = 1"))
        self.assertMessage(error, "client.toml line 2: token is a table ({'value': 1, ", "it must be a string")

    def test_bad_server_port(self) -> None:
        error = self.server_error("state_dir = '/tmp/x'\nport = 70000\n")
        self.assertMessage(error, "--port 70000 is not a port number (1-65535)", "(set in ", "server.toml line 2: port)")

    def test_bad_client_server_address(self) -> None:
        error = self.client_error(MINIMAL.replace("127.0.0.1:19050", "127.0.0.1:99999"))
        self.assertMessage(error, "port 99999 is outside 1-65535", "client.toml line 1: server)")

    def test_bad_forward_port(self) -> None:
        error = self.client_error(MINIMAL.replace('forward = "4000"', 'forward = "70000"'))
        self.assertMessage(error, "client.toml line 6: [[tunnel]] #1 forward: port 70000 is outside 0-65535")

    def test_forward_bind_address_must_be_an_ip(self) -> None:
        error = self.client_error(MINIMAL.replace('forward = "4000"', 'forward = "myhost:4000"'))
        self.assertMessage(error, "line 6: [[tunnel]] #1 forward: 'myhost' is not an IP address")

    def test_forward_not_a_port(self) -> None:
        error = self.client_error(MINIMAL.replace('forward = "4000"', 'forward = "http"'))
        self.assertMessage(error, "[[tunnel]] #1 forward: 'http' has no port", "forward is [BIND:]PORT")

    def test_forward_wrong_type(self) -> None:
        error = self.client_error(MINIMAL.replace('forward = "4000"', "forward = true"))
        self.assertMessage(error, 'line 6: [[tunnel]] #1: forward is a boolean; write a string such as forward = "127.0.0.1:4000"')

    def test_bad_to(self) -> None:
        error = self.client_error(MINIMAL.replace('to = "localhost:3000"', 'to = "localhost:0"'))
        self.assertMessage(error, "client.toml line 7: [[tunnel]] #1 to: port 0 is outside 1-65535")
        error = self.client_error(MINIMAL.replace('to = "localhost:3000"', 'to = "::1:3000"'))
        self.assertMessage(error, "[[tunnel]] #1 to: write IPv6 addresses in brackets")

    def test_bad_proxy_protocol(self) -> None:
        error = self.client_error(MINIMAL + 'proxy_protocol = "v3"\n')
        self.assertMessage(error, "client.toml line 8: [[tunnel]] #1: proxy_protocol is 'v3'; write \"off\" (the default), \"v1\" or \"v2\"")
        error = self.client_error(MINIMAL + "proxy_protocol = 2\n")
        self.assertMessage(error, "proxy_protocol is an integer; write")

    def test_tunnel_missing_to(self) -> None:
        error = self.client_error(MINIMAL + '\n[[tunnel]]\nforward = "4001"\n')
        self.assertMessage(error, "client.toml line 9: [[tunnel]] #2 has no 'to'; add to = \"localhost:3000\"")

    def test_tunnel_missing_forward(self) -> None:
        error = self.client_error(MINIMAL + '\n[[tunnel]]\nto = "3001"\n')
        self.assertMessage(error, "line 9: [[tunnel]] #2 has no 'forward'; add forward = \"4000\"")

    def test_tunnel_unknown_key(self) -> None:
        error = self.client_error(MINIMAL + 'proxy = "v1"\n')
        self.assertMessage(error, "line 8: [[tunnel]] #1: unknown key 'proxy'; did you mean 'proxy_protocol'?")

    def test_single_tunnel_table(self) -> None:
        error = self.client_error(MINIMAL.replace("[[tunnel]]", "[tunnel]"))
        self.assertMessage(error, "client.toml line 5: 'tunnel' is a single table; write each tunnel as [[tunnel]]")

    def test_duplicate_forward(self) -> None:
        error = self.client_error(MINIMAL + '\n[[tunnel]]\nforward = "4000"\nto = "3001"\n')
        self.assertMessage(error, "line 10: [[tunnel]] #2: forward 4000 is also tunnel #1's")

    def test_no_tunnels(self) -> None:
        error = self.client_error(MINIMAL.split("[[tunnel]]")[0])
        self.assertMessage(error, "client.toml has no tunnels: add a [[tunnel]] table")

    def test_missing_token_file(self) -> None:
        error = self.client_error(MINIMAL.replace('token = "tok"', 'token_file = "nothere"'))
        self.assertMessage(
            error, "client.toml line 2: token_file:", f"{self.dir / 'nothere'} does not exist",
            "copy the server's token into it",
        )

    def test_empty_token_file(self) -> None:
        (self.dir / "empty").write_text("\n")
        error = self.client_error(MINIMAL.replace('token = "tok"', 'token_file = "empty"'))
        self.assertMessage(error, f"{self.dir / 'empty'} is empty")

    def test_token_file_is_a_directory(self) -> None:
        error = self.client_error(MINIMAL.replace('token = "tok"', 'token_file = "."'))
        self.assertMessage(error, "is a directory, not a file")

    def test_missing_token_file_flag(self) -> None:
        options = tap_client.Options()
        e = self.assertRaises(
            usage.UsageError, options.parseOptions,
            ["-c", "127.0.0.1", "-f", "1", "-t", "2", "--fingerprint", FP, "--token-file", str(self.dir / "x")],
        )
        self.assertMessage(str(e), f"--token-file: {self.dir / 'x'} does not exist")

    def test_token_and_token_file_in_one_file(self) -> None:
        (self.dir / "t").write_text("x")
        error = self.client_error(MINIMAL.replace('token = "tok"', 'token = "tok"\ntoken_file = "t"'))
        self.assertMessage(error, "client.toml: give token or token_file, not both")

    def test_two_trust_settings(self) -> None:
        error = self.client_error(top("trust_on_first_use = true\n"))
        self.assertMessage(
            error, "give one of --fingerprint, --ca and --trust-on-first-use, not --fingerprint and "
            "--trust-on-first-use (set in ", "client.toml line 3: fingerprint;", "client.toml line 4: trust_on_first_use)",
        )

    def test_bad_fingerprint(self) -> None:
        error = self.client_error(MINIMAL.replace(FP, "sha256:1234"))
        self.assertMessage(error, "fingerprint")

    def test_server_bad_client_entry(self) -> None:
        error = self.server_error('client = ["alice"]\n')
        self.assertMessage(error, "server.toml line 1: client: --client: expected NAME=TOKEN")
        self.assertNotIn("alice", error.rpartition("server.toml")[2])  # it may be a token: never echoed
        error = self.server_error("client = [1, 2]\n")
        self.assertMessage(error, "client is an array; write a string, or an array of strings")

    def test_server_unknown_key(self) -> None:
        error = self.server_error("allow_port = '4000'\n")
        self.assertMessage(error, "server.toml line 1: unknown key 'allow_port'; did you mean 'allow_ports'?")

    def test_two_config_flags(self) -> None:
        path = str(self.write(MINIMAL))
        e = self.assertRaises(usage.UsageError, tap_client.Options().parseOptions, ["--config", path, "--config", path])
        self.assertMessage(str(e), "--config is given 2 times; give one file")


class PlanTests(SynchronousTestCase):
    def test_unchanged_removed_added_retargeted(self) -> None:
        current = [
            TunnelSpec(1, "0.0.0.0", 4000, "localhost", 3000),
            TunnelSpec(2, "0.0.0.0", 4001, "localhost", 3001),
            TunnelSpec(3, "0.0.0.0", 0, "localhost", 3002),
            TunnelSpec(4, "0.0.0.0", 4003, "localhost", 3003),
        ]
        wanted = [
            TunnelSpec(1, "0.0.0.0", 4000, "localhost", 3000),  # unchanged
            TunnelSpec(2, "0.0.0.0", 4001, "db", 5432, "v1"),  # same port: retargeted
            TunnelSpec(3, "0.0.0.0", 0, "localhost", 9999),  # port 0, new target: new tunnel
            TunnelSpec(4, "0.0.0.0", 4005, "localhost", 3005),  # new
        ]
        changes = plan_tunnel_changes(current, wanted)
        self.assertEqual(changes.retargeted, (TunnelSpec(2, "0.0.0.0", 4001, "db", 5432, "v1"),))
        self.assertEqual([s.tunnel_id for s in changes.removed], [3, 4])
        self.assertEqual([(s.bind_port, s.target_port) for s in changes.added], [(0, 9999), (4005, 3005)])

    def test_nothing_changes(self) -> None:
        current = [TunnelSpec(7, "0.0.0.0", 0, "localhost", 3000), TunnelSpec(9, "0.0.0.0", 0, "localhost", 3000)]
        wanted = [TunnelSpec(1, "0.0.0.0", 0, "localhost", 3000), TunnelSpec(2, "0.0.0.0", 0, "localhost", 3000)]
        self.assertFalse(plan_tunnel_changes(current, wanted))


# ---------------------------------------------------------------- SIGHUP reload


class ReloadTests(TestCase):
    """The client re-reads its file and changes only the tunnels that changed."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-reload-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server()
        self.targets = [listen_target(self, Echo) for _ in range(3)]
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def served(self, index: int) -> int:
        """How many connections target `index` has had."""
        factory = self.targets[index][0]
        return len(factory.connections) + len(factory.lost)

    def logged(self, text: str) -> list[str]:
        return [m for m in (formatEvent(e) for e in self.events) if text in m]

    def write(self, targets: list[int], extra: str = "") -> Path:
        tunnels = "".join(
            f'\n[[tunnel]]\nforward = "127.0.0.1:0"\nto = "127.0.0.1:{self.targets[i][1]}"\n' for i in targets
        )
        path = self.dir / "client.toml"
        path.write_text(
            f'server = "127.0.0.1:{self.tunnel.control_port}"\ntoken = "{TOKEN}"\n'
            f'fingerprint = "{self.tunnel.fingerprint}"\nmax_retry_delay = 0.5\n{extra}{tunnels}'
        )
        return path

    @defer.inlineCallbacks
    def start_client(self, targets: list[int]) -> Any:
        options = tap_client.Options()
        options.parseOptions(["--config", str(self.write(targets))])
        service = tap_client.ClientMainService(
            options.config, reactor, exit_on_fatal=False, reload_argv=options.argv
        )
        service.running_options(options)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.service = service
        bound = yield with_timeout(service.client.when_bound(), 10)
        return {i: port for i, (_, port) in bound.items()}

    @defer.inlineCallbacks
    def assert_refused(self, port: int) -> Any:
        """Wait until 127.0.0.1:port refuses connections (the server closed it)."""
        for _ in range(100):
            try:
                conversation = yield converse(port)
            except Exception:
                return
            conversation.transport.abortConnection()
            yield conversation.closed
            yield sleep(0.05)
        self.fail(f"port {port} still accepts connections")

    @defer.inlineCallbacks
    def test_reload_adds_and_removes_tunnels_without_touching_a_running_transfer(self) -> Any:
        ports = yield self.start_client([0, 1])
        client = self.service.client
        link, session = client.link, client.session
        server_sessions = set(self.tunnel.server.sessions)
        # a transfer on tunnel 1, running across the reload
        data = pattern(7, 4 * 1024 * 1024)
        running = yield converse(ports[1])
        running.transport.write(data[: len(data) // 2])
        # an open connection on tunnel 2, which the reload removes
        leftover = yield converse(ports[2])
        leftover.transport.write(b"before")
        yield wait_until(lambda: bytes(leftover.received) == b"before")

        self.write([0, 2])  # tunnel 2 (target 1) out, a new one (target 2) in
        self.service.reload()
        running.transport.write(data[len(data) // 2 :])  # the transfer carries on meanwhile
        yield wait_until(lambda: 3 in client.bound)
        self.assertEqual(sorted(client.tunnels), [1, 3])  # ids stay, the new one is fresh
        yield self.assert_refused(ports[2])
        # the new tunnel works
        reply, _ = yield with_timeout(visit(client.bound[3][1], Visitor(b"through the new tunnel")), 10)
        self.assertEqual(reply, b"through the new tunnel")
        # the removed tunnel's open connection carries on until it closes
        leftover.transport.write(b" and after")
        yield wait_until(lambda: bytes(leftover.received) == b"before and after")
        leftover.transport.loseWriteConnection()
        yield with_timeout(leftover.closed, 10)
        # the transfer: every byte, on the same connection, over the same link and session
        running.transport.loseWriteConnection()
        yield with_timeout(running.closed, 60)
        self.assertEqual(len(running.received), len(data))
        self.assertTrue(bytes(running.received) == data, "the echoed transfer differs from what was sent")
        self.assertIs(client.link, link)
        self.assertIs(client.session, session)
        self.assertEqual(set(self.tunnel.server.sessions), server_sessions)
        self.assertEqual(self.logged("resumed"), [])
        self.assertEqual(self.served(0), 1)  # one connection to the target, never reconnected
        self.assertEqual(
            len(self.logged("reloaded ")), 1, "\n".join(self.logged("reload"))
        )
        self.assertIn("(1 added, 1 removed, 0 changed)", self.logged("reloaded ")[0])
        [removed] = self.logged("tunnel removed: ")
        self.assertIn(f":{ports[2]} -> 127.0.0.1:{self.targets[1][1]}; its port is closed, its 1 open", removed)
        events = {e["event"]: e for e in self.events if isinstance(e.get("event"), str)}
        self.assertEqual((events["tunnel_removed"]["port"], events["tunnel_removed"]["streams"]), (ports[2], 1))
        self.assertEqual(events["tunnel_added"]["target"], f"127.0.0.1:{self.targets[2][1]}")
        self.assertEqual(
            [events["config_reloaded"][k] for k in ("added", "removed", "changed")], [1, 1, 0]
        )

    @defer.inlineCallbacks
    def test_invalid_file_on_reload_changes_nothing(self) -> Any:
        ports = yield self.start_client([0])
        path = self.dir / "client.toml"
        path.write_text(path.read_text() + '\n[[tunnel]]\nforward = "127.0.0.1:0"\nto = "localhost:0"\n')
        self.service.reload()
        self.assertEqual(list(self.service.client.tunnels), [1])
        [error] = self.logged("reloading the config file failed")
        self.assertIn("keeping the current tunnels and settings", error)
        self.assertIn("client.toml line 12: [[tunnel]] #2 to: port 0 is outside 1-65535", error)
        [event] = [e for e in self.events if e.get("event") == "config_reload_failed"]
        self.assertIn("port 0 is outside 1-65535", event["reason"])
        reply, _ = yield with_timeout(visit(ports[1], Visitor(b"still here")), 10)
        self.assertEqual(reply, b"still here")

    @defer.inlineCallbacks
    def test_other_settings_need_a_restart(self) -> Any:
        yield self.start_client([0])
        self.write([0], extra="connect_timeout = 3\nping_interval = 5\n")
        self.service.reload()
        [warning] = self.logged("take effect only after a restart")
        self.assertIn("client.toml: changed ", warning)
        for name in ("connect_timeout", "ping_interval"):
            self.assertIn(name, warning)
        self.assertNotIn("session", warning)
        self.assertEqual(self.service.config.connect_timeout, 10.0)
        self.assertIn("(0 added, 0 removed, 0 changed)", self.logged("reloaded ")[0])

    @defer.inlineCallbacks
    def test_a_changed_server_list_needs_a_restart(self) -> Any:
        yield self.start_client([0])
        path = self.write([0])
        first = f'server = "127.0.0.1:{self.tunnel.control_port}"'
        path.write_text(path.read_text().replace(first, f'server = ["127.0.0.1:{self.tunnel.control_port}", "127.0.0.1:1"]'))
        self.service.reload()
        [warning] = self.logged("take effect only after a restart")
        self.assertIn("client.toml: changed server", warning)
        self.assertEqual(self.service.config.server_list, (("127.0.0.1", self.tunnel.control_port),))

    @defer.inlineCallbacks
    def test_new_target_for_a_fixed_port_keeps_the_tunnel(self) -> Any:
        from tests.harness import free_port

        port = free_port()
        path = self.write([])
        base = path.read_text()
        path.write_text(base + f'[[tunnel]]\nforward = "127.0.0.1:{port}"\nto = "127.0.0.1:{self.targets[0][1]}"\n')
        options = tap_client.Options()
        options.parseOptions(["--config", str(path)])
        service = tap_client.ClientMainService(options.config, reactor, exit_on_fatal=False, reload_argv=options.argv)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        yield with_timeout(service.client.when_bound(), 10)
        path.write_text(base + f'[[tunnel]]\nforward = "127.0.0.1:{port}"\nto = "127.0.0.1:{self.targets[1][1]}"\n')
        service.reload()
        self.assertEqual(service.client.tunnels[1].target_port, self.targets[1][1])
        reply, _ = yield with_timeout(visit(port, Visitor(b"x")), 10)
        self.assertEqual(reply, b"x")
        self.assertEqual(self.served(1), 1)  # the new target served it
        self.assertEqual(self.served(0), 0)

    @defer.inlineCallbacks
    def test_change_while_the_link_is_down_applies_on_resume(self) -> Any:
        yield self.start_client([0, 1])
        client = self.service.client
        session = client.session
        assert client.link is not None
        client.link.transport.abortConnection()
        yield wait_until(lambda: client.link is None)
        self.write([1, 2])  # remove tunnel 1, add target 2
        self.service.reload()
        yield wait_until(lambda: client.link is not None and 3 in client.bound, 20)
        self.assertIs(client.session, session)  # resumed, not a new session
        server_session = next(iter(self.tunnel.server.sessions.values()))
        yield wait_until(lambda: sorted(server_session.tunnels) == [2, 3])
        reply, _ = yield with_timeout(visit(client.bound[3][1], Visitor(b"after resume")), 10)
        self.assertEqual(reply, b"after resume")


class ProcessReloadTests(SynchronousTestCase):
    """`kill -HUP` on a real client process (the installed plugin) started
    with --config: tunnels added and removed, a transfer on another tunnel
    untouched."""

    def setUp(self) -> None:
        from tests import harness as tp

        reason = tp.plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.tp = tp
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-config-processes-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def start_target(self) -> int:
        target = self.tp.TargetServer()
        self.tp.serve_in_thread(self, target)
        return target.server_address[1]

    def write_config(self, path: Path, control: int, targets: list[int]) -> None:
        state = self.workdir / "state"
        tunnels = "".join(f'\n[[tunnel]]\nforward = "127.0.0.1:0"\nto = "127.0.0.1:{t}"\n' for t in targets)
        path.write_text(
            f'server = "127.0.0.1:{control}"\ntoken_file = "{state / "token"}"\n'
            f'fingerprint = "sha256:{self.tp.cert_fingerprint(state / "server.crt")}"\n{tunnels}'
        )

    def ready_ports(self, client: Any, count: int) -> dict[int, int]:
        """{target port: public port} once `count` 'tunnel ready' lines are logged."""
        pattern = r"tunnel ready: \S+:(\d+) -> 127\.0\.0\.1:(\d+)"
        deadline = time.monotonic() + self.tp.START_TIMEOUT
        while len(re.findall(pattern, client.output)) < count:
            client.wait_for(r"tunnel ready", self.tp.START_TIMEOUT)
            if time.monotonic() > deadline:
                self.fail(f"fewer than {count} tunnels ready: {client.describe()}")
            time.sleep(0.05)
        return {int(t): int(p) for p, t in re.findall(pattern, client.output)}

    def test_sighup_adds_and_removes_tunnels_during_a_transfer(self) -> None:
        tp = self.tp
        control = tp.free_port()
        server = tp.Process(
            self, "server",
            [*tp.TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(control),
             "--interface", "127.0.0.1", "--state-dir", str(self.workdir / "state")],
            self.workdir,
        )
        server.wait_for(r"Run on the client machine")
        a, b, c = (self.start_target() for _ in range(3))
        path = self.workdir / "client.toml"
        self.write_config(path, control, [a, b])
        client = tp.Process(
            self, "client", [*tp.TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "--config", str(path)],
            self.workdir,
        )
        ports = self.ready_ports(client, 2)

        running = socket.create_connection(("127.0.0.1", ports[a]), timeout=20)
        self.addCleanup(running.close)
        received = bytearray()

        def exchange(chunk: bytes) -> None:
            running.sendall(chunk)
            want = len(received) + len(chunk)
            while len(received) < want:
                data = running.recv(65536)
                self.assertTrue(data, "the running transfer was closed")
                received.extend(data)

        data = pattern(11, 8 * 256 * 1024)
        chunks = [data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
        while len(received) < len(tp.BANNER):
            received.extend(running.recv(65536))
        exchange(chunks[0])
        exchange(chunks[1])

        self.write_config(path, control, [a, c])  # b's tunnel out, c's in
        os.kill(client.popen.pid, signal.SIGHUP)
        exchange(chunks[2])
        client.wait_for(r"reloaded \S+client\.toml: 2 tunnels \(1 added, 1 removed, 0 changed\)")
        exchange(chunks[3])
        ports = self.ready_ports(client, 3)
        exchange(chunks[4])

        for _ in range(200):  # the removed tunnel's port closes
            try:
                socket.create_connection(("127.0.0.1", ports[b]), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.05)
        else:
            self.fail(f"port {ports[b]} of the removed tunnel still accepts connections")
        with socket.create_connection(("127.0.0.1", ports[c]), timeout=20) as visitor:
            visitor.sendall(b"via c")
            visitor.shutdown(socket.SHUT_WR)
            reply = bytearray()
            while part := visitor.recv(65536):
                reply.extend(part)
        self.assertEqual(bytes(reply), tp.BANNER + b"via c")

        for chunk in chunks[5:]:
            exchange(chunk)
        running.shutdown(socket.SHUT_WR)
        while rest := running.recv(65536):
            received.extend(rest)
        self.assertEqual(len(received), len(tp.BANNER) + len(data))
        self.assertTrue(bytes(received) == tp.BANNER + data, "the transfer's bytes differ from what was sent")
        for text in ("link restored", "did not resume", "cannot reach", "Traceback"):
            self.assertNotIn(text, client.output)
        self.assertNotIn("detached", server.output)
        self.assertEqual(server.output.count("new session"), 1)
        self.assertEqual(client.popen.poll(), None)


class DocumentedOptionsTests(SynchronousTestCase):
    """README's "Every option" tables and docs/configuration.md's key lists
    name every option and file key the programs accept."""

    root = Path(__file__).resolve().parent.parent

    def options(self) -> dict[str, FileOptions]:
        return {"server": tap_server.Options(), "client": tap_client.Options()}

    def test_readme_tables_list_every_option(self) -> None:
        readme = (self.root / "README.md").read_text()
        tables = readme.split("## Every option", 1)[1].split("\n## ", 1)[0]
        for end, options in self.options().items():
            section = tables.split(f"### `rtunnel_{end}`", 1)[1].split("\n### ", 1)[0]
            names = sorted(o.rstrip("=") for o in options.longOpt)  # type: ignore[attr-defined]
            missing = [n for n in names if n not in ("help", "version") and f"`--{n}" not in section]
            self.assertEqual(missing, [], f"rtunnel_{end} options missing from README's table")

    def test_configuration_md_names_every_file_key(self) -> None:
        docs = (self.root / "docs" / "configuration.md").read_text()
        for end, options in self.options().items():
            missing = [k for k in options.config_keys() if f"`{k}`" not in docs]
            self.assertEqual(missing, [], f"{end} file keys missing from docs/configuration.md")
