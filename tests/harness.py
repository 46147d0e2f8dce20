"""Shared helpers of the tests: real servers, clients, targets, visitors and
child processes on loopback; no test module imports another's helpers.

Sections: targets, visitors, an in-process tunnel (server + client), waiting,
log events, IPv6 (why a host cannot run the IPv6 tests), Prometheus samples,
certificates (a CA and a server certificate), and twistd / installed scripts
as child processes. Everything runs with real sockets and real TLS; every
helper cleans up after itself so trial's dirty-reactor check passes.

Other helper modules, each one thing: tests/memory.py (a session pair in
memory on a fake clock), tests/faultproxy.py (a TCP proxy that injects link
faults), tests/chromium.py (a headless browser), tests/spec_peer.py (a peer
written from docs/protocol.md alone), tests/etcd.py (real etcd nodes and a
3-node cluster on loopback).
"""

from __future__ import annotations

import datetime
import hashlib
import html.parser
import http.client
import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

import rtunnel.tap.server
from rtunnel.config import ClientConfig, ServerConfig, TunnelSpec
from rtunnel.link import Keepalive
from rtunnel.tap.client import ClientMainService
from rtunnel.tap.server import ServerService
from rtunnel.tls import fingerprint_of_pem

TOKEN = "test-token-0123456789"


def pattern(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (cheap to make, hard to misorder)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps = size // len(block) + 1
    return (block * reps)[:size]


# ---------------------------------------------------------------- targets


class Target(Protocol):
    """A local service: its factory tracks open connections and close reasons."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.factory.connections.remove(self)
        self.factory.lost.append(reason)


@implementer(IHalfCloseableProtocol)
class Echo(Target):
    """Echoes everything; half-closes after the peer half-closes."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseWriteConnection()


@implementer(IHalfCloseableProtocol)
class HashReply(Target):
    """Reads until EOF, then answers with the SHA-256 of what it read."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.hash = hashlib.sha256()
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(f"{self.count} {self.hash.hexdigest()}".encode())
        self.transport.loseWriteConnection()


class Source(Target):
    """Sends `factory.size` bytes of pattern(seed) at once, then closes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(pattern(self.factory.seed, self.factory.size))
        self.transport.loseConnection()


class TargetFactory(Factory):
    noisy = False

    def __init__(self, protocol: type[Protocol], **attrs: Any) -> None:
        self.protocol = protocol
        self.connections: list[Protocol] = []
        self.lost: list[Failure] = []
        self.__dict__.update(attrs)


def listen_target(test: Any, protocol: type[Protocol], **attrs: Any) -> tuple[TargetFactory, int]:
    factory = TargetFactory(protocol, **attrs)
    port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return factory, port.getHost().port


# ---------------------------------------------------------------- visitors


@implementer(IHalfCloseableProtocol)
class Visitor(Protocol):
    """Sends `payload`, half-closes, collects the reply until the close.

    `done` fires with (reply bytes, close reason). When `read_slowly` is set
    the visitor pauses reading after each chunk for `read_slowly` seconds.
    """

    def __init__(self, payload: bytes = b"", half_close: bool = True, read_slowly: float = 0.0) -> None:
        self.payload = payload
        self.half_close = half_close
        self.read_slowly = read_slowly
        self.chunks: list[bytes] = []
        self.received = 0
        self.done: defer.Deferred[tuple[bytes, Failure]] = defer.Deferred()
        self.read_closed = False
        self._resume_call: Any = None

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)
        if self.half_close:
            self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.received += len(data)
        if self.read_slowly:
            self.transport.pauseProducing()
            self._resume_call = reactor.callLater(self.read_slowly, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        if self.transport.connected:
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        self.read_closed = True
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self.done.callback((b"".join(self.chunks), reason))


def visit(port: int, visitor: Visitor) -> defer.Deferred[tuple[bytes, Failure]]:
    """Connect `visitor` to 127.0.0.1:port; fires when the connection ends."""
    return visit_at("127.0.0.1", port, visitor)


def visit_at(host: str, port: int, visitor: Visitor) -> defer.Deferred[tuple[bytes, Failure]]:
    """`visit`, to any host (e.g. ::1)."""
    factory = ClientFactory.forProtocol(lambda: visitor)
    factory.noisy = False

    def failed(connector: Any, reason: Failure) -> None:  # an instance attribute: no self
        visitor.done.errback(reason)

    factory.clientConnectionFailed = failed  # type: ignore[method-assign]
    reactor.connectTCP(host, port, factory)
    return visitor.done


# ---------------------------------------------------------------- tunnel


class Tunnel:
    """A real server and client (in this process) on loopback."""

    def __init__(self, test: Any) -> None:
        self.test = test
        self.state_dir = Path(tempfile.mkdtemp(prefix="rtunnel-test-"))
        self.server_service: ServerService | None = None
        self.client_service: ClientMainService | None = None
        self.control_port = 0

    @defer.inlineCallbacks
    def start_server(self, **overrides: Any) -> Any:
        config = ServerConfig(
            listen=overrides.pop("listen", "tcp:0:interface=127.0.0.1"),
            state_dir=self.state_dir,
            token=TOKEN,
            handshake_timeout=overrides.pop("handshake_timeout", 5.0),
            **overrides,
        )
        # A server that cannot start calls exit_process, which would end the
        # whole trial run (os._exit when the reactor shuts down, before the
        # summary): in tests the failed `ready` is the report.
        self.test.patch(rtunnel.tap.server, "exit_process", lambda _reactor, _code: None)
        self.server_service = ServerService(config, reactor)
        self.server_service.startService()
        port = yield self.server_service.ready
        self.control_port = port.getHost().port
        self.test.addCleanup(self.stop_server)
        return self.server_service

    @property
    def server(self) -> Any:
        assert self.server_service is not None and self.server_service.server is not None
        return self.server_service.server

    @property
    def fingerprint(self) -> str:
        return fingerprint_of_pem((self.state_dir / "server.crt").read_bytes())

    def client_config(self, targets: list[tuple[int, int]], **overrides: Any) -> ClientConfig:
        tunnels = tuple(
            TunnelSpec(i, "127.0.0.1", public, "127.0.0.1", target)
            for i, (public, target) in enumerate(targets, start=1)
        )
        config = ClientConfig(
            server_host="127.0.0.1",
            server_port=self.control_port,
            tunnels=tunnels,
            token=TOKEN,
            fingerprint=overrides.pop("fingerprint") if "fingerprint" in overrides else self.fingerprint,
            initial_retry_delay=0.1,
            max_retry_delay=0.5,
            keepalive=Keepalive(interval=10, dead_after=30),
        )
        return replace(config, **overrides)

    def start_client(self, config: ClientConfig) -> ClientMainService:
        service = ClientMainService(config, reactor, exit_on_fatal=False)
        service.startService()
        self.client_service = service
        self.test.addCleanup(lambda: service.running and service.stopService())
        return service

    @defer.inlineCallbacks
    def connect(self, targets: list[tuple[int, int]], **overrides: Any) -> Any:
        """Start a client with tunnels public->target; fire with bound ports."""
        service = self.start_client(self.client_config(targets, **overrides))
        bound = yield with_timeout(service.client.when_bound(), 10)
        return [bound[i][1] for i in sorted(bound)]

    def stop_server(self) -> defer.Deferred[None]:
        if self.server_service is not None and self.server_service.running:
            return self.server_service.stopService()
        return defer.succeed(None)


def with_timeout(d: defer.Deferred[Any], seconds: float) -> defer.Deferred[Any]:
    return d.addTimeout(seconds, reactor)


@defer.inlineCallbacks
def wait_until(predicate: Any, seconds: float = 10.0, step: float = 0.02) -> Any:
    """Poll `predicate` until true; fail the test after `seconds`."""
    deadline = reactor.seconds() + seconds
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        yield sleep(step)


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def free_port() -> int:
    """A TCP port free on every address of both families when IPv6 is there
    (rtunnel binds `::` dual-stack by default), else on 127.0.0.1."""
    return free_ports(1)[0]


_HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """`n` different ports, each as free_port() finds one, none handed out
    before in this process: the kernel gives a released port out again, so
    two free_port() calls in a row could name one port twice (a test's
    control port and its target were once the same one)."""
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for _ in range(n + 200):
            if len(chosen) == n:
                break
            try:
                s = socket.socket(socket.AF_INET6)
                held.append(s)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", 0))
            except OSError:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port and port not in _HANDED_OUT:
                chosen.append(port)
                _HANDED_OUT.add(port)
        if len(chosen) < n:
            raise RuntimeError(f"free_ports: found {len(chosen)} unused ports of the {n} asked for")
        return chosen
    finally:
        for s in held:
            s.close()


def environ_without_token() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RTUNNEL_TOKEN", None)
    return env


@implementer(IHalfCloseableProtocol)
class Conversation(Protocol):
    """A visitor the test drives: it sends when told and keeps what comes back."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.reason: Failure | None = None
        self.closed: defer.Deferred[bytes] = defer.Deferred()  # fires with all it received

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.reason = reason
        self.closed.callback(bytes(self.received))


def converse(port: int) -> defer.Deferred[Conversation]:
    """A Conversation connected to 127.0.0.1:port (fires once connected)."""
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Conversation())


# ---------------------------------------------------------------- log events


class LogCapture:
    """Every twisted.logger event while a test runs; the observer is removed
    in the test's cleanup."""

    def __init__(self, test: Any) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def named(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """The events whose `event` field is `event` and whose other fields
        include `fields`."""
        return [
            e for e in self.events
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def refusals(self, event: str, **fields: Any) -> int:
        """How many refusals the lines of `event` stand for: a line that
        folds repeats (rtunnel.limits.RefusalLog) carries their `count`."""
        return sum(int(e.get("count", 1)) for e in self.named(event, **fields))

    def text(self) -> str:
        """Every event as a log line, for a failing assertion's message."""
        return "\n".join(formatEvent(e) for e in self.events)

    def failures(self) -> list[str]:
        """Tracebacks and critical lines logged (each one a bug)."""
        return [
            f"{e.get('log_format')!r} {e.get('log_failure', '')}"
            for e in self.events
            if "log_failure" in e or e.get("log_level") is LogLevel.critical
        ]


# ---------------------------------------------------------------- IPv6


def _why_no_ipv6() -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"this host cannot bind ::1 ({e}); IPv6 tests need an IPv6 loopback"
    return None


def _why_no_dual_stack() -> str | None:
    why = _why_no_ipv6()
    if why:
        return why
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
            s.listen(1)
            with socket.create_connection(("127.0.0.1", s.getsockname()[1]), timeout=5):
                pass
    except OSError as e:
        return f"a socket on :: does not accept IPv4 here (net.ipv6.bindv6only=1?): {e}"
    return None


NO_IPV6 = _why_no_ipv6()  # None, or why IPv6 tests skip on this host
NO_DUAL_STACK = _why_no_dual_stack()  # None, or why dual-stack (`::` takes IPv4) tests skip


@defer.inlineCallbacks
def reaches(host: str, port: int) -> Any:
    """Whether a visitor to host:port gets its bytes echoed within 10 s."""
    try:
        reply, _ = yield with_timeout(visit_at(host, port, Visitor(b"hi")), 10)
    except Exception:
        return False
    return reply == b"hi"


# ---------------------------------------------------------------- metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus scrape: (name, labels) -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample `name` whose labels include `labels` (fails if not one)."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} samples {name}{labels} in the scrape, expected 1")
    return found[0]


# ---------------------------------------------------------------- certificates


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca_and_server(
    directory: Path, dns_name: str, ip: str | None = None, client: str | None = None,
) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for `dns_name` (and the address `ip`)
    signed by it (PEM files ca.crt, srv.crt, srv.key); with `client`, also a
    client certificate of that common name signed by the CA (client.crt,
    client.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("rtunnel test CA"))
        .issuer_name(_name("rtunnel test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def issue(common: str, names: list[x509.GeneralName], usage: list[x509.ObjectIdentifier], stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path

    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    names: list[x509.GeneralName] = [x509.DNSName(dns_name)]
    if ip is not None:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    usage = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    if client is not None:  # etcd's gateway presents its server certificate to its own gRPC port
        usage.append(x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)
        issue(client, [], [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH], "client")
    cert_path, key_path = issue(dns_name, names, usage, "srv")
    return ca_path, cert_path, key_path


# ---------------------------------------------------------------- a fleet without etcd


class StaticFleet:
    """The fleet's directory for tests of member links, held in this
    process (no etcd): each member's link endpoint and the home of each
    name. `set_home` tells every member's watchers, as etcd's watch would."""

    def __init__(self) -> None:
        self.endpoints: dict[str, str] = {}
        self.homes: dict[Any, str] = {}
        self.fenced: set[str] = set()
        self.watchers: list[Any] = []

    def directory(self, member: str) -> StaticDirectory:
        return StaticDirectory(self, member)

    def set_home(self, name: Any, member: str | None) -> None:
        if member is None:
            self.homes.pop(name, None)
        else:
            self.homes[name] = member
        for watcher in list(self.watchers):
            watcher(name, member)


class StaticDirectory:
    """One member's view of a StaticFleet: the FleetDirectory interface
    (docs/fleet.md) that rtunnel.fleet.links uses."""

    def __init__(self, fleet: StaticFleet, member: str) -> None:
        self.fleet = fleet
        self.member = member

    def link_endpoint(self, member: str) -> str | None:
        return self.fleet.endpoints.get(member)

    def home_of(self, name: Any) -> str | None:
        return self.fleet.homes.get(name)

    def remote_names(self) -> list[tuple[Any, str]]:
        return [(name, home) for name, home in self.fleet.homes.items() if home != self.member]

    def watch_names(self, callback: Any) -> None:
        self.fleet.watchers.append(callback)

    def session_home(self, session_id: str) -> str | None:
        return None

    @property
    def fenced(self) -> bool:
        return self.member in self.fleet.fenced


# ---------------------------------------------------------------- processes
#
# twistd and the installed scripts as real child processes: each in its own
# working directory, its output in a log file, every wait bounded, killed in
# the test's cleanup.

# twistd, run by this interpreter whatever scripts are on PATH (`python -m
# twisted` would be `twist`, not `twistd`)
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
START_TIMEOUT = 30.0  # an interpreter start plus Twisted and cryptography imports
EXIT_TIMEOUT = 20.0
BANNER = b"hello from the target\n"  # what TargetServer says first


def clean_env() -> dict[str, str]:
    """Our environment, minus what would make a child use another rtunnel copy."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "RTUNNEL_TOKEN"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


_plugins_checked: str | None = None  # "" when installed, else the reason to skip


def plugins_installed() -> str:
    """'' when `twistd --help` of this interpreter lists both plugins, else
    why not (the reason a process test skips); asked once per run."""
    global _plugins_checked
    if _plugins_checked is None:
        _plugins_checked = _check_plugins()
    return _plugins_checked


def _check_plugins() -> str:
    argv = [*TWISTD, "--help"]
    cwd = tempfile.mkdtemp(prefix="rtunnel-plugin-check-")
    try:
        out = subprocess.run(
            argv, cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL,
            capture_output=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run twistd with {sys.executable}: {e}"
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    text = out.stdout.decode(errors="replace")
    missing = [name for name in ("rtunnel-server", "rtunnel-client") if name not in text]
    if missing:
        return (
            f"the twistd plugins {', '.join(missing)} are not installed for {sys.executable} "
            "('twistd --help' does not list them); run 'pip install .' first"
        )
    return ""


def cert_fingerprint(cert_path: Path) -> str:
    """Hex SHA-256 of the certificate's DER form, as the server prints it."""
    der = ssl.PEM_cert_to_DER_cert(cert_path.read_text())
    return hashlib.sha256(der).hexdigest()


class Process:
    """One child process whose stdout and stderr go to a log file."""

    def __init__(
        self, test: SynchronousTestCase, name: str, argv: list[str], workdir: Path,
        pass_fds: tuple[int, ...] = (), extra_env: dict[str, str] | None = None,
    ) -> None:
        """Start `argv`; the child inherits the descriptors `pass_fds` and
        our environment (less what would pick another rtunnel) plus `extra_env`."""
        self.name = name
        self.argv = argv
        cwd = workdir / f"{name}-cwd"
        cwd.mkdir(exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env={**clean_env(), **(extra_env or {})}, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds,
        )
        test.addCleanup(self.stop)

    @property
    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def describe(self) -> str:
        state = "running" if self.popen.poll() is None else f"exited with {self.popen.returncode}"
        return f"{self.name} ({state}); its output:\n{self.output}"

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of `pattern` in the output, waiting while the process runs."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output)
            if match:
                return match
            if self.popen.poll() is not None:
                match = regex.search(self.output)  # a last look: it may have just written it
                if match:
                    return match
                raise AssertionError(f"{pattern!r} never appeared: {self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} did not appear within {timeout:.0f} s: {self.describe()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f} s: {self.describe()}") from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


class BannerEcho(socketserver.BaseRequestHandler):
    """Says BANNER, then echoes until the peer half-closes, then closes."""

    server: TargetServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        count = 0
        try:
            sock.sendall(BANNER)
            while data := sock.recv(65536):
                sock.sendall(data)
                count += len(data)
            self.server.eofs.append(count)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class TargetServer(socketserver.ThreadingTCPServer):
    """A BannerEcho target on 127.0.0.1 (a port the kernel picks); run it
    with serve_in_thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), BannerEcho)
        self.eofs: list[int] = []  # bytes echoed, for each visitor whose EOF arrived


def serve_in_thread(test: Any, server: socketserver.BaseServer) -> None:
    """Run a socketserver in a daemon thread until `test`'s cleanup stops it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    test.addCleanup(stop)


# ---------------------------------------------------------------- the HTTP edge (#15)
#
# A server with --http/--https and --domain as a real process, local HTTP
# services in threads, raw and curl visitors (tests/test_http_*.py).

DOMAIN = "tunnel.test"


class WhoAmI(http.server.BaseHTTPRequestHandler):
    """Answers every request with JSON naming its service, the request line,
    its headers and body: what reached which local service."""

    protocol_version = "HTTP/1.1"
    service = "?"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        reply = json.dumps({
            "service": self.server.service,  # type: ignore[attr-defined]
            "method": self.command, "path": self.path, "body": body.decode("latin-1"),
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class WhoAmIServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: str) -> None:
        super().__init__(("127.0.0.1", 0), WhoAmI)
        self.service = service

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a connection reset as a client process stops at the end of a test


def raw_exchange(port: int, data: bytes, timeout: float = 10.0, half_close: bool = False) -> bytes:
    """Send `data` to 127.0.0.1:port, read until the server closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def responses(data: bytes) -> list[bytes]:
    """The bodies of the Content-Length-framed responses in `data`, in order."""
    bodies = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        bodies.append(rest[:length])
        data = rest[length:]
    return bodies


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


class EdgeProcesses(SynchronousTestCase):
    """A server with the shared ports, and helpers to start clients and services."""

    server_args: tuple[str, ...] = ()

    def more_server_args(self) -> list[str]:
        return []

    def setUp(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="rtunnel-http-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.state_dir = self.workdir / "state"
        self.server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--listen", "tcp:0:interface=127.0.0.1",
             "--state-dir", str(self.state_dir), "--domain", DOMAIN,
             "--http", "tcp:0:interface=127.0.0.1", *self.server_args, *self.more_server_args()],
            self.workdir,
        )
        self.control = int(self.server.wait_for(r"rtunnel server listening on \S+ \(port (\d+)\)").group(1))
        self.http_port = int(self.server.wait_for(r"serving HTTP for clients' hostnames on \S+ \(port (\d+)\)").group(1))

    def start_service(self, name: str) -> int:
        service = WhoAmIServer(name)
        serve_in_thread(self, service)
        return int(service.server_address[1])

    def start_client(self, *args: str, name: str = "client", wait: str | None = r"tunnel ready: ") -> Process:
        token = (self.state_dir / "token").read_text().strip()
        client = Process(
            self, name,
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-client", "-c", f"127.0.0.1:{self.control}",
             "--token", token, "--fingerprint", cert_fingerprint(self.state_dir / "server.crt"), *args],
            self.workdir,
        )
        if wait:
            client.wait_for(wait)
        return client

    def get(self, conn: http.client.HTTPConnection, host: str, path: str = "/") -> dict[str, Any]:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        body = response.read()
        self.assertEqual(response.status, 200, body)
        return dict(json.loads(body))


def curl(*args: str) -> tuple[int, str, str]:
    """Run curl (bounded); its exit code, stdout and stderr."""
    out = subprocess.run(["curl", "--silent", "--show-error", "--max-time", "15", *args],
                         capture_output=True, timeout=30)
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


class TlsService(http.server.ThreadingHTTPServer):
    """A local HTTPS service holding its own certificate (for TLS passthrough)."""

    daemon_threads = True

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), WhoAmI)
        self.service = "tls-local"
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class HttpsBase(EdgeProcesses):
    """A server with --https and a static wildcard certificate made here."""

    def more_server_args(self) -> list[str]:
        if shutil.which("curl") is None:
            raise SkipTest("curl not found: install Debian's 'curl' package")
        certs = self.workdir / "edge-certs"
        certs.mkdir()
        self.ca, cert, key = make_ca_and_server(certs, f"*.{DOMAIN}")
        return ["--https", "tcp:0:interface=127.0.0.1", "--https-cert", str(cert), "--https-key", str(key)]

    def setUp(self) -> None:
        super().setUp()
        self.https_port = int(self.server.wait_for(
            r"serving HTTPS for clients' hostnames on \S+ \(port (\d+)\)").group(1))

    def url(self, name: str, path: str = "/") -> list[str]:
        return ["--resolve", f"{name}:{self.https_port}:127.0.0.1", f"https://{name}:{self.https_port}{path}"]

    def setup_only(self) -> None:
        """(For tests that use this server from another test case.)"""


class PageReader(html.parser.HTMLParser):
    """What the dumped DOM shows: text by class, attributes by tag."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._open: list[tuple[str, str]] = []
        self.text_by_class: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values))
        self._open.append((tag, values.get("class", "")))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._open and data.strip():
            for cls in self._open[-1][1].split():
                self.text_by_class.setdefault(cls, []).append(data.strip())

    def texts(self, cls: str) -> list[str]:
        return self.text_by_class.get(cls, [])

    def attrs(self, name: str, tag: str, cls: str | None = None) -> list[str]:
        return [
            a[name] for t, a in self.elements
            if t == tag and name in a and (cls is None or cls in a.get("class", "").split())
        ]
