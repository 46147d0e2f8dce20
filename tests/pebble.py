"""Debian's pebble (a real ACME server for tests) and pebble-challtestsrv
(its DNS server: every name is 127.0.0.1), on loopback, bounded in time.

Used by tests/test_acme.py (and by the --https edge's tests). `Pebble`
writes a config into its own temporary directory: its own listen and
management ports, `httpPort` = the port of the caller's HTTP-01 responder,
and an HTTPS certificate made here with cryptography (`ca_file` is its CA:
give it as --acme-ca). Pebble's own root, which signs the certificates it
issues, changes at every start: `root_pem()` fetches it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEBBLE = os.environ.get("RTUNNEL_PEBBLE", "/usr/bin/pebble")
CHALLTESTSRV = os.environ.get("RTUNNEL_CHALLTESTSRV", "/usr/bin/pebble-challtestsrv")


def pebble_missing() -> str | None:
    """Why the ACME tests cannot run here, or None."""
    for tool, package in ((PEBBLE, "pebble"), (CHALLTESTSRV, "pebble-challtestsrv")):
        if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
            return f"{tool} not found: install Debian's '{package}' package (apt-get install pebble)"
    return None


def _port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _https_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and, signed by it, a certificate for 127.0.0.1 and localhost: pebble's HTTPS."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rtunnel test ACME server CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    for path, data in zip(paths, (_pem(ca), _pem(cert), _pem(key)), strict=True):
        path.write_bytes(data)
    return paths


class Pebble:
    """pebble + pebble-challtestsrv as child processes. `start()` blocks
    until the directory answers (at most `timeout` s); `stop()` is safe at
    any time and is what a test calls to make the ACME server unreachable."""

    def __init__(self, http_port: int, validity: int | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-pebble-"))
        self.http_port = http_port
        self.validity = validity
        self.ca_file, self._cert, self._key = _https_certificate(self.dir)
        self.port = _port()
        self.management_port = _port()
        self.dns_port = _port(socket.SOCK_DGRAM)
        self.challtest_management_port = _port()
        self.directory_url = f"https://127.0.0.1:{self.port}/dir"
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self, timeout: float = 20.0) -> None:
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self._cert),
            "privateKey": str(self._key),
            "httpPort": self.http_port,
            "tlsPort": _port(),  # TLS-ALPN-01: nothing listens there (not offered by rtunnel)
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity is not None:
            config["certificateValidityPeriod"] = self.validity
        (self.dir / "pebble.json").write_text(json.dumps({"pebble": config}))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        if not self._processes:
            self._spawn("challtestsrv", [
                CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
                "-tlsalpn01", "", "-management", f"127.0.0.1:{self.challtest_management_port}",
                "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
            ], env)
        self._spawn("pebble", [
            PEBBLE, "-config", str(self.dir / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns_port}",
        ], env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(self.directory_url, verify=str(self.ca_file), timeout=2).raise_for_status()
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pebble did not answer at {self.directory_url}: {self.output()}") from None
                time.sleep(0.1)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 -- the child keeps it
        self._processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir))
        log.close()

    def stop_pebble(self) -> None:
        """Stop the ACME server only (the DNS server stays): orders now fail to connect."""
        for process in self._processes:
            if process.args[0] == PEBBLE:
                self._end(process)
        self._processes = [p for p in self._processes if p.args[0] != PEBBLE]

    def stop(self) -> None:
        for process in self._processes:
            self._end(process)
        self._processes = []

    def _end(self, process: subprocess.Popen[bytes]) -> None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, True)

    def root_pem(self) -> bytes:
        """Pebble's root of this run, from its management API."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        response = requests.get(url, verify=str(self.ca_file), timeout=5)
        response.raise_for_status()
        return response.content

    def output(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}" for path in sorted(self.dir.glob("*.log"))
        )
