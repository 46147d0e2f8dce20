"""Fixes from the review of #7: the client's tunnel labels after a removal,
a port removed and re-added in one reload, dual-stack listeners under a
narrowed bind policy, and SIGHUP with nothing to reload.

Real servers and clients on loopback (in this process, or as processes for
SIGHUP); the dual-stack tests bind `::` and skip without it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from rtunnel.config import TunnelSpec
from rtunnel.counters import tunnel_name
from rtunnel.metrics import ClientCollector, registry_for
from rtunnel.tap import client as tap_client
from tests.harness import (
    TOKEN,
    Echo,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    wait_until,
    with_timeout,
)
from tests.test_configfile import converse
from tests.test_ipv6 import NO_DUAL_STACK, reaches, visit_at
from tests.test_metrics import parse, value


class LogCapture:
    """Every log event while a test runs."""

    def __init__(self, test: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class ClientTunnelNameTests(TestCase):
    """Review item 2: a removed tunnel's connections keep their label."""

    timeout = 60

    @defer.inlineCallbacks
    def test_a_removed_tunnels_open_connection_keeps_its_tunnel_label(self) -> Any:
        tunnel = Tunnel(self)
        yield tunnel.start_server()
        _, target = listen_target(self, Echo)
        [public] = yield tunnel.connect([(0, target)])
        client = tunnel.client_service.client
        name = tunnel_name("127.0.0.1", public)
        registry = registry_for(ClientCollector(client))

        def scraped() -> Any:
            return parse(generate_latest(registry).decode())

        visitor = yield converse(public)
        visitor.transport.write(b"before")
        yield wait_until(lambda: bytes(visitor.received) == b"before")
        client.remove_tunnel(1)
        self.assertEqual(client.tunnel_name(1), name)
        live = scraped()
        self.assertEqual(value(live, "rtunnel_stream_bytes_total", tunnel=name, direction="in"), 6)
        self.assertNotIn("?", {dict(labels).get("tunnel") for _, labels in live})

        visitor.transport.write(b" after")
        yield wait_until(lambda: bytes(visitor.received) == b"before after")
        visitor.transport.loseWriteConnection()
        yield with_timeout(visitor.closed, 10)
        yield wait_until(lambda: client.session is not None and not client.session.streams)
        self.assertEqual(sorted(client.traffic.closed), [("", name)])
        self.assertEqual(client.traffic.closed[("", name)].bytes_in, 12)
        closed = scraped()
        self.assertEqual(value(closed, "rtunnel_stream_bytes_total", tunnel=name, direction="in"), 12)
        self.assertNotIn("?", {dict(labels).get("tunnel") for _, labels in closed})


class SamePortReloadTests(TestCase):
    """Review item 3: a reload that closes a port and opens the same port
    on another address binds it at once, not after the 5 s retry."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-review-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tunnel = Tunnel(self)
        yield self.tunnel.start_server()
        self.log = LogCapture(self)
        _, self.target = listen_target(self, Echo)
        self.port = free_port()

    def write(self, forward: str) -> Path:
        path = self.dir / "client.toml"
        path.write_text(
            f'server = "127.0.0.1:{self.tunnel.control_port}"\ntoken = "{TOKEN}"\n'
            f'fingerprint = "{self.tunnel.fingerprint}"\nmax_retry_delay = 0.5\n'
            f'\n[[tunnel]]\nforward = "{forward}"\nto = "127.0.0.1:{self.target}"\n'
        )
        return path

    @defer.inlineCallbacks
    def rebind(self, before: str, after: str, visit_host: str) -> Any:
        options = tap_client.Options()
        options.parseOptions(["--config", str(self.write(before))])
        service = tap_client.ClientMainService(options.config, reactor, exit_on_fatal=False, reload_argv=options.argv)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        client = service.client
        yield with_timeout(client.when_bound(), 10)
        self.write(after)
        service.reload()
        self.assertEqual(sorted(client.tunnels), [2])  # removed and added, not retargeted
        yield wait_until(lambda: 2 in client.bound or self.log.named("bind_failed"), 15)
        self.assertEqual(self.log.named("bind_failed"), [], self.log.text())
        self.assertEqual(client.bound[2][1], self.port)
        reply, _ = yield with_timeout(visit_at(visit_host, self.port, Visitor(b"same port")), 10)
        self.assertEqual(reply, b"same port")

    def test_another_ipv4_address_on_the_same_port(self) -> Any:
        return self.rebind(f"0.0.0.0:{self.port}", f"127.0.0.1:{self.port}", "127.0.0.1")

    def test_default_address_to_explicit_ipv6_any(self) -> Any:
        if NO_DUAL_STACK:
            raise SkipTest(NO_DUAL_STACK)
        return self.rebind(str(self.port), f"[::]:{self.port}", "::1")

    @defer.inlineCallbacks
    def test_a_tunnel_removed_while_its_bind_waits_is_never_bound(self) -> Any:
        [public] = yield self.tunnel.connect([(self.port, self.target)])
        client = self.tunnel.client_service.client
        spec = client.remove_tunnel(1)
        added = client.add_tunnel(replace(spec, bind_host="0.0.0.0"))  # waits for the port to close
        client.remove_tunnel(added.tunnel_id)  # ...and is gone before it has
        marker = client.add_tunnel(replace(spec, bind_port=0))  # BOUND once the server has read all that
        yield wait_until(lambda: marker.tunnel_id in client.bound)
        [session] = self.tunnel.server.sessions.values()
        yield wait_until(lambda: not session._binds_waiting and not self.tunnel.server.ports._closing)
        self.assertEqual(sorted(session.tunnels), [marker.tunnel_id])
        self.assertEqual(list(self.tunnel.server.listeners), [("127.0.0.1", client.bound[marker.tunnel_id][1])])
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", public), timeout=5).close()


class DualStackPolicyTests(TestCase):
    """Review item 4: a clients-file reload that takes 0.0.0.0 from a
    client's bind list; its dual-stack `::` port still takes IPv4."""

    timeout = 60
    TOKEN = "carol-token-0123456789"

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        if NO_DUAL_STACK:
            raise SkipTest(NO_DUAL_STACK)
        self.tunnel = Tunnel(self)
        self.clients_file = self.tunnel.state_dir / "clients.toml"
        self.port = free_port()
        self.write('"0.0.0.0", "::"')
        yield self.tunnel.start_server(clients_file=self.clients_file)
        _, self.target = listen_target(self, Echo)
        self.log = LogCapture(self)

    def write(self, bind: str) -> None:
        sha = hashlib.sha256(self.TOKEN.encode()).hexdigest()
        self.clients_file.write_text(
            f'[clients.carol]\ntoken_sha256 = "{sha}"\nports = [{self.port}]\nbind = [{bind}]\n'
        )

    @defer.inlineCallbacks
    def start_client(self) -> Any:
        config = replace(
            self.tunnel.client_config([]), token=self.TOKEN,
            tunnels=(TunnelSpec(1, "", self.port, "127.0.0.1", self.target),),
        )
        service = self.tunnel.start_client(config)
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1], ("::", self.port))
        return service

    def reaches(self, host: str) -> defer.Deferred[bool]:
        return reaches(host, self.port)

    @defer.inlineCallbacks
    def test_reload_reports_the_dual_stack_port_as_outside_the_policy(self) -> Any:
        yield self.start_client()
        self.assertTrue((yield self.reaches("127.0.0.1")))
        self.write('"::"')
        self.tunnel.server_service.reload()
        [mismatch] = self.log.named("policy_mismatch")
        self.assertIn(f":{self.port}", formatEvent(mismatch))

    @defer.inlineCallbacks
    def test_a_new_session_gets_an_ipv6_only_port_not_the_dual_stack_one(self) -> Any:
        first = yield self.start_client()
        self.write('"::"')
        self.tunnel.server_service.reload()
        first.client.link.transport.abortConnection()  # the client dies without a goodbye
        yield wait_until(lambda: first.client.link is None)
        yield first.stopService()
        yield self.start_client()  # a new session takes the port back
        self.assertTrue((yield self.reaches("::1")))
        self.assertFalse((yield self.reaches("127.0.0.1")))
        self.assertEqual(self.log.named("bind_failed"), [], self.log.text())


class NothingToReloadTests(SynchronousTestCase):
    """Review item 5: SIGHUP to a server without --clients and a client
    without --config (real processes) is logged, not fatal."""

    def setUp(self) -> None:
        from tests import test_processes as tp

        reason = tp._plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.tp = tp
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-review-processes-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def test_sighup_without_clients_file_or_config_file(self) -> None:
        tp = self.tp
        state = self.workdir / "state"
        control = tp._free_port()
        server = tp.Process(
            self, "server",
            [*tp.TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(control),
             "--interface", "127.0.0.1", "--state-dir", str(state)],
            self.workdir,
        )
        server.wait_for(r"Run on the client machine")
        target = tp._TargetServer()
        tp.serve_in_thread(self, target)
        client = tp.Process(
            self, "client",
            [*tp.TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{control}",
             "-f", "0", "-t", f"127.0.0.1:{target.server_address[1]}",
             "--token", (state / "token").read_text().strip(),
             "--fingerprint", tp._fingerprint(state / "server.crt")],
            self.workdir,
        )
        public = int(client.wait_for(r"tunnel ready: \S+:(\d+) -> ").group(1))

        for process, option in ((server, "--clients"), (client, "--config")):
            os.kill(process.popen.pid, signal.SIGHUP)
            process.wait_for(rf"SIGHUP: nothing to reload \(no {option}\)")
        time.sleep(0.5)  # a process the signal killed would be gone by now
        self.assertIsNone(server.popen.poll(), server.describe())
        self.assertIsNone(client.popen.poll(), client.describe())

        with socket.create_connection(("127.0.0.1", public), timeout=20) as visitor:
            visitor.sendall(b"still up")
            visitor.shutdown(socket.SHUT_WR)
            reply = bytearray()
            while part := visitor.recv(65536):
                reply.extend(part)
        self.assertEqual(bytes(reply), tp.BANNER + b"still up")
        for process in (server, client):
            self.assertNotIn("Traceback", process.output)
