"""File descriptors (rtunnel.descriptors): the limit raised at start, a share
kept from visitors for control connections, and accept(2) running out of
descriptors without a busy loop, a log flood or closing waiting clients.

The processes run with a small hard limit of open files (set in the child
before it starts), so that running out takes a few hundred connections.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from rtunnel.descriptors import (
    CONTROL_MARGIN,
    MAX_RESERVE,
    DescriptorGate,
    listen_tcp,
    raise_limit,
    reserve_for,
)
from tests.harness import (
    TOKEN,
    TWISTD,
    Conversation,
    Echo,
    Tunnel,
    listen_target,
    sleep,
    wait_until,
    with_timeout,
)

SERVER_SOFT, SERVER_HARD = 64, 256  # the server raises 64 to 256 and keeps 64 from visitors
CPU_SECONDS_ALLOWED = 0.2  # of the server's CPU over 2 s of exhaustion: an idle process, not a spin


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def limited(soft: int, hard: int) -> Any:
    """A preexec_fn: the child's open files limit is soft/hard."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class GatedPortTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_gated_listening_socket_carries_no_dict_of_its_own_and_accepts(self) -> Any:
        accepted: defer.Deferred[None] = defer.Deferred()

        class Accepted(Protocol):
            def connectionMade(self) -> None:
                accepted.callback(None)

        port = listen_tcp(reactor, 0, Factory.forProtocol(Accepted), 16, "127.0.0.1", DescriptorGate(reactor, "visitor"))
        self.addCleanup(port.stopListening)
        listening = port.socket  # type: ignore[attr-defined]
        self.assertIs(listening.port, port)
        self.assertFalse(hasattr(listening, "__dict__"))  # one per tunnel: a dict cost 336 bytes
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        yield with_timeout(accepted, 5)


class LimitTests(unittest.SynchronousTestCase):
    def test_raise_limit_takes_the_soft_limit_to_the_hard_one_and_says_what_it_was(self) -> None:
        out = subprocess.run(
            [sys.executable, "-c", "from rtunnel.descriptors import raise_limit; print(tuple(raise_limit().__dict__.values()))"],
            preexec_fn=limited(100, 300), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(out.stdout.strip(), "(100, 300, 300, None)", out.stderr)

    def test_raise_limit_leaves_a_limit_already_at_the_hard_one(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            raise unittest.SkipTest("this process's soft limit is below its hard limit")
        got = raise_limit()
        self.assertEqual((got.before, got.soft, got.error), (soft, soft, None))

    def test_visitors_leave_a_quarter_of_a_small_limit_and_512_of_a_large_one(self) -> None:
        self.assertEqual(reserve_for(256), 64)
        self.assertEqual(reserve_for(1024), 256)
        self.assertEqual(reserve_for(1 << 20), MAX_RESERVE)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(DescriptorGate(reactor, "visitor").ceiling(), limit - reserve_for(limit))
        self.assertEqual(DescriptorGate(reactor, "control").ceiling(), limit - CONTROL_MARGIN)


# A process listening on a gated port (the control kind) that then opens
# files until none is left; "free" on stdin closes them, "quit" stops it.
# It echoes what its clients send and logs to stderr.
GATED_ECHO = r"""
import json, os, sys
from twisted.internet import reactor, stdio
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import LineReceiver
from rtunnel.descriptors import DescriptorGate, listen_tcp

globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

files = []
gate = DescriptorGate(reactor, "control")

class Commands(LineReceiver):
    delimiter = b"\n"
    def lineReceived(self, line):
        if line == b"free":
            while files:
                os.close(files.pop())
        elif line == b"quit":
            gate.stop()
            reactor.stop()

def fill():
    while True:
        try:
            files.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    print(json.dumps({"port": port.getHost().port, "files": len(files)}), flush=True)

stdio.StandardIO(Commands())
port = listen_tcp(reactor, 0, Factory.forProtocol(Echo), 1024, "127.0.0.1", gate)
reactor.callWhenRunning(fill)
reactor.run()
"""


class AcceptWithoutDescriptorsTests(unittest.SynchronousTestCase):
    def test_out_of_descriptors_the_port_waits_without_spinning_logging_or_closing_clients(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="rtunnel-fds-"))
        log_path = workdir / "stderr"
        with open(log_path, "wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-c", GATED_ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, preexec_fn=limited(128, 128),
            )
        self.addCleanup(lambda: child.poll() is None and child.kill())
        assert child.stdout is not None and child.stdin is not None
        started = json.loads(child.stdout.readline() or b"{}")
        self.assertIn("port", started, log_path.read_text())
        lines_before = len(log_path.read_text().splitlines())

        clients = [socket.create_connection(("127.0.0.1", started["port"]), timeout=5) for _ in range(40)]
        self.addCleanup(lambda: [c.close() for c in clients])
        for client in clients:
            client.sendall(b"ping")
        used = cpu_seconds(child.pid)
        time.sleep(2.0)
        self.assertLess(cpu_seconds(child.pid) - used, CPU_SECONDS_ALLOWED, "the process spins on accept")
        log = log_path.read_text().splitlines()[lines_before:]
        self.assertLessEqual(len(log), 2, "\n".join(log))
        self.assertIn("cannot accept control connections (EMFILE", "\n".join(log))
        for client in clients:  # still waiting in the queue, not closed
            client.settimeout(0.01)
            self.assertRaises(TimeoutError, client.recv, 1)

        child.stdin.write(b"free\n")
        child.stdin.flush()
        for client in clients:
            client.settimeout(5)
            self.assertEqual(client.recv(4), b"ping")
        child.stdin.write(b"quit\n")
        child.stdin.flush()
        self.assertEqual(child.wait(20), 0, log_path.read_text())


class Visitor(Conversation):
    """A visitor of the flood."""

    transport: Any = None


class ServerOutOfDescriptorsTests(unittest.TestCase):
    """A twistd server with a hard limit of 256 open files, its client and
    target in this process, flooded by visitors."""

    timeout = 120

    def start_server(self) -> Any:
        workdir = Path(tempfile.mkdtemp(prefix="rtunnel-fds-server-"))
        self.log_path = workdir / "server.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("RTUNNEL_TOKEN", None)
        with open(self.log_path, "wb") as log:
            server = subprocess.Popen(
                [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(port),
                 "--interface", "127.0.0.1", "--state-dir", str(workdir / "state"), "--token", TOKEN],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=limited(SERVER_SOFT, SERVER_HARD),
            )
        self.addCleanup(self.stop, server)
        tunnel = Tunnel(self)
        tunnel.state_dir, tunnel.control_port = workdir / "state", port
        return server, tunnel

    def stop(self, server: subprocess.Popen[bytes]) -> None:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @defer.inlineCallbacks
    def visit(self, port: int, count: int) -> Any:
        """`count` visitors at once; fire with them once each is either
        connected and still open, or closed."""
        visitors = [Visitor() for _ in range(count)]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)

        def reset_at_once(_: object, visitor: Visitor) -> None:  # a reset before Twisted saw it connect
            visitor.closed.callback(b"")

        connecting = [connectProtocol(endpoint, v).addErrback(reset_at_once, v) for v in visitors]
        yield defer.gatherResults(connecting)
        for visitor in visitors:
            self.addCleanup(
                lambda v=visitor: v.transport is not None and v.transport.connected and v.transport.abortConnection()
            )
        yield sleep(1.0)  # refused ones are reset at once
        return visitors

    @defer.inlineCallbacks
    def test_visitors_holding_every_descriptor_they_may_leave_room_for_a_control_connection(self) -> Any:
        server, tunnel = self.start_server()
        yield wait_until(lambda: "Run on the client machine" in self.log(), 60)
        self.assertIn(
            f"open files: limit {SERVER_HARD} (hard limit {SERVER_HARD}, was {SERVER_SOFT}); "
            f"{reserve_for(SERVER_HARD)} of them kept for control connections", self.log(),
        )
        _, target = listen_target(self, Echo)
        [public] = yield tunnel.connect([(0, target)])

        # more visitors than the server has descriptors: it keeps what it may
        visitors = yield self.visit(public, SERVER_HARD + 100)
        held = [v for v in visitors if not v.closed.called]
        self.assertGreater(len(held), SERVER_HARD // 2)
        self.assertLess(len(held), SERVER_HARD - reserve_for(SERVER_HARD))
        lines = len(self.log().splitlines())
        refused = yield self.visit(public, 200)  # all of these are refused
        self.assertTrue(all(v.closed.called for v in refused))
        new_lines = self.log().splitlines()[lines:]
        self.assertLessEqual(len(new_lines), 2, "\n".join(new_lines))

        # exhausted for visitors, the server idles
        used = cpu_seconds(server.pid)
        yield sleep(2.0)
        self.assertLess(cpu_seconds(server.pid) - used, CPU_SECONDS_ALLOWED)

        # a control connection gets in, and its client gets a tunnel
        second = tunnel.start_client(tunnel.client_config([(0, target)]))
        bound = yield with_timeout(second.client.when_bound(), 10)
        self.assertEqual(len(bound), 1)

        # the held visitors still work; once they leave, new ones get in
        probe = held[0]
        probe.transport.write(b"still here")
        yield wait_until(lambda: bytes(probe.received) == b"still here", 10)
        for visitor in held:
            visitor.transport.loseConnection()
        yield with_timeout(defer.gatherResults([v.closed for v in held]), 20)
        # (the server closes its side once both directions are done)
        yield wait_until(lambda: len(os.listdir(f"/proc/{server.pid}/fd")) < SERVER_SOFT, 10)
        [after] = yield self.visit(public, 1)
        after.transport.write(b"after the flood")
        yield wait_until(lambda: bytes(after.received) == b"after the flood", 10)
        self.assertNotIn("Traceback", self.log())
