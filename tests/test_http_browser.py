"""Headless Chromium opens https://app.<domain>:PORT/ through the server's
--https port (TLS terminated with a static certificate made here, trusted
by its SPKI hash; the name mapped to 127.0.0.1 by --host-resolver-rules)
and the page served by the client's local service renders (#15).

Set RTUNNEL_SCREENSHOT_TO=docs/images/https-tunnel.png to keep the screenshot."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import shutil
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests.chromium import Chromium, chromium_missing
from tests.harness import DOMAIN, HttpsBase, serve_in_thread

PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>Hello via rtunnel</title>
<style>body{font-family:sans-serif;background:#f4f6fb;margin:0}main{margin:80px auto;max-width:640px;
background:#fff;border-radius:12px;padding:40px;box-shadow:0 4px 24px #0002}h1{color:#1d4ed8}</style></head>
<body><main><h1 id="hello">Hello from localhost:3000</h1><p>This page is served by a service on the
client's machine, published by <b>rtunnel_client --http app -t 3000</b> and reached over HTTPS at the
server's shared port, with the certificate the server holds.</p><p>Opened at <code id="url"></code>
over <code id="proto"></code>.</p></main><script>document.getElementById("url").textContent=location.href;
document.getElementById("proto").textContent=location.protocol</script></body></html>"""


class Page(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = PAGE if self.path == "/" else b"not found"
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def spki_hash(cert_path: Path) -> str:
    """base64 SHA-256 of a certificate's SubjectPublicKeyInfo (Chromium's --ignore-certificate-errors-spki-list)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@defer.inlineCallbacks
def render_and_screenshot(test: unittest.TestCase, url: str, flags: list[str], shot: Path, keep_env: str) -> Any:
    """Chromium renders `url` (the page's heading must be in its DOM), then
    takes a PNG screenshot into `shot`, copied to $keep_env's path if set."""
    browser = Chromium(reactor)
    test.addCleanup(browser.cleanup)
    code, dom, err = yield browser.run(url, ["--dump-dom", *flags], timeout=60)
    test.assertEqual(code, 0, err[-2000:])
    test.assertIn(b'<h1 id="hello">Hello from localhost:3000</h1>', dom, err[-2000:])
    browser = Chromium(reactor)
    test.addCleanup(browser.cleanup)
    code, _, err = yield browser.run(url, [f"--screenshot={shot}", *flags], timeout=60)
    test.assertEqual(code, 0, err[-2000:])
    test.assertEqual(shot.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
    keep = os.environ.get(keep_env)
    if keep:
        shutil.copy(shot, keep)


def chain_spki_hashes(pem_file: Path) -> list[str]:
    """Chromium's SPKI hashes of every certificate in a PEM file (a stored key + chain)."""
    hashes = []
    for cert in x509.load_pem_x509_certificates(pem_file.read_bytes().split(b"-----END PRIVATE KEY-----")[-1]):
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        hashes.append(base64.b64encode(hashlib.sha256(spki).digest()).decode())
    return hashes


class ChromiumOverHttps(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        missing = chromium_missing()
        if missing:
            raise unittest.SkipTest(missing)
        # the Https tests' server and helpers (run, not collected, here)
        self.edge = HttpsBase("setup_only")
        self.edge.setUp()
        self.addCleanup(self.edge.doCleanups)

    @defer.inlineCallbacks
    def test_chromium_renders_the_local_page_over_https(self) -> None:
        """The page of the client's local service renders in Chromium at
        https://app.DOMAIN:PORT/, the certificate checked against the test
        CA's (by SPKI hash), and a screenshot is taken."""
        service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        service.daemon_threads = True
        serve_in_thread(self.edge, service)
        self.edge.start_client("--http", "app", "-t", str(service.server_address[1]))
        url = f"https://app.{DOMAIN}:{self.edge.https_port}/"
        cert = self.edge.workdir / "edge-certs" / "srv.crt"
        flags = [
            f"--host-resolver-rules=MAP app.{DOMAIN} 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={spki_hash(cert)},{spki_hash(self.edge.ca)}",
            "--window-size=1000,600", "--virtual-time-budget=3000",
        ]
        yield render_and_screenshot(self, url, flags, self.edge.workdir / "https-tunnel.png", "RTUNNEL_SCREENSHOT_TO")



class ChromiumOverAcme(unittest.TestCase):
    """The same page, with the certificate the server obtained from a real
    ACME server (pebble) for the claimed name. Chromium's SPKI list applies to
    the chain the server sends (leaf and pebble's intermediate; the root is
    never sent), so it is given the SPKI hashes of that chain, read from the
    file the server stored; curl checks the same chain against pebble's root
    (tests.test_https_acme)."""

    timeout = 150

    def setUp(self) -> None:
        missing = chromium_missing()
        if missing:
            raise unittest.SkipTest(missing)
        from tests.test_https_acme import AcmeEndToEnd

        self.edge = AcmeEndToEnd("setup_only")
        self.edge.setUp()
        self.addCleanup(self.edge.doCleanups)

    @defer.inlineCallbacks
    def test_chromium_renders_the_local_page_with_a_certificate_from_acme(self) -> None:
        service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        service.daemon_threads = True
        serve_in_thread(self.edge, service)
        self.edge.start_client("--http", "app", "-t", str(service.server_address[1]))
        name = f"app.{DOMAIN}"
        status, _, err = yield threads.deferToThread(self.edge.wait_until_served, name)
        self.assertEqual(status, 0, err)
        url = f"https://{name}:{self.edge.https_port}/"
        stored = self.edge.state_dir / "acme" / "certificates" / f"{name}.pem"
        flags = [
            f"--host-resolver-rules=MAP {name} 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={','.join(chain_spki_hashes(stored))}",
            "--window-size=1000,600", "--virtual-time-budget=3000",
        ]
        shot = self.edge.workdir / "https-acme.png"
        yield render_and_screenshot(self, url, flags, shot, "RTUNNEL_ACME_SCREENSHOT_TO")
