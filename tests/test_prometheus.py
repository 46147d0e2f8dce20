"""System test: a real Prometheus (Debian's `prometheus`) scrapes a real
server's /metrics, and a byte counter read back through Prometheus's HTTP
query API equals the bytes pushed through a tunnel.

Skips when /usr/bin/prometheus (or `prometheus` on PATH) is missing. The
Prometheus process runs with its own config and storage in a temp dir, on a
free loopback port, and is killed in the cleanup.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from tests.harness import (
    HashReply,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    pattern,
    sleep,
    visit,
    with_timeout,
)


def find_prometheus() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    return "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None


class _Output(ProcessProtocol):
    """Keeps the process's output (for failure messages) and its end."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output += data
        del self.output[:-20000]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        if not reason.check(ProcessDone, ProcessTerminated):
            reason.raiseException()
        self.ended.callback(None)

    def tail(self) -> str:
        return self.output[-3000:].decode(errors="replace")


class PrometheusTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        binary = find_prometheus()
        if binary is None:
            raise unittest.SkipTest(
                "Debian's prometheus is not installed (/usr/bin/prometheus missing; "
                "apt-get install prometheus)"
            )
        self.binary = binary

    def start_prometheus(self, target_port: int) -> tuple[int, _Output]:
        work = Path(tempfile.mkdtemp(prefix="rtunnel-prometheus-"))
        self.addCleanup(shutil.rmtree, work, True)
        (work / "prometheus.yml").write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: rtunnel\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        port = free_port()
        process = _Output()
        args = [
            self.binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        transport = reactor.spawnProcess(process, self.binary, args, env={"PATH": os.environ.get("PATH", "")}, path=str(work))

        def kill() -> defer.Deferred[None]:
            if process.running:
                transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(kill)
        return port, process

    @defer.inlineCallbacks
    def query(self, port: int, expression: str) -> Any:
        """The result vector of an instant query (raises on HTTP errors)."""
        url = f"http://127.0.0.1:{port}/api/v1/query?{urlencode({'query': expression})}"
        response = yield with_timeout(Agent(reactor).request(b"GET", url.encode()), 5)
        body = yield readBody(response)
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise AssertionError(f"Prometheus query {expression!r} failed: {answer}")
        return answer["data"]["result"]

    @defer.inlineCallbacks
    def wait_for_value(self, port: int, process: _Output, expression: str, expected: float, seconds: float) -> Any:
        """Poll `expression` until its single value is `expected`; fail after `seconds`."""
        deadline = reactor.seconds() + seconds
        last: Any = "no answer yet"
        while reactor.seconds() < deadline:
            if not process.running:
                raise AssertionError(f"prometheus exited:\n{process.tail()}")
            try:
                result = yield self.query(port, expression)
            except Exception as e:  # not listening yet
                last = repr(e)
            else:
                last = result
                if len(result) == 1 and float(result[0]["value"][1]) == expected:
                    return
            yield sleep(0.5)
        raise AssertionError(
            f"{expression} did not reach {expected} within {seconds} s (last: {last}); "
            f"prometheus said:\n{process.tail()}"
        )

    @defer.inlineCallbacks
    def test_prometheus_reads_back_the_bytes_pushed_through_a_tunnel(self):
        target, target_port = listen_target(self, HashReply)
        tunnel = Tunnel(self)
        yield tunnel.start_server(metrics="tcp:0:interface=127.0.0.1")
        metrics_port = tunnel.server_service.metrics_port.getHost().port
        [public] = yield tunnel.connect([(0, target_port)])
        port, process = self.start_prometheus(metrics_port)

        yield self.wait_for_value(port, process, 'up{job="rtunnel"}', 1, 60)
        sizes = [3_000_001, 1_234_567]
        for i, size in enumerate(sizes):
            reply, _ = yield with_timeout(visit(public, Visitor(pattern(i, size))), 30)
            self.assertTrue(reply.startswith(f"{size} ".encode()), reply[:100])
        yield self.wait_for_value(
            port, process, 'sum(rtunnel_stream_bytes_total{job="rtunnel",direction="in"})', sum(sizes), 30
        )
        yield self.wait_for_value(
            port, process, 'rtunnel_streams_opened_total{job="rtunnel",client="default"}', len(sizes), 10
        )
