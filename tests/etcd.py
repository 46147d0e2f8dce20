"""Real etcd for the fleet tests: one node, or a 3-node cluster, on loopback.

Also the base of the fleet's process tests (FleetProcesses: members as
twistd processes, clients, visitors) and small synchronous readers of etcd
and /metrics.

Debian's `etcd-server` (/usr/bin/etcd) on free ports, each node with its
own data directory under the test's temporary directory; `stop()` ends
them (trial's cleanup does it too). Tests that need it skip with a reason
when etcd is not installed (`SKIP_NO_ETCD`).
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.harness import (
    BANNER,
    TWISTD,
    Process,
    TargetServer,
    cert_fingerprint,
    free_port,
    make_ca_and_server,
    plugins_installed,
    serve_in_thread,
)

ETCD = shutil.which("etcd")
SKIP_NO_ETCD = (
    None if ETCD else "etcd is not installed (apt-get install etcd-server; .ci/run installs it)"
)
START_TIMEOUT = 20.0



class EtcdNode:
    """One etcd process (a member of `cluster`, "name=peerurl,..." or itself alone)."""

    def __init__(self, workdir: Path, name: str = "n1", tls: bool = False) -> None:
        """With `tls`, etcd serves https:// with a test CA's certificate and
        asks clients for a certificate of that CA (--client-cert-auth): the
        files are `tls_dir`/ca.crt, client.crt and client.key."""
        self.name = name
        self.tls_dir: Path | None = None
        if tls:
            self.tls_dir = workdir / f"etcd-tls-{name}"
            self.tls_dir.mkdir(parents=True, exist_ok=True)
            make_ca_and_server(self.tls_dir, "localhost", ip="127.0.0.1", client="rtunnel-member")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.data_dir = workdir / f"etcd-{name}"
        self.log_path = workdir / f"etcd-{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.cluster = f"{name}={self.peer_url}"
        self.cluster_state = "new"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_dir is not None else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self) -> None:
        assert ETCD is not None, SKIP_NO_ETCD
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            [
                ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.cluster, "--initial-cluster-state", self.cluster_state,
                "--initial-cluster-token", f"rtunnel-test-{self.workdir.name}",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "warn", *self._tls_args(),
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.cluster_state = "existing"  # a restart rejoins

    def _tls_args(self) -> list[str]:
        if self.tls_dir is None:
            return []
        return [
            "--cert-file", str(self.tls_dir / "srv.crt"), "--key-file", str(self.tls_dir / "srv.key"),
            "--trusted-ca-file", str(self.tls_dir / "ca.crt"), "--client-cert-auth",
        ]

    def client_context(self) -> ssl.SSLContext | None:
        if self.tls_dir is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        context.load_cert_chain(str(self.tls_dir / "client.crt"), str(self.tls_dir / "client.key"))
        return context

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1, context=self.client_context()) as answer:
                return b'"true"' in answer.read()
        except OSError:
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"etcd {self.name} exited: {self.log_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd {self.name} not healthy after {timeout:.0f} s: {self.log_path.read_text(errors='replace')}")
            time.sleep(0.05)

    def pause(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
            self.popen.wait(5)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_etcd(test: Any, workdir: Path, tls: bool = False) -> EtcdNode:
    """One healthy etcd node (https:// with client certificates if `tls`), stopped at the test's end."""
    node = EtcdNode(workdir, tls=tls)
    node.start()
    test.addCleanup(node.stop)
    node.wait_healthy()
    return node


def start_cluster(test: Any, workdir: Path, size: int = 3) -> list[EtcdNode]:
    """A healthy `size`-node etcd cluster on loopback, stopped at the test's end."""
    nodes = [EtcdNode(workdir, f"n{i + 1}") for i in range(size)]
    cluster = ",".join(f"{node.name}={node.peer_url}" for node in nodes)
    for node in nodes:
        node.cluster = cluster
        node.start()
        test.addCleanup(node.stop)
    for node in nodes:
        node.wait_healthy()
    return nodes


# ---------------------------------------------------------------- fleet processes


TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab", "carol": "carol-token-0123456789"}
PREFIX = "/rtunnel/"


def etcd_get(url: str, key: str, context: ssl.SSLContext | None = None) -> dict[str, Any] | None:
    """The JSON value of `key` (None if absent), read with urllib (over TLS
    with `context`: EtcdNode.client_context() for a node with tls)."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    request = urllib.request.Request(url + "/v3/kv/range", body, {"Content-Type": "application/json"})
    deadline = time.monotonic() + 5
    while True:  # a node answers 503 while the cluster elects a leader
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as answer:
                kvs = json.loads(answer.read()).get("kvs", [])
            return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
        except urllib.error.HTTPError as e:
            if e.code < 500 or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples at a /metrics URL: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def wait(predicate: Any, timeout: float, what: str, step: float = 0.02) -> float:
    """Poll until true; the time.monotonic() it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


class FleetProcesses(SynchronousTestCase):
    """Base of the fleet process tests: members on 127.0.0.1/.2/.3 (twistd
    rtunnel-server --fleet-etcd), clients, a banner-echo target, visitors."""

    def setUp(self) -> None:
        if SKIP_NO_ETCD:
            raise SkipTest(SKIP_NO_ETCD)
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        target = self.target = TargetServer()
        serve_in_thread(self, target)
        self.target_port = target.server_address[1]

    def member_files(self, index: int, server_identity: Path | None = None) -> Path:
        """Member `index`'s state directory with its member certificate (from
        the test's fleet CA, made on first use), and, if given, the server
        certificate and key of `server_identity` (members behind one load
        balancer present one certificate to clients)."""
        from rtunnel.fleet import ca

        state = self.workdir / f"state{index}"
        ca_dir = self.workdir / "fleet-ca"
        if not (ca_dir / ca.CA_CERT).exists():
            ca.init_ca(ca_dir, "test")
        if not (state / f"m{index}.crt").exists():
            ca.issue_member(ca_dir, f"m{index}", state)
        if server_identity is not None and server_identity != state:
            for name in ("server.crt", "server.key"):
                shutil.copy(server_identity / name, state / name)
        return state

    def start_member(
        self, index: int, etcd_urls: list[str], ttl: int = 5, metrics: int | None = None,
        port: int | None = None, link_port: int | None = None, server_identity: Path | None = None,
        more: tuple[str, ...] = (),
    ) -> tuple[Process, int]:
        """Member m`index` on 127.0.0.`index` (its control port, member links and
        --public-host there), a real `twistd rtunnel-server --fleet-etcd` process."""
        host = f"127.0.0.{index}"
        port = port or free_port()
        self.member_files(index, server_identity)
        options = ["--metrics", f"tcp:{metrics}:interface={host}"] if metrics else []
        options += more
        clients = [arg for name, token in TOKENS.items() for arg in ("--client", f"{name}={token}")]
        member = Process(
            self, f"member{index}",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(port), "--interface", host,
             "--public-host", host, "--state-dir", str(self.workdir / f"state{index}"), "--token", "unused-0123456789",
             *clients, "--fleet-etcd", ",".join(etcd_urls), "--fleet-member", f"m{index}",
             "--fleet-listen", f"tcp:{link_port or free_port()}:interface={host}", "--fleet-lease-ttl", str(ttl),
             *options],
            self.workdir,
        )
        member.wait_for(r"Run on the client machine:")
        return member, port

    def start_client(self, index: int, control: int, credential: str, public: int, name: str) -> Process:
        fingerprint = cert_fingerprint(self.workdir / f"state{index}" / "server.crt")
        return Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.{index}:{control}",
             "-f", str(public), "-t", str(self.target_port), "--token", TOKENS[credential],
             "--fingerprint", fingerprint],
            self.workdir,
        )

    def visit(self, host: str, port: int, payload: bytes = b"ping") -> bytes:
        with socket.create_connection((host, port), timeout=10) as visitor:
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := visitor.recv(65536):
                chunks.append(chunk)
        reply = b"".join(chunks)
        self.assertEqual(reply, BANNER + payload)
        return reply

    def claim(self, url: str, port: int) -> dict[str, Any] | None:
        return etcd_get(url, f"{PREFIX}claims/tcp/default/{port}")


# ---------------------------------------------------------------- haproxy in front of the control port

HAPROXY = shutil.which("haproxy")
SKIP_NO_HAPROXY = None if HAPROXY else "haproxy is not installed (apt-get install haproxy; .ci/run installs it)"
HAPROXY_CONFIG = Path(__file__).resolve().parent.parent / "scripts" / "fleet-haproxy.cfg"


def start_haproxy(test: Any, workdir: Path, members: list[str]) -> tuple[Process, int]:
    """A real haproxy (scripts/fleet-haproxy.cfg, the deployment example's
    file) in front of the control ports `members` ("host:port" each):
    its process and its front port on 127.0.0.1."""
    assert HAPROXY is not None, SKIP_NO_HAPROXY
    front = free_port()
    env = {
        "RTUNNEL_FRONT": f"127.0.0.1:{front}", "RTUNNEL_HAPROXY_STATS": f"127.0.0.1:{free_port()}",
        **{f"RTUNNEL_MEMBER{i + 1}": member for i, member in enumerate(members)},
    }
    process = Process(test, "haproxy", [HAPROXY, "-db", "-f", str(HAPROXY_CONFIG)], workdir, extra_env=env)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", front), timeout=1).close()
            break
        except OSError:
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"haproxy did not listen on {front}: {process.describe()}") from None
            time.sleep(0.05)
    return process, front
