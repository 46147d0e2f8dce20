"""The HTTP edge: an HTTP/1.1 reverse proxy on the shared ports, routing
each request by its Host to the tunnel that claimed the name
(rtunnel.server.hostnames). The HTTPS port in front of it is
rtunnel.server.httpsport; the service's side of each stream is
rtunnel.server.httpupstream; the bytes of heads and bodies are
rtunnel.server.httpmessages.

Per request, not per connection: a visitor's connection may name another
host in its next request, which then goes to that name's owner (the stream
to the previous one is ended). A stream to a tunnel is kept across
keep-alive requests to the same name. Each request is parsed with h11
(framing by Content-Length or chunked per RFC 9112); what h11 tolerates
but RFC 9112 lets a server refuse (Content-Length with Transfer-Encoding,
duplicate Content-Length, obs-fold, bare LF, several Host headers) is
refused before h11 sees the head. The head passed on is written here in
one join (hop-by-hop headers dropped, X-Forwarded-* and Forwarded set by
the server). Responses are framed by rtunnel.server.httpupstream without
an event per piece. After a 101 the connection is a byte relay. Flow
control is the stream's: the visitor's socket is read only while the
stream takes bytes, and the stream grants credit only while the visitor's
socket takes them.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.addresses import host_port
from rtunnel.httpconfig import HttpSettings
from rtunnel.server.deadlines import Deadlines
from rtunnel.server.hostnames import HostRoutes, HostStats, HostTunnel
from rtunnel.server.httpmessages import (
    REASONS,
    EdgeError,
    check_head,
    page,
)
from rtunnel.server.httpresponses import Responses
from rtunnel.server.httprouting import Routing
from rtunnel.server.httpsport import HttpsFactory
from rtunnel.server.httpupstream import Upstream
from rtunnel.transports import set_nodelay
from rtunnel.wire import ResetCode

if TYPE_CHECKING:
    from rtunnel.server import TunnelServer
    from rtunnel.server.certificates import CertificateSource

__all__ = ["EdgeError", "HttpEdge", "HttpFactory", "HttpVisitor", "check_head", "edge_factories", "page"]


class HttpEdge:
    """What the shared ports' connections share: settings, routes,
    certificates, counters and the access log."""

    log = Logger()

    def __init__(
        self, reactor: Any, server: TunnelServer, settings: HttpSettings, routes: HostRoutes,
        certificates: CertificateSource | None,
    ) -> None:
        self.reactor = reactor
        self.server = server
        self.settings = settings
        self.routes = routes
        if certificates is not None:
            routes.certificates = certificates
        self.visitors: set[HttpVisitor] = set()
        self.deadlines = Deadlines(reactor)  # every connection's head (and ClientHello) deadline, one timer
        #: the route to a name held at another fleet member, or None (set by rtunnel.fleet.hostedge)
        self.elsewhere: Callable[[str], Any] | None = None
        self._access = open(settings.access_log, "a", buffering=1) if settings.access_log else None  # noqa: SIM115

    @property
    def certificates(self) -> CertificateSource | None:
        """The server's certificate source now (TunnelServer.certificates may be set later, e.g. ACME)."""
        return self.routes.certificates

    def route(self, name: str | None) -> Any:
        """The tunnel serving `name`: held here, else (in a fleet) at another member."""
        tunnel = self.routes.route(name)
        if tunnel is None and name and self.elsewhere is not None:
            tunnel = self.elsewhere(name)
        return tunnel

    def stats(self, name: str) -> HostStats:
        return self.routes.stats[name]

    def trusted(self, ip: str) -> bool:
        if not self.settings.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.settings.trusted_proxies)

    def access(self, record: dict[str, Any]) -> None:
        """One line of the access log (combined format, or JSON)."""
        if self._access is None:
            return
        if self.settings.access_log_format == "json":
            line = json.dumps(record, separators=(",", ":"))
        else:
            when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(record["time"]))
            line = (
                f'{record["client"]} - - [{when}] "{record["method"]} {record["target"]} HTTP/1.1" '
                f'{record["status"]} {record["bytes"]} "{record["referer"]}" "{record["user_agent"]}" '
                f'"{record["host"]}"'
            )
        self._access.write(line + "\n")

    @property
    def access_log(self) -> bool:
        """Whether requests are logged (--access-log): only then is a record built."""
        return self._access is not None

    def close(self) -> None:
        self.deadlines.stop()
        if self._access is not None:
            self._access.close()
            self._access = None


class HttpFactory(Factory):
    """The --http port (scheme "http"), or the terminated side of --https."""

    noisy = False

    def __init__(self, edge: HttpEdge, scheme: str, server_name: str = "") -> None:
        self.edge = edge
        self.scheme = scheme
        self.server_name = server_name  # the SNI of a terminated TLS connection

    def buildProtocol(self, addr: Any) -> Protocol:
        return HttpVisitor(self.edge, self.scheme, self.server_name)


@implementer(IHalfCloseableProtocol, IPushProducer)
class HttpVisitor(Routing, Responses, Protocol):
    """One visitor connection on a shared port: requests parsed, routed and
    relayed one at a time (a pipelined request waits for the response
    before it is read)."""

    log = Logger()

    def __init__(self, edge: HttpEdge, scheme: str, server_name: str = "") -> None:
        self.edge = edge
        self.scheme = scheme
        self.server_name = server_name
        self.buffer = b""  # bytes of the next request's head (not yet given to h11)
        self.inbox = b""  # bytes of the current request not yet given to h11 (fed a slice at a time)
        self.fed_eof = False
        self.conn: h11.Connection | None = None  # the current request's parser
        self.upstream: Upstream | None = None
        self.tunnel: HostTunnel | None = None  # the current request's
        self.stats: HostStats | None = None  # the current tunnel's counters
        self.relaying = False  # after a 101: bytes both ways
        self.eof = False  # the visitor half-closed
        self.closed = False
        self.paused: set[str] = set()
        self.deadline: float | None = None  # the next request head's (Deadlines)
        self.deadline_watched = False
        self.trusted = False  # the visitor is one of --trusted-proxies
        self.keep_alive = True  # the current request lets the connection carry another
        self.framing = "raw"  # of the response to the visitor: raw (as the service framed it), chunked, close
        self.out: list[bytes] | None = None  # response bytes gathered in one turn, written at once
        self.waiting: Any = None  # a request waiting for a detached tunnel
        self.request: h11.Request | None = None
        self.headers: list[tuple[bytes, bytes]] = []  # the current request's (lower-case name, value)
        self.fields: dict[bytes, bytes] = {}  # the first value of each of them
        self.stats_name = ""  # the claimed name the current request counts under
        self.names: tuple[bytes, str | None] = (b"", None)  # the last Host seen and its normalised name
        self.host_name = "-"  # the current request's normalised host
        self.forwarding: tuple[bytes, bytes] = (b"", b"")  # a Host, and the forwarding lines for it
        self.response_started = False
        self.status = 0  # of the current response
        self.sent = 0  # body bytes of the current response
        self.started = 0.0  # when the current request's head was parsed (for the access log)
        self.peer = ("?", 0)
        self.local = ("?", 0)

    # ------------------------------------------------------------ Twisted

    def connectionMade(self) -> None:
        if self.scheme == "http":  # behind TLS, SniRouter set it on the socket
            set_nodelay(self.transport)
        self.peer = host_port(self.transport.getPeer())
        self.local = host_port(self.transport.getHost())
        self.trusted = self.edge.trusted(self.peer[0])
        self.transport.registerProducer(self, True)
        self.edge.visitors.add(self)
        self._arm_head_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        if self.relaying:
            self._to_upstream(data)
            return
        if self.conn is None:
            self.buffer += data
            self._next_request()
            return
        self.inbox += data
        if len(self.inbox) > 4 * self.edge.settings.max_request_head:
            self._pause("inbox")  # read on once h11 has taken it (a stream being opened, or paused)
        self._pump()

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.relaying:
            if self.upstream is not None:
                self.upstream.stream.local_eof()
            return
        if self.conn is None:
            self._close()
            return
        self._pump()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.closed = True
        self.edge.visitors.discard(self)
        self._cancel_timers()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self.relaying or self.request is not None:
                upstream.stream.local_lost(reason.getErrorMessage())
            else:
                upstream.retire()

    # IPushProducer: the visitor's socket filled up or drained
    def pauseProducing(self) -> None:
        if self.upstream is not None:
            self.upstream.stream.local_buffer_full()

    def resumeProducing(self) -> None:
        if self.upstream is not None:
            self.upstream.stream.local_buffer_drained()

    def stopProducing(self) -> None:
        self.pauseProducing()

    # ------------------------------------------------------------ reading requests

    def _pause(self, why: str) -> None:
        if not self.paused and not self.closed:
            self.transport.pauseProducing()
        self.paused.add(why)

    def _resume(self, why: str) -> None:
        if why in self.paused:
            self.paused.discard(why)
            if not self.paused and not self.closed:
                self.transport.resumeProducing()

    def _arm_head_timer(self) -> None:
        """The next head must arrive within --request-head-timeout (the edge's
        Deadlines: no reactor timer per connection or request)."""
        self.deadline = self.edge.reactor.seconds() + self.edge.settings.request_head_timeout
        if not self.deadline_watched:
            self.edge.deadlines.watch(self)

    def _cancel_head_timer(self) -> None:
        self.deadline = None  # its entry, if any, finds nothing to do

    def _cancel_timers(self) -> None:
        self.deadline = None
        if self.waiting is not None and self.waiting.active():
            self.waiting.cancel()
        self.waiting = None

    def deadline_passed(self) -> None:
        self.deadline = None
        if self.closed:
            return
        if self.buffer:
            self._fail(EdgeError(408, f"the request head did not arrive within "
                                      f"{self.edge.settings.request_head_timeout:g} s"))
        else:
            self._close()  # an idle keep-alive connection: closed quietly

    def _next_request(self) -> None:
        """Cut the next request's head from the buffer, check it, and start
        parsing it (with what follows it) with a new h11 connection."""
        limit = self.edge.settings.max_request_head
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > limit:
                self._fail(EdgeError(431, f"the request head is larger than {limit} bytes"))
            elif self.buffer.find(b"\n\n") >= 0 or self.buffer.find(b"\n\r\n") >= 0:
                self._fail(EdgeError(400, "a line of the request ends in a bare LF; end every line with CRLF"))
            elif self.eof:
                self._close()
            return
        if end + 4 > limit:
            self._fail(EdgeError(431, f"the request head is larger than {limit} bytes"))
            return
        head = self.buffer[:end + 4]
        try:
            check_head(head)
        except EdgeError as e:
            self._fail(e)
            return
        self._cancel_head_timer()
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        self.conn.receive_data(head)
        self.inbox, self.buffer, self.fed_eof = self.buffer[end + 4:], b"", False
        self._pump()

    def _pump(self) -> None:
        """Take the request's events while its stream is ready for them."""
        conn = self.conn
        while conn is not None and conn is self.conn and not self.closed and not self.relaying:
            if self.request is not None and (self.upstream is None or not self.upstream.ready):
                return  # the stream is being opened: the body waits in h11
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint in (400, 431, 501) else 400
                if self.request is not None and status == 431:  # in the body: a chunk line too long
                    status = 400
                self._fail(EdgeError(status, f"malformed request: {e}"))
                return
            if event is h11.NEED_DATA:
                if "stream" in self.paused or not self._feed(conn):
                    return  # the stream takes no more now (it resumes us), or nothing is left
                continue
            if event is h11.PAUSED:
                self._pause("pipelined")  # the next request waits for this one's response
                return
            event_type = type(event)
            if event_type is h11.Request:
                self._start(event)  # type: ignore[arg-type]
                if conn.their_state is h11.DONE:
                    return  # the request is whole and passed on (or answered): the rest waits for the response
            elif event_type is h11.Data:
                data = event.data  # type: ignore[union-attr]
                self._count_in(len(data))
                if self.upstream is not None:
                    self.upstream.send_body(data if type(data) is bytes else bytes(data))
            elif event_type is h11.EndOfMessage:
                if self.upstream is not None:
                    self.upstream.end_request()
                if self.inbox or conn.trailing_data[0]:
                    self._pause("pipelined")
                elif not self.eof:
                    return  # nothing more to read until the response is out
            elif event_type is h11.ConnectionClosed:
                if self.request is None:
                    self._close()
                return

    def _feed(self, conn: h11.Connection) -> bool:
        """Give h11 the next slice of the inbox (or the EOF); False if there
        is nothing to give. Slices keep h11's buffer, and so a chunk-size
        line with a huge extension, within --max-request-head."""
        if self.inbox:
            size = max(1024, self.edge.settings.max_request_head // 2)
            piece, self.inbox = self.inbox[:size], self.inbox[size:]
            conn.receive_data(piece)
            if not self.inbox:
                self._resume("inbox")
            return True
        if self.eof and not self.fed_eof:
            self.fed_eof = True
            conn.receive_data(b"")
            return True
        return False

    def _rest(self, conn: h11.Connection) -> tuple[bytes, bool]:
        """What the visitor sent after the current request, and whether it half-closed."""
        data, closed = conn.trailing_data
        return data + self.inbox, closed or self.eof

    def _count_in(self, n: int) -> None:
        if self.stats is not None and self.tunnel is not None and self.tunnel.claim is not None:
            self.stats.bytes_in += n

    # ------------------------------------------------------------ the edge's own answers

    def _answer(self, status: int, body: bytes, content_type: bytes = b"text/html; charset=utf-8",
                location: bytes | None = None) -> None:
        """Answer the current request from the edge, then close the connection."""
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"cache-control", b"no-store")]
        if location is not None:
            headers.append((b"location", location))
        reason = REASONS.get(status, "Error").encode()
        head = b"HTTP/1.1 %d %s\r\n" % (status, reason) + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        self.edge.routes.edge_answers[status] += 1
        if self.request is not None:
            self.sent = len(body)
            self._account(status)
        self.flush()
        if not self.closed:
            self.transport.write(head + b"\r\n" + (b"" if self.is_head_request() else body))
        self._close()

    def _fail(self, error: EdgeError) -> None:
        if self.response_started:
            self._close(abort=True)
            return
        if error.status >= 500 or error.status in (404, 421):
            level = self.log.info
        else:
            level = self.log.debug
        level(
            "HTTP {status} to {client}: {why}", status=error.status, client=self.peer[0], why=error.text,
            event="http_refused", host=self.host_name if self.request is not None else "-", scheme=self.scheme,
        )
        self._answer(error.status, page(error.status, error.text))

    def _close(self, abort: bool = False) -> None:
        if self.closed:
            return
        if not abort:
            self.flush()
        self.out = None
        self.closed = True
        self._cancel_timers()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if self.relaying or self.request is not None:
                upstream.stream.reset(ResetCode.ABORTED, "the visitor's request was cut short")
            else:
                upstream.retire()
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    # ------------------------------------------------------------ relay after 101

    def relay_eof(self) -> None:
        transport = self.transport
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            self._close()

    def relay_done(self) -> None:
        self._close()


def edge_factories(edge: HttpEdge) -> dict[str, Callable[[], Factory]]:
    """The factories of the shared ports, by option."""
    return {
        "http": lambda: HttpFactory(edge, "http"),
        "https": lambda: HttpsFactory(edge, lambda name: HttpFactory(edge, "https", name)),
    }
