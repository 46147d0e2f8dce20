"""Public ports bound for clients: a port closed and opened again on
another address in one reload, and a tunnel removed while its bind waits.

Real servers and clients in this process on loopback; the IPv6 case binds
`::` and skips without dual stack.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase

from rtunnel.tap import client as tap_client
from tests.harness import (
    NO_DUAL_STACK,
    TOKEN,
    Echo,
    LogCapture,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    visit_at,
    wait_until,
    with_timeout,
)


class SamePortRebindTests(TestCase):
    """A client reload that closes a public port and opens the same port on
    another address gets it bound at once, not after the 5 s bind retry."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-ports-"))
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

    def test_the_same_port_moves_to_another_ipv4_address_at_once(self) -> Any:
        return self.rebind(f"0.0.0.0:{self.port}", f"127.0.0.1:{self.port}", "127.0.0.1")

    def test_the_same_port_moves_from_the_default_address_to_ipv6_any_at_once(self) -> Any:
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
