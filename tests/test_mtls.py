"""Client certificates (mutual TLS): cert_sha256 in the clients file, the
client's --client-cert/--client-key, and the server's policy for them."""

from __future__ import annotations

import datetime
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from rtunnel import auth
from rtunnel.errors import ConfigError
from rtunnel.tap.client import ClientMainService, Options
from rtunnel.tls import ClientIdentity, load_client_identity
from tests.harness import (
    Echo,
    Tunnel,
    Visitor,
    free_ports,
    listen_target,
    make_ca_and_server,
    visit,
    with_timeout,
)

ALICE = "alice-token-0123456789"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def make_client_cert(directory: Path, name: str) -> tuple[Path, Path, str]:
    """A self-signed client certificate and key (PEM files) and its cert_sha256."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class LoaderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="rtunnel-mtls-")) / "clients.toml"

    def load(self, text: str) -> dict[str, auth.ClientPolicy]:
        self.path.write_text(text)
        return auth.load_clients(self.path)

    def test_cert_only_and_both(self):
        digest = "AB" * 32
        clients = self.load(
            f'[clients.a]\ncert_sha256 = "{digest}"\nports = [1]\n'
            f'[clients.b]\ncert_sha256 = "{"cd" * 32}"\ntoken_sha256 = "{sha(ALICE)}"\nports = [2]\n'
        )
        self.assertEqual(clients["a"].cert_sha256, digest.lower())
        self.assertIsNone(clients["a"].token_sha256)
        self.assertEqual(clients["b"].token_sha256, sha(ALICE))
        self.assertIsNone(auth.authenticate(clients, ALICE + "x"))
        self.assertEqual(auth.authenticate(clients, ALICE).name, "b")
        self.assertIsNone(auth.authenticate_certificate(clients, None))

    def test_errors_name_file_client_and_key(self):
        for text, wanted in (
            ('[clients.a]\ncert_sha256 = "xyz"\nports = [1]\n', "client 'a', key 'cert_sha256'"),
            ("[clients.a]\ncert_sha256 = 5\nports = [1]\n", "client 'a', key 'cert_sha256': is a integer"),
            ("[clients.a]\nports = [1]\n", "cert_sha256"),
            (
                f'[clients.a]\ncert_sha256 = "{"ab" * 32}"\nports = [1]\n'
                f'[clients.b]\ncert_sha256 = "{"AB" * 32}"\nports = [2]\n',
                "same cert_sha256",
            ),
        ):
            e = self.assertRaises(ConfigError, self.load, text)
            self.assertIn(str(self.path), str(e))
            self.assertIn(wanted, str(e))


class OptionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-mtls-"))
        self.cert, self.key, self.digest = make_client_cert(self.dir, "alice")

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["-c", "example.net", "-f", "4000", "-t", "3000", "--fingerprint", "ab" * 32, *args])
        return options

    def test_cert_makes_the_token_optional(self):
        self.patch(os, "environ", {})
        options = self.parse("--client-cert", str(self.cert), "--client-key", str(self.key))
        self.assertEqual(options.config.token, "")
        self.assertEqual(options.client_identity.fingerprint, self.digest)
        e = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn("--client-cert", str(e))

    def test_both_or_neither_and_matching_key(self):
        e = self.assertRaises(usage.UsageError, self.parse, "--token", "x", "--client-cert", str(self.cert))
        self.assertIn("give both or neither", str(e))
        _, other_key, _ = make_client_cert(self.dir, "bob")
        e = self.assertRaises(
            usage.UsageError, self.parse, "--client-cert", str(self.cert), "--client-key", str(other_key)
        )
        self.assertIn("does not belong", str(e))
        e = self.assertRaises(
            usage.UsageError, self.parse, "--client-cert", str(self.key), "--client-key", str(self.key)
        )
        self.assertIn("is not a PEM certificate", str(e))
        e = self.assertRaises(
            usage.UsageError, self.parse, "--client-cert", str(self.dir / "nope"), "--client-key", str(self.key)
        )
        self.assertIn("cannot read", str(e))


class MutualTLSTests(unittest.TestCase):
    def setUp(self) -> None:
        self.tunnel = Tunnel(self)
        self.dir = self.tunnel.state_dir
        self.clients_file = self.dir / "clients.toml"
        self.alice_port, self.other_port = free_ports(2)
        cert, key, self.alice_digest = make_client_cert(self.dir, "alice")
        self.alice_identity = load_client_identity(cert, key)
        cert, key, _ = make_client_cert(self.dir, "mallory")
        self.mallory_identity = load_client_identity(cert, key)
        self.clients_file.write_text(
            f'[clients.alice]\ncert_sha256 = "{self.alice_digest}"\nports = [{self.alice_port}]\n'
            'bind = ["127.0.0.1"]\n'
            f'[clients.bob]\ntoken_sha256 = "{sha(ALICE)}"\nports = [{self.other_port}]\nbind = ["127.0.0.1"]\n'
        )

    def start_client(self, targets: list[tuple[int, int]], identity: ClientIdentity | None, **kw: object):
        config = self.tunnel.client_config(targets, **kw)
        service = ClientMainService(config, reactor, exit_on_fatal=False, client_identity=identity)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    @defer.inlineCallbacks
    def test_listed_certificate_without_token_binds_and_moves_bytes(self):
        yield self.tunnel.start_server(clients_file=self.clients_file)
        _, target = listen_target(self, Echo)
        service = self.start_client([(0, target)], self.alice_identity, token="")
        bound = yield with_timeout(service.client.when_bound(), 10)
        port = bound[1][1]
        self.assertEqual(port, self.alice_port)
        reply, _ = yield with_timeout(visit(port, Visitor(b"hello over mtls")), 10)
        self.assertEqual(reply, b"hello over mtls")
        self.assertEqual([s.credential for s in self.tunnel.server.sessions.values()], ["alice"])

    @defer.inlineCallbacks
    def test_unlisted_certificate_without_token_is_refused(self):
        yield self.tunnel.start_server(clients_file=self.clients_file)
        service = self.start_client([(0, 1)], self.mallory_identity, token="")
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("wrong token", message)
        self.assertIn("not a cert_sha256", message)
        self.assertEqual(self.tunnel.server.guard.failures, 1)

    @defer.inlineCallbacks
    def test_unlisted_certificate_falls_back_to_the_token(self):
        yield self.tunnel.start_server(clients_file=self.clients_file)
        _, target = listen_target(self, Echo)
        service = self.start_client([(0, target)], self.mallory_identity, token=ALICE)
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1][1], self.other_port)  # bob's policy: bob's token

    @defer.inlineCallbacks
    def test_the_certificate_clients_policy_applies(self):
        yield self.tunnel.start_server(clients_file=self.clients_file)
        # the certificate wins over a token of another client
        service = self.start_client([(self.other_port, 1)], self.alice_identity, token=ALICE)
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn(f"port {self.other_port} is not permitted for client alice", message)

    @defer.inlineCallbacks
    def test_client_without_certificate_still_uses_its_token(self):
        yield self.tunnel.start_server(clients_file=self.clients_file)
        _, target = listen_target(self, Echo)
        [port] = yield self.tunnel.connect([(0, target)], token=ALICE)
        self.assertEqual(port, self.other_port)
        reply, _ = yield with_timeout(visit(port, Visitor(b"plain")), 10)
        self.assertEqual(reply, b"plain")

    @defer.inlineCallbacks
    def test_certificate_with_trust_on_first_use(self):
        yield self.tunnel.start_server(clients_file=self.clients_file)
        _, target = listen_target(self, Echo)
        config = self.tunnel.client_config([(0, target)], token="", fingerprint=None)
        service = ClientMainService(
            config, reactor, exit_on_fatal=False, known_servers=self.dir / "known",
            client_identity=self.alice_identity,
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1][1], self.alice_port)

    @defer.inlineCallbacks
    def test_certificate_with_a_ca_checked_server(self):
        ca, cert, key = make_ca_and_server(self.dir, "localhost")
        yield self.tunnel.start_server(clients_file=self.clients_file, cert=cert, key=key)
        _, target = listen_target(self, Echo)
        service = self.start_client(
            [(0, target)], self.alice_identity, token="", fingerprint=None, ca_file=ca, server_host="localhost"
        )
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1][1], self.alice_port)
