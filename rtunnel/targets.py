"""The client's connections to its tunnels' targets: one per visitor.

A target connection is made with as little as the reactor allows (an IP
literal with connectTCP itself, a host name with HostnameEndpoint), carries
an optional PROXY protocol header first, and reports once how its attempt
ended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from rtunnel.addresses import is_ip_literal
from rtunnel.config import TunnelSpec
from rtunnel.mux import Stream, StreamProtocol
from rtunnel.transports import write_now
from rtunnel.wire import ResetCode


def reset_code_for(failure: Failure) -> tuple[ResetCode, str]:
    if failure.check(error.ConnectionRefusedError):
        return ResetCode.REFUSED, "connection refused"
    if failure.check(error.TimeoutError, defer.TimeoutError):
        return ResetCode.TIMEOUT, "timed out"
    if failure.check(error.DNSLookupError):
        return ResetCode.UNREACHABLE, "host name not found"
    return ResetCode.UNREACHABLE, failure.getErrorMessage()


class TargetFactory(ClientFactory):
    """Connects one stream to its local target (quietly: one per visitor).
    A non-empty `header` (PROXY protocol) is written to the target first.
    `settled` is called once: with None when connected, else with the
    failure; then it is let go of, with all it holds."""

    noisy = False

    def __init__(self, stream: Stream, header: bytes, settled: Callable[[Failure | None], None]) -> None:
        self.stream = stream
        self.header = header
        self._settled: Callable[[Failure | None], None] | None = settled
        self._cancel: Callable[[], None] | None = None

    def connect(self, reactor: Any, spec: TunnelSpec, timeout: float) -> None:
        """Start connecting to `spec`'s target. An IP literal is connected
        with connectTCP itself: only the connector (and this factory) stay
        with the connection, where an endpoint also keeps its wrapping
        protocol, factory and Deferred. A host name goes through
        HostnameEndpoint (it resolves in a thread, for every connection)."""
        if not is_ip_literal(spec.target_host):
            d = HostnameEndpoint(reactor, spec.target_host, spec.target_port, timeout=timeout).connect(self)
            self._cancel = d.cancel
            d.addErrback(self.connection_failed)
            return
        try:
            connector = reactor.connectTCP(spec.target_host, spec.target_port, self, timeout=timeout)
        except Exception:  # as TCP4ClientEndpoint.connect: a failed attempt, not a crash
            self.connection_failed(Failure())
            return
        if self._settled is not None:
            self._cancel = connector.stopConnecting

    def cancel(self) -> None:
        """Stop an attempt still under way (its stream closed first)."""
        cancel, self._cancel = self._cancel, None
        if cancel is not None and self._settled is not None:
            cancel()

    def buildProtocol(self, addr: object) -> StreamProtocol:
        self._settle(None)
        header, self.header = self.header, b""  # the connector keeps this factory
        if header:
            return ProxyHeaderTarget(self.stream, header)
        return StreamProtocol(self.stream)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.connection_failed(reason)

    def connection_failed(self, reason: Failure) -> None:
        self._settle(reason)

    def _settle(self, result: Failure | None) -> None:
        settled, self._settled, self._cancel = self._settled, None, None
        if settled is not None:
            settled(result)


class ProxyHeaderTarget(StreamProtocol):
    """A target connection that starts with a PROXY protocol header, written
    before attach_local flushes the visitor's early bytes. The header is not
    stream data: it counts against no window or offset, and it is not kept
    once written."""

    def __init__(self, stream: Stream, header: bytes) -> None:
        super().__init__(stream)
        self.header = header

    def connectionMade(self) -> None:
        header, self.header = self.header, b""
        write_now(self.transport, header)
        super().connectionMade()
