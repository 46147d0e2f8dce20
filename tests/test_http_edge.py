"""Hostnames on the shared HTTP port (#15), with real processes on loopback:
a server with --http and --domain, clients with --http NAME, local HTTP
services in threads, and visitors speaking raw HTTP/1.1 over sockets."""

from __future__ import annotations

import http.client
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import (
    TWISTD,
    Process,
    cert_fingerprint,
    make_ca_and_server,
    plugins_installed,
    serve_in_thread,
)

DOMAIN = "tunnel.test"


class WhoAmI(http.server.BaseHTTPRequestHandler):
    """Answers every request with JSON naming its service, the request line,
    its headers and body: what reached which local service."""

    protocol_version = "HTTP/1.1"
    service = "?"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        reply = json.dumps({
            "service": self.server.service,  # type: ignore[attr-defined]
            "method": self.command, "path": self.path, "body": body.decode("latin-1"),
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class WhoAmIServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: str) -> None:
        super().__init__(("127.0.0.1", 0), WhoAmI)
        self.service = service

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection reset as a client process stops at the end of a test


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, half_close: bool = False) -> bytes:
    """Send `data` to 127.0.0.1:port, read until the server closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def responses(data: bytes) -> list[bytes]:
    """The bodies of the Content-Length-framed responses in `data`, in order."""
    bodies = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        bodies.append(rest[:length])
        data = rest[length:]
    return bodies


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


class EdgeProcesses(SynchronousTestCase):
    """A server with the shared ports, and helpers to start clients and services."""

    server_args: tuple[str, ...] = ()

    def more_server_args(self) -> list[str]:
        return []

    def setUp(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-http-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state_dir = self.workdir / "state"
        self.server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--listen", "tcp:0:interface=127.0.0.1",
             "--state-dir", str(self.state_dir), "--domain", DOMAIN,
             "--http", "tcp:0:interface=127.0.0.1", *self.server_args, *self.more_server_args()],
            self.workdir,
        )
        self.control = int(self.server.wait_for(r"rtunnel server listening on \S+ \(port (\d+)\)").group(1))
        self.http_port = int(self.server.wait_for(r"serving HTTP for clients' hostnames on \S+ \(port (\d+)\)").group(1))

    def start_service(self, name: str) -> int:
        service = WhoAmIServer(name)
        serve_in_thread(self, service)
        return int(service.server_address[1])

    def start_client(self, *args: str, name: str = "client", wait: str | None = r"tunnel ready: ") -> Process:
        token = (self.state_dir / "token").read_text().strip()
        client = Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{self.control}",
             "--token", token, "--fingerprint", cert_fingerprint(self.state_dir / "server.crt"), *args],
            self.workdir,
        )
        if wait:
            client.wait_for(wait)
        return client

    def get(self, conn: http.client.HTTPConnection, host: str, path: str = "/") -> dict[str, Any]:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
        self.assertEqual(response.status, 200, body)
        return dict(json.loads(body))


class RoutingByHost(EdgeProcesses):
    def test_each_request_reaches_only_its_hostnames_owner(self) -> None:
        """Two clients, two names on one shared port: keep-alive requests
        alternating between them on separate connections, and one
        connection whose second request names the other host — every
        request reaches its own owner's service and no other."""
        alice = self.start_service("alice")
        bob = self.start_service("bob")
        client_a = self.start_client("--http", "alice", "-t", str(alice), name="client-a")
        self.start_client("--http", f"bob.{DOMAIN}", "-t", str(bob), name="client-b")
        self.assertIn(f"http://alice.{DOMAIN}:{self.http_port}", client_a.output)
        to_a = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        to_b = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        for i in range(6):
            self.assertEqual(self.get(to_a, f"alice.{DOMAIN}", f"/a{i}")["service"], "alice")
            self.assertEqual(self.get(to_b, f"BOB.{DOMAIN}.", f"/b{i}")["service"], "bob")
        both = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        first = self.get(both, f"alice.{DOMAIN}", "/first")
        second = self.get(both, f"bob.{DOMAIN}:{self.http_port}", "/second")
        third = self.get(both, f"alice.{DOMAIN}", "/third")
        self.assertEqual((first["service"], second["service"], third["service"]), ("alice", "bob", "alice"))
        self.assertEqual(second["path"], "/second")
        for conn in (to_a, to_b, both):
            conn.close()

    def test_forwarding_headers_are_the_servers_not_the_visitors(self) -> None:
        """X-Forwarded-For/Proto/Host and Forwarded come from the server; a
        visitor's own copies (not a trusted proxy) are dropped."""
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        conn.request("GET", "/", headers={
            "Host": f"alice.{DOMAIN}", "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6",
            "X-Forwarded-Proto": "https",
        })
        seen = json.loads(conn.getresponse().read())
        headers = dict((k, v) for k, v in seen["headers"])
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(headers["x-forwarded-proto"], "http")
        self.assertEqual(headers["x-forwarded-host"], f"alice.{DOMAIN}")
        self.assertEqual(headers["forwarded"], f'for=127.0.0.1;proto=http;host="alice.{DOMAIN}"')
        self.assertNotIn("6.6.6.6", json.dumps(seen))

    def test_pipelined_requests_are_answered_in_order_each_by_its_owner(self) -> None:
        """Three requests sent at once on one connection, naming two hosts:
        three responses, in order, each from the named host's service."""
        alice = self.start_service("alice")
        bob = self.start_service("bob")
        self.start_client("--http", "alice", "-t", str(alice), name="client-a")
        self.start_client("--http", "bob", "-t", str(bob), name="client-b")
        requests = b"".join(
            f"GET /{i} HTTP/1.1\r\nHost: {name}.{DOMAIN}\r\n{'Connection: close' if i == 2 else 'X: y'}\r\n\r\n".encode()
            for i, name in enumerate(("alice", "bob", "alice"))
        )
        response = raw_exchange(self.http_port, requests)
        bodies = [json.loads(body) for body in responses(response)]
        self.assertEqual([(b["service"], b["path"]) for b in bodies], [("alice", "/0"), ("bob", "/1"), ("alice", "/2")])

    def test_a_visitor_that_half_closes_after_its_request_gets_the_response(self) -> None:
        """A request followed by the visitor's FIN (nc -N) is still answered;
        an HTTP/1.0 request gets a response framed for HTTP/1.0 and a close."""
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        request = f"GET /fin HTTP/1.1\r\nHost: alice.{DOMAIN}\r\n\r\n".encode()
        response = raw_exchange(self.http_port, request, half_close=True)
        self.assertEqual(status_of(response), 200, response)
        self.assertEqual(json.loads(responses(response)[0])["path"], "/fin")
        response = raw_exchange(self.http_port, f"GET /old HTTP/1.0\r\nHost: alice.{DOMAIN}\r\n\r\n".encode())
        self.assertEqual(status_of(response), 200, response)
        self.assertIn(b"connection: close", response.lower())

    def test_unknown_host_gets_a_404_naming_no_tenant(self) -> None:
        """A Host no tunnel serves, or none at all: 404/400 pages that name no other tenant."""
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        response = raw_exchange(self.http_port, f"GET / HTTP/1.1\r\nHost: nobody.{DOMAIN}\r\n\r\n".encode())
        self.assertEqual(status_of(response), 404, response)
        self.assertNotIn(b"alice", response)
        response = raw_exchange(self.http_port, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(status_of(response), 400, response)
        self.assertNotIn(b"alice", response)

    def test_client_refuses_to_start_when_the_server_has_no_http(self) -> None:
        """A server without --http/--https does not serve "http" tunnels: the
        client says so and exits 2."""
        state = self.workdir / "plain"
        plain = Process(
            self, "plain-server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--listen", "tcp:0:interface=127.0.0.1",
             "--state-dir", str(state)],
            self.workdir,
        )
        control = int(plain.wait_for(r"rtunnel server listening on \S+ \(port (\d+)\)").group(1))
        client = Process(
            self, "client-plain",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{control}",
             "--token", (state / "token").read_text().strip(),
             "--fingerprint", cert_fingerprint(state / "server.crt"), "--http", "app", "-t", "3000"],
            self.workdir,
        )
        self.assertEqual(client.wait_exit(), 2, client.describe())
        self.assertIn("does not serve 'http' tunnels", client.output)


BAD_REQUESTS: list[tuple[str, bytes, int]] = [
    ("Content-Length with Transfer-Encoding",
     b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("duplicate Content-Length",
     b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    ("Content-Length list", b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 5, 5\r\n\r\nhello", 400),
    ("bad chunk size",
     b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: H\r\nX-A: one\r\n two\r\n\r\n", 400),
    ("CR injection in a value", b"GET / HTTP/1.1\r\nHost: H\r\nX-A: one\rX-Injected: yes\r\n\r\n", 400),
    ("bare LF line ending", b"GET / HTTP/1.1\r\nHost: H\nX-Injected: yes\r\n\r\n", 400),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: H\r\nHost: other.example\r\n\r\n", 400),
    ("huge chunk extension",
     b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\n5;x=" + b"a" * 65536
     + b"\r\nhello\r\n0\r\n\r\n", 400),
    ("unknown transfer coding", b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("head over --max-request-head",
     b"GET / HTTP/1.1\r\nHost: H\r\n" + b"X-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
    ("space before the colon", b"GET / HTTP/1.1\r\nHost: H\r\nContent-Length : 5\r\n\r\nhello", 400),
]


class MalformedRequests(EdgeProcesses):
    server_args = ("--request-head-timeout", "1")

    def test_smuggling_shapes_get_clear_4xx_and_honest_traffic_continues(self) -> None:
        """Every request-smuggling and malformed shape gets its 4xx (or 501)
        with a page saying what was wrong; none reaches the service; the
        server survives and an honest visitor's keep-alive requests go on."""
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        host = f"alice.{DOMAIN}".encode()
        honest = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        self.assertEqual(self.get(honest, f"alice.{DOMAIN}", "/before")["path"], "/before")
        for what, request, status in BAD_REQUESTS:
            response = raw_exchange(self.http_port, request.replace(b"Host: H", b"Host: " + host))
            self.assertEqual(status_of(response), status, f"{what}: {response[:300]!r}")
            self.assertNotIn(b'"service"', response, what)
            self.assertEqual(self.get(honest, f"alice.{DOMAIN}", "/during")["service"], "alice", what)
        self.assertIsNone(self.server.popen.poll())

    def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(self) -> None:
        """Slowloris: a head not complete within --request-head-timeout gets
        408; an idle keep-alive connection is closed quietly."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            response = s.recv(65536)
        self.assertEqual(status_of(response), 408, response)
        self.assertLess(time.monotonic() - started, 5)
        with socket.create_connection(("127.0.0.1", self.http_port), timeout=10) as s:
            self.assertEqual(s.recv(100), b"")

    def test_a_chunked_body_reaches_the_service_whole(self) -> None:
        """A chunked request body is re-framed and arrives whole; a
        Content-Length body too."""
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        host = f"alice.{DOMAIN}".encode()
        response = raw_exchange(
            self.http_port,
            b"POST /c HTTP/1.1\r\nHost: " + host + b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        self.assertEqual(status_of(response), 200, response)
        self.assertEqual(json.loads(response.split(b"\r\n\r\n", 1)[1])["body"], "hello world")
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        body = bytes(range(256)) * 1000
        conn.request("PUT", "/big", body=body, headers={"Host": f"alice.{DOMAIN}"})
        self.assertEqual(json.loads(conn.getresponse().read())["body"].encode("latin-1"), body)


class WebSocketThroughHttp(EdgeProcesses):
    def test_websocket_echo_through_the_http_port(self) -> None:
        """Upgrade: the 101 switches the connection to a byte relay; a real
        WebSocket client and server exchange messages through --http."""
        from websockets.sync.client import connect
        from websockets.sync.server import serve

        def echo(ws: Any) -> None:
            for message in ws:
                ws.send(message)

        ws_server = serve(echo, "127.0.0.1", 0)
        threading.Thread(target=ws_server.serve_forever, daemon=True).start()
        self.addCleanup(ws_server.shutdown)
        self.start_client("--http", "echo", "-t", str(ws_server.socket.getsockname()[1]))
        sock = socket.create_connection(("127.0.0.1", self.http_port), timeout=10)
        with connect(f"ws://echo.{DOMAIN}:{self.http_port}/chat", sock=sock, open_timeout=10) as ws:
            for i in range(20):
                message = f"message {i} " + "x" * (i * 1000)
                ws.send(message)
                self.assertEqual(ws.recv(timeout=10), message)
            ws.send(b"\x00\x01binary")
            self.assertEqual(ws.recv(timeout=10), b"\x00\x01binary")


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


class TrustedProxy(EdgeProcesses):
    server_args = ("--trusted-proxies", "127.0.0.0/8")

    def test_a_trusted_proxys_forwarding_headers_are_kept(self) -> None:
        """From a --trusted-proxies address, X-Forwarded-For is kept with
        the proxy's address appended, and its Forwarded kept."""
        alice = self.start_service("alice")
        self.start_client("--http", "alice", "-t", str(alice))
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        conn.request("GET", "/", headers={"Host": f"alice.{DOMAIN}", "X-Forwarded-For": "203.0.113.7",
                                          "Forwarded": "for=203.0.113.7"})
        headers = json.loads(conn.getresponse().read())["headers"]
        self.assertIn(["x-forwarded-for", "203.0.113.7, 127.0.0.1"], headers)
        self.assertEqual([v for k, v in headers if k == "forwarded"],
                         ["for=203.0.113.7", "for=127.0.0.1;proto=http;host=\"alice.tunnel.test\""])


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


def curl(*args: str) -> tuple[int, str, str]:
    """Run curl (bounded); its exit code, stdout and stderr."""
    out = subprocess.run(["curl", "--silent", "--show-error", "--max-time", "15", *args],
                         capture_output=True, timeout=30)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


class TlsService(http.server.ThreadingHTTPServer):
    """A local HTTPS service holding its own certificate (for TLS passthrough)."""

    daemon_threads = True

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), WhoAmI)
        self.service = "tls-local"
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class HttpsBase(EdgeProcesses):
    """A server with --https and a static wildcard certificate made here."""

    def more_server_args(self) -> list[str]:
        if shutil.which("curl") is None:
            raise SkipTest("curl not found: install Debian's 'curl' package")
        certs = self.workdir / "edge-certs"
        certs.mkdir()
        self.ca, cert, key = make_ca_and_server(certs, f"*.{DOMAIN}")
        return ["--https", "tcp:0:interface=127.0.0.1", "--https-cert", str(cert), "--https-key", str(key)]

    def setUp(self) -> None:
        super().setUp()
        self.https_port = int(self.server.wait_for(
            r"serving HTTPS for clients' hostnames on \S+ \(port (\d+)\)").group(1))

    def url(self, name: str, path: str = "/") -> list[str]:
        return ["--resolve", f"{name}:{self.https_port}:127.0.0.1", f"https://{name}:{self.https_port}{path}"]

    def setup_only(self) -> None:
        """(For tests that use this server from another test case.)"""


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


del EdgeProcesses
