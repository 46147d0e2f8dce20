"""PROXY protocol v1 and v2 through a real consumer: Debian's nginx with
`listen ... proxy_protocol` logs the visitor's address and port.

Visitors connect from 127.0.0.2 (and, if this host has ::1, from ::1 to a
target on 127.0.0.1), so the address nginx logs is provably the visitor's,
not the rtunnel client's 127.0.0.1 it really talks to.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.protocol import ClientFactory
from twisted.trial import unittest

from rtunnel.config import TunnelSpec
from rtunnel.tap.client import Options
from tests.harness import TOKEN, Tunnel, Visitor, sleep, wait_until, with_timeout

NGINX = os.environ.get("RTUNNEL_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
LOG_FORMAT = (
    "uri=$request_uri visitor=$proxy_protocol_addr:$proxy_protocol_port "
    "reached=$proxy_protocol_server_addr:$proxy_protocol_server_port peer=$remote_addr"
)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nginx_config(root: Path, listens: list[str]) -> str:
    temp_paths = "\n".join(
        f"    {name}_temp_path {root / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    listen_lines = "\n".join(f"        listen {address} proxy_protocol;" for address in listens)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process off;
pid {root / "nginx.pid"};
error_log {root / "error.log"} info;
events {{ worker_connections 64; }}
http {{
{temp_paths}
    log_format visitors '{LOG_FORMAT}';
    access_log {root / "access.log"} visitors;
    server {{
{listen_lines}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


class SourceVisitor(Visitor):
    """A Visitor that remembers its own (source) address and port."""

    def connectionMade(self) -> None:
        host = self.transport.getHost()
        self.source = (host.host, host.port)
        super().connectionMade()


class ProxyProtocolThroughNginx(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        if not os.path.exists(NGINX):
            raise unittest.SkipTest(f"nginx is not installed ({NGINX} missing; apt-get install nginx)")
        self.root = Path(tempfile.mkdtemp(prefix="rtunnel-nginx-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.ipv6 = has_ipv6_loopback()
        self.port4 = free_port("127.0.0.1")
        listens = [f"127.0.0.1:{self.port4}"]
        if self.ipv6:
            self.port6 = free_port("::1")
            listens.append(f"[::1]:{self.port6}")
        (self.root / "nginx.conf").write_text(nginx_config(self.root, listens))
        yield self.start_nginx([("127.0.0.1", self.port4)] + ([("::1", self.port6)] if self.ipv6 else []))
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server()

    @defer.inlineCallbacks
    def start_nginx(self, addresses: list[tuple[str, int]]) -> Any:
        out = open(self.root / "nginx.out", "wb")  # noqa: SIM115 (closed in cleanup)
        self.addCleanup(out.close)
        process = subprocess.Popen(
            [NGINX, "-p", str(self.root), "-c", str(self.root / "nginx.conf"), "-e", str(self.root / "error.log")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

        def stop() -> None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

        self.addCleanup(stop)
        deadline = time.monotonic() + 15
        for host, port in addresses:
            while True:
                if process.poll() is not None:
                    self.fail(f"nginx exited with status {process.returncode}: {self.nginx_output()}")
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family) as probe:
                    if probe.connect_ex((host, port)) == 0:
                        break
                if time.monotonic() > deadline:
                    self.fail(f"nginx did not listen on {host}:{port} within 15 s: {self.nginx_output()}")
                yield sleep(0.05)

    def nginx_output(self) -> str:
        texts = []
        for name in ("nginx.out", "error.log"):
            path = self.root / name
            if path.exists():
                texts.append(f"{name}: {path.read_text(errors='replace')[-2000:]}")
        return " | ".join(texts) or "no output"

    def access_lines(self) -> list[str]:
        path = self.root / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    @defer.inlineCallbacks
    def request(self, source: str, public: tuple[str, int], path: str) -> Any:
        """GET `path` from `source` through the public port; fire with
        (the visitor's source (host, port), nginx's log line of it)."""
        visitor = SourceVisitor(f"GET {path} HTTP/1.0\r\nHost: tunnel\r\n\r\n".encode(), half_close=False)
        factory = ClientFactory.forProtocol(lambda: visitor)
        factory.noisy = False
        factory.clientConnectionFailed = lambda connector, reason: visitor.done.errback(reason)  # type: ignore[method-assign]
        reactor.connectTCP(public[0], public[1], factory, bindAddress=(source, 0))
        reply, reason = yield with_timeout(visitor.done, 20)
        reason.trap(error.ConnectionDone)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:200])
        self.assertTrue(reply.endswith(b"\r\n\r\nok\n"), reply[-200:])
        yield wait_until(lambda: any(f"uri={path} " in line for line in self.access_lines()), 10)
        [line] = [line for line in self.access_lines() if f"uri={path} " in line]
        return visitor.source, dict(word.split("=", 1) for word in line.split(" "))

    @defer.inlineCallbacks
    def connect(self, tunnels: list[TunnelSpec]) -> Any:
        config = replace(self.tunnel.client_config([]), tunnels=tuple(tunnels))
        service = self.tunnel.start_client(config)
        bound = yield with_timeout(service.client.when_bound(), 10)
        return {i: port for i, (_, port) in bound.items()}

    def check(self, logged: dict[str, str], source: tuple[str, int], reached: tuple[str, int], peer: str) -> None:
        visitor_host, _, visitor_port = logged["visitor"].rpartition(":")
        self.assertEqual((visitor_host, int(visitor_port)), source)
        reached_host, _, reached_port = logged["reached"].rpartition(":")
        self.assertEqual((reached_host, int(reached_port)), reached)
        self.assertEqual(logged["peer"], peer)  # the rtunnel client: what nginx sees without the header

    @defer.inlineCallbacks
    def test_v1_and_v2_visitor_address_logged_by_nginx(self):
        ports = yield self.connect([
            # bound to 0.0.0.0: the header's destination is the address the visitor reached
            TunnelSpec(1, "0.0.0.0", 0, "127.0.0.1", self.port4, "v1"),
            TunnelSpec(2, "0.0.0.0", 0, "127.0.0.1", self.port4, "v2"),
        ])
        for tunnel, version in ((1, "v1"), (2, "v2")):
            source, logged = yield self.request("127.0.0.2", ("127.0.0.1", ports[tunnel]), f"/{version}-ipv4")
            self.assertEqual(source[0], "127.0.0.2")
            self.check(logged, source, ("127.0.0.1", ports[tunnel]), "127.0.0.1")

    @defer.inlineCallbacks
    def test_v1_and_v2_ipv6_visitor_address_logged_by_nginx(self):
        if not self.ipv6:
            raise unittest.SkipTest("this host has no IPv6 loopback (::1)")
        ports = yield self.connect([
            TunnelSpec(1, "::1", 0, "::1", self.port6, "v1"),
            # an IPv6 visitor through an IPv4 connection to nginx: ::1 can only come from the header
            TunnelSpec(2, "::1", 0, "127.0.0.1", self.port4, "v2"),
        ])
        source, logged = yield self.request("::1", ("::1", ports[1]), "/v1-ipv6")
        self.check(logged, source, ("::1", ports[1]), "::1")
        source, logged = yield self.request("::1", ("::1", ports[2]), "/v2-ipv6-to-ipv4")
        self.check(logged, source, ("::1", ports[2]), "127.0.0.1")

    @defer.inlineCallbacks
    def test_command_line_flag_through_nginx(self):
        options = Options()
        options.parseOptions([
            "-c", f"127.0.0.1:{self.tunnel.control_port}", "--token", TOKEN,
            "--fingerprint", self.tunnel.fingerprint, "--proxy-protocol", "v2",
            "-f", "0.0.0.0:0", "-t", f"127.0.0.1:{self.port4}",
        ])
        service = self.tunnel.start_client(options.config)
        bound = yield with_timeout(service.client.when_bound(), 10)
        public = bound[1][1]
        source, logged = yield self.request("127.0.0.2", ("127.0.0.1", public), "/flag-v2")
        self.check(logged, source, ("127.0.0.1", public), "127.0.0.1")
