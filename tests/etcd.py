"""Real etcd for the fleet tests: one node, or a 3-node cluster, on loopback.

Debian's `etcd-server` (/usr/bin/etcd) on free ports, each node with its
own data directory under the test's temporary directory; `stop()` ends
them (trial's cleanup does it too). Tests that need it skip with a reason
when etcd is not installed (`SKIP_NO_ETCD`).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ETCD = shutil.which("etcd")
SKIP_NO_ETCD = (
    None if ETCD else "etcd is not installed (apt-get install etcd-server; .ci/run installs it)"
)
START_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdNode:
    """One etcd process (a member of `cluster`, "name=peerurl,..." or itself alone)."""

    def __init__(self, workdir: Path, name: str = "n1") -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.data_dir = workdir / f"etcd-{name}"
        self.log_path = workdir / f"etcd-{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.cluster = f"{name}={self.peer_url}"
        self.cluster_state = "new"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

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
                "--log-level", "warn",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.cluster_state = "existing"  # a restart rejoins

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as answer:
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


def start_etcd(test: Any, workdir: Path) -> EtcdNode:
    """One healthy etcd node, stopped at the test's end."""
    node = EtcdNode(workdir)
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
