"""IPv6: control link, public ports and targets on ::1; the default
dual-stack listeners and the clients file's bind policy over them (also
across a reload); IPv4-mapped peers counted and shown as IPv4.

Everything runs on loopback (::1, 127.0.0.1) with real sockets and TLS,
except the default binds, which are `::` (every address of the host) because
that is the behaviour under test. Skipped when this host cannot bind ::1.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import socket
import socketserver
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.logger import formatEvent
from twisted.python.usage import UsageError
from twisted.trial import unittest

from rtunnel.config import TunnelSpec
from tests.harness import (
    NO_DUAL_STACK,
    NO_IPV6,
    TOKEN,
    Echo,
    LogCapture,
    Process,
    Tunnel,
    Visitor,
    free_port,
    listen_target,
    pattern,
    reaches,
    serve_in_thread,
    visit_at,
    wait_until,
    with_timeout,
)
from tests.harness import TargetFactory as _TargetFactory


def listen_target6(test: Any, **attrs: Any) -> tuple[_TargetFactory, int]:
    """An echoing target on [::1]."""
    factory = _TargetFactory(Echo, **attrs)
    port = reactor.listenTCP(0, factory, interface="::1")
    test.addCleanup(port.stopListening)
    return factory, port.getHost().port


def spy_on_opens(service: Any) -> list[dict[str, Any]]:
    """The info (src, dst) of every OPEN the client receives; the client
    goes on handling each as before."""
    client = service.client
    seen: list[dict[str, Any]] = []
    original = client.stream_opened

    def stream_opened(session: Any, stream: Any, tunnel_id: int, info: dict[str, Any]) -> None:
        seen.append(info)
        original(session, stream, tunnel_id, info)

    client.stream_opened = stream_opened
    return seen


class _NoIPv6Reactor:
    """The real reactor, except that listening on an IPv6 address fails as it
    does on a kernel booted with ipv6.disable=1 (EAFNOSUPPORT). Such a host
    cannot be made here: a network namespace with disable_ipv6=1 still binds
    `::`. Everything else goes to the real reactor."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if ":" in interface:
            self.refused.append(interface)
            raise CannotListenError(interface, port, OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol"))
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


# ---------------------------------------------------------------- pure parts


class OptionTests(unittest.SynchronousTestCase):
    def client(self, *argv: str) -> Any:
        from rtunnel.tap.client import Options

        options = Options()
        options.parseOptions(["--token", "t", "--fingerprint", "ab" * 32, *argv])
        return options.config

    def server(self, *argv: str) -> Any:
        from rtunnel.tap.server import Options

        options = Options()
        options.parseOptions(list(argv))
        return options.config

    def test_connect_takes_bracketed_ipv6_with_or_without_port(self) -> None:
        config = self.client("-c", "[::1]:19051", "-f", "4000", "-t", "3000")
        self.assertEqual((config.server_host, config.server_port), ("::1", 19051))
        config = self.client("-c", "[2001:db8::1]", "-f", "4000", "-t", "3000")
        self.assertEqual((config.server_host, config.server_port), ("2001:db8::1", 19050))

    def test_connect_refuses_a_bare_ipv6_address(self) -> None:
        # "::1:4000" is itself an IPv6 address: a bare one is ambiguous
        error = self.assertRaises(UsageError, self.client, "-c", "::1", "-f", "4000", "-t", "3000")
        self.assertIn("-c/--connect: write IPv6 addresses in brackets, e.g. [::1]:3000 (not '::1')", str(error))

    def test_forward_and_target_take_ipv6(self) -> None:
        config = self.client("-c", "srv", "-f", "[::1]:4000", "-t", "[::1]:3000", "-f", "[::]:0", "-t", "3001", "-f", "4002", "-t", "3002")
        self.assertEqual(
            [(t.bind_host, t.bind_port, t.target_host, t.target_port) for t in config.tunnels],
            [("::1", 4000, "::1", 3000), ("::", 0, "localhost", 3001), ("", 4002, "localhost", 3002)],
        )

    def test_server_listens_on_dual_stack_by_default_with_an_ipv4_fallback(self) -> None:
        config = self.server("--port", "19052")
        self.assertEqual(config.listen, r"tcp:19052:backlog=1024:interface=\:\:")
        self.assertEqual(config.listen_fallback, "tcp:19052:backlog=1024:interface=0.0.0.0")
        config = self.server("--port", "19052", "--interface", "::1")
        self.assertEqual(config.listen, r"tcp:19052:backlog=1024:interface=\:\:1")
        self.assertIsNone(config.listen_fallback)  # an address given is that address, or an error
        config = self.server("--listen", r"tcp6:19052:interface=\:\:1")
        self.assertIsNone(config.listen_fallback)


# ---------------------------------------------------------------- real tunnels


class IPv6TunnelTests(unittest.TestCase):
    """A real server and client in this process."""

    def setUp(self) -> None:
        if NO_IPV6:
            raise unittest.SkipTest(NO_IPV6)
        self.tunnel = Tunnel(self)

    def client_config(self, tunnels: list[TunnelSpec], server_host: str = "::1", **overrides: Any) -> Any:
        config = self.tunnel.client_config([], **overrides)
        return replace(config, server_host=server_host, tunnels=tuple(tunnels))

    @defer.inlineCallbacks
    def start(self, tunnels: list[TunnelSpec], server_host: str = "::1", **overrides: Any) -> Any:
        service = self.tunnel.start_client(self.client_config(tunnels, server_host, **overrides))
        bound = yield with_timeout(service.client.when_bound(), 10)
        return service, bound

    @defer.inlineCallbacks
    def test_everything_on_ipv6_loopback(self) -> None:
        """Control link to [::1], public port on [::1], target on [::1]."""
        yield self.tunnel.start_server(listen=r"tcp6:0:interface=\:\:1")
        self.assertEqual(self.tunnel.server_service.port.getHost().host, "::1")
        target, target_port = listen_target6(self)
        service, bound = yield self.start([TunnelSpec(1, "::1", 0, "::1", target_port)])
        host, public = bound[1]
        self.assertEqual(host, "::1")
        opens = spy_on_opens(service)
        [session] = self.tunnel.server.sessions.values()
        self.assertEqual(session.peer[0], "::1")  # the control link came over IPv6

        payload = pattern(6, 300_000)
        reply, _ = yield with_timeout(visit_at("::1", public, Visitor(payload)), 20)
        self.assertEqual(len(reply), len(payload))
        self.assertEqual(hashlib.sha256(reply).digest(), hashlib.sha256(payload).digest())
        self.assertEqual(opens[0]["src"][0], "::1")
        self.assertEqual(opens[0]["dst"][0], "::1")
        # the public port is IPv6 alone: IPv4 visitors do not reach it
        failed = visit_at("127.0.0.1", public, Visitor(b"x"))
        yield self.assertFailure(with_timeout(failed, 10), Exception)

    @defer.inlineCallbacks
    def test_default_public_port_is_dual_stack(self) -> None:
        """`-f 0` binds ::; an IPv4 visitor gets through and the client sees
        it as 127.0.0.1, not ::ffff:127.0.0.1; an IPv6 visitor too."""
        if NO_DUAL_STACK:
            raise unittest.SkipTest(NO_DUAL_STACK)
        yield self.tunnel.start_server()  # control on 127.0.0.1
        target, target_port = listen_target6(self)
        service, bound = yield self.start(
            [TunnelSpec(1, "", 0, "::1", target_port)], server_host="127.0.0.1"
        )
        host, public = bound[1]
        self.assertEqual(host, "::")
        opens = spy_on_opens(service)
        for seed, (visitor_host, seen_as) in enumerate((("127.0.0.1", "127.0.0.1"), ("::1", "::1"))):
            payload = pattern(seed, 100_000)
            reply, _ = yield with_timeout(visit_at(visitor_host, public, Visitor(payload)), 20)
            self.assertEqual(reply, payload)
            self.assertEqual(opens[-1]["src"][0], seen_as)

    @defer.inlineCallbacks
    def test_default_address_takes_back_the_credentials_ipv4_port(self) -> None:
        """A client that bound 0.0.0.0:PORT (an older client, whose default
        that was) vanishes; its successor asks for PORT at the default
        address and gets the held 0.0.0.0 socket back at once, not
        "in use" until the old session's grace runs out."""
        yield self.tunnel.start_server()
        target, target_port = listen_target6(self)
        fixed = free_port()
        old, _ = yield self.start([TunnelSpec(1, "0.0.0.0", fixed, "::1", target_port)], server_host="127.0.0.1")
        old.client.link.transport.abortConnection()  # "kill -9": no goodbye
        yield old.stopService()
        new, bound = yield self.start([TunnelSpec(1, "", fixed, "::1", target_port)], server_host="127.0.0.1")
        self.assertEqual(bound[1], ("0.0.0.0", fixed))
        reply, _ = yield with_timeout(visit_at("127.0.0.1", fixed, Visitor(b"same port")), 20)
        self.assertEqual(reply, b"same port")

    @defer.inlineCallbacks
    def test_default_control_listener_is_dual_stack_and_unmaps_peers(self) -> None:
        """The server's default listen (::) takes IPv4 clients; a wrong token
        from one counts against 127.0.0.1 and is logged as 127.0.0.1."""
        if NO_DUAL_STACK:
            raise unittest.SkipTest(NO_DUAL_STACK)
        from rtunnel.tap.server import Options

        options = Options()
        options.parseOptions(["--port", str(free_port())])
        log = LogCapture(self)
        yield self.tunnel.start_server(listen=options.config.listen, auth_failure_burst=1)
        self.assertEqual(self.tunnel.server_service.port.getHost().host, "::")
        target, target_port = listen_target6(self)
        service, bound = yield self.start([TunnelSpec(1, "::1", 0, "::1", target_port)], server_host="127.0.0.1")
        [session] = self.tunnel.server.sessions.values()
        self.assertEqual(session.peer[0], "127.0.0.1")

        wrong = self.tunnel.start_client(self.client_config([TunnelSpec(1, "::1", 0, "::1", target_port)], "127.0.0.1", token="wrong-token"))
        yield with_timeout(wrong.when_fatal(), 10)
        guard = self.tunnel.server.guard
        self.assertEqual(guard.failures, 1)
        self.assertIsNotNone(guard.retry_after("127.0.0.1"))
        self.assertIsNone(guard.retry_after("::1"))
        refusal = log.named("auth_failed")[0]
        self.assertEqual(refusal["host"], "127.0.0.1")
        self.assertTrue(refusal["peer"].startswith("127.0.0.1:"), refusal["peer"])

    @defer.inlineCallbacks
    def test_host_names_resolving_to_ipv6(self) -> None:
        """A server (-c) and a target (-t) named by a host name whose only
        address is ::1. This
        host's /etc/hosts may have no such name, so the reactor's own
        resolver (GAIResolver, in its thread pool) gets a getaddrinfo that
        knows one more name, as an /etc/hosts line would."""
        from twisted.internet._resolver import GAIResolver

        name = "ipv6-only-target.rtunnel.test"

        def getaddrinfo(host: str, port: int, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
            if host == name:
                return socket.getaddrinfo("::1", port, socket.AF_INET6, type, proto, flags)
            return socket.getaddrinfo(host, port, family, type, proto, flags)

        previous = reactor.installNameResolver(GAIResolver(reactor, getaddrinfo=getaddrinfo))
        self.addCleanup(reactor.installNameResolver, previous)
        yield self.tunnel.start_server(listen=r"tcp6:0:interface=\:\:1")
        target, target_port = listen_target6(self)
        service, bound = yield self.start([TunnelSpec(1, "::1", 0, name, target_port)], server_host=name)
        [session] = self.tunnel.server.sessions.values()
        self.assertEqual(session.peer[0], "::1")
        reply, _ = yield with_timeout(visit_at("::1", bound[1][1], Visitor(b"by name")), 20)
        self.assertEqual(reply, b"by name")


class FallbackTests(unittest.TestCase):
    """Hosts without IPv6: the defaults fall back to 0.0.0.0, with a log line."""

    def setUp(self) -> None:
        self.tunnel = Tunnel(self)

    @defer.inlineCallbacks
    def start_server(self, **config: Any) -> Any:
        from rtunnel.config import ServerConfig
        from rtunnel.tap.server import ServerService

        fake = _NoIPv6Reactor()
        port = free_port()
        service = ServerService(
            ServerConfig(
                listen=rf"tcp:{port}:interface=\:\:", listen_fallback=f"tcp:{port}:interface=127.0.0.1",
                state_dir=self.tunnel.state_dir, token=TOKEN, **config,
            ),
            fake,
        )
        service.startService()
        self.tunnel.server_service = service
        self.addCleanup(self.tunnel.stop_server)
        listening = yield with_timeout(service.ready, 10)
        self.tunnel.control_port = listening.getHost().port
        return fake

    @defer.inlineCallbacks
    def test_control_port_and_default_public_port_fall_back_to_ipv4(self) -> None:
        log = LogCapture(self)
        fake = yield self.start_server()
        self.assertEqual(self.tunnel.server_service.port.getHost().host, "127.0.0.1")
        _, target = listen_target_any(self)
        config = replace(
            self.tunnel.client_config([]), tunnels=(TunnelSpec(1, "", 0, "127.0.0.1", target),)
        )
        service = self.tunnel.start_client(config)
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1][0], "0.0.0.0")
        reply, _ = yield with_timeout(visit_at("127.0.0.1", bound[1][1], Visitor(b"over IPv4")), 20)
        self.assertEqual(reply, b"over IPv4")
        self.assertEqual(fake.refused, ["::", "::"])
        self.assertEqual([e["listener"] for e in log.named("ipv6_unavailable")], ["control", "public"])
        self.assertIn("this host has no IPv6", log.named("ipv6_unavailable")[0]["log_format"])

    @defer.inlineCallbacks
    def test_an_explicit_ipv6_bind_is_refused_with_a_reason(self) -> None:
        yield self.start_server()
        config = replace(self.tunnel.client_config([]), tunnels=(TunnelSpec(1, "::", 0, "127.0.0.1", 1),))
        service = self.tunnel.start_client(config)
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("this server has no IPv6, so it cannot bind ::", message)


def listen_target_any(test: Any) -> tuple[_TargetFactory, int]:
    return listen_target(test, Echo)


class PolicyTests(unittest.TestCase):
    """The default bind under a clients file's `bind` lists."""

    def setUp(self) -> None:
        if NO_DUAL_STACK:
            raise unittest.SkipTest(NO_DUAL_STACK)
        self.tunnel = Tunnel(self)
        self.clients_file = self.tunnel.state_dir / "clients.toml"
        self.port = free_port()

    @defer.inlineCallbacks
    def start(self, bind: str) -> Any:
        sha = hashlib.sha256(b"carol-token-0123456789").hexdigest()
        self.clients_file.write_text(
            f'[clients.carol]\ntoken_sha256 = "{sha}"\nports = [{self.port}]\nbind = [{bind}]\n'
        )
        yield self.tunnel.start_server(clients_file=self.clients_file)
        _, target = listen_target_any(self)
        config = replace(
            self.tunnel.client_config([]), token="carol-token-0123456789",
            tunnels=(TunnelSpec(1, "", self.port, "127.0.0.1", target),),
        )
        return self.tunnel.start_client(config)

    def reaches(self, host: str) -> defer.Deferred[bool]:
        return reaches(host, self.port)

    @defer.inlineCallbacks
    def test_ipv4_only_policy_gets_0_0_0_0(self) -> None:
        service = yield self.start('"0.0.0.0"')
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1], ("0.0.0.0", self.port))
        self.assertTrue((yield self.reaches("127.0.0.1")))
        self.assertFalse((yield self.reaches("::1")))

    @defer.inlineCallbacks
    def test_ipv6_only_policy_gets_an_ipv6_only_socket(self) -> None:
        service = yield self.start('"::"')
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1], ("::", self.port))
        self.assertTrue((yield self.reaches("::1")))
        self.assertFalse((yield self.reaches("127.0.0.1")))  # 0.0.0.0 is not the client's to bind

    @defer.inlineCallbacks
    def test_both_get_dual_stack(self) -> None:
        service = yield self.start('"0.0.0.0", "::"')
        bound = yield with_timeout(service.client.when_bound(), 10)
        self.assertEqual(bound[1], ("::", self.port))
        self.assertTrue((yield self.reaches("::1")))
        self.assertTrue((yield self.reaches("127.0.0.1")))

    @defer.inlineCallbacks
    def test_neither_is_refused_with_the_addresses_it_may_bind(self) -> None:
        service = yield self.start('"127.0.0.1"')
        message = yield with_timeout(service.when_fatal(), 10)
        self.assertIn("client carol may not bind the default address (:: or 0.0.0.0); it may bind 127.0.0.1", message)
        self.assertIn(f"-f 127.0.0.1:{self.port}", message)


class DualStackPolicyReloadTests(unittest.TestCase):
    """A clients-file reload that takes 0.0.0.0 from a client's bind list:
    the dual-stack `::` port it already has (which still takes IPv4) is
    reported, and its next session gets an IPv6-only port."""

    timeout = 60
    TOKEN = "carol-token-0123456789"

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        if NO_DUAL_STACK:
            raise unittest.SkipTest(NO_DUAL_STACK)
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


# ---------------------------------------------------------------- processes


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _EchoServer6(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True


class ProcessTests(unittest.SynchronousTestCase):
    """rtunnel_server and rtunnel_client, the installed scripts, on ::1."""

    def setUp(self) -> None:
        if NO_IPV6:
            raise unittest.SkipTest(NO_IPV6)
        bin_dir = Path(sys.executable).parent
        self.scripts = {name: bin_dir / name for name in ("rtunnel_server", "rtunnel_client")}
        missing = [str(p) for p in self.scripts.values() if not p.exists()]
        if missing:
            raise unittest.SkipTest(f"{', '.join(missing)} not installed for {sys.executable}; run 'pip install .' first")
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-ipv6-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)

    def free_port6(self) -> int:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]

    def test_scripts_on_ipv6_loopback(self) -> None:
        target = _EchoServer6(("::1", 0), _EchoHandler)
        serve_in_thread(self, target)
        state = self.workdir / "state"
        port = self.free_port6()
        server = Process(
            self, "server",
            [str(self.scripts["rtunnel_server"]), "--interface", "::1", "--port", str(port), "--state-dir", str(state)],
            self.workdir,
        )
        server.wait_for(r"Run on the client machine:\s+rtunnel_client .*--fingerprint sha256:[0-9a-f]{64}")
        self.assertIn(r"interface=\:\:1", server.output)
        token = (state / "token").read_text().strip()
        fingerprint = server.wait_for(r"fingerprint (sha256:[0-9a-f]{64})").group(1)
        client = Process(
            self, "client",
            [str(self.scripts["rtunnel_client"]), "-c", f"[::1]:{port}", "-f", "[::1]:0",
             "-t", f"[::1]:{target.server_address[1]}", "--token", token, "--fingerprint", fingerprint],
            self.workdir,
        )
        match = client.wait_for(r"tunnel ready: (\S+):(\d+) -> (\S+)")
        self.assertEqual(match.group(1), "[::1]")
        public = int(match.group(2))
        self.assertIn(f"connected to [::1]:{port}", client.output)

        payload = pattern(7, 1_000_000)
        with socket.create_connection(("::1", public), timeout=20) as visitor:
            chunks: list[bytes] = []
            reader = threading.Thread(target=lambda: _read_all(visitor, chunks), daemon=True)
            reader.start()
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)
            reader.join(30)
        self.assertFalse(reader.is_alive(), "no EOF from the tunnel within 30 s")
        reply = b"".join(chunks)
        self.assertEqual(len(reply), len(payload))
        self.assertEqual(reply, payload)
        self.assertRegex(server.output, r"new session \w+ for default from \[::1\]:\d+")
        for process in (client, server):
            process.popen.terminate()
            process.wait_exit()
            self.assertNotIn("Traceback", process.output, process.describe())


def _read_all(sock: socket.socket, chunks: list[bytes]) -> None:
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        pass

