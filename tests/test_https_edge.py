"""Hostnames on the shared ports (#15), part two, real processes on
loopback: --https terminated with a static certificate and checked with
curl, TLS passthrough, ownership of names across sessions and credentials,
metrics and the access log."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time

from tests.harness import (
    DOMAIN,
    TWISTD,
    EdgeProcesses,
    HttpsBase,
    Process,
    TlsService,
    cert_fingerprint,
    curl,
    make_ca_and_server,
    raw_exchange,
    serve_in_thread,
    status_of,
)


class Ownership(EdgeProcesses):
    """A hostname is a claim like a port: it belongs to a credential."""

    server_args = ("--client", "bob=bobs-token-0123456789", "--offline-wait", "1")

    def test_a_name_stays_its_credentials_while_detached_and_goes_to_its_next_session(self) -> None:
        """Another credential is refused the name, also while its holder is
        detached (a request then waits --offline-wait and gets 502 "offline");
        a new session of the owning credential takes it over and serves it."""
        first = self.start_service("first")
        owner = self.start_client("--http", "alice", "-t", str(first), name="owner")
        bob = Process(  # another credential
            self, "bob",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{self.control}",
             "--token", "bobs-token-0123456789", "--fingerprint", cert_fingerprint(self.state_dir / "server.crt"),
             "--http", "alice", "-t", str(first)],
            self.workdir,
        )
        bob.wait_for(r"refused hostname alice \(http\): hostname alice\.tunnel\.test is held by another client")
        owner.popen.kill()  # no GOAWAY: the session is detached, kept for --resume-grace
        owner.popen.wait(5)
        started = time.monotonic()
        response = raw_exchange(self.http_port, f"GET / HTTP/1.1\r\nHost: alice.{DOMAIN}\r\n\r\n".encode())
        self.assertEqual(status_of(response), 502, response)
        self.assertIn(b"offline", response)
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        refusals = bob.output.count("held by another client")
        bob.wait_for(rf"(?s)(held by another client.*){{{refusals + 1}}}", timeout=15)
        second = self.start_service("second")
        self.start_client("--http", "alice", "-t", str(second), name="owner-again")
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        self.assertEqual(self.get(conn, f"alice.{DOMAIN}")["service"], "second")

    def test_token_credentials_get_only_names_under_the_domain(self) -> None:
        """A token credential asking for a name outside --domain is refused
        (not_permitted: fatal, exit 2, with the reason)."""
        client = self.start_client("--http", "app.elsewhere.example", "-t", "3000", wait=None)
        self.assertEqual(client.wait_exit(), 2, client.describe())
        self.assertIn("not permitted for token credential default", client.output)


class Observability(EdgeProcesses):
    """Metrics by hostname, and the access log (#15 item 6)."""

    def more_server_args(self) -> list[str]:
        self.access_log = self.workdir / "access.log"
        return ["--metrics", "tcp:0:interface=127.0.0.1", "--access-log", str(self.access_log)]

    def test_metrics_and_access_log_show_hostnames_statuses_and_bytes(self) -> None:
        """Requests, status classes and bytes per hostname in /metrics; one
        combined-format line per request in --access-log, naming the host."""
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        for i in range(3):
            self.get(conn, f"alice.{DOMAIN}", f"/page{i}")
        raw_exchange(self.http_port, f"GET / HTTP/1.1\r\nHost: nobody.{DOMAIN}\r\n\r\n".encode())
        metrics_port = int(self.server.wait_for(r"metrics at http://\S+:(\d+)/metrics").group(1))
        metrics = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=10)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        name = f"alice.{DOMAIN}"
        self.assertIn(f'rtunnel_http_requests_total{{hostname="{name}"}} 3.0', text)
        self.assertIn(f'rtunnel_http_responses_total{{class="2xx",hostname="{name}"}} 3.0', text)
        self.assertRegex(text, rf'rtunnel_http_bytes_total{{direction="out",hostname="{name}"}} [1-9]')
        self.assertIn('rtunnel_http_edge_answers_total{status="404"} 1.0', text)
        self.assertNotIn("nobody", text)
        lines = self.access_log.read_text().splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertRegex(lines[0], rf'^127\.0\.0\.1 - - \[.+\] "GET /page0 HTTP/1.1" 200 \d+ "-" "[^"]*" "{name}"$')
        self.assertRegex(lines[3], r'"GET / HTTP/1.1" 404 \d+ ')


class Https(HttpsBase):
    """--https terminated with the static certificate, and TLS passthrough."""

    def test_https_terminated_with_the_static_certificate(self) -> None:
        """curl --cacert checks the chain and the name; the request reaches
        the owner's service marked X-Forwarded-Proto https; BOUND's URLs
        are logged by the client; plain HTTP for the name gets a 308 to https."""
        alice = self.start_service("alice")
        client = self.start_client("--http", "alice", "-t", str(alice))
        self.assertIn(f"https://alice.{DOMAIN}:{self.https_port}", client.output)
        code, out, err = curl("--cacert", str(self.ca), *self.url(f"alice.{DOMAIN}", "/secure"))
        self.assertEqual(code, 0, err)
        seen = json.loads(out)
        self.assertEqual((seen["service"], seen["path"]), ("alice", "/secure"))
        self.assertIn(["x-forwarded-proto", "https"], seen["headers"])
        response = raw_exchange(self.http_port, f"GET /x?y=1 HTTP/1.1\r\nHost: alice.{DOMAIN}\r\n\r\n".encode())
        self.assertEqual(status_of(response), 308, response)
        self.assertIn(f"location: https://alice.{DOMAIN}:{self.https_port}/x?y=1".encode(), response.lower())

    def test_a_name_without_certificate_gets_an_alert_not_another_certificate(self) -> None:
        """SNI naming nothing the certificate covers: the handshake ends in
        an unrecognized_name alert; no certificate is shown."""
        context = ssl.create_default_context(cafile=str(self.ca))
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=10) as raw:
            with self.assertRaises(ssl.SSLError) as caught:
                context.wrap_socket(raw, server_hostname="other.example.org")
        self.assertIn("UNRECOGNIZED_NAME", str(caught.exception).upper())

    def test_tls_passthrough_reaches_the_local_service_undecrypted(self) -> None:
        """--tls: the server routes by SNI without decrypting; curl checks
        the certificate is the local service's own (another CA than the
        server's wildcard), and the service sees the request."""
        local_dir = self.workdir / "local-certs"
        local_dir.mkdir()
        local_ca, cert, key = make_ca_and_server(local_dir, f"secure.{DOMAIN}")
        service = TlsService(cert, key)
        serve_in_thread(self, service)
        self.start_client("--tls", f"secure.{DOMAIN}", "-t", str(service.server_address[1]))
        code, out, err = curl("--cacert", str(local_ca), *self.url(f"secure.{DOMAIN}", "/passthrough"))
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["service"], "tls-local")
        code, out, err = curl("--cacert", str(self.ca), *self.url(f"secure.{DOMAIN}", "/"))
        self.assertNotEqual(code, 0, "the server's own certificate was shown for a passthrough name")



class HttpsWithoutRedirect(HttpsBase):
    """--no-https-redirect, and the access log as JSON."""

    server_args = ("--no-https-redirect", "--access-log-format", "json")

    def more_server_args(self) -> list[str]:
        self.access_log = self.workdir / "access.jsonl"
        return [*super().more_server_args(), "--access-log", str(self.access_log)]

    def test_plain_http_is_served_without_redirect_and_logged_as_json(self) -> None:
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        self.assertEqual(self.get(conn, f"alice.{DOMAIN}", "/plain")["service"], "alice")
        code, out, err = curl("--cacert", str(self.ca), *self.url(f"alice.{DOMAIN}", "/tls"))
        self.assertEqual(code, 0, err)
        records = [json.loads(line) for line in self.access_log.read_text().splitlines()]
        self.assertEqual(
            [(r["host"], r["target"], r["status"], r["scheme"]) for r in records],
            [(f"alice.{DOMAIN}", "/plain", 200, "http"), (f"alice.{DOMAIN}", "/tls", 200, "https")],
        )
