"""Hostnames as values (#15): normalisation, who may claim what, routes
with wildcards, certificate name matching (RFC 6125) and the SNI of a real
ClientHello. No reactor, no sockets."""

from __future__ import annotations

import shutil
import ssl
import tempfile
from pathlib import Path

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.auth import parse_clients
from rtunnel.config import hostname_spec
from rtunnel.configfile import plan_tunnel_changes
from rtunnel.errors import ConfigError
from rtunnel.httpconfig import BadHostname, HttpSettings, host_of, normalise
from rtunnel.server.certificates import name_matches
from rtunnel.server.claims import LocalClaims
from rtunnel.server.hostnames import HostRefused, HostRoutes
from rtunnel.server.sni import NotClientHello, parse_client_hello
from rtunnel.tap import client as tap_client
from rtunnel.tap import server as tap_server

HASH = "0" * 64


class Normalise(SynchronousTestCase):
    def test_case_trailing_dot_and_idna_compare_equal(self) -> None:
        """Lower case, no trailing dot, IDNA A-labels: one spelling per name."""
        self.assertEqual(normalise("App.Example.COM."), "app.example.com")
        self.assertEqual(normalise("bücher.example"), "xn--bcher-kva.example")
        self.assertEqual(normalise("XN--BCHER-KVA.example"), "xn--bcher-kva.example")
        self.assertEqual(host_of("Bücher.Example:8080"), "xn--bcher-kva.example")
        self.assertIsNone(host_of("[::1]:80"))

    def test_malformed_names_are_refused(self) -> None:
        for bad in ("", "a..b", "-a.example", "a_b.example", "x" * 64 + ".example", "*.example", "a b.example"):
            with self.assertRaises(BadHostname, msg=bad):
                normalise(bad)
        self.assertEqual(normalise("*.Alice.Example", wildcard=True), "*.alice.example")


class Permissions(SynchronousTestCase):
    def routes(self, domain: str | None = "tunnel.example") -> HostRoutes:
        return HostRoutes(HttpSettings(http="tcp:0", domain=domain), LocalClaims())

    def test_clients_file_hosts_with_a_wildcard(self) -> None:
        """hosts = ["app.alice.example.com", "*.alice.example.com"]: those
        names and one label under the wildcard; nothing else."""
        clients = parse_clients(
            f'[clients.alice]\ntoken_sha256 = "{HASH}"\nhosts = ["App.Alice.Example.com", "*.alice.example.com"]\n',
            "clients.toml",
        )
        policy = clients["alice"]
        self.assertEqual(policy.hosts, ("app.alice.example.com", "*.alice.example.com"))
        self.assertEqual(policy.ports, ())
        routes = self.routes()
        for name in ("app.alice.example.com", "*.alice.example.com", "x.alice.example.com"):
            routes.check_permitted(policy, "alice", name)
        for name in ("a.b.alice.example.com", "alice.example.com", "app.bob.example.com", "x.tunnel.example"):
            with self.assertRaises(HostRefused, msg=name) as caught:
                routes.check_permitted(policy, "alice", name)
            self.assertEqual(caught.exception.code, "not_permitted")

    def test_token_credentials_get_name_dot_domain(self) -> None:
        routes = self.routes()
        self.assertEqual(routes.full_name("MyApp"), "myapp.tunnel.example")
        routes.check_permitted(None, "default", "myapp.tunnel.example")
        for name in ("a.b.tunnel.example", "tunnel.example", "*.tunnel.example", "myapp.other.example"):
            with self.assertRaises(HostRefused, msg=name):
                routes.check_permitted(None, "default", name)
        without_domain = self.routes(None)
        with self.assertRaises(HostRefused) as caught:
            without_domain.check_permitted(None, "default", without_domain.full_name("myapp"))
        self.assertIn("no --domain", caught.exception.message)

    def test_a_bad_hosts_entry_is_a_config_error(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_clients(f'[clients.a]\ntoken_sha256 = "{HASH}"\nhosts = ["bad name"]\n', "c.toml")
        self.assertIn("hosts", str(caught.exception))


class Matching(SynchronousTestCase):
    def test_rfc6125_wildcards_cover_exactly_one_label(self) -> None:
        self.assertTrue(name_matches("*.example.com", "a.example.com"))
        self.assertTrue(name_matches("a.example.com", "a.example.com"))
        self.assertFalse(name_matches("*.example.com", "example.com"))
        self.assertFalse(name_matches("*.example.com", "a.b.example.com"))
        self.assertFalse(name_matches("a.example.com", "b.example.com"))


class ClientHello(SynchronousTestCase):
    def hello(self, server_name: str | None) -> bytes:
        context = ssl.create_default_context()
        context.check_hostname = False
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return outgoing.read()

    def test_the_sni_of_a_real_client_hello(self) -> None:
        data = self.hello("app.example.com")
        self.assertEqual(parse_client_hello(data).server_name, "app.example.com")  # type: ignore[union-attr]
        self.assertIsNone(parse_client_hello(data[:20]))  # more bytes needed
        self.assertEqual(parse_client_hello(self.hello(None)).server_name, "")  # type: ignore[union-attr]

    def test_not_tls_is_refused(self) -> None:
        with self.assertRaises(NotClientHello):
            parse_client_hello(b"GET / HTTP/1.1\r\n\r\n")
        with self.assertRaises(NotClientHello):
            parse_client_hello(b"\x16\x03\x01\xff\xff" + b"\x00" * 30000)


class ClientOptions(SynchronousTestCase):
    """--http/--tls beside -f, and [[tunnel]] http/hostnames/tls in a config file."""

    def test_http_and_tls_pair_with_the_next_to_like_forward(self) -> None:
        options = tap_client.Options()
        options.parseOptions([
            "-c", "example.org", "--token", "t", "--fingerprint", "ab" * 32,
            "-f", "4000", "-t", "3000", "--http", "myapp", "-t", "8080", "--tls", "secure.example.org", "-t", "8443",
        ])
        kinds = [(t.kind, t.hostname, t.bind_port, t.target_port) for t in options.config.tunnels]
        self.assertEqual(kinds, [("tcp", "", 4000, 3000), ("http", "myapp", 0, 8080),
                                 ("tls", "secure.example.org", 0, 8443)])

    def test_config_file_tunnels_of_hostnames(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="rtunnel-hostnames-"))
        self.addCleanup(shutil.rmtree, directory, True)
        path = directory / "client.toml"
        path.write_text(
            'server = "example.org"\ntoken = "t"\nfingerprint = "' + "ab" * 32 + '"\n'
            '[[tunnel]]\nhttp = "myapp"\nto = "localhost:3000"\n'
            '[[tunnel]]\nhostnames = ["a.example.org", "b.example.org"]\nto = "8080"\n'
            '[[tunnel]]\ntls = "s.example.org"\nto = "8443"\n'
        )
        options = tap_client.Options()
        options.parseOptions(["--config", str(path)])
        kinds = [(t.tunnel_id, t.kind, t.hostname, t.target_port) for t in options.config.tunnels]
        self.assertEqual(kinds, [(1, "http", "myapp", 3000), (2, "http", "a.example.org", 8080),
                                 (3, "http", "b.example.org", 8080), (4, "tls", "s.example.org", 8443)])
        path.write_text('server = "example.org"\ntoken = "t"\n[[tunnel]]\nhttp = "x"\nforward = "4000"\nto = "3000"\n')
        with self.assertRaises(usage.UsageError) as caught:
            tap_client.Options().parseOptions(["--config", str(path)])
        self.assertIn("split it into two [[tunnel]] tables", str(caught.exception))


class Reload(SynchronousTestCase):
    def test_hostnames_a_reloaded_policy_no_longer_permits_are_named(self) -> None:
        """After a clients-file reload, the names a session holds outside its
        new hosts are found (the server warns; they stay until the session ends)."""
        routes = HostRoutes(HttpSettings(http="tcp:0"), LocalClaims())
        before = parse_clients(f'[clients.a]\ntoken_sha256 = "{HASH}"\nhosts = ["x.a.example", "y.a.example"]\n', "c")
        after = parse_clients(f'[clients.a]\ntoken_sha256 = "{HASH}"\nhosts = ["x.a.example"]\n', "c")

        class Session:
            credential, serial, hostnames, tunnel_count = "a", 1, {}, 0

            def still_wants(self, tag: int) -> bool:
                return True

        session = Session()
        session.server = type("S", (), {"policy_for": staticmethod(lambda credential: before["a"])})()
        for tag, name in enumerate(("x.a.example", "y.a.example"), start=1):
            session.hostnames[tag] = routes.bind(session, tag, "http", name)  # type: ignore[arg-type]
        self.assertEqual(routes.not_permitted(session, after["a"]), ["y.a.example"])  # type: ignore[arg-type]


class ClientReload(SynchronousTestCase):
    def test_a_hostname_with_a_new_target_is_retargeted_in_place(self) -> None:
        """SIGHUP: the same hostname with another `to` keeps its tunnel (no
        UNBIND/BIND of the name); a new name is added, a dropped one removed."""
        live = [hostname_spec(1, "http", "app", "3000", "off", "--http"),
                hostname_spec(2, "http", "old", "3001", "off", "--http")]
        wanted = [hostname_spec(1, "http", "app", "4000", "off", "--http"),
                  hostname_spec(2, "http", "new", "3001", "off", "--http")]
        changes = plan_tunnel_changes(live, wanted)
        self.assertEqual([(t.tunnel_id, t.hostname, t.target_port) for t in changes.retargeted], [(1, "app", 4000)])
        self.assertEqual([t.hostname for t in changes.removed], ["old"])
        self.assertEqual([t.hostname for t in changes.added], ["new"])


class ServerOptions(SynchronousTestCase):
    def test_settings_of_the_shared_ports_without_them_are_an_error(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            tap_server.Options().parseOptions(["--domain", "tunnel.example"])
        self.assertIn("--domain needs the shared HTTP/HTTPS ports, which are off: add --http", str(caught.exception))
        options = tap_server.Options()
        options.parseOptions(["--domain", "Tunnel.Example.", "--http", "8080", "--trusted-proxies", "10.0.0.0/8 ::1"])
        http = options.config.http
        self.assertEqual((http.domain, http.http, len(http.trusted_proxies)), ("tunnel.example", "tcp:8080", 2))


class Routes(SynchronousTestCase):
    def test_an_exact_claim_wins_over_the_wildcard_one_level_up(self) -> None:
        """"*.zone" serves x.zone (one label), not zone or a.b.zone; a name's
        own claim wins over the wildcard."""
        routes = HostRoutes(HttpSettings(http="tcp:0"), LocalClaims())
        policy = parse_clients(
            f'[clients.a]\ntoken_sha256 = "{HASH}"\nhosts = ["*.a.example", "own.a.example"]\n', "c")["a"]

        class Session:
            credential, serial, hostnames, tunnel_count = "a", 1, {}, 0
            server = type("S", (), {"policy_for": staticmethod(lambda credential: policy)})()

            def still_wants(self, tag: int) -> bool:
                return True

        session = Session()
        wildcard = routes.bind(session, 1, "http", "*.a.example")  # type: ignore[arg-type]
        own = routes.bind(session, 2, "http", "own.a.example")  # type: ignore[arg-type]
        self.assertIs(routes.route("x.a.example"), wildcard)
        self.assertIs(routes.route("own.a.example"), own)
        self.assertIsNone(routes.route("a.example"))
        self.assertIsNone(routes.route("b.x.a.example"))
        self.assertIsNone(routes.route(None))
