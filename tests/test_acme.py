"""rtunnel.server.acme: certificates from a real ACME server (Debian's pebble).

Each test runs pebble and pebble-challtestsrv (tests/pebble.py: every name
resolves to 127.0.0.1) and a twisted.web HTTP-01 responder on loopback that
serves `AcmeCertificates.challenge_response`, as the --http edge does.
Renewal is driven by an injected clock (a task.Clock set to the real time,
then advanced): pebble issues real certificates, the source decides when
they are due.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from rtunnel.server.acme import AcmeCertificates, normalise_hostname
from rtunnel.tap import server as tap_server
from tests.pebble import Pebble, pebble_missing

NAME = "app.acme.test"
DAY = 86400.0
CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")


def scrape(source: AcmeCertificates) -> dict[tuple[str, str], float]:
    """The source's samples as Prometheus serves them: (name, its one label's value) -> value."""
    registry = CollectorRegistry()
    registry.register(source)  # type: ignore[arg-type]
    return {
        (sample.name, next(iter(sample.labels.values()), "")): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


class _Challenges(Resource):
    """/.well-known/acme-challenge/TOKEN -> the source's key authorization, else 404."""

    isLeaf = True

    def __init__(self, test: AcmeTestCase) -> None:
        super().__init__()
        self.test = test
        self.asked: list[str] = []

    def render_GET(self, request: Request) -> bytes:
        parts = request.path.split(b"/")
        if len(parts) == 4 and parts[1:3] == [b".well-known", b"acme-challenge"]:
            token = parts[3].decode("ascii", "replace")
            self.asked.append(token)
            for source in self.test.sources:
                answer = source.challenge_response(token)
                if answer is not None:
                    request.setHeader(b"content-type", b"application/octet-stream")
                    return answer
        request.setResponseCode(404)
        return b"no such challenge\n"


@implementer(IOpenSSLContextFactory)
class _Serving:
    """A TLS context factory that always answers one context (a TLS server built from context_for)."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def getContext(self) -> Any:
        return self.context


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello over the ACME certificate\n"


class AcmeTestCase(TestCase):
    timeout = 50
    validity: int | None = None  # pebble's certificate lifetime in seconds (None: its default, 5 years)

    def setUp(self) -> None:
        reason = pebble_missing()
        if reason:
            raise SkipTest(reason)
        self.sources: list[AcmeCertificates] = []
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        self.addCleanup(globalLogPublisher.removeObserver, self._observe)
        self.state = Path(tempfile.mkdtemp(prefix="rtunnel-acme-"))
        self.addCleanup(shutil.rmtree, self.state, True)
        self.challenges = _Challenges(self)
        port = reactor.listenTCP(0, Site(self.challenges), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.pebble = Pebble(port.getHost().port, self.validity)
        self.addCleanup(self.pebble.cleanup)
        self.pebble.start()
        self.clock = task.Clock()
        self.clock.advance(time.time())

    def _observe(self, event: dict[str, Any]) -> None:
        if str(event.get("event", "")).startswith("acme_"):
            self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def source(self, **settings: Any) -> AcmeCertificates:
        settings.setdefault("clock", self.clock)
        settings.setdefault("poll_interval", 0.1)
        settings.setdefault("ca_file", self.pebble.ca_file)
        source = AcmeCertificates(reactor, self.state, self.pebble.directory_url, "ops@example.org", **settings)
        source.startService()
        self.sources.append(source)
        self.addCleanup(self._stop, source)
        return source

    def _stop(self, source: AcmeCertificates) -> defer.Deferred[None] | None:
        if source.running:
            return source.stopService()
        return None

    def leaf(self, source: AcmeCertificates, name: str = NAME) -> x509.Certificate:
        pem = source.certificate_pem(name)
        assert pem is not None, f"no certificate for {name}"
        return x509.load_pem_x509_certificates(pem)[0]

    def advance_to(self, when: float) -> None:
        self.clock.advance(when - self.clock.seconds())


class IssueTests(AcmeTestCase):
    @defer.inlineCallbacks
    def test_a_claimed_name_gets_a_certificate_that_chains_to_the_acme_root_and_serves_tls(self) -> Any:
        if CURL is None or OPENSSL is None:
            raise SkipTest("curl and openssl are needed to check the chain (apt-get install curl openssl)")
        source = self.source()
        self.assertIsNone(source.context_for(NAME))
        source.name_claimed(NAME.upper() + ".")  # normalised: the same name
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 1, "failed": 0}, self.pebble.output())
        self.assertTrue(self.challenges.asked, "pebble never fetched the HTTP-01 token")
        self.assertIsNone(source.challenge_response(self.challenges.asked[0]))  # no longer pending

        pem = source.certificate_pem(NAME)
        assert pem is not None
        root = self.state / "root.pem"
        root.write_bytes(self.pebble.root_pem())
        chain = x509.load_pem_x509_certificates(pem)
        leaf_file, intermediates = self.state / "leaf.pem", self.state / "chain.pem"
        leaf_file.write_bytes(chain[0].public_bytes(Encoding.PEM))
        intermediates.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain[1:]))
        out, err, code = yield getProcessOutputAndValue(
            OPENSSL, ["verify", "-CAfile", str(root), "-untrusted", str(intermediates), "-verify_hostname", NAME,
                      str(leaf_file)],
        )
        self.assertEqual(code, 0, out + err)

        tls = reactor.listenSSL(  # type: ignore[attr-defined]
            0, Site(_Hello()), _Serving(source.context_for("App.Acme.Test")), interface="127.0.0.1"
        )
        self.addCleanup(tls.stopListening)
        port = tls.getHost().port
        out, err, code = yield getProcessOutputAndValue(
            CURL, ["-sS", "--max-time", "10", "--cacert", str(root), "--resolve", f"{NAME}:{port}:127.0.0.1",
                   f"https://{NAME}:{port}/"],
        )
        self.assertEqual((code, out), (0, b"hello over the ACME certificate\n"), err)

        metrics = scrape(source)
        self.assertEqual(
            metrics[("rtunnel_certificate_expiry_timestamp_seconds", NAME)], chain[0].not_valid_after_utc.timestamp()
        )
        self.assertEqual(metrics[("rtunnel_acme_orders_total", "ok")], 1)
        self.assertEqual(metrics[("rtunnel_certificate_renewal_failing", NAME)], 0)
        [issued] = self.named("acme_certificate_issued")
        self.assertEqual(issued["hostname"], NAME)

    @defer.inlineCallbacks
    def test_no_order_is_made_for_a_name_nobody_claimed_or_a_wildcard(self) -> Any:
        source = self.source()
        for sni in (NAME, "other.acme.test", "*.acme.test", "", "bad name", "a" * 300):
            self.assertIsNone(source.context_for(sni))
        source.name_claimed("*.acme.test")
        source.name_claimed("not a name")
        source.name_claimed("claimed.acme.test")
        yield source.idle()
        self.assertEqual(len(self.named("acme_name_refused")), 2)
        self.assertEqual(
            sorted(e["hostname"] for e in self.named("acme_order_started")), ["claimed.acme.test"]
        )  # only the claimed one, never an SNI or a wildcard
        self.assertIsNone(source.context_for("other.acme.test"))
        self.assertEqual(sorted(os.listdir(self.state / "acme" / "certificates")), ["claimed.acme.test.pem"])



class ErrorTests(AcmeTestCase):
    """What a user reads when an order fails: what was wrong and what to do."""

    @defer.inlineCallbacks
    def test_an_untrusted_acme_server_certificate_says_to_give_its_ca(self) -> Any:
        source = self.source(ca_file=None)
        source.name_claimed(NAME)
        yield source.idle()
        [failed] = self.named("acme_order_failed")
        self.assertIn(f"the ACME server at {self.pebble.directory_url} has a TLS certificate this host does not "
                      "trust (certificate verify failed: unable to get local issuer certificate)", failed["reason"])
        self.assertIn("give its CA with --acme-ca", failed["reason"])
        self.assertEqual(source.orders, {"ok": 0, "failed": 1})
        self.assertIsNone(source.context_for(NAME))

    @defer.inlineCallbacks
    def test_a_failed_http01_validation_names_the_host_and_what_to_check(self) -> Any:
        source = self.source()
        self.sources.remove(source)  # the responder no longer answers its tokens: pebble gets a 404
        source.name_claimed(NAME)
        yield source.idle()
        [failed] = self.named("acme_order_failed")
        self.assertIn(f"ACME server at {self.pebble.directory_url} could not validate {NAME} over HTTP-01: ",
                      failed["reason"])
        self.assertIn("404", failed["reason"])
        self.assertIn(f"check that {NAME} resolves to this server and that port 80 (--http) reaches it",
                      failed["reason"])
        self.assertTrue(self.challenges.asked, "pebble never asked for the token")
        self.assertIsNone(source.context_for(NAME))


class NameTests(SynchronousTestCase):
    def test_names_are_normalised_before_any_comparison_and_file_name(self) -> None:
        self.assertEqual(normalise_hostname("App.Example.COM."), "app.example.com")
        self.assertEqual(normalise_hostname("Bücher.example.com"), "xn--bcher-kva.example.com")
        self.assertEqual(normalise_hostname("*.Alice.example.com"), "*.alice.example.com")
        for bad in ("", "localhost", "a..b", "-a.b", "a b.c", "a/b.c", "../x.y", "x" * 64 + ".com"):
            self.assertIsNone(normalise_hostname(bad), bad)


class RenewalTests(AcmeTestCase):
    @defer.inlineCallbacks
    def test_a_certificate_is_renewed_when_30_days_remain_and_not_before(self) -> Any:
        source = self.source()
        source.name_claimed(NAME)
        yield source.idle()
        first = self.leaf(source)
        not_after = first.not_valid_after_utc.timestamp()
        self.advance_to(not_after - 31 * DAY)  # the hourly check runs: not due yet
        yield source.idle()
        self.assertEqual(source.orders["ok"], 1)
        self.advance_to(not_after - 29 * DAY)
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 2, "failed": 0}, self.pebble.output())
        second = self.leaf(source)
        self.assertNotEqual(second.serial_number, first.serial_number)
        self.assertEqual([e["renewal"] for e in self.named("acme_order_started")], [False, True])

    @defer.inlineCallbacks
    def test_a_failed_renewal_keeps_the_old_certificate_serving_with_a_log_line_and_a_metric(self) -> Any:
        source = self.source(backoff=(600.0, 3600.0))
        source.name_claimed(NAME)
        yield source.idle()
        context, pem = source.context_for(NAME), source.certificate_pem(NAME)
        not_after = self.leaf(source).not_valid_after_utc.timestamp()
        self.pebble.stop_pebble()
        self.advance_to(not_after - 29 * DAY)
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 1, "failed": 1})
        self.assertIs(source.context_for(NAME), context)
        self.assertEqual(source.certificate_pem(NAME), pem)
        self.assertEqual((self.state / "acme" / "certificates" / f"{NAME}.pem").read_bytes(), pem)
        [failed] = self.named("acme_order_failed")
        self.assertIn(f"cannot reach the ACME server at {self.pebble.directory_url}: Connection refused;",
                      failed["reason"])
        self.assertIn("check --acme-directory", failed["reason"])
        self.assertEqual(failed["retry_in"], 600.0)
        metrics = scrape(source)
        self.assertEqual(metrics[("rtunnel_certificate_renewal_failing", NAME)], 1)
        self.assertEqual(metrics[("rtunnel_acme_orders_total", "failed")], 1)

        self.clock.advance(300)  # the back-off: no second attempt yet, whatever the claims say
        source.name_released(NAME)
        source.name_claimed(NAME)
        yield source.idle()
        self.assertEqual(source.orders["failed"], 1)
        self.pebble.start()  # a new pebble: it has forgotten the account, the source registers again
        self.clock.advance(301)
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 2, "failed": 1}, self.pebble.output())
        self.assertNotEqual(source.certificate_pem(NAME), pem)
        self.assertIsNot(source.context_for(NAME), context)
        self.assertEqual(source.accounts_registered, 2)


class ShortLivedTests(AcmeTestCase):
    """A real short-lived certificate (pebble issues 9 s ones) on the real clock."""

    validity = 9

    @defer.inlineCallbacks
    def test_a_short_lived_certificate_is_renewed_when_a_third_of_its_lifetime_remains(self) -> Any:
        source = self.source(clock=reactor, check_interval=0.5)
        source.name_claimed(NAME)
        yield source.idle()
        first = self.leaf(source)
        lifetime = (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds()
        deadline = time.monotonic() + 20
        while source.orders["ok"] < 2 and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.2, lambda: None)
        started = self.named("acme_order_started")
        self.assertEqual(source.orders, {"ok": 2, "failed": 0}, self.pebble.output())
        renewed_at = started[1]["log_time"]
        remaining = first.not_valid_after_utc.timestamp() - renewed_at
        self.assertLess(remaining, lifetime / 3)  # not before it was due...
        self.assertGreater(remaining, lifetime / 3 - 1.5)  # ...and within a check or two of it
        second = self.leaf(source)
        self.assertGreater(second.not_valid_after_utc, first.not_valid_after_utc)
        self.assertIsNotNone(source.context_for(NAME))


class BoundsTests(AcmeTestCase):
    @defer.inlineCallbacks
    def test_orders_are_rate_limited_per_hour_and_one_per_name_at_a_time(self) -> Any:
        source = self.source(orders_per_hour=2, max_concurrent=2)
        names = [f"n{i}.acme.test" for i in range(3)]
        for name in names:
            source.name_claimed(name)
            source.name_claimed(name)  # a second claim (a handover) while its order runs: no second order
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 2, "failed": 0})
        self.assertEqual([source.context_for(n) is not None for n in names], [True, True, False])
        [limited] = self.named("acme_rate_limited")
        self.assertEqual((limited["hostname"], limited["limit"]), (names[2], 2))
        self.clock.advance(3599)
        yield source.idle()
        self.assertEqual(source.orders["ok"], 2)
        self.clock.advance(1)  # an hour after the first two: the third starts
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 3, "failed": 0})
        self.assertIsNotNone(source.context_for(names[2]))
        self.assertEqual(len(self.named("acme_order_started")), 3)

    @defer.inlineCallbacks
    def test_a_name_released_before_its_turn_is_not_ordered(self) -> Any:
        source = self.source(orders_per_hour=1)
        source.name_claimed("first.acme.test")
        source.name_claimed("second.acme.test")
        source.name_released("second.acme.test")
        yield source.idle()
        self.clock.advance(3600)
        yield source.idle()
        self.assertEqual([e["hostname"] for e in self.named("acme_order_started")], ["first.acme.test"])


class StateTests(AcmeTestCase):
    @defer.inlineCallbacks
    def test_files_are_private_and_a_restart_reuses_account_and_certificates_without_an_order(self) -> Any:
        source = self.source()
        source.name_claimed(NAME)
        yield source.idle()
        self.assertEqual(source.accounts_registered, 1)
        acme = self.state / "acme"
        files = [acme / "account-key.pem", acme / "account.json", acme / "certificates" / f"{NAME}.pem"]
        for path in files:
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path)
        for directory in (acme, acme / "certificates"):
            self.assertEqual(stat.S_IMODE(directory.stat().st_mode) & 0o077, 0, directory)
            self.assertEqual([n for n in os.listdir(directory) if n.endswith(".tmp")], [])
        pem = source.certificate_pem(NAME)
        key = (acme / "account-key.pem").read_bytes()
        yield source.stopService()

        again = self.source()
        self.assertEqual(again.certificate_pem(NAME), pem)  # served at once, before any claim
        self.assertIsNotNone(again.context_for(NAME))
        again.name_claimed(NAME)
        yield again.idle()
        self.assertEqual(again.orders, {"ok": 0, "failed": 0})  # not due: no order
        again.name_claimed("second.acme.test")
        yield again.idle()
        self.assertEqual(again.orders, {"ok": 1, "failed": 0})
        self.assertEqual(again.accounts_registered, 0)  # the stored account signed the order
        self.assertEqual((acme / "account-key.pem").read_bytes(), key)
        self.assertEqual(len(self.named("acme_account_registered")), 1)
        [loaded] = self.named("acme_certificates_loaded")
        self.assertEqual(loaded["names"], [NAME])

    @defer.inlineCallbacks
    def test_a_broken_certificate_file_is_ignored_and_the_name_ordered_again(self) -> Any:
        certificates = self.state / "acme" / "certificates"
        certificates.mkdir(parents=True)
        (certificates / f"{NAME}.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n")
        source = self.source()
        [unreadable] = self.named("acme_certificate_unreadable")
        self.assertIn(f"{NAME}.pem", unreadable["path"])
        self.assertIsNone(source.context_for(NAME))
        source.name_claimed(NAME)
        yield source.idle()
        self.assertEqual(source.orders["ok"], 1)
        self.assertIsNotNone(source.context_for(NAME))


class OptionTests(SynchronousTestCase):
    """--acme-directory, --acme-email, --acme-ca reach ServerConfig; bad values say what to give."""

    def test_the_acme_options_reach_the_server_config(self) -> None:
        options = tap_server.Options()
        options.parseOptions([
            "--token", "t", "--acme-directory", "https://127.0.0.1:14000/dir", "--acme-email", "ops@example.org",
            "--acme-ca", "/etc/pebble/ca.pem",
        ])
        config = options.config
        self.assertEqual(
            (config.acme_directory, config.acme_email, config.acme_ca),
            ("https://127.0.0.1:14000/dir", "ops@example.org", Path("/etc/pebble/ca.pem")),
        )

    def test_the_default_directory_is_lets_encrypt_production_with_no_email(self) -> None:
        options = tap_server.Options()
        options.parseOptions(["--token", "t"])
        self.assertEqual(options.config.acme_directory, "https://acme-v02.api.letsencrypt.org/directory")
        self.assertIsNone(options.config.acme_email)
        self.assertIsNone(options.config.acme_ca)

    def test_a_bad_directory_or_email_is_refused_with_what_to_give(self) -> None:
        for argv, expected in (
            (["--acme-directory", "ftp://x"], "is not an http(s) URL; give the ACME server's directory URL"),
            (["--acme-email", "nobody"], "is not an e-mail address (name@example.org)"),
        ):
            error = self.assertRaises(usage.UsageError, tap_server.Options().parseOptions, ["--token", "t", *argv])
            self.assertIn(expected, str(error))


class FullDiskTests(AcmeTestCase):
    """The state directory on a real, small tmpfs (mounting needs root: skipped otherwise)."""

    def setUp(self) -> None:
        super().setUp()
        self.disk = Path(tempfile.mkdtemp(prefix="rtunnel-acme-disk-"))
        self.addCleanup(shutil.rmtree, self.disk, True)
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(self.disk)], capture_output=True
        )
        if mount.returncode != 0:
            raise SkipTest(f"cannot mount a small tmpfs to fill (needs root): {mount.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", str(self.disk)], check=False)
        self.state = self.disk

    def fill(self) -> Path:
        filler = self.disk / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        return filler

    @defer.inlineCallbacks
    def test_a_full_disk_keeps_the_old_files_and_certificate_and_says_what_to_do(self) -> Any:
        source = self.source(backoff=(600.0, 3600.0))
        source.name_claimed(NAME)
        yield source.idle()
        path = self.disk / "acme" / "certificates" / f"{NAME}.pem"
        pem, context = path.read_bytes(), source.context_for(NAME)
        filler = self.fill()
        self.advance_to(self.leaf(source).not_valid_after_utc.timestamp() - 29 * DAY)
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 1, "failed": 1})
        [failed] = self.named("acme_order_failed")
        self.assertIn(f"cannot write {path}: No space left on device", failed["reason"])
        self.assertIn("Free some space", failed["reason"])
        self.assertEqual(path.read_bytes(), pem)
        self.assertEqual(sorted(os.listdir(path.parent)), [path.name])  # no temporary file left
        self.assertIs(source.context_for(NAME), context)
        filler.unlink()
        self.clock.advance(600)
        yield source.idle()
        self.assertEqual(source.orders, {"ok": 2, "failed": 1})
        self.assertNotEqual(path.read_bytes(), pem)
