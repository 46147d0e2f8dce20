"""Server identity (CA + hostname), protocol version mismatch, key material."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from twisted.internet import defer
from twisted.trial import unittest

import rtunnel.client
from rtunnel.tls import load_or_create_token, load_server_identity
from tests.harness import Echo, Tunnel, Visitor, listen_target, make_ca_and_server, visit, with_timeout


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
