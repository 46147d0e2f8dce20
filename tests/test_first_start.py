"""What a new user reads: the client command the server prints at start, and
the one `rtunnel_server add-client` prints. Each says what it could not know
(the name clients reach the server by, its port, a fingerprint not made
yet) instead of printing a guess as if it were the answer."""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rtunnel.config import ServerConfig
from rtunnel.tap.server import ServerService, add_client_main, client_host
from rtunnel.tls import format_fingerprint, load_server_identity
from tests.harness import LogCapture


class ClientHostTests(SynchronousTestCase):
    def test_a_port_bound_to_one_address_is_reached_there(self) -> None:
        self.assertEqual(client_host("127.0.0.1", "localhost"), ("127.0.0.1", ""))
        self.assertEqual(client_host("2001:db8::5", "h.example"), ("2001:db8::5", ""))

    def test_on_every_address_the_hosts_name_comes_with_a_note(self) -> None:
        for listening in ("::", "0.0.0.0", ""):
            host, note = client_host(listening, "tunnel.example.com")
            self.assertEqual(host, "tunnel.example.com")
            self.assertIn("if the client machine reaches this server by another name or address, use that", note)

    def test_a_host_named_localhost_gets_a_placeholder_and_says_to_replace_it(self) -> None:
        for name in ("localhost", "LOCALHOST", "localhost.localdomain", "ip6-localhost", ""):
            host, note = client_host("::", name)
            self.assertEqual(host, "SERVER")
            self.assertIn("SERVER: this server's name or address as the client machine reaches it", note)


class AddClientCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-add-client-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def add(self, *argv: str) -> str:
        out = io.StringIO()
        status = add_client_main(
            ["alice", "--ports", "4000-4099", "--state-dir", str(self.dir), *argv], out
        )
        self.assertEqual(status, 0)
        return out.getvalue()

    def command(self, printed: str) -> str:
        [line] = [line.strip() for line in printed.splitlines() if line.strip().startswith("rtunnel_client")]
        return line

    def test_without_a_certificate_it_says_where_the_fingerprint_comes_from(self) -> None:
        printed = self.add("--server", "tunnel.example:2222")
        self.assertIn("--fingerprint FINGERPRINT", self.command(printed))
        self.assertIn(f"FINGERPRINT: there is no server certificate in {self.dir} yet", printed)
        self.assertIn("prints its fingerprint", printed)

    def test_with_the_servers_certificate_it_prints_its_fingerprint_and_no_note(self) -> None:
        identity = load_server_identity(self.dir, None, None)
        printed = self.add("--server", "tunnel.example:2222")
        self.assertIn(f"--fingerprint {format_fingerprint(identity.fingerprint)}", self.command(printed))
        self.assertNotIn("FINGERPRINT", printed)
        self.assertIn("-c tunnel.example:2222 ", self.command(printed))
        self.assertNotIn("a guess", printed)

    def test_without_server_the_address_is_called_a_guess(self) -> None:
        printed = self.add()
        host = re.search(r"-c (\S+):19050 ", self.command(printed)).group(1)  # type: ignore[union-attr]
        self.assertIn(f"-c {host}:19050: ", printed)
        self.assertIn("add-client knows neither the server's --port nor the name clients reach it by", printed)
        self.assertIn("pass --server HOST:PORT", printed)

    def test_a_client_limited_to_some_addresses_forwards_on_one_of_them(self) -> None:
        self.assertIn(" -f [::1]:4000 ", self.command(self.add("--bind", "::1", "--bind", "127.0.0.1")))
        self.assertIn(" -f 4000 ", self.command(self.add("--bind", "127.0.0.1,0.0.0.0")))
        self.assertIn(" -f 4000 ", self.command(self.add()))


class ServerListeningLineTests(TestCase):
    """The server's start line, for each place the token can come from."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-first-start-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.events = LogCapture(self).events

    @defer.inlineCallbacks
    def start(self, **config: Any) -> Any:
        from twisted.internet import reactor

        import rtunnel.tap.server

        self.patch(rtunnel.tap.server, "exit_process", lambda _reactor, _code: None)
        service = ServerService(
            ServerConfig(listen="tcp:0:interface=127.0.0.1", state_dir=self.dir, **config), reactor
        )
        service.startService()
        yield service.ready
        self.addCleanup(service.stopService)
        [event] = [e for e in self.events if e.get("event") == "server_listening"]
        return formatEvent(event)

    @defer.inlineCallbacks
    def test_first_start_names_the_token_file_and_not_the_token(self) -> Any:
        text = yield self.start()
        token = (self.dir / "token").read_text().strip()
        self.assertNotIn(token, text)
        self.assertIn(f"The token clients must present is in {self.dir / 'token'} (new, mode 600)", text)
        self.assertIn(f"--token-file {self.dir / 'token'} --fingerprint sha256:", text)
        self.assertRegex(text, r"rtunnel_client -c 127\.0\.0\.1:\d+ -f 4000")

    @defer.inlineCallbacks
    def test_a_token_from_the_environment_is_named_as_such(self) -> Any:
        self.patch(os, "environ", {**os.environ, "RTUNNEL_TOKEN": "env-token-1234567890"})
        text = yield self.start(token="env-token-1234567890")
        self.assertIn('--token "$RTUNNEL_TOKEN"', text)
        self.assertNotIn("env-token-1234567890", text)

    @defer.inlineCallbacks
    def test_a_token_given_with_the_option_is_not_shown(self) -> Any:
        text = yield self.start(token="flag-token-1234567890")
        self.assertIn("--token TOKEN", text)
        self.assertIn("TOKEN: the token given to this server with --token", text)
        self.assertNotIn("flag-token-1234567890", text)
