"""Per-client credentials and policy: the clients file, add-client, the
server's enforcement of ports, bind addresses and limits, and SIGHUP reload."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import stat
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from rtunnel import auth, files
from rtunnel.errors import ConfigError, StateDirError
from rtunnel.tap.server import add_client_main
from tests.harness import (
    Echo,
    Tunnel,
    Visitor,
    free_ports,
    listen_target,
    sleep,
    visit,
    wait_until,
    with_timeout,
)

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class LoaderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-auth-"))
        self.path = self.dir / "clients.toml"

    def load(self, text: str, **kw: object) -> dict[str, auth.ClientPolicy]:
        return auth.load_clients(write(self.path, text), **kw)

    def refused(self, text: str) -> str:
        e = self.assertRaises(ConfigError, self.load, text)
        self.assertIn(str(self.path), str(e))
        return str(e)

    def test_valid_file(self):
        clients = self.load(
            f'[clients.alice]\ntoken_sha256 = "{sha(ALICE).upper()}"\nports = ["4000-4099", 5432]\n'
            'bind = ["0.0.0.0"]\nmax_tunnels = 3\nmax_streams = 10\n\n'
            f'[clients.bob]\ntoken_sha256 = "{sha(BOB)}"\nports = [6000]\n',
            default_max_streams=77,
        )
        self.assertEqual(
            clients["alice"],
            auth.ClientPolicy("alice", sha(ALICE), ((4000, 4099), (5432, 5432)), ("0.0.0.0",), 3, 10),
        )
        bob = clients["bob"]
        self.assertEqual(bob.bind, ("0.0.0.0", "::"))
        self.assertEqual((bob.max_tunnels, bob.max_streams), (16, 77))
        self.assertTrue(bob.permits_port(6000))
        self.assertFalse(bob.permits_port(6001))
        self.assertTrue(bob.permits_address("::"))
        self.assertFalse(bob.permits_address("127.0.0.1"))

    def test_default_bind_comes_from_the_server(self):
        clients = self.load(f'[clients.a]\ntoken_sha256 = "{sha(ALICE)}"\nports = [1]\n', default_bind=("127.0.0.1",))
        self.assertEqual(clients["a"].bind, ("127.0.0.1",))

    def test_empty_file_has_no_clients(self):
        self.assertEqual(self.load("# nobody yet\n"), {})

    def test_bad_toml_names_line_and_column(self):
        message = self.refused('[clients.alice]\ntoken_sha256 = "abc\n')
        self.assertIn("not valid TOML", message)
        self.assertIn("line 2", message)
        self.assertIn("column", message)

    def test_missing_token_sha256(self):
        message = self.refused('[clients.alice]\nports = [4000]\n')
        self.assertIn("client 'alice', key 'token_sha256': missing", message)

    def test_bad_hex(self):
        message = self.refused('[clients.alice]\ntoken_sha256 = "xyz"\nports = [4000]\n')
        self.assertIn("client 'alice', key 'token_sha256'", message)
        self.assertIn("not 64 hex digits", message)
        message = self.refused(f'[clients.alice]\ntoken_sha256 = "{sha(ALICE)[:-1]}g"\nports = [4000]\n')
        self.assertIn("not 64 hex digits", message)

    def test_bad_port_ranges(self):
        base = f'[clients.alice]\ntoken_sha256 = "{sha(ALICE)}"\n'
        for ports, expected in [
            ('["4099-4000"]', "backwards"),
            ('["4000-70000"]', "outside 1-65535"),
            ("[0]", "outside 1-65535"),
            ('["http"]', "not a port or a range"),
            ("[]", "is empty"),
            ('"4000-4099"', "must be a list"),
            ("[4.5]", "is a number"),
        ]:
            message = self.refused(base + f"ports = {ports}\n")
            self.assertIn("client 'alice', key 'ports'", message)
            self.assertIn(expected, message)
        self.assertIn("key 'ports': missing", self.refused(base))

    def test_wrong_value_types(self):
        base = f'[clients.alice]\ntoken_sha256 = "{sha(ALICE)}"\nports = [4000]\n'
        for line, key, expected in [
            ('max_tunnels = "many"', "max_tunnels", "is a string"),
            ("max_streams = true", "max_streams", "is a boolean"),
            ("max_tunnels = 0", "max_tunnels", "at least 1"),
            ('bind = "0.0.0.0"', "bind", "non-empty list"),
            ('bind = ["example.com"]', "bind", "not an IP address"),
            ("bind = [1]", "bind", "is a integer"),
        ]:
            message = self.refused(base + line + "\n")
            self.assertIn(f"client 'alice', key '{key}'", message)
            self.assertIn(expected, message)
        message = self.refused('[clients.alice]\ntoken_sha256 = 5\nports = [4000]\n')
        self.assertIn("is a integer", message)

    def test_unknown_keys_and_tables(self):
        base = f'[clients.alice]\ntoken_sha256 = "{sha(ALICE)}"\nports = [4000]\n'
        message = self.refused(base + "port = 4001\n")
        self.assertIn("client 'alice', key 'port': unknown key", message)
        self.assertIn("unknown top-level key 'server'", self.refused('[server]\nx = 1\n'))
        self.assertIn("clients.alice is a integer", self.refused("[clients]\nalice = 1\n"))

    def test_bad_names_and_duplicate_tokens(self):
        body = f'token_sha256 = "{sha(ALICE)}"\nports = [4000]\n'
        self.assertIn("reserved", self.refused("[clients.default]\n" + body))
        self.assertIn("must be 1-64 letters", self.refused('[clients."a b"]\n' + body))
        message = self.refused("[clients.a]\n" + body + "[clients.b]\n" + body)
        self.assertIn("same token_sha256", message)

    def test_missing_file(self):
        e = self.assertRaises(ConfigError, auth.load_clients, self.dir / "nope.toml")
        self.assertIn("does not exist", str(e))
        self.assertIn("add-client", str(e))


class AuthenticateTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clients = {
            "alice": auth.ClientPolicy("alice", sha(ALICE), ((4000, 4000),)),
            "bob": auth.ClientPolicy("bob", sha(BOB), ((5000, 5000),)),
        }

    def test_right_client(self):
        self.assertEqual(auth.authenticate(self.clients, ALICE).name, "alice")
        self.assertEqual(auth.authenticate(self.clients, BOB).name, "bob")

    def test_wrong_token(self):
        self.assertIsNone(auth.authenticate(self.clients, "nope"))
        self.assertIsNone(auth.authenticate(self.clients, None))
        self.assertIsNone(auth.authenticate(self.clients, sha(ALICE)))  # the hash is not the token
        self.assertIsNone(auth.authenticate({}, ALICE))

    def test_compares_against_every_client(self):
        calls = []
        real = auth.hmac.compare_digest

        def counting(a: bytes, b: bytes) -> bool:
            calls.append(b)
            return real(a, b)

        self.patch(auth.hmac, "compare_digest", counting)
        self.assertEqual(auth.authenticate(self.clients, ALICE).name, "alice")  # alice comes first
        self.assertEqual(len(calls), 2)


class AddClientTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-auth-"))
        self.path = self.dir / "state" / "clients.toml"

    def test_writes_only_the_hash_with_mode_0600(self):
        token = auth.add_client(self.path, "alice", [(4000, 4099), (5432, 5432)], bind=["127.0.0.1"])
        text = self.path.read_text()
        self.assertNotIn(token, text)
        self.assertIn(sha(token), text)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(os.listdir(self.path.parent), ["clients.toml"])  # no temp file left
        policy = auth.load_clients(self.path)["alice"]
        self.assertEqual(policy.ports, ((4000, 4099), (5432, 5432)))
        self.assertEqual(policy.bind, ("127.0.0.1",))
        self.assertEqual(auth.authenticate(auth.load_clients(self.path), token), policy)

    def test_adds_and_replaces_keeping_the_rest(self):
        self.path.parent.mkdir()
        write(self.path, "# our clients\n")
        first = auth.add_client(self.path, "alice", [(4000, 4000)])
        bob = auth.add_client(self.path, "bob", [(5000, 5000)], max_tunnels=2)
        second = auth.add_client(self.path, "alice", [(4001, 4001)], max_streams=9)
        clients = auth.load_clients(self.path)
        self.assertEqual(sorted(clients), ["alice", "bob"])
        self.assertIsNone(auth.authenticate(clients, first))
        self.assertEqual(auth.authenticate(clients, second).ports, ((4001, 4001),))
        self.assertEqual(clients["alice"].max_streams, 9)
        self.assertEqual(auth.authenticate(clients, bob).max_tunnels, 2)
        self.assertIn("# our clients", self.path.read_text())

    def test_refuses_a_broken_file_and_bad_names(self):
        self.path.parent.mkdir()
        write(self.path, "[clients.alice\n")
        self.assertRaises(ConfigError, auth.add_client, self.path, "bob", [(1, 1)])
        self.assertEqual(self.path.read_text(), "[clients.alice\n")
        self.assertRaises(ConfigError, auth.add_client, self.dir / "x.toml", "default", [(1, 1)])
        self.assertRaises(ConfigError, auth.add_client, self.dir / "x.toml", "a b", [(1, 1)])

    def test_unwritable_is_a_clear_error(self):
        self.path.parent.mkdir()
        original = files.os.replace

        def full(src: str, dst: object) -> None:
            raise OSError(28, "No space left on device")

        self.patch(files.os, "replace", full)
        e = self.assertRaises(StateDirError, auth.add_client, self.path, "alice", [(1, 1)])
        self.assertIn(f"cannot write {self.path}", str(e))
        self.assertIn("free space or choose another path", str(e))
        self.patch(files.os, "replace", original)
        self.assertEqual(os.listdir(self.path.parent), [])  # the temp file is gone

    def test_command_prints_the_token_once(self):
        out = io.StringIO()
        status = add_client_main(
            ["carol", "--ports", "4000-4099", "--bind", "127.0.0.1", "--clients", str(self.path),
             "--state-dir", str(self.dir), "--server", "tunnel.example:19050"],
            out,
        )
        self.assertEqual(status, 0)
        printed = out.getvalue()
        token = next(line.split()[-1] for line in printed.splitlines() if line.startswith("    ") and " " not in line.strip())
        # carol may bind only 127.0.0.1, so the command forwards a port there
        self.assertIn(f"rtunnel_client -c tunnel.example:19050 -f 127.0.0.1:4000 -t 3000 --token {token}", printed)
        self.assertEqual(printed.count(token), 2)  # on its own, and in the command
        self.assertEqual(auth.authenticate(auth.load_clients(self.path), token).name, "carol")
        self.assertNotIn(token, self.path.read_text())


class PolicyTests(unittest.TestCase):
    """A real server with a clients file, real clients."""

    def setUp(self) -> None:
        self.tunnel = Tunnel(self)
        self.clients_file = self.tunnel.state_dir / "clients.toml"
        self.alice_port, self.bob_port = free_ports(2)

    def write_clients(self, *, alice: bool = True, bob: bool = True, extra: str = "", **alice_keys: object) -> None:
        text = ""
        if alice:
            text += f'[clients.alice]\ntoken_sha256 = "{sha(ALICE)}"\nports = [{self.alice_port}]\nbind = ["127.0.0.1"]\n'
            text += "".join(f"{k} = {v}\n" for k, v in alice_keys.items())
        if bob:
            text += f'[clients.bob]\ntoken_sha256 = "{sha(BOB)}"\nports = [{self.bob_port}]\nbind = ["127.0.0.1"]\n'
        write(self.clients_file, text + extra)

    @defer.inlineCallbacks
    def start(self, **overrides: object):
        service = yield self.tunnel.start_server(clients_file=self.clients_file, **overrides)
        return service

    def sessions_of(self, name: str) -> list:
        return [s for s in self.tunnel.server.sessions.values() if s.credential == name]

    @defer.inlineCallbacks
    def test_port_outside_the_list_is_fatal(self):
        self.write_clients()
        yield self.start()
        service = self.tunnel.start_client(self.tunnel.client_config([(self.bob_port, 1)], token=ALICE))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn(f"port {self.bob_port} is not permitted for client alice", message)
        self.assertIn(f"allowed: {self.alice_port}", message)

    @defer.inlineCallbacks
    def test_address_outside_the_list_is_fatal(self):
        self.write_clients(alice=False, extra=(
            f'[clients.alice]\ntoken_sha256 = "{sha(ALICE)}"\nports = [{self.alice_port}]\nbind = ["127.0.0.2"]\n'
        ))
        yield self.start()
        service = self.tunnel.start_client(self.tunnel.client_config([(self.alice_port, 1)], token=ALICE))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("bind address 127.0.0.1 is not permitted for client alice", message)

    @defer.inlineCallbacks
    def test_own_port_works_and_port_zero_picks_in_the_range(self):
        self.write_clients(max_streams=7)
        yield self.start()
        _, target = listen_target(self, Echo)
        [port] = yield self.tunnel.connect([(0, target)], token=ALICE)
        self.assertEqual(port, self.alice_port)
        reply, _ = yield with_timeout(visit(port, Visitor(b"hello")), 10)
        self.assertEqual(reply, b"hello")
        [session] = self.sessions_of("alice")
        self.assertEqual(session.mux_session.settings.max_streams, 7)
        self.assertNotEqual(self.tunnel.server.config.session.max_streams, 7)

    @defer.inlineCallbacks
    def test_default_token_still_works_alongside(self):
        self.write_clients()
        yield self.start()
        _, target = listen_target(self, Echo)
        [port] = yield self.tunnel.connect([(0, target)])  # the harness's --token
        reply, _ = yield with_timeout(visit(port, Visitor(b"hi")), 10)
        self.assertEqual(reply, b"hi")

    @defer.inlineCallbacks
    def test_max_tunnels(self):
        extra_ports = free_ports(2)
        self.write_clients(alice=False, extra=(
            f'[clients.alice]\ntoken_sha256 = "{sha(ALICE)}"\nbind = ["127.0.0.1"]\nmax_tunnels = 2\n'
            f"ports = [{self.alice_port}, {extra_ports[0]}, {extra_ports[1]}]\n"
        ))
        yield self.start()
        _, target = listen_target(self, Echo)
        service = self.tunnel.start_client(self.tunnel.client_config(
            [(self.alice_port, target), (extra_ports[0], target), (extra_ports[1], target)], token=ALICE
        ))
        message = yield with_timeout(service.when_fatal(), 10)  # retrying cannot fix it
        self.assertIn("at most 2 tunnels per session", message)
        self.assertEqual(len(service.client.bound), 2)

    @defer.inlineCallbacks
    def test_sighup_removes_a_client_and_leaves_the_others(self):
        self.write_clients()
        original = signal.getsignal(signal.SIGHUP)
        service = yield self.start()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), original)
        _, target = listen_target(self, Echo)
        alice_service = self.tunnel.start_client(self.tunnel.client_config([(self.alice_port, target)], token=ALICE))
        yield with_timeout(alice_service.client.when_bound(), 10)
        [bob_port] = yield self.tunnel.connect([(self.bob_port, target)], token=BOB)
        [bob_session] = self.sessions_of("bob")

        # A transfer through bob that spans the reload.
        first, second = b"a" * 100_000, b"b" * 100_000
        visitor = Visitor(first, half_close=False)
        done = visit(bob_port, visitor)
        yield wait_until(lambda: visitor.received >= len(first))

        # A reload with a broken file changes nothing.
        write(self.clients_file, "[clients.alice\n")
        os.kill(os.getpid(), signal.SIGHUP)
        yield sleep(0.3)
        self.assertEqual(sorted(self.tunnel.server.clients), ["alice", "bob"])
        self.assertEqual(len(self.sessions_of("alice")), 1)

        # Alice is removed; bob's policy changes.
        fatal = alice_service.when_fatal()
        self.write_clients(alice=False)
        write(self.clients_file, self.clients_file.read_text().replace("bind = [", "max_tunnels = 3\nbind = ["))
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_until(lambda: not self.sessions_of("alice"))
        self.assertNotIn(("127.0.0.1", self.alice_port), self.tunnel.server.listeners)
        # Alice's port is really free: we can listen on it ourselves.
        port = reactor.listenTCP(self.alice_port, Factory(), interface="127.0.0.1")
        yield port.stopListening()
        message = yield with_timeout(fatal, 10)  # its reconnect is refused for good
        self.assertIn("wrong token", message)

        # Bob's session, port and transfer are untouched.
        self.assertEqual(self.sessions_of("bob"), [bob_session])
        self.assertEqual(self.tunnel.server.clients["bob"].max_tunnels, 3)
        visitor.transport.write(second)
        visitor.transport.loseWriteConnection()
        reply, _ = yield with_timeout(done, 10)
        self.assertEqual(reply, first + second)
        reply, _ = yield with_timeout(visit(bob_port, Visitor(b"again")), 10)
        self.assertEqual(reply, b"again")

        yield self.tunnel.stop_server()
        self.assertFalse(service.running)
        self.assertEqual(signal.getsignal(signal.SIGHUP), original)  # the handler is restored

    @defer.inlineCallbacks
    def test_a_bad_clients_file_stops_the_start(self):
        write(self.clients_file, "[clients.alice]\nports = [1]\n")
        self.tunnel.server_service = None
        from rtunnel.config import ServerConfig
        from rtunnel.tap import server as tap_server

        exits = []
        self.patch(tap_server, "exit_process", lambda r, code: exits.append(code))
        service = tap_server.ServerService(
            ServerConfig(listen="tcp:0:interface=127.0.0.1", state_dir=self.tunnel.state_dir,
                         clients_file=self.clients_file), reactor,
        )
        service.startService()
        failure = yield self.assertFailure(service.ready, ConfigError)
        self.assertIn("key 'token_sha256': missing", str(failure))
        self.assertEqual(exits, [1])
        self.assertFalse((self.tunnel.state_dir / "token").exists())
        yield service.stopService()
