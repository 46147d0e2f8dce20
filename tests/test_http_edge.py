"""Hostnames on the shared HTTP port (#15), with real processes on loopback:
a server with --http and --domain, clients with --http NAME, local HTTP
services in threads, and visitors speaking raw HTTP/1.1 over sockets."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

from tests.harness import (
    DOMAIN,
    TWISTD,
    EdgeProcesses,
    Process,
    cert_fingerprint,
    raw_exchange,
    responses,
    status_of,
)


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


class HostnamesCountAsTunnels(EdgeProcesses):
    def more_server_args(self) -> list[str]:
        return ["--max-tunnels", "2"]

    def test_a_session_s_hostnames_count_toward_max_tunnels(self) -> None:
        """--max-tunnels bounds what one session holds, hostnames included:
        a client asking for a port and two names with a limit of two gets
        the first two, and the third is refused with a message naming the
        limit (fatal: retrying cannot fix it, the client exits)."""
        alice = self.start_service("alice")
        client = self.start_client(
            "-f", "0", "-t", str(alice), "--http", "alice", "-t", str(alice), "--http", "bob", "-t", str(alice),
            wait=None,
        )
        client.wait_for(r"at most 2 tunnels per session \(--max-tunnels\)")
        self.assertNotEqual(client.wait_exit(20), 0, client.output)
        self.assertIn("tunnel ready: http://alice.", client.output)
        self.assertNotIn("tunnel ready: http://bob.", client.output)
