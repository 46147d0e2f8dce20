"""--https with certificates from ACME, end to end: a real server process
whose --http port answers pebble's HTTP-01 validation, a real client
claiming a name, and curl checking the certificate pebble issued (its root
only) and the page of the client's service (#15 items 1 and 5)."""

from __future__ import annotations

import json
import time

from twisted.trial.unittest import SkipTest

from tests.harness import DOMAIN, EdgeProcesses, curl, free_port
from tests.pebble import Pebble, pebble_missing


class AcmeEndToEnd(EdgeProcesses):
    """`--https` without `--https-cert` takes its certificates from ACME."""

    def more_server_args(self) -> list[str]:
        reason = pebble_missing()
        if reason:
            raise SkipTest(reason)
        self.http_listen = free_port()  # pebble validates HTTP-01 on this port
        self.pebble = Pebble(self.http_listen)
        self.addCleanup(self.pebble.cleanup)
        self.pebble.start()
        return [
            "--http", f"tcp:{self.http_listen}:interface=127.0.0.1", "--https", "tcp:0:interface=127.0.0.1",
            "--acme-directory", self.pebble.directory_url, "--acme-ca", str(self.pebble.ca_file),
            "--acme-email", "ops@tunnel.test",
        ]

    def setUp(self) -> None:
        super().setUp()
        self.https_port = int(self.server.wait_for(
            r"serving HTTPS for clients' hostnames on \S+ \(port (\d+)\)").group(1))
        self.root = self.workdir / "pebble-root.pem"
        self.root.write_bytes(self.pebble.root_pem())

    def setup_only(self) -> None:
        """(For tests that use this server from another test case.)"""

    def https_get(self, name: str) -> tuple[int, str, str]:
        port = self.https_port
        return curl("--cacert", str(self.root), "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/")

    def wait_until_served(self, name: str, timeout: float = 45.0) -> tuple[int, str, str]:
        """curl the name (pebble's root the only trust) until it answers, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            status, out, err = self.https_get(name)
            if status == 0 or time.monotonic() > deadline:
                return status, out, err
            time.sleep(0.5)

    def test_a_claimed_name_gets_a_certificate_from_acme_and_serves_the_clients_page(self) -> None:
        service = self.start_service("acme-app")
        self.start_client("--http", "app", "-t", str(service))
        name = f"app.{DOMAIN}"
        status, out, err = self.wait_until_served(name)
        self.assertEqual(status, 0, f"curl failed: {err}\nserver log:\n{self.server.output[-3000:]}")
        self.assertEqual(json.loads(out)["service"], "acme-app")
        issued = self.state_dir / "acme" / "certificates" / f"{name}.pem"
        self.assertTrue(issued.exists(), sorted(p.name for p in self.state_dir.rglob("*")))
        self.assertEqual(issued.stat().st_mode & 0o777, 0o600)
        # and nothing was ordered for a name no client claimed: its TLS ends with an alert
        status, _, err = self.https_get(f"nobody.{DOMAIN}")
        self.assertNotEqual(status, 0)
        self.assertFalse((self.state_dir / "acme" / "certificates" / f"nobody.{DOMAIN}.pem").exists())
