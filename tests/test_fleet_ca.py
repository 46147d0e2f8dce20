"""The fleet CA and member certificates (rtunnel.fleet.ca) and the two
commands that make them, `rtunnel_server fleet-init` and `fleet-add-member`.
(That a member link refuses a certificate of another CA or of another member
over real TLS is in tests/test_fleet_links.py.)"""

from __future__ import annotations

import io
import stat
import tempfile
from pathlib import Path

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.errors import ConfigError
from rtunnel.fleet import ca
from rtunnel.tap.fleet_commands import fleet_add_member_main, fleet_init_main


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class FleetInitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-ca-")) / "state"

    def test_fleet_init_makes_a_ca_with_a_private_key_and_keeps_it_on_a_second_run(self) -> None:
        out = io.StringIO()
        self.assertEqual(fleet_init_main(["-s", str(self.state)], out), 0)
        cert, key = self.state / ca.CA_CERT, self.state / ca.CA_KEY
        self.assertEqual(_mode(key), 0o600)
        self.assertEqual(_mode(cert), 0o644)
        authority = x509.load_pem_x509_certificate(cert.read_bytes())
        self.assertTrue(authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertIn("fleet-add-member", out.getvalue())
        before = (cert.read_bytes(), key.read_bytes())
        again = io.StringIO()
        self.assertEqual(fleet_init_main(["-s", str(self.state)], again), 0)
        self.assertIn("already", again.getvalue())
        self.assertEqual((cert.read_bytes(), key.read_bytes()), before)
        self.assertEqual([p.name for p in self.state.iterdir() if p.name.endswith(".tmp")], [])

    def test_rtunnel_server_fleet_init_runs_the_command_not_the_server(self) -> None:
        import sys

        from rtunnel import scripts

        self.patch(sys, "argv", ["rtunnel_server", "fleet-init", "-s", str(self.state)])
        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit) as exited:
            scripts.server_main()
        self.assertEqual(exited.exception.code, 0)
        self.assertTrue((self.state / ca.CA_KEY).exists())

    def test_a_half_made_ca_is_reported_not_silently_kept(self) -> None:
        self.state.mkdir(parents=True)
        (self.state / ca.CA_CERT).write_bytes(b"not a certificate")
        with self.assertRaises(ConfigError) as caught:
            ca.init_ca(self.state)
        self.assertIn("fleet CA key", str(caught.exception))

    def test_fleet_add_member_without_a_ca_says_to_run_fleet_init(self) -> None:
        err = io.StringIO()
        self.patch(__import__("sys"), "stderr", err)
        self.assertEqual(fleet_add_member_main(["m1", "-s", str(self.state)], io.StringIO()), 1)
        self.assertIn("fleet-init", err.getvalue())


class MemberCertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-ca-"))
        self.state, self.other_state, self.out = base / "state", base / "other", base / "out"
        ca.init_ca(self.state, "one")
        ca.init_ca(self.other_state, "two")

    def test_fleet_add_member_issues_a_certificate_naming_the_member_that_loads_as_its_identity(self) -> None:
        out = io.StringIO()
        self.assertEqual(fleet_add_member_main(["m2", "--out", str(self.out), "-s", str(self.state)], out), 0)
        self.assertEqual(_mode(self.out / "m2.key"), 0o600)
        self.assertEqual((self.out / ca.CA_CERT).read_bytes(), (self.state / ca.CA_CERT).read_bytes())
        cert = x509.load_pem_x509_certificate((self.out / "m2.crt").read_bytes())
        self.assertEqual(ca.member_name_of(cert), "m2")
        identity = ca.load_member_identity(self.out / "m2.crt", self.out / "m2.key", self.out / ca.CA_CERT, "m2")
        self.assertEqual(identity.member, "m2")
        self.assertIn("--fleet-member m2", out.getvalue())

    def test_a_member_certificate_of_another_fleet_ca_is_refused(self) -> None:
        files = ca.issue_member(self.other_state, "m1", self.out)
        with self.assertRaises(ConfigError) as caught:
            ca.load_member_identity(files.cert, files.key, self.state / ca.CA_CERT, "m1")
        self.assertIn("was not issued by the fleet CA", str(caught.exception))

    def test_the_certificate_of_another_member_is_refused(self) -> None:
        files = ca.issue_member(self.state, "m1", self.out)
        with self.assertRaises(ConfigError) as caught:
            ca.load_member_identity(files.cert, files.key, files.ca, "m3")
        self.assertIn("is the certificate of member 'm1', not of 'm3'", str(caught.exception))

    def test_a_key_of_another_member_is_refused(self) -> None:
        one = ca.issue_member(self.state, "m1", self.out)
        two = ca.issue_member(self.state, "m2", self.out)
        with self.assertRaises(ConfigError) as caught:
            ca.load_member_identity(one.cert, two.key, one.ca, "m1")
        self.assertIn("does not belong", str(caught.exception))

    def test_member_names_must_be_dns_labels(self) -> None:
        for bad in ("", "M1", "-m", "m_1", "a" * 64, "m1.example"):
            with self.assertRaises(ConfigError):
                ca.issue_member(self.state, bad, self.out)
        self.assertEqual(ca.check_member_name("edge-fra-2"), "edge-fra-2")

    def test_the_identity_in_the_state_directory_is_found_by_member_name(self) -> None:
        ca.issue_member(self.state, "m4")
        self.assertEqual(ca.member_identity_in(self.state, "m4").member, "m4")


class MemberOptionTests(SynchronousTestCase):
    """--fleet-cert, --fleet-key and --fleet-ca (rtunnel.tap.server_options)."""

    def setUp(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-ca-"))
        self.state, self.out = base / "state", base / "out"
        ca.init_ca(self.state)

    def test_the_three_files_go_together(self) -> None:
        from twisted.python import usage

        from rtunnel.tap.server import Options

        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--fleet-cert", "m1.crt", "-s", str(self.state)])
        self.assertIn("--fleet-cert, --fleet-key and --fleet-ca go together", str(caught.exception))

    def test_the_files_named_by_the_options_are_this_members_identity(self) -> None:
        from rtunnel.tap.server import Options

        files = ca.issue_member(self.state, "m1", self.out)
        options = Options()
        options.parseOptions([
            "-s", str(self.state), "--fleet-cert", str(files.cert), "--fleet-key", str(files.key),
            "--fleet-ca", str(files.ca),
        ])
        config = options.config
        identity = ca.member_identity(config.state_dir, "m1", config.fleet_cert, config.fleet_key, config.fleet_ca)
        self.assertEqual(identity.cert_pem, files.cert.read_bytes())

    def test_without_the_options_a_missing_certificate_says_how_to_issue_one(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            ca.member_identity(self.state, "m7", None, None, None)
        self.assertIn("rtunnel_server fleet-add-member m7", str(caught.exception))
