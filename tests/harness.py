"""Real servers, clients, targets and visitors on loopback, for trial tests.

Everything here runs in the test's reactor with real sockets and real TLS;
every helper cleans up after itself so trial's dirty-reactor check passes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
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
    factory = ClientFactory.forProtocol(lambda: visitor)
    factory.noisy = False

    def failed(connector: Any, reason: Failure) -> None:  # an instance attribute: no self
        visitor.done.errback(reason)

    factory.clientConnectionFailed = failed  # type: ignore[method-assign]
    reactor.connectTCP("127.0.0.1", port, factory)
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
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
            return s.getsockname()[1]
    except OSError:
        pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
