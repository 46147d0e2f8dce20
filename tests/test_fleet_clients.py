"""Clients of a fleet, with real processes: two members (twistd
rtunnel-server --fleet-etcd) on one real etcd, a real client process with
several servers, fault proxies in front of the members' control ports, and
visitors pushing bytes checked by hash (docs/fleet.md "Clients and resume",
"Draining a member")."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import SkipTest, TestCase

from rtunnel.client import TunnelClient
from rtunnel.config import ClientConfig, Keepalive, TunnelSpec
from rtunnel.fleet import ca
from rtunnel.tap.client import ClientMainService
from rtunnel.tls import fingerprint_of_pem
from tests.etcd import SKIP_NO_ETCD, TOKENS, start_etcd
from tests.faultproxy import FaultProxy
from tests.harness import (
    TWISTD,
    Echo,
    LogCapture,
    Process,
    Visitor,
    cert_fingerprint,
    converse,
    free_port,
    listen_target,
    pattern,
    plugins_installed,
    visit_at,
    wait_until,
    with_timeout,
)

PAYLOAD = 24 * 1024 * 1024  # bytes each way through a link that is cut mid-transfer


@defer.inlineCallbacks
def output_shows(process: Process, regex: str, timeout: float = 20.0) -> Any:
    """Wait (without blocking the reactor) until `regex` is in the output."""
    compiled = re.compile(regex)
    deadline = time.monotonic() + timeout
    while not compiled.search(process.output):
        if process.popen.poll() is not None and not compiled.search(process.output):
            raise AssertionError(f"{regex!r} never appeared: {process.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{regex!r} did not appear within {timeout:.0f} s: {process.describe()}")
        yield task.deferLater(reactor, 0.05, lambda: None)
    return compiled.search(process.output)


class FleetClientTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        if SKIP_NO_ETCD:
            raise SkipTest(SKIP_NO_ETCD)
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)
        self.node = start_etcd(self, self.workdir / "etcd")

    def start_member(self, index: int, *more: str) -> tuple[Process, int]:
        """Member m<index> on 127.0.0.<index>; every member after the first
        presents the first one's certificate (one fleet-wide server identity)."""
        host, port = f"127.0.0.{index}", free_port()
        ca_dir, state = self.workdir / "fleet-ca", self.workdir / f"state{index}"
        if not (ca_dir / ca.CA_CERT).exists():
            ca.init_ca(ca_dir, "test")
        ca.issue_member(ca_dir, f"m{index}", state)  # member links (wired in the server process or not)
        shared = [] if index == 1 else [
            "--cert", str(self.workdir / "state1" / "server.crt"), "--key", str(self.workdir / "state1" / "server.key"),
        ]
        clients = [arg for name, token in TOKENS.items() for arg in ("--client", f"{name}={token}")]
        member = Process(
            self, f"member{index}",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(port), "--interface", host,
             "--public-host", host, "--state-dir", str(self.workdir / f"state{index}"), "--token", "unused-0123456789",
             *clients, *shared, "--fleet-etcd", self.node.url, "--fleet-member", f"m{index}",
             "--fleet-listen", f"tcp:{free_port()}:interface={host}", *more],
            self.workdir,
        )
        member.wait_for(r"Run on the client machine:")
        return member, port

    def start_client(self, servers: list[str], public: int, target: int, name: str = "client") -> Process:
        return Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", ",".join(servers),
             "-f", str(public), "-t", str(target), "--token", TOKENS["alice"],
             "--fingerprint", cert_fingerprint(self.workdir / "state1" / "server.crt")],
            self.workdir,
        )

    @defer.inlineCallbacks
    def test_a_resume_landing_on_a_non_home_member_is_sent_home_and_loses_no_byte(self) -> None:
        """The client's link to its home (m1) is cut mid-transfer; its next
        attempt reaches m2 first (-c m2,m1), which answers MOVED with m1's
        address; the client resumes there: 24 MiB each way arrive whole."""
        m1, p1 = self.start_member(1)
        m2, p2 = self.start_member(2)
        to_m2, to_m1 = FaultProxy(reactor, "127.0.0.2", p2), FaultProxy(reactor, "127.0.0.1", p1)
        self.addCleanup(to_m2.stop)
        self.addCleanup(to_m1.stop)
        first = free_port()  # m2's proxy is not listening yet: the first round goes on to m1
        to_m1.listen()
        _, target = listen_target(self, Echo)
        public = free_port()
        client = self.start_client([f"127.0.0.1:{first}", f"127.0.0.1:{to_m1.port}"], public, target)
        yield output_shows(client, rf"tunnel ready: \S+:{public} ")
        self.assertRegex(m1.output, r"new session \w+ for alice")  # its home: m1
        to_m2.listen(port=first)
        data = pattern(7, PAYLOAD)
        visitor = Visitor(data)
        done = visit_at("127.0.0.1", public, visitor)
        started = time.monotonic()
        while visitor.received < PAYLOAD // 4:
            self.assertLess(time.monotonic() - started, 30, "the transfer did not start")
            yield task.deferLater(reactor, 0.01, lambda: None)
        to_m1.sever_rst()  # mid-transfer: the next attempt goes to m2 first
        cut = time.monotonic()
        yield output_shows(client, r"session resumed with \d+ open streams")
        resumed = time.monotonic() - cut
        reply, _ = yield with_timeout(done, 60)
        print(f"\nlink cut mid-transfer: resumed at the home through a MOVED from the other member after "
              f"{resumed:.2f} s (the client's first retry waits 0.4-0.6 s)")
        self.assertEqual(len(reply), PAYLOAD)
        self.assertEqual(hashlib.sha256(reply).hexdigest(), hashlib.sha256(data).hexdigest())
        yield output_shows(client, r"the server sends us to another fleet member, 127\.0\.0\.1:\d+: connecting there")
        yield output_shows(client, r"session resumed with \d+ open streams")
        self.assertRegex(m2.output, r"session \w+ of alice goes to fleet member m1: sending")
        self.assertEqual(client.output.count("tunnel ready"), 1)  # resumed, never bound again
        self.assertNotIn("did not resume the session", client.output)
        self.assertGreaterEqual(to_m2.connections_accepted, 1)
        for process in (m1, m2, client):
            self.assertNotIn("Traceback", process.output)
        client.popen.send_signal(signal.SIGTERM)

    @defer.inlineCallbacks
    def test_a_drained_member_s_client_moves_its_ports_and_its_open_connection_finishes_on_the_old_link(
        self,
    ) -> None:
        """SIGUSR2 drains m1: its client gets GOAWAY MOVED to m2, makes a new
        session there that takes the port over (a visitor at m2 is served by
        it), while a connection opened before finishes through m1 (bytes by
        hash); once it is done the client closes the old link and m1 exits."""
        m1, p1 = self.start_member(1)
        m2, p2 = self.start_member(2)
        _, target = listen_target(self, Echo)
        public = free_port()
        client = self.start_client([f"127.0.0.1:{p1}", f"127.0.0.2:{p2}"], public, target)
        yield output_shows(client, rf"tunnel ready: \S+:{public} ")
        self.assertRegex(m1.output, r"new session \w+ for alice")
        yield output_shows(m2, r"fleet member m2 joined")
        old = yield converse(public)  # 127.0.0.1: m1's public address
        data = pattern(3, 4 * 1024 * 1024)
        old.transport.write(data[: len(data) // 2])
        started = time.monotonic()
        while len(old.received) < len(data) // 2:
            self.assertLess(time.monotonic() - started, 20, "the first half did not come back")
            yield task.deferLater(reactor, 0.01, lambda: None)
        m1.popen.send_signal(signal.SIGUSR2)
        yield output_shows(m1, r"draining: asking 1 client\(s\) to move to member m2")
        yield output_shows(client, rf"the server is being drained: moving to 127\.0\.0\.2:{p2}; 1 open connections")
        yield output_shows(client, rf"tunnel ready: \S+:{public} (.|\n)*tunnel ready: \S+:{public} ")
        reply, _ = yield visit_at("127.0.0.2", public, Visitor(b"a new visitor at the new home"))
        self.assertEqual(reply, b"a new visitor at the new home")
        self.assertIsNone(m1.popen.poll(), "m1 must wait for the open connection")
        old.transport.write(data[len(data) // 2 :])
        old.transport.loseWriteConnection()
        received = yield with_timeout(old.closed, 30)
        self.assertEqual(hashlib.sha256(received).hexdigest(), hashlib.sha256(data).hexdigest())
        yield output_shows(m1, r"drained: no session left; stopping")
        deadline = time.monotonic() + 15
        while m1.popen.poll() is None:
            self.assertLess(time.monotonic(), deadline, f"m1 did not exit: {m1.describe()}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(m1.popen.returncode, 0, m1.describe())
        reply, _ = yield visit_at("127.0.0.2", public, Visitor(b"after m1 left"))
        self.assertEqual(reply, b"after m1 left")
        yield output_shows(client, r"the link of the session we moved away from is closed")
        self.assertNotIn("link restored", client.output)  # the old link's end is not taken for the new one's
        for process in (m1, m2, client):
            self.assertNotIn("Traceback", process.output)

    @defer.inlineCallbacks
    def test_the_admin_api_drains_a_member_as_sigusr2_does(self) -> None:
        """POST /api/fleet/drain (with the admin token) starts the drain: 202
        naming the member the clients go to; the client moves its port to m2
        and m1 exits once no session is left. A GET is refused (405)."""
        admin = free_port()
        m1, p1 = self.start_member(1, "--admin", str(admin))
        m2, p2 = self.start_member(2)
        _, target = listen_target(self, Echo)
        public = free_port()
        client = self.start_client([f"127.0.0.1:{p1}", f"127.0.0.2:{p2}"], public, target)
        yield output_shows(client, rf"tunnel ready: \S+:{public} ")
        yield output_shows(m2, r"fleet member m2 joined")
        token = (self.workdir / "state1" / "admin-token").read_text().strip()
        url = f"http://127.0.0.1:{admin}/api/fleet/drain"
        code, body = yield threads.deferToThread(_http, url, token, "GET")
        self.assertEqual(code, 405, body)
        code, body = yield threads.deferToThread(_http, url, token, "POST")
        self.assertEqual(code, 202, body)
        self.assertEqual((body["draining"], body["target"]), (True, "m2"))
        yield output_shows(m1, r"draining: asking 1 client\(s\) to move to member m2")
        yield output_shows(client, rf"tunnel ready: \S+:{public} (.|\n)*tunnel ready: \S+:{public} ")
        reply, _ = yield visit_at("127.0.0.2", public, Visitor(b"at the new home"))
        self.assertEqual(reply, b"at the new home")
        yield output_shows(m1, r"drained: no session left; stopping")
        deadline = time.monotonic() + 15
        while m1.popen.poll() is None:
            self.assertLess(time.monotonic(), deadline, f"m1 did not exit: {m1.describe()}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(m1.popen.returncode, 0, m1.describe())

    @defer.inlineCallbacks
    def test_a_drain_stops_the_member_after_its_timeout_even_with_a_connection_left(self) -> None:
        """--fleet-drain-timeout bounds the drain: a connection still open on
        the old link after it does not keep the member running."""
        m1, p1 = self.start_member(1, "--fleet-drain-timeout", "2")
        m2, p2 = self.start_member(2)
        _, target = listen_target(self, Echo)
        public = free_port()
        client = self.start_client([f"127.0.0.1:{p1}", f"127.0.0.2:{p2}"], public, target)
        yield output_shows(client, rf"tunnel ready: \S+:{public} ")
        yield output_shows(m2, r"fleet member m2 joined")
        held = yield converse(public)  # open through m1, never closed by the visitor
        held.transport.write(b"x")
        yield wait_until(lambda: held.received == b"x")
        started = time.monotonic()
        m1.popen.send_signal(signal.SIGUSR2)
        yield output_shows(m1, r"drained: 1 session\(s\) left after 2 s; stopping")
        while m1.popen.poll() is None:
            self.assertLess(time.monotonic() - started, 20, f"m1 did not exit: {m1.describe()}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(time.monotonic() - started, 2.0)

    @defer.inlineCallbacks
    def test_an_old_client_s_resume_at_another_member_gets_a_new_session_and_its_port_back(self) -> None:
        """A client that does not follow MOVED (its HELLO has no "accepts"):
        its resume at m2 gets a new session, whose BIND takes the port over
        from the old session at m1 (same credential, the newest holds)."""
        m1, p1 = self.start_member(1)
        m2, p2 = self.start_member(2)
        to_m2, to_m1 = FaultProxy(reactor, "127.0.0.2", p2), FaultProxy(reactor, "127.0.0.1", p1)
        self.addCleanup(to_m2.stop)
        self.addCleanup(to_m1.stop)
        first = free_port()
        to_m1.listen()
        _, target = listen_target(self, Echo)
        public = free_port()
        plain_hello = TunnelClient.hello

        def old_hello(client: TunnelClient) -> dict[str, Any]:
            body = plain_hello(client)
            body.pop("accepts")
            return body

        self.patch(TunnelClient, "hello", old_hello)
        logs = LogCapture(self)
        config = ClientConfig(
            server_host="127.0.0.1", server_port=first,
            servers=(("127.0.0.1", first), ("127.0.0.1", to_m1.port)),
            tunnels=(TunnelSpec(1, "", public, "127.0.0.1", target),), token=TOKENS["alice"],
            fingerprint=fingerprint_of_pem((self.workdir / "state1" / "server.crt").read_bytes()),
            initial_retry_delay=0.1, max_retry_delay=0.5, keepalive=Keepalive(interval=10, dead_after=30),
        )
        service = ClientMainService(config, reactor, exit_on_fatal=False)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        yield with_timeout(service.client.when_bound(), 20)
        first_session = service.client.session_id
        to_m2.listen(port=first)
        to_m1.sever_rst()
        yield output_shows(m2, r"new session \w+ for alice")
        yield output_shows(m1, rf"port {public} on \S+ is held at another member now \(taken_over\)")
        reply, _ = yield visit_at("127.0.0.2", public, Visitor(b"new session at m2"))
        self.assertEqual(reply, b"new session at m2")
        self.assertNotEqual(service.client.session_id, first_session)
        self.assertEqual(len(logs.named("session_lost")), 1)
        self.assertNotIn("goes to fleet member", m2.output)


def _http(url: str, token: str, method: str) -> tuple[int, Any]:
    """One admin API request (blocking: run in a thread): (status, JSON body)."""
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
