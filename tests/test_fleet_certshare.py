"""ACME certificates at every member (rtunnel.fleet.certshare, docs/fleet.md
"Certificates at every member"), in this process: two real servers with
--https and ACME certificate sources (m1 the home, m2 the edge), real member
links with mutual TLS, a real client at m1 claiming an http hostname, and a
StaticFleet directory (tests/harness.py) instead of etcd. The home's ACME
source serves a certificate it finds stored in its state directory (as after
a restart), so no ACME server is needed; tests/test_fleet_hostedge.py runs
the same with pebble issuing the certificate, as processes.

Real TLS handshakes at the edge's --https port check what it shows."""

from __future__ import annotations

import socket
import ssl
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from rtunnel.config import TunnelSpec
from rtunnel.fleet import ca, certshare
from rtunnel.fleet.hostedge import HostEdge
from rtunnel.fleet.links import FleetLinks
from rtunnel.httpconfig import HttpSettings
from rtunnel.server.acme import load_name_certificate
from rtunnel.server.claims import Hostname
from tests.harness import (
    DOMAIN,
    LogCapture,
    StaticFleet,
    Tunnel,
    WhoAmIServer,
    make_ca_and_server,
    serve_in_thread,
    sleep,
    wait_until,
    with_timeout,
)

NAME = f"app.{DOMAIN}"
UNREACHABLE_ACME = "https://127.0.0.1:9/directory"  # never asked: the stored certificate is not due


def acme_file(directory: Path, name: str) -> tuple[bytes, Path]:
    """A key + chain for `name` as the ACME source stores it (key first), and its CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert, key = make_ca_and_server(directory, name)
    return key.read_bytes() + cert.read_bytes(), ca_path


def shown(port: int, name: str, ca_file: Path) -> bytes | None:
    """The DER certificate the edge at 127.0.0.2:`port` shows for SNI `name`
    (checked against `ca_file`), or None: the handshake failed (an alert)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with socket.create_connection(("127.0.0.2", port), timeout=5) as sock:
            with context.wrap_socket(sock, server_hostname=name) as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificates(pem)[0].public_bytes(serialization.Encoding.DER)


class CertificatesAtEveryMemberTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, stored: bytes | None, third: bytes | None = None) -> Any:
        """m1 (with `stored` as NAME's ACME certificate) and m2, both with
        --https, member links between them, and a client at m1 claiming NAME;
        with `third`, m3 too, with `third` as its certificate of NAME and a
        client of its own claiming NAME (each member's claims are its own:
        the StaticFleet decides which of m1 and m3 the fleet calls the home)."""
        self.fleet = StaticFleet()
        base = Path(tempfile.mkdtemp(prefix="rtunnel-certshare-"))
        ca_dir = base / "ca"
        ca.init_ca(ca_dir)
        self.tunnels: dict[str, Tunnel] = {}
        self.hosts: dict[str, HostEdge] = {}
        self.links: dict[str, FleetLinks] = {}
        files_of = {"m1": stored, "m2": None, "m3": third}
        for index, member in enumerate(["m1", "m2"] + (["m3"] if third is not None else []), start=1):
            address = f"127.0.0.{index}"
            tunnel = Tunnel(self)
            pem = files_of[member]
            if pem is not None:
                certificates = tunnel.state_dir / "acme" / "certificates"
                certificates.mkdir(parents=True)
                (certificates / f"{NAME}.pem").write_bytes(pem)
            yield tunnel.start_server(
                listen=f"tcp:0:interface={address}", public_host=address,
                http=HttpSettings(https=f"tcp:0:interface={address}", domain=DOMAIN),
                acme_directory=UNREACHABLE_ACME,
            )
            files = ca.issue_member(ca_dir, member, base / member)
            links = FleetLinks(
                reactor, tunnel.server, self.fleet.directory(member),
                ca.load_member_identity(files.cert, files.key, files.ca, member), f"tcp:0:interface={address}",
            )
            port = yield links.start()
            self.addCleanup(links.stop)
            self.fleet.endpoints[member] = f"tcp:host={address}:port={port.getHost().port}"
            self.hosts[member] = HostEdge(links, tunnel.server_service.edge)
            self.addCleanup(self.hosts[member].stop)
            self.tunnels[member], self.links[member] = tunnel, links
        self.https_port = self.tunnels["m2"].server_service.shared_ports["https"].getHost().port
        service = WhoAmIServer("app")
        serve_in_thread(self, service)
        for member in ("m1", "m3"):
            if member not in self.tunnels:
                continue
            home = self.tunnels[member]
            config = replace(
                home.client_config([], server_host=f"127.0.0.{member[1]}"),
                tunnels=(
                    TunnelSpec(1, "", 0, "127.0.0.1", service.server_address[1], kind="http", hostname="app"),
                    TunnelSpec(2, "", 0, "127.0.0.1", service.server_address[1], kind="tls", hostname="secure"),
                ),
            )
            client = home.start_client(config)
            yield with_timeout(client.client.when_bound(), 10)
            self.assertIn(NAME, home.server.hostnames.tunnels)
            self.assertEqual(home.server.hostnames.tunnels[f"secure.{DOMAIN}"].kind, "tls")

    @property
    def share(self) -> certshare.CertificateShare:
        return self.hosts["m2"].certs

    @defer.inlineCallbacks
    def test_the_edge_fetches_the_home_s_certificate_serves_it_takes_its_renewal_and_forgets_it_on_release(
        self,
    ) -> Any:
        self.patch(certshare, "REFRESH_EVERY", 0.5)  # the hourly refresh, shortened
        stored, ca_file = acme_file(Path(tempfile.mkdtemp(prefix="rtunnel-certshare-")) / "first", NAME)
        yield self.start(stored)
        before = yield threads.deferToThread(shown, self.https_port, NAME, ca_file)
        self.assertIsNone(before, "m2 served a certificate for a name the directory does not say is held")
        self.fleet.set_home(Hostname(NAME), "m1")
        yield wait_until(lambda: NAME in self.share.held, 10)
        seen = yield threads.deferToThread(shown, self.https_port, NAME, ca_file)
        self.assertEqual(seen, der(stored), "the edge shows the home's very certificate")
        self.assertFalse((self.tunnels["m2"].state_dir / "acme" / "certificates" / f"{NAME}.pem").exists(),
                         "the edge writes no key to disk")
        self.assertEqual(self.links["m1"].visitors_received["m2"], 0, "a fetch is not counted as a visitor")

        # the home renews (its ACME order's end, as `_issued` is called): the edge's refresh takes it
        renewed, renewed_ca = acme_file(Path(tempfile.mkdtemp(prefix="rtunnel-certshare-")) / "renewed", NAME)
        home_source = self.tunnels["m1"].server_service.acme
        home_source._issued(load_name_certificate(NAME, renewed), NAME)
        yield wait_until(lambda: self.share.held[NAME][1].pem == renewed, 10)
        seen = yield threads.deferToThread(shown, self.https_port, NAME, renewed_ca)
        self.assertEqual(seen, der(renewed))

        self.fleet.set_home(Hostname(NAME), None)  # released
        self.assertNotIn(NAME, self.share.held)
        seen = yield threads.deferToThread(shown, self.https_port, NAME, renewed_ca)
        self.assertIsNone(seen, "the edge served the certificate of a released name")

    @defer.inlineCallbacks
    def test_the_home_refuses_a_name_it_does_not_hold_and_a_sni_flood_makes_a_bounded_number_of_fetches(
        self,
    ) -> Any:
        """The directory says m1 holds `ghost`, which m1 does not hold (and
        has no certificate of): m1 resets the fetch and m2 shows nothing.
        m1 refuses the certificate of a name it holds as a --tls tunnel too.
        200 ClientHellos for it at m2 make at most one fetch more (one per
        MISS_EVERY); 200 for a name held nowhere make none."""
        logs = LogCapture(self)
        stored, ca_file = acme_file(Path(tempfile.mkdtemp(prefix="rtunnel-certshare-")) / "first", NAME)
        yield self.start(stored)
        ghost = f"ghost.{DOMAIN}"
        self.fleet.set_home(Hostname(ghost), "m1")
        yield wait_until(lambda: self.share.failures.get(ghost, 0) >= 1, 10)
        self.assertEqual(self.share.fetches, 1)
        self.assertNotIn(ghost, self.share.held)
        refused = logs.named("edge_certificate_fetch_failed", hostname=ghost)
        self.assertTrue(refused, logs.text())
        self.assertIn(f"reset by peer: hostname {ghost} is not held at member m1 as an http tunnel", logs.text())
        secure = f"secure.{DOMAIN}"
        self.fleet.set_home(Hostname(secure), "m1")  # this directory says nothing of kinds: m2 takes it for http
        yield wait_until(lambda: self.share.failures.get(secure, 0) >= 1, 10)
        self.assertNotIn(secure, self.share.held)
        self.assertIn(f"reset by peer: hostname {secure} is not held at member m1 as an http tunnel", logs.text())
        self.assertEqual(self.share.fetches, 2)
        self.share.released(secure)

        def flood(name: str) -> list[bytes | None]:
            return [shown(self.https_port, name, ca_file) for _ in range(200)]

        seen = yield threads.deferToThread(flood, ghost)
        self.assertEqual(set(seen), {None})
        yield sleep(0.5)  # the fetches the flood started end
        self.assertLessEqual(self.share.fetches, 3, "one fetch per MISS_EVERY seconds at most")
        self.assertNotIn(ghost, self.share.held)
        before = self.share.fetches
        seen = yield threads.deferToThread(flood, f"nowhere.{DOMAIN}")
        self.assertEqual(set(seen), {None})
        self.assertEqual(self.share.fetches, before, "a name held nowhere is never fetched")

    @defer.inlineCallbacks
    def test_a_refresh_that_finds_the_member_link_down_is_made_once_the_link_is_back(self) -> Any:
        """The link to the home drops and cannot be made again (the home's
        link endpoint is gone from the directory) when the refresh is due:
        the edge keeps serving the certificate it has, and once the link is
        back it fetches the home's renewed certificate."""
        self.patch(certshare, "REFRESH_EVERY", 0.3)
        stored, ca_file = acme_file(Path(tempfile.mkdtemp(prefix="rtunnel-certshare-")) / "first", NAME)
        yield self.start(stored)
        self.fleet.set_home(Hostname(NAME), "m1")
        yield wait_until(lambda: NAME in self.share.held, 10)
        endpoint = self.fleet.endpoints.pop("m1")
        peer = self.links["m2"].peers["m1"]
        assert peer.link is not None
        peer.link.transport.abortConnection()
        yield wait_until(lambda: peer.session is None, 10)
        yield sleep(1.0)  # refreshes fall due while the link is down
        renewed, renewed_ca = acme_file(Path(tempfile.mkdtemp(prefix="rtunnel-certshare-")) / "renewed", NAME)
        self.tunnels["m1"].server_service.acme._issued(load_name_certificate(NAME, renewed), NAME)
        seen = yield threads.deferToThread(shown, self.https_port, NAME, ca_file)
        self.assertEqual(seen, der(stored), "the certificate fetched before serves while the home is unreachable")
        self.fleet.endpoints["m1"] = endpoint
        yield wait_until(lambda: self.share.held[NAME][1].pem == renewed, 10)
        seen = yield threads.deferToThread(shown, self.https_port, NAME, renewed_ca)
        self.assertEqual(seen, der(renewed))

    @defer.inlineCallbacks
    def test_a_name_that_moves_to_another_member_is_served_with_the_new_home_s_certificate(self) -> Any:
        """NAME held at m1 (certificate A), then at m3 (certificate B): the
        edge m2 forgets A at once and serves B, fetched from m3."""
        first, first_ca = acme_file(Path(tempfile.mkdtemp(prefix="rtunnel-certshare-")) / "m1", NAME)
        second, second_ca = acme_file(Path(tempfile.mkdtemp(prefix="rtunnel-certshare-")) / "m3", NAME)
        yield self.start(first, third=second)
        self.fleet.set_home(Hostname(NAME), "m1")
        yield wait_until(lambda: NAME in self.share.held, 10)
        seen = yield threads.deferToThread(shown, self.https_port, NAME, first_ca)
        self.assertEqual(seen, der(first))
        self.fleet.set_home(Hostname(NAME), "m3")
        self.assertIsNone(self.share.context_for(NAME), "the old home's certificate served after the move")
        yield wait_until(lambda: NAME in self.share.held and self.share.held[NAME][0] == "m3", 10)
        seen = yield threads.deferToThread(shown, self.https_port, NAME, second_ca)
        self.assertEqual(seen, der(second))
