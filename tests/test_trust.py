"""Server identity (CA + hostname), protocol version mismatch, key material."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.trial import unittest

import rtunnel.client
from rtunnel.tls import load_or_create_token, load_server_identity
from tests.harness import Echo, Tunnel, Visitor, listen_target, visit, with_timeout


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca_and_server(directory: Path, dns_name: str) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for `dns_name` signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("rtunnel test CA"))
        .issuer_name(_name("rtunnel test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "srv.crt", directory / "srv.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


class CertificateAuthorityTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.tunnel = Tunnel(self)
        self.ca, cert, key = make_ca_and_server(self.tunnel.state_dir, "localhost")
        yield self.tunnel.start_server(cert=cert, key=key)

    @defer.inlineCallbacks
    def test_ca_and_matching_hostname_are_trusted(self):
        _, target = listen_target(self, Echo)
        config = self.tunnel.client_config(
            [(0, target)], fingerprint=None, ca_file=self.ca, server_host="localhost"
        )
        service = self.tunnel.start_client(config)
        bound = yield with_timeout(service.client.when_bound(), 10)
        reply, _ = yield with_timeout(visit(bound[1][1], Visitor(b"via CA")), 10)
        self.assertEqual(reply, b"via CA")

    @defer.inlineCallbacks
    def test_ca_with_other_hostname_is_fatal(self):
        config = self.tunnel.client_config(
            [(0, 1)], fingerprint=None, ca_file=self.ca, server_host="127.0.0.1"
        )
        service = self.tunnel.start_client(config)
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("TLS with the server failed", message)
        self.assertEqual(self.tunnel.server.sessions, {})


class VersionMismatchTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unsupported_version_is_fatal_and_names_both_sides(self):
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        self.patch(rtunnel.client, "PROTOCOL_VERSIONS", (99,))
        service = tunnel.start_client(tunnel.client_config([(0, 1)]))
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("protocol versions [1]", message)
        self.assertIn("offered [99]", message)


class KeyMaterialTests(unittest.SynchronousTestCase):
    def test_first_start_creates_private_key_and_token_readable_by_owner_only(self):
        state = Path(self.mktemp())
        identity = load_server_identity(state)
        token, created = load_or_create_token(state)
        self.assertTrue(identity.created and created)
        for name in ("server.key", "token"):
            mode = stat.S_IMODE((state / name).stat().st_mode)
            self.assertEqual(mode, 0o600, name)
        again = load_server_identity(state)
        self.assertFalse(again.created)
        self.assertEqual(again.fingerprint, identity.fingerprint)
        self.assertEqual(load_or_create_token(state), (token, False))
        cert = x509.load_pem_x509_certificate((state / "server.crt").read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn(ipaddress.ip_address("127.0.0.1"), alt.get_values_for_type(x509.IPAddress))

    def test_unwritable_state_dir_is_a_clear_error(self):
        from rtunnel.errors import StateDirError

        blocker = Path(self.mktemp())
        blocker.write_text("a file where a directory should be")
        with self.assertRaises(StateDirError) as caught:
            load_or_create_token(blocker / "state")
        self.assertIn("choose another --state-dir", str(caught.exception))


class CertificateMismatchTests(unittest.SynchronousTestCase):
    def test_key_of_another_certificate_is_refused_at_start(self):
        from rtunnel.errors import ConfigError

        first, second = Path(self.mktemp()), Path(self.mktemp())
        first.mkdir()
        second.mkdir()
        _, cert, _ = make_ca_and_server(first, "localhost")
        _, _, other_key = make_ca_and_server(second, "localhost")
        with self.assertRaises(ConfigError) as caught:
            load_server_identity(Path(self.mktemp()), cert, other_key)
        self.assertIn("does not belong to the certificate", str(caught.exception))
