"""Trust on first use: the known-servers file, learning, pinning, a changed key."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.python.usage import UsageError
from twisted.trial import unittest

import rtunnel.tap.client
from rtunnel.errors import ConfigError
from rtunnel.tap.client import ClientMainService, Options
from rtunnel.tls import (
    DEFAULT_KNOWN_SERVERS,
    KnownServersError,
    TrustOnFirstUseCreator,
    load_known_servers,
    parse_known_servers,
    server_key,
    store_known_server,
)
from tests.harness import Echo, Tunnel, Visitor, free_port, listen_target, visit, wait_until, with_timeout

FP_A = "ab" * 32
FP_B = "cd" * 32


def start_tofu_client(
    test: unittest.TestCase, tunnel: Tunnel, targets: list[tuple[int, int]], known: Path, **kwargs: Any
) -> ClientMainService:
    """A client of `tunnel` with --trust-on-first-use and `known` as its file."""
    config = tunnel.client_config(targets, fingerprint=None)
    service = ClientMainService(config, reactor, known_servers=known, **{"exit_on_fatal": False, **kwargs})
    service.startService()
    test.addCleanup(lambda: service.running and service.stopService())
    return service


class FirstUseTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_first_connection_stores_the_fingerprint_and_later_ones_reuse_it(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        known = Path(self.mktemp()) / "config" / "rtunnel" / "known_servers"
        key = f"127.0.0.1:{tunnel.control_port}"

        first = start_tofu_client(self, tunnel, [(0, target)], known)
        self.assertIsNone(first.client.tls_creator.fingerprint)
        bound = yield with_timeout(first.client.when_bound(), 10)
        reply, _ = yield with_timeout(visit(bound[1][1], Visitor(b"first use")), 10)
        self.assertEqual(reply, b"first use")

        creator = first.client.tls_creator
        self.assertIsInstance(creator, TrustOnFirstUseCreator)
        self.assertEqual(creator.learned, tunnel.fingerprint)
        self.assertEqual(load_known_servers(known), {key: tunnel.fingerprint})
        self.assertIn(f"{key} sha256:{tunnel.fingerprint}\n", known.read_text())
        self.assertEqual(stat.S_IMODE(known.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(known.parent.stat().st_mode) & 0o077, 0)  # 0700 less the umask
        self.assertEqual(sorted(p.name for p in known.parent.iterdir()), ["known_servers"])  # no temp left
        yield first.stopService()

        contents = known.read_bytes()
        second = start_tofu_client(self, tunnel, [(0, target)], known)
        self.assertEqual(second.client.tls_creator.fingerprint, tunnel.fingerprint)
        bound = yield with_timeout(second.client.when_bound(), 10)
        reply, _ = yield with_timeout(visit(bound[1][1], Visitor(b"pinned")), 10)
        self.assertEqual(reply, b"pinned")
        self.assertIsNone(second.client.tls_creator.learned)
        self.assertEqual(known.read_bytes(), contents)

    @defer.inlineCallbacks
    def test_replaced_server_key_is_fatal_and_names_both_fingerprints(self):
        control = free_port()
        listen = f"tcp:{control}:interface=127.0.0.1"
        old = Tunnel(self)
        yield old.start_server(listen=listen)
        _, target = listen_target(self, Echo)
        known = Path(self.mktemp()) / "known_servers"
        exits: list[int] = []
        self.patch(rtunnel.tap.client, "exit_process", lambda reactor, code: exits.append(code))

        running = start_tofu_client(self, old, [(0, target)], known, exit_on_fatal=True)
        yield with_timeout(running.client.when_bound(), 10)
        old_fp = old.fingerprint

        # Another identity (a new state dir) on the same control port.
        yield old.stop_server()
        new = Tunnel(self)
        yield new.start_server(listen=listen)
        new_fp = new.fingerprint
        self.assertNotEqual(old_fp, new_fp)

        # The running client reconnects, sees the new certificate and stops.
        message = yield with_timeout(running.when_fatal(), 15)
        key = f"127.0.0.1:{control}"
        for part in ("CHANGED", f"stored sha256:{old_fp}", f"now sha256:{new_fp}", key, str(known)):
            self.assertIn(part, message)
        yield wait_until(lambda: exits == [2], 5)

        # So does a client started afresh; the file keeps the old fingerprint.
        fresh = start_tofu_client(self, new, [(0, target)], known)
        message = yield with_timeout(fresh.when_fatal(), 10)
        self.assertIn(f"the certificate of {key} has CHANGED", message)
        self.assertIn(f"remove the line for {key} from {known}", message)
        self.assertEqual(load_known_servers(known), {key: old_fp})
        self.assertEqual(new.server.sessions, {})

    @defer.inlineCallbacks
    def test_unwritable_known_servers_file_refuses_the_connection(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        blocker = Path(self.mktemp())
        blocker.write_text("a file where a directory should be")
        known = blocker / "known_servers"
        service = start_tofu_client(self, tunnel, [(0, 1)], known)
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn(f"first connection to 127.0.0.1:{tunnel.control_port}", message)
        self.assertIn("not trusted", message)
        self.assertIn(f"cannot write the known-servers file {known}", message)
        self.assertIn("--known-servers", message)
        self.assertIn("is not a directory", message)
        self.assertIsNone(service.client.tls_creator.learned)
        self.assertEqual(tunnel.server.sessions, {})

    @defer.inlineCallbacks
    def test_read_only_directory_refuses_the_connection(self):
        if os.geteuid() == 0:
            raise unittest.SkipTest("root can write to a read-only directory")
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        directory = Path(self.mktemp())
        directory.mkdir(mode=0o500)
        self.addCleanup(os.chmod, directory, 0o700)
        service = start_tofu_client(self, tunnel, [(0, 1)], directory / "known_servers")
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("Permission denied", message)
        self.assertIn("not trusted", message)
        self.assertEqual(list(directory.iterdir()), [])
        self.assertEqual(tunnel.server.sessions, {})

    def test_malformed_known_servers_file_stops_the_client_at_start(self):
        known = Path(self.mktemp())
        known.write_text("127.0.0.1:19050 sha256:nothex\n")
        config = Tunnel(self).client_config([(0, 1)], fingerprint=None)
        with self.assertRaises(ConfigError) as caught:
            ClientMainService(config, reactor, exit_on_fatal=False, known_servers=known)
        self.assertIn(f"{known} line 1", str(caught.exception))


class KnownServersFileTests(unittest.SynchronousTestCase):
    def test_store_and_load_round_trip(self):
        path = Path(self.mktemp()) / "sub" / "known_servers"
        self.assertEqual(load_known_servers(path), {})
        store_known_server(path, "srv.example:19050", FP_A)
        store_known_server(path, "[::1]:19050", FP_B)
        self.assertEqual(load_known_servers(path), {"srv.example:19050": FP_A, "[::1]:19050": FP_B})
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        lines = path.read_text().splitlines()
        self.assertIn(f"srv.example:19050 sha256:{FP_A}", lines)
        self.assertIn(f"[::1]:19050 sha256:{FP_B}", lines)

    def test_store_replaces_the_servers_line_and_keeps_the_rest(self):
        path = Path(self.mktemp())
        path.write_text(f"# mine\n\nsrv:1 sha256:{FP_A}\nother:2 {FP_A.upper()}\n")
        os.chmod(path, 0o644)
        store_known_server(path, "srv:1", FP_B)
        self.assertEqual(path.read_text(), f"# mine\n\nother:2 {FP_A.upper()}\nsrv:1 sha256:{FP_B}\n")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def test_comments_and_blank_lines_are_ignored(self):
        text = f"# a comment\n\n   \n  # indented comment\nsrv:19050   sha256:{FP_A}  \n\tSRV2:1 {FP_B}\n"
        self.assertEqual(parse_known_servers(text, Path("f")), {"srv:19050": FP_A, "srv2:1": FP_B})

    def test_malformed_lines_are_reported_with_their_number(self):
        for bad in (
            "srv:19050",
            "srv:19050 sha256:abc",
            "srv sha256:" + FP_A,
            "srv:0 sha256:" + FP_A,
            "srv:70000 sha256:" + FP_A,
            "::1:19050 sha256:" + FP_A,
            "srv:19050 sha256:" + FP_A + " extra",
        ):
            text = f"# header\n\nok:1 sha256:{FP_B}\n{bad}\n"
            with self.assertRaises(KnownServersError) as caught:
                parse_known_servers(text, Path("/k/known"))
            self.assertIn("/k/known line 4", str(caught.exception), bad)
            self.assertIn("HOST:PORT sha256:", str(caught.exception))

    def test_a_server_listed_twice_is_an_error(self):
        text = f"srv:1 sha256:{FP_A}\nSRV:1 sha256:{FP_B}\n"
        with self.assertRaises(KnownServersError) as caught:
            parse_known_servers(text, Path("f"))
        self.assertIn("f line 2: srv:1 is already on line 1", str(caught.exception))

    def test_a_malformed_file_is_not_rewritten(self):
        path = Path(self.mktemp())
        path.write_text("garbage\n")
        self.assertRaises(KnownServersError, store_known_server, path, "srv:1", FP_A)
        self.assertEqual(path.read_text(), "garbage\n")

    def test_server_keys(self):
        self.assertEqual(server_key("Srv.Example", 19050), "srv.example:19050")
        self.assertEqual(server_key("2001:db8::1", 19050), "[2001:db8::1]:19050")


class TrustOnFirstUseOptionTests(unittest.SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["-c", "srv", "--token", "t", "-f", "4000", "-t", "3000", *argv])
        return options

    def test_trust_on_first_use_replaces_fingerprint_and_ca(self):
        options = self.parse("--trust-on-first-use", "--known-servers", "/tmp/k")
        self.assertEqual(options.known_servers, Path("/tmp/k"))
        self.assertTrue(self.parse("--trust-on-first-use", "--known-servers", "k").known_servers.is_absolute())
        self.assertIsNone(options.config.fingerprint)
        self.assertIsNone(options.config.ca_file)

    def test_default_known_servers_file_is_in_the_home_config(self):
        options = self.parse("--trust-on-first-use")
        self.assertEqual(options.known_servers, Path(os.path.expanduser(DEFAULT_KNOWN_SERVERS)).absolute())
        self.assertEqual(DEFAULT_KNOWN_SERVERS, "~/.config/rtunnel/known_servers")

    def test_trust_on_first_use_excludes_fingerprint_and_ca(self):
        for extra in (("--fingerprint", FP_A), ("--ca", "/tmp/ca.pem")):
            with self.assertRaises(UsageError) as caught:
                self.parse("--trust-on-first-use", *extra)
            self.assertIn("--trust-on-first-use", str(caught.exception))
        self.assertRaises(UsageError, self.parse, "--fingerprint", FP_A, "--ca", "/tmp/ca.pem")

    def test_known_servers_needs_trust_on_first_use(self):
        self.assertRaises(UsageError, self.parse, "--fingerprint", FP_A, "--known-servers", "/tmp/k")

    def test_no_identity_message_mentions_trust_on_first_use(self):
        with self.assertRaises(UsageError) as caught:
            self.parse()
        message = str(caught.exception)
        for part in ("--fingerprint", "--ca", "--trust-on-first-use", "sha256sum"):
            self.assertIn(part, message)

    def test_malformed_known_servers_file_is_a_usage_error(self):
        known = Path(self.mktemp())
        known.write_text("# ok\nnot a server line\n")
        with self.assertRaises(UsageError) as caught:
            self.parse("--trust-on-first-use", "--known-servers", str(known))
        self.assertIn("line 2", str(caught.exception))

    def test_fingerprint_and_ca_give_no_known_servers(self):
        self.assertIsNone(self.parse("--fingerprint", FP_A).known_servers)
