"""A fleet on an etcd that serves https:// and asks for client certificates
(`--client-cert-auth`): rtunnel.fleet.etcdtls, `--fleet-etcd-ca`,
`--fleet-etcd-cert`, `--fleet-etcd-key` (docs/fleet.md "etcd over TLS"),
against a real etcd on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rtunnel.errors import ConfigError
from rtunnel.fleet.etcd import EtcdClient, EtcdUnavailable
from rtunnel.fleet.etcdtls import load_etcd_tls
from tests.etcd import PREFIX, SKIP_NO_ETCD, FleetProcesses, etcd_get, start_etcd, wait
from tests.harness import make_ca_and_server


class EtcdOverTlsTests(TestCase):
    timeout = 60
    skip = SKIP_NO_ETCD

    def setUp(self) -> None:
        self.node = start_etcd(self, Path(self.mktemp()).absolute(), tls=True)
        assert self.node.tls_dir is not None
        self.files = self.node.tls_dir

    def client(self, ca: bool = True, cert: bool = True) -> EtcdClient:
        tls = load_etcd_tls(
            (self.node.url,), self.files / "ca.crt" if ca else None,
            self.files / "client.crt" if cert else None, self.files / "client.key" if cert else None,
        )
        etcd = EtcdClient(reactor, [self.node.url], timeout=2.0, tls=tls)
        self.addCleanup(etcd.close)
        return etcd

    @defer.inlineCallbacks
    def test_with_etcd_s_ca_and_a_client_certificate_calls_and_watches_work(self) -> Any:
        etcd = self.client()
        seen: list[str] = []
        snapshots: list[int] = []
        watch = etcd.watch(
            "/t/", lambda kvs, rev: snapshots.append(rev), lambda events, rev: seen.extend(e.kv.key for e in events),
        )
        self.addCleanup(watch.stop)
        yield self.until(lambda: snapshots, "the watch's first snapshot")
        yield etcd.put("/t/a", b"over tls")
        self.assertEqual((yield etcd.get("/t/a")).value, b"over tls")
        yield self.until(lambda: "/t/a" in seen, "the watch event of the put")

    @defer.inlineCallbacks
    def until(self, predicate: Any, what: str) -> Any:
        deadline = reactor.seconds() + 10
        while not predicate():
            self.assertLess(reactor.seconds(), deadline, f"no {what} within 10 s")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_without_a_client_certificate_etcd_refuses_and_the_error_names_the_url(self) -> Any:
        etcd = self.client(cert=False)
        with self.assertRaises(EtcdUnavailable) as caught:
            yield etcd.get("/t/a")
        self.assertIn(self.node.url.removeprefix("https://"), str(caught.exception))

    @defer.inlineCallbacks
    def test_without_etcd_s_ca_its_certificate_is_not_trusted(self) -> Any:
        etcd = self.client(ca=False)
        with self.assertRaises(EtcdUnavailable) as caught:
            yield etcd.get("/t/a")
        self.assertIn("certificate", str(caught.exception).lower())


class EtcdTlsOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        make_ca_and_server(self.dir, "localhost", ip="127.0.0.1", client="m1")

    def test_no_option_means_no_tls_settings(self) -> None:
        self.assertIsNone(load_etcd_tls(("https://127.0.0.1:2379",), None, None, None))

    def test_a_key_without_its_certificate_is_refused_naming_the_missing_option(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_etcd_tls(("https://127.0.0.1:2379",), None, None, self.dir / "client.key")
        self.assertIn("--fleet-etcd-key needs --fleet-etcd-cert", str(caught.exception))

    def test_tls_options_with_only_http_urls_are_refused(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_etcd_tls(("http://127.0.0.1:2379",), self.dir / "ca.crt", None, None)
        self.assertIn("https://", str(caught.exception))

    def test_a_missing_file_and_a_mismatched_key_say_which_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load_etcd_tls(("https://h:1",), self.dir / "nope.crt", None, None)
        self.assertIn("nope.crt", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            load_etcd_tls(("https://h:1",), None, self.dir / "client.crt", self.dir / "srv.key")
        self.assertIn("is not the private key of", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            load_etcd_tls(("https://h:1",), self.dir / "client.key", None, None)
        self.assertIn("not a PEM certificate", str(caught.exception))


class MemberOverTlsTests(FleetProcesses):
    skip = SKIP_NO_ETCD

    def test_a_member_joins_a_fleet_whose_etcd_asks_for_client_certificates(self) -> None:
        node = start_etcd(self, self.workdir, tls=True)
        assert node.tls_dir is not None
        files = node.tls_dir
        member, _ = self.start_member(1, [node.url], more=(
            "--fleet-etcd-ca", str(files / "ca.crt"), "--fleet-etcd-cert", str(files / "client.crt"),
            "--fleet-etcd-key", str(files / "client.key"),
        ))
        wait(lambda: etcd_get(node.url, f"{PREFIX}members/m1", node.client_context()) is not None, 20,
             "m1 registered over TLS")
        self.assertNotIn("Traceback", member.output)
