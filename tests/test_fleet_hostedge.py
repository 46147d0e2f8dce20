"""Hostnames at every member of a fleet (#14 item 3 for #15's names):
real etcd, two `twistd rtunnel-server` members on 127.0.0.1 and .2, each
with --http and --https (one wildcard certificate), real clients with
--http/--tls at one member, and visitors at the other (docs/fleet.md
"Hostnames at every member")."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.etcd import TOKENS, FleetProcesses, scrape, start_etcd, wait
from tests.harness import (
    DOMAIN,
    TWISTD,
    Process,
    TlsService,
    WhoAmIServer,
    cert_fingerprint,
    curl,
    free_ports,
    make_ca_and_server,
    serve_in_thread,
)
from tests.pebble import Pebble, pebble_missing

VISITOR = "127.0.0.3"  # the visitors' own address: neither member's


class HostnamesAtEveryMember(FleetProcesses):
    def start_fleet(self) -> None:
        """etcd, and members m1 and m2 with the shared ports on their own addresses."""
        self.node = start_etcd(self, self.workdir / "etcd")
        certs = self.workdir / "edge-certs"
        certs.mkdir()
        self.ca, cert, key = make_ca_and_server(certs, f"*.{DOMAIN}")
        ports = free_ports(4)
        self.http_ports = {1: ports[0], 2: ports[1]}
        self.https_ports = {1: ports[2], 2: ports[3]}
        self.members = {}
        for i in (1, 2):
            host = f"127.0.0.{i}"
            self.members[i] = self.start_member(i, [self.node.url], more=(
                "--domain", DOMAIN, "--http", f"tcp:{self.http_ports[i]}:interface={host}",
                "--https", f"tcp:{self.https_ports[i]}:interface={host}", "--https-cert", str(cert),
                "--https-key", str(key), "--no-https-redirect",
            ))
        for member, _ in self.members.values():
            member.wait_for(r"serving HTTPS for clients' hostnames")

    def start_service(self, name: str) -> int:
        service = WhoAmIServer(name)
        serve_in_thread(self, service)
        return int(service.server_address[1])

    def start_host_client(self, index: int, credential: str, *tunnel: str, name: str = "client") -> Process:
        control = self.members[index][1]
        client = Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.{index}:{control}",
             "--token", TOKENS[credential], "--fingerprint",
             cert_fingerprint(self.workdir / f"state{index}" / "server.crt"), *tunnel],
            self.workdir,
        )
        client.wait_for(r"tunnel ready: ")
        return client

    def connection(self, index: int) -> http.client.HTTPConnection:
        """A visitor's connection to member `index`'s --http port, from VISITOR."""
        return http.client.HTTPConnection(
            f"127.0.0.{index}", self.http_ports[index], timeout=10, source_address=(VISITOR, 0),
        )

    def get(self, conn: http.client.HTTPConnection, host: str, path: str = "/") -> tuple[int, bytes]:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()

    def status_at(self, index: int, host: str) -> int:
        conn = self.connection(index)
        try:
            status, body = self.get(conn, host)
            return status
        except OSError:
            return 0
        finally:
            conn.close()

    def https(self, index: int, name: str, path: str, ca: Path) -> tuple[int, str, str]:
        port = self.https_ports[index]
        return curl("--cacert", str(ca), "--interface", VISITOR, "--resolve", f"{name}:{port}:127.0.0.{index}",
                    f"https://{name}:{port}{path}")

    def test_requests_at_a_member_that_does_not_hold_the_hostname_reach_its_home_s_client(self) -> None:
        """--http alice at m1; at m2: keep-alive requests over HTTP reach the
        service with X-Forwarded-For the visitor's own address, HTTPS is
        terminated with m2's certificate, a WebSocket works, and a name held
        nowhere gets m2's usual 404."""
        from websockets.sync.client import connect
        from websockets.sync.server import serve

        self.start_fleet()
        alice = self.start_service("alice")

        def echo(ws: Any) -> None:
            for message in ws:
                ws.send(message)

        ws_server = serve(echo, "127.0.0.1", 0)
        threading.Thread(target=ws_server.serve_forever, daemon=True).start()
        self.addCleanup(ws_server.shutdown)
        self.start_host_client(
            1, "alice", "--http", "alice", "-t", str(alice), "--http", "echo", "-t",
            str(ws_server.socket.getsockname()[1]),
        )
        host = f"alice.{DOMAIN}"
        wait(lambda: self.status_at(2, host) == 200, 10, "m2 serves the hostname held at m1")
        conn = self.connection(2)
        for i in range(3):  # keep-alive: one connection, several requests
            status, body = self.get(conn, host, f"/keep/{i}")
            self.assertEqual(status, 200, body)
            seen = json.loads(body)
            self.assertEqual((seen["service"], seen["path"]), ("alice", f"/keep/{i}"))
            headers = dict(map(tuple, seen["headers"]))
            self.assertEqual(headers["x-forwarded-for"], VISITOR)
            self.assertEqual(headers["x-forwarded-proto"], "http")
            self.assertEqual(headers["forwarded"], f'for={VISITOR};proto=http;host="{host}"')
        conn.close()
        code, out, err = self.https(2, host, "/secure", self.ca)
        self.assertEqual(code, 0, err)
        seen = json.loads(out)
        self.assertEqual((seen["service"], seen["path"]), ("alice", "/secure"))
        self.assertIn(["x-forwarded-proto", "https"], seen["headers"])
        self.assertIn(["x-forwarded-for", VISITOR], seen["headers"])
        sock = socket.create_connection(("127.0.0.2", self.http_ports[2]), timeout=10, source_address=(VISITOR, 0))
        with connect(f"ws://echo.{DOMAIN}:{self.http_ports[2]}/chat", sock=sock, open_timeout=10) as ws:
            for i in range(5):
                message = f"message {i} " + "x" * (i * 5000)
                ws.send(message)
                self.assertEqual(ws.recv(timeout=10), message)
        status, body = self.get(self.connection(2), f"nobody.{DOMAIN}")
        self.assertEqual(status, 404, body)
        self.assertIn(b"no tunnel serves this hostname", body)
        member2 = self.members[2][0]
        member2.wait_for(rf"serving hostname alice\.{DOMAIN} \(http\) here for member m1")
        self.assertNotIn("Traceback", member2.output + self.members[1][0].output)

    def test_tls_passthrough_at_a_member_that_does_not_hold_the_hostname_shows_the_service_s_own_certificate(
        self,
    ) -> None:
        """--tls secure at m1; curl at m2's --https port sees the service's
        own certificate (another CA than the members' wildcard) and reaches it."""
        self.start_fleet()
        local_dir = self.workdir / "local-certs"
        local_dir.mkdir()
        local_ca, cert, key = make_ca_and_server(local_dir, f"secure.{DOMAIN}")
        service = TlsService(cert, key)
        serve_in_thread(self, service)
        self.start_host_client(1, "bob", "--tls", f"secure.{DOMAIN}", "-t", str(service.server_address[1]))
        self.members[2][0].wait_for(rf"serving hostname secure\.{DOMAIN} \(tls\) here for member m1")
        code, out, err = self.https(2, f"secure.{DOMAIN}", "/through-m2", local_ca)
        self.assertEqual(code, 0, err)
        seen = json.loads(out)
        self.assertEqual((seen["service"], seen["path"]), ("tls-local", "/through-m2"))
        code, out, err = self.https(2, f"secure.{DOMAIN}", "/", self.ca)
        self.assertNotEqual(code, 0, "the member's own certificate was shown for a passthrough name")

    def test_the_edge_follows_a_hostname_released_at_one_member_and_claimed_at_the_other(self) -> None:
        """The client at m1 stops: m2 answers 404 for the name; a client at m2
        claims it: m1, now the edge, carries its requests to m2."""
        self.start_fleet()
        alice = self.start_service("alice")
        host = f"alice.{DOMAIN}"
        client = self.start_host_client(1, "alice", "--http", "alice", "-t", str(alice), name="at-m1")
        wait(lambda: self.status_at(2, host) == 200, 10, "m2 serves the hostname held at m1")
        client.popen.terminate()
        client.wait_exit()
        wait(lambda: self.status_at(2, host) == 404 and self.status_at(1, host) == 404, 10,
             "the released name is served nowhere")
        self.start_host_client(2, "alice", "--http", "alice", "-t", str(alice), name="at-m2")
        wait(lambda: self.status_at(1, host) == 200, 10, "m1 serves the hostname now held at m2")
        status, body = self.get(self.connection(1), host, "/moved")
        self.assertEqual(status, 200, body)
        self.assertIn(["x-forwarded-for", VISITOR], json.loads(body)["headers"])

    def test_a_newer_session_at_another_member_takes_the_hostname_over_and_both_members_route_to_it(self) -> None:
        """The same credential's client claims the name at m2 while its first
        client at m1 still runs: m1 stops routing the name to its own
        session and carries its requests to m2; m2 serves it."""
        self.start_fleet()
        first, second = self.start_service("first"), self.start_service("second")
        host = f"alice.{DOMAIN}"
        self.start_host_client(1, "alice", "--http", "alice", "-t", str(first), name="at-m1")
        wait(lambda: self.status_at(2, host) == 200, 10, "m2 serves the hostname held at m1")
        self.start_host_client(2, "alice", "--http", "alice", "-t", str(second), name="at-m2")

        def served_by_second(index: int) -> bool:
            conn = self.connection(index)
            try:
                status, body = self.get(conn, host)
            finally:
                conn.close()
            return status == 200 and json.loads(body)["service"] == "second"

        wait(lambda: served_by_second(1) and served_by_second(2), 10, "both members route to the newer session")
        self.members[1][0].wait_for(rf"serving hostname alice\.{DOMAIN} \(http\) here for member m2")


def served_certificate(host: str, port: int, name: str, root: Path) -> bytes | None:
    """The DER certificate `host:port` shows for SNI `name` (its chain checked
    against `root`), or None if the handshake fails (e.g. an alert)."""
    context = ssl.create_default_context(cafile=str(root))
    try:
        with socket.create_connection((host, port), timeout=10, source_address=(VISITOR, 0)) as sock:
            with context.wrap_socket(sock, server_hostname=name) as tls:
                return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


def leaf_der(pem_file: Path) -> bytes:
    """The first certificate of a stored key + chain file, as DER."""
    return x509.load_pem_x509_certificates(pem_file.read_bytes())[0].public_bytes(serialization.Encoding.DER)


class AcmeInAFleet(FleetProcesses):
    def test_an_edge_serves_the_acme_certificate_its_home_obtained_and_stops_when_the_name_is_released(
        self,
    ) -> None:
        """ACME (pebble) validates every name at m1's --http port; the client
        claims its name at m2, which orders the certificate: m1 carries the
        challenge to m2, m2 answers it and gets the certificate. m1, the
        edge, fetches it from m2 over the member link and serves HTTPS for
        the name with the very same certificate (curl checks the chain and
        reaches the client's page). The client stops (the name is released):
        m1 no longer serves the certificate (alert)."""
        reason = pebble_missing()
        if reason:
            raise SkipTest(reason)
        node = start_etcd(self, self.workdir / "etcd")
        http1, http2, https1, https2, metrics1 = free_ports(5)
        pebble = Pebble(http1)  # pebble's DNS says every name is 127.0.0.1: m1
        self.addCleanup(pebble.cleanup)
        pebble.start()
        members = {}
        for i, http_port, https_port in ((1, http1, https1), (2, http2, https2)):
            host = f"127.0.0.{i}"
            members[i] = self.start_member(i, [node.url], metrics=metrics1 if i == 1 else None, more=(
                "--domain", DOMAIN, "--http", f"tcp:{http_port}:interface={host}",
                "--https", f"tcp:{https_port}:interface={host}", "--acme-directory", pebble.directory_url,
                "--acme-ca", str(pebble.ca_file), "--acme-email", "ops@tunnel.test",
            ))
        service = WhoAmIServer("acme-app")
        serve_in_thread(self, service)
        name = f"app.{DOMAIN}"
        control = members[2][1]
        client = Process(
            self, "client",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.2:{control}",
             "--token", TOKENS["alice"], "--fingerprint", cert_fingerprint(self.workdir / "state2" / "server.crt"),
             "--http", "app", "-t", str(service.server_address[1])],
            self.workdir,
        )
        client.wait_for(r"tunnel ready: ")
        root = self.workdir / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())

        def served(index: int, port: int) -> tuple[int, str, str]:
            return curl("--cacert", str(root), "--interface", VISITOR, "--resolve", f"{name}:{port}:127.0.0.{index}",
                        f"https://{name}:{port}/")

        wait(lambda: served(2, https2)[0] == 0, 45, f"m2 serves {name} with its ACME certificate", step=0.5)
        self.assertEqual(json.loads(served(2, https2)[1])["service"], "acme-app")
        stored = self.workdir / "state2" / "acme" / "certificates" / f"{name}.pem"
        self.assertTrue(stored.exists())
        self.assertFalse((self.workdir / "state1" / "acme" / "certificates" / f"{name}.pem").exists(),
                         "the edge stores no copy of the key")
        # the first handshakes at the edge may get the alert while it fetches the certificate
        wait(lambda: served(1, https1)[0] == 0, 20, f"m1 serves {name} with m2's certificate", step=0.25)
        code, out, err = served(1, https1)
        self.assertEqual(code, 0, err)
        seen = json.loads(out)
        self.assertEqual(seen["service"], "acme-app")
        self.assertIn(["x-forwarded-proto", "https"], seen["headers"])
        self.assertIn(["x-forwarded-for", VISITOR], seen["headers"])
        self.assertEqual(served_certificate("127.0.0.1", https1, name, root), leaf_der(stored),
                         "the edge shows the very certificate the home obtained")
        self.assertEqual(served_certificate("127.0.0.2", https2, name, root), leaf_der(stored))
        members[1][0].wait_for(rf"certificate for hostname app\.{DOMAIN} fetched from member m2")
        leaf = x509.load_der_x509_certificate(leaf_der(stored))
        expiry = scrape(f"http://127.0.0.1:{metrics1}/metrics")[(
            "rtunnel_fleet_edge_certificate_expiry_timestamp_seconds",
            (("home", "m2"), ("hostname", name), ("member", "m1")),
        )]
        self.assertEqual(expiry, leaf.not_valid_after_utc.timestamp())

        client.popen.terminate()
        client.wait_exit()
        wait(lambda: served_certificate("127.0.0.1", https1, name, root) is None, 15,
             "m1 stops serving the certificate of the released name")
        code, _, err = served(1, https1)
        self.assertNotEqual(code, 0)
        self.assertIn("unrecognized", err.lower())
        self.assertNotIn("Traceback", members[1][0].output + members[2][0].output)


class ClaimRecordKindTests(SynchronousTestCase):
    def test_a_hostname_claim_record_carries_its_kind_and_an_older_record_without_it_still_reads(self) -> None:
        from rtunnel.fleet.keys import ClaimRecord

        record = ClaimRecord("alice", "m1", "s1", 3, 42, "tls")
        self.assertEqual(ClaimRecord.decode(record.encode()), record)
        self.assertEqual(json.loads(record.encode())["kind"], "tls")
        older = b'{"credential": "alice", "member": "m1", "serial": 42, "session": "s1", "tunnel": 3}'
        decoded = ClaimRecord.decode(older)
        self.assertEqual(decoded, ClaimRecord("alice", "m1", "s1", 3, 42))
        assert decoded is not None
        self.assertEqual(decoded.encode(), older, "a port's record is written as before (no kind)")
