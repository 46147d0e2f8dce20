"""The HTTP edge: an HTTP/1.1 reverse proxy on the shared ports, routing
each request by its Host to the tunnel that claimed the name
(rtunnel.server.hostnames), and the HTTPS port in front of it (SNI:
terminate TLS with the CertificateSource, or pass the bytes through to a
"tls" tunnel).

Per request, not per connection: a visitor's connection may name another
host in its next request, which then goes to that name's owner (the stream
to the previous one is ended). A stream to a tunnel is kept across
keep-alive requests to the same name. Both directions are parsed with h11
and written again (framing by Content-Length or chunked, hop-by-hop
headers dropped, X-Forwarded-* and Forwarded set by the server); what h11
tolerates but RFC 9112 lets a server refuse (Content-Length with
Transfer-Encoding, duplicate Content-Length, obs-fold, bare LF, several
Host headers) is refused before h11 sees the head. After a 101 the
connection is a byte relay. Flow control is the stream's: the visitor's
socket is read only while the stream takes bytes, and the stream grants
credit only while the visitor's socket takes them.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from twisted.internet.interfaces import IHalfCloseableProtocol, IOpenSSLContextFactory, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel.addresses import host_port
from rtunnel.httpconfig import HttpSettings, host_of
from rtunnel.localsocket import StreamProtocol
from rtunnel.mux import Stream
from rtunnel.server.hostnames import HostRoutes, HostStats, HostTunnel
from rtunnel.server.sni import UNRECOGNIZED_NAME_ALERT, NotClientHello, parse_client_hello
from rtunnel.transports import set_nodelay, write_now
from rtunnel.wire import ResetCode

if TYPE_CHECKING:
    from rtunnel.server import TunnelServer
    from rtunnel.server.certificates import CertificateSource

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"})
ACME_PREFIX = b"/.well-known/acme-challenge/"
REASONS = {
    400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 421: "Misdirected Request",
    431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 308: "Permanent Redirect", 200: "OK",
}


class EdgeError(Exception):
    """A request the edge answers itself, with `status` and a page saying `text`."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def check_head(head: bytes) -> None:
    """Refuse what h11 would accept but a proxy must not pass on (request
    smuggling shapes, RFC 9112 2.2, 5.2, 6.1, 6.3); raise EdgeError(400)."""
    if b"\n" in head.replace(b"\r\n", b""):
        raise EdgeError(400, "a line of the request ends in a bare LF; end every line with CRLF")
    if b"\r" in head.replace(b"\r\n", b""):
        raise EdgeError(400, "the request has a bare CR in its head (header injection?)")
    lines = head.split(b"\r\n")
    lengths = encodings = hosts = 0
    for line in lines[1:]:
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            raise EdgeError(400, "obsolete line folding (a header line starting with a space) is not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise EdgeError(400, "a header line has no name or whitespace before its colon")
        name = name.lower()
        if name == b"content-length":
            lengths += 1
            if b"," in value:
                raise EdgeError(400, "a Content-Length with several values is not accepted")
        elif name == b"transfer-encoding":
            encodings += 1
        elif name == b"host":
            hosts += 1
    if lengths > 1:
        raise EdgeError(400, "the request has more than one Content-Length header")
    if lengths and encodings:
        raise EdgeError(400, "the request has both Content-Length and Transfer-Encoding")
    if hosts > 1:
        raise EdgeError(400, "the request has more than one Host header")


def page(status: int, text: str) -> bytes:
    """A small HTML page for an edge answer; `text` names nothing of other tenants."""
    reason = REASONS.get(status, "Error")
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{status} {reason}</title></head>"
        f"<body><h1>{status} {reason}</h1><p>{escaped}</p><hr><p>rtunnel</p></body></html>\n"
    ).encode()


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

    def close(self) -> None:
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
class HttpVisitor(Protocol):
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
        self.conn: h11.Connection | None = None  # the current request's parser, and writer of its response
        self.upstream: Upstream | None = None
        self.tunnel: HostTunnel | None = None  # the current request's
        self.relaying = False  # after a 101: bytes both ways
        self.eof = False  # the visitor half-closed
        self.closed = False
        self.paused: set[str] = set()
        self.head_timer: Any = None
        self.head_deadline: float | None = None
        self.trusted = False  # the visitor is one of --trusted-proxies
        self.keep_alive = True  # the current request lets the connection carry another
        self.framing = "raw"  # of the response to the visitor: raw (as the service framed it), chunked, close
        self.out: list[bytes] | None = None  # response bytes gathered in one turn, written at once
        self.waiting: Any = None  # a request waiting for a detached tunnel
        self.request: h11.Request | None = None
        self.stats_name = ""  # the claimed name the current request counts under
        self.fields: dict[bytes, str] = {}  # the current request's headers (first value of each)
        self.names: tuple[str, str | None] = ("", None)  # the last Host seen and its normalised name
        self.response_started = False
        self.record: dict[str, Any] = {}
        self.peer = ("?", 0)
        self.local = ("?", 0)

    # ------------------------------------------------------------ Twisted

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.peer = host_port(self.transport.getPeer())  # type: ignore[union-attr]
        self.local = host_port(self.transport.getHost())  # type: ignore[union-attr]
        self.trusted = self.edge.trusted(self.peer[0])
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
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
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self.paused.add(why)

    def _resume(self, why: str) -> None:
        if why in self.paused:
            self.paused.discard(why)
            if not self.paused and not self.closed:
                self.transport.resumeProducing()  # type: ignore[union-attr]

    def _arm_head_timer(self) -> None:
        """The next head must arrive within --request-head-timeout. One timer
        per connection, moved lazily (not a callLater per request)."""
        timeout = self.edge.settings.request_head_timeout
        self.head_deadline = self.edge.reactor.seconds() + timeout
        if self.head_timer is None:
            self.head_timer = self.edge.reactor.callLater(timeout, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        self.head_deadline = None  # the timer, if any, finds nothing to do

    def _cancel_timers(self) -> None:
        self.head_deadline = None
        if self.head_timer is not None and self.head_timer.active():
            self.head_timer.cancel()
        self.head_timer = None
        if self.waiting is not None and self.waiting.active():
            self.waiting.cancel()
        self.waiting = None

    def _head_timeout(self) -> None:
        self.head_timer = None
        deadline = self.head_deadline
        if deadline is None or self.closed:
            return
        left = deadline - self.edge.reactor.seconds()
        if left > 0:
            self.head_timer = self.edge.reactor.callLater(left, self._head_timeout)
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
            if isinstance(event, h11.Request):
                self._start(event)
            elif isinstance(event, h11.Data):
                self._count_in(len(event.data))
                self._to_upstream_event(event)
            elif isinstance(event, h11.EndOfMessage):
                self._to_upstream_event(h11.EndOfMessage())
            elif isinstance(event, h11.ConnectionClosed):
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
        if self.tunnel is not None and self.tunnel.claim is not None:
            self.edge.stats(self.tunnel.name).bytes_in += n

    # ------------------------------------------------------------ routing

    def _start(self, request: h11.Request) -> None:
        self.request = request
        self.stats_name = ""
        self.fields = fields = {}  # the first value of each header, by (lower-case) name: one pass
        for field_name, value in request.headers:
            if field_name not in fields:
                fields[field_name] = value.decode("latin-1")
        self.response_started = False
        connection = fields.get(b"connection", "").lower()
        self.keep_alive = request.http_version == b"1.1" and "close" not in connection
        host_header = self._authority(request)
        if self.names[0] != host_header:  # keep-alive requests mostly repeat their Host
            self.names = (host_header, host_of(host_header) if host_header else None)
        name = self.names[1]
        self.record = {
            "time": time.time(), "client": self.peer[0], "method": request.method.decode("latin-1"),
            "target": request.target.decode("latin-1")[:2000], "host": name or "-", "status": 0, "bytes": 0,
            "referer": fields.get(b"referer") or "-", "user_agent": fields.get(b"user-agent") or "-",
            "scheme": self.scheme,
        }
        try:
            if not host_header:
                raise EdgeError(400, "the request names no host (Host header)")
            if self.scheme == "http" and request.target.startswith(ACME_PREFIX):
                certificates = self.edge.certificates
                token = request.target[len(ACME_PREFIX):].decode("ascii", "replace")
                answer = certificates.challenge_response(token) if certificates is not None else None
                if answer is not None:
                    self._answer(200, answer, content_type=b"application/octet-stream")
                    return
            if self.server_name and name != self.server_name:
                raise EdgeError(421, "the request's Host is not the name this TLS connection was opened for")
            tunnel = self.edge.route(name)
            if tunnel is None:
                raise EdgeError(404, "no tunnel serves this hostname on this server")
            self.stats_name = tunnel.name  # the claim's name: "*.zone" for a name its wildcard serves
            self.edge.stats(tunnel.name).requests += 1
            if self.scheme == "http" and self._redirect(name, request):
                return
            if tunnel.kind == "tls":
                raise EdgeError(404, "this hostname is served over TLS only (https)")
            self.tunnel = tunnel
            self._connect(tunnel, time.monotonic() + self.edge.settings.offline_wait)
        except EdgeError as e:
            self._fail(e)

    def _authority(self, request: h11.Request) -> str:
        target = request.target
        for scheme in (b"http://", b"https://"):  # absolute-form: its authority is the host (RFC 9112 3.2.2)
            if target[:len(scheme)].lower() == scheme:
                return target[len(scheme):].split(b"/", 1)[0].decode("latin-1")
        return self.fields.get(b"host", "")

    def _redirect(self, name: str | None, request: h11.Request) -> bool:
        settings, certificates = self.edge.settings, self.edge.certificates
        if not (settings.redirect_https and settings.https and name and certificates is not None):
            return False
        if certificates.context_for(name) is None:
            return False
        port = self.edge.routes.https_port
        location = f"https://{name}{'' if port in (0, 443) else f':{port}'}".encode() + request.target
        self._answer(308, page(308, "this site is served over https"), location=location)
        return True

    def _connect(self, tunnel: HostTunnel, deadline: float) -> None:
        """Give the request a stream to `tunnel`'s owner: the open one if it
        goes there already, else a new one; wait (bounded) while the owner
        is detached."""
        self.waiting = None
        current = self.edge.route(tunnel.name if tunnel.claim is not None else None) or tunnel
        owner = current.owner
        if owner is not None and owner.detached and time.monotonic() < deadline:
            self._pause("waiting")  # the body waits in the socket, not here
            self.waiting = self.edge.reactor.callLater(0.05, self._connect, current, deadline)
            return
        self._resume("waiting")
        if owner is None or owner.expired or owner.detached:
            self._fail(EdgeError(502, "the tunnel for this hostname is offline (its client is not connected); "
                                      "try again later"))
            return
        self.tunnel = current
        upstream = self.upstream
        if upstream is not None and upstream.tunnel is current and upstream.reusable():
            upstream.conn.start_next_cycle()
        else:
            if upstream is not None:
                self.upstream = None
                upstream.retire()
            why = current.room()
            stream = current.open_stream(list(self.peer), list(self.local)) if why is None else None
            if stream is None:
                self._fail(EdgeError(503, f"the tunnel cannot take another connection now ({why or 'refused'}); "
                                          "try again shortly"))
                return
            self.upstream = Upstream(self, current, stream)
            stream.attach_local(self.upstream)
            if self.closed or self.upstream is None:
                return
        self._send_head()

    def _send_head(self) -> None:
        request, upstream = self.request, self.upstream
        assert request is not None and upstream is not None and self.conn is not None
        fields = self.fields
        upgrade = fields.get(b"upgrade", "")
        connection_tokens = {t.strip().lower() for t in fields.get(b"connection", "").encode("latin-1").split(b",")}
        headers: list[tuple[bytes, bytes]] = []
        trusted = self.trusted
        forwarded_for: list[str] = []
        for name, value in request.headers:
            if name in HOP_BY_HOP or name in connection_tokens:
                continue
            if name in FORWARDING:
                if trusted and name == b"x-forwarded-for":
                    forwarded_for.append(value.decode("latin-1"))
                if trusted and name == b"forwarded":
                    headers.append((name, value))
                continue
            headers.append((name, value))
        if self.conn.their_http_version == b"1.1" and b"transfer-encoding" in fields:
            headers.append((b"transfer-encoding", b"chunked"))
        if upgrade and b"upgrade" in connection_tokens:
            headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade.encode("latin-1"))]
        client = self.peer[0]
        host = self.record["host"] if self.record.get("host") != "-" else ""
        forwarded_for.append(client)
        node = f'"[{client}]"' if ":" in client else client
        headers += [
            (b"x-forwarded-for", ", ".join(forwarded_for).encode("latin-1")),
            (b"x-forwarded-proto", self.scheme.encode()),
            (b"x-forwarded-host", fields.get(b"host", "").encode("latin-1") or host.encode()),
            (b"forwarded", f"for={node};proto={self.scheme};host=\"{host}\"".encode("latin-1")),
        ]
        if not any(n == b"host" for n, _ in headers):
            headers.append((b"host", host.encode()))
        upstream.send(h11.Request(method=request.method, target=request.target, headers=headers))
        self._pump()

    def _to_upstream_event(self, event: h11.Data | h11.EndOfMessage) -> None:
        if self.upstream is not None:
            self.upstream.send(event)
        if isinstance(event, h11.EndOfMessage) and self.conn is not None:
            data, _ = self._rest(self.conn)
            if data:
                self._pause("pipelined")

    def _to_upstream(self, data: bytes) -> None:
        if self.upstream is not None:
            self._count_in(len(data))
            self.upstream.stream.local_data(data)

    # ------------------------------------------------------------ responses

    def upstream_event(self, event: Any) -> None:
        """An event of the tunnel's response to the current request."""
        conn = self.conn
        if conn is None or self.closed:
            return
        if isinstance(event, h11.Data):
            data = event.data if type(event.data) is bytes else bytes(event.data)  # h11 may hand a bytearray
            self.record["bytes"] += len(data)
            if self.framing == "chunked":
                self._to_visitor(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                self._to_visitor(data)
        elif isinstance(event, h11.Response):
            self._respond(event)
        elif isinstance(event, h11.EndOfMessage):
            if self.framing == "chunked":
                self._to_visitor(b"0\r\n\r\n")
            self._finish()
        elif isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                self._switch(event)
                return
            self._to_visitor(_head(event.status_code, event.reason, _response_headers(event.headers)))

    def _respond(self, event: h11.Response) -> None:
        """The service's response head, framed for the visitor: its own
        Content-Length kept; otherwise chunked (HTTP/1.1) or until close."""
        assert self.request is not None
        self.response_started = True
        status = event.status_code
        self.record["status"] = status
        headers = _response_headers(event.headers)
        if self.request.method == b"HEAD" or status in (204, 304) or any(n == b"content-length" for n, _ in headers):
            self.framing = "raw"
        elif self.request.http_version == b"1.1":
            self.framing = "chunked"
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            self.framing = "close"
            self.keep_alive = False
        if not self.keep_alive:
            headers.append((b"connection", b"close"))
        self._to_visitor(_head(status, event.reason, headers))

    def _switch(self, event: h11.InformationalResponse) -> None:
        """A 101: write it, then relay bytes both ways."""
        conn, upstream = self.conn, self.upstream
        assert conn is not None and upstream is not None
        self.response_started = True
        self.record["status"] = 101
        headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
        upgrade = [v for n, v in event.headers if n == b"upgrade"]
        headers += [(b"connection", b"Upgrade")] + [(b"upgrade", v) for v in upgrade[:1]]
        asked = self.request is not None and b"upgrade" in self.fields
        if not asked or conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            self._fail(EdgeError(502, "the service switched protocols without the visitor asking"))
            return
        self._to_visitor(_head(101, event.reason, headers))
        self.relaying = True
        self._account(101)
        self._resume("pipelined")
        visitor_rest, _ = self._rest(conn)
        self.inbox = b""
        self._resume("inbox")
        service_rest, _ = upstream.conn.trailing_data
        if service_rest:
            self._to_visitor(service_rest)
        if visitor_rest:
            self._to_upstream(visitor_rest)

    def _to_visitor(self, data: bytes) -> None:
        if data and not self.closed:
            if self.tunnel is not None and self.tunnel.claim is not None:
                self.edge.stats(self.tunnel.name).bytes_out += len(data)
            if self.out is not None:
                self.out.append(data)
            else:
                self._send(data)

    def gather(self) -> None:
        """Hold what is written until `flush` (one write per turn, not per event)."""
        if self.out is None:
            self.out = []

    def flush(self) -> None:
        out, self.out = self.out, None
        if out and not self.closed:
            self._send(out[0] if len(out) == 1 else b"".join(out))

    def _send(self, data: bytes) -> None:
        if self.scheme == "http":  # a TCP socket: at once if nothing is queued
            write_now(self.transport, data)
        else:  # TLS: through the TLS layer, never the socket under it
            self.transport.write(data)  # type: ignore[union-attr]

    def _account(self, status: int) -> None:
        record = self.record
        record["status"] = status
        name = self.stats_name
        if name and name in self.edge.routes.stats:
            self.edge.routes.stats[name].statuses[f"{status // 100}xx"] += 1
        self.edge.access(record)

    def _finish(self) -> None:
        """The response is complete: the next request, or the end."""
        conn, upstream = self.conn, self.upstream
        assert conn is not None
        self._account(self.record["status"])
        self.request, self.tunnel, self.record, self.response_started = None, None, {}, False
        if upstream is not None and not upstream.reusable():
            self.upstream = None
            upstream.retire()
        if not self.keep_alive or self.framing == "close" or conn.their_state is not h11.DONE:
            self._close()
            return
        rest, closed = self._rest(conn)
        self.conn, self.inbox = None, b""
        self.buffer = rest
        self._resume("inbox")
        self._resume("pipelined")
        self._arm_head_timer()
        if closed:
            self.eof = True
        if rest or closed:
            self._next_request()

    def upstream_failed(self, upstream: Upstream, why: str) -> None:
        """The stream ended before a response did, or (between requests) the
        service closed it: our half ends too (FIN), so the stream closes;
        a request waiting for it gets 502."""
        if upstream is not self.upstream:
            upstream.retire()
            return
        if self.relaying or self.response_started:
            self._close(abort=not self.relaying)  # resets the stream
            return
        self.upstream = None
        upstream.retire()
        if self.request is not None:
            self._fail(EdgeError(502, f"the tunnel's service did not answer ({why})"))

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
        if self.record:
            self.record["bytes"] = len(body)
            self._account(status)
        self.flush()
        if not self.closed:
            self.transport.write(head + b"\r\n" + (b"" if self._is_head() else body))  # type: ignore[union-attr]
        self._close()

    def _is_head(self) -> bool:
        return self.request is not None and self.request.method == b"HEAD"

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
            event="http_refused", host=self.record.get("host", "-"), scheme=self.scheme,
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
            transport.abortConnection()  # type: ignore[attr-defined]
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


class Upstream:
    """The client end of one stream to a tunnel, as the stream's LocalPort:
    requests are written into it by h11 (client role), the service's
    response is parsed from it and handed to the visitor."""

    def __init__(self, visitor: HttpVisitor, tunnel: HostTunnel, stream: Stream) -> None:
        self.visitor = visitor
        self.tunnel = tunnel
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.ready = False
        self.retired = False

    def reusable(self) -> bool:
        return (
            not self.retired and not self.stream.closed and self.tunnel.claim is not None
            and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        )

    def send(self, event: Any) -> None:
        try:
            data = self.conn.send(event)
        except h11.LocalProtocolError as e:
            self.visitor._fail(EdgeError(400, f"the request cannot be passed on: {e}"))
            return
        if data:
            self.stream.local_data(data)

    def retire(self) -> None:
        """No more requests through this stream: end our half, drop what comes."""
        if self.retired:
            return
        self.retired = True
        if not self.stream.closed:
            self.stream.local_eof()

    # ------------------------------------------------------------ LocalPort

    def bind(self, stream: Stream) -> None:
        self.stream = stream
        self.ready = True

    def write(self, data: bytes) -> None:
        self._contained(self._received, data)

    def _contained(self, f: Callable[..., None], *args: Any) -> None:
        """Run `f`, called from the control link's frame handling: a bug in
        the edge ends this visitor and its stream, never the client's session."""
        try:
            f(*args)
        except Exception:
            self.visitor.log.failure(
                "the HTTP edge failed on a response for {host} (a bug); closing that visitor", Failure(),
                host=self.tunnel.name if self.tunnel.claim is not None else "?", event="http_edge_error",
            )
            self.retired = True
            if not self.stream.closed:
                self.stream.reset(ResetCode.ABORTED, "the server's HTTP edge failed")
            self.visitor._close(abort=True)

    def _received(self, data: bytes) -> None:
        if self.retired:
            return
        visitor = self.visitor
        if visitor.relaying:
            visitor._to_visitor(data)
            return
        self.conn.receive_data(data)
        visitor.gather()
        try:
            self._pump()
        finally:
            visitor.flush()

    def _pump(self) -> None:
        while not self.retired and not self.visitor.relaying:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                self.stream.reset(ResetCode.ABORTED, "malformed response")
                self.visitor.upstream_failed(self, f"malformed response: {e}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                self.visitor.upstream_failed(self, "it closed the connection")
                return
            self.visitor.upstream_event(event)

    def half_close(self) -> None:
        self._contained(self._eof)

    def _eof(self) -> None:
        if self.retired:
            return
        if self.visitor.relaying:
            self.visitor.relay_eof()
            return
        self.conn.receive_data(b"")
        self._pump()

    def abort(self) -> None:
        if not self.retired:
            self.retired = True
            self.visitor.upstream_failed(self, "the tunnel's connection was reset")

    def close(self) -> None:
        if not self.retired and self.visitor.relaying:
            self.visitor.relay_done()

    def pause_reading(self) -> None:
        if not self.retired:
            self.visitor._pause("stream")

    def resume_reading(self) -> None:
        self.visitor._resume("stream")
        if not self.retired and not self.visitor.relaying:
            self.visitor._pump()


def _head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A response head as the visitor gets it (HTTP/1.1)."""
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason or REASONS.get(status, "").encode())]
    lines += [b"%b: %b\r\n" % (name, value) for name, value in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


def _response_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    tokens = set()
    for name, value in headers:
        if name == b"connection":
            tokens |= {t.strip().lower() for t in value.split(b",")}
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in tokens]


# ---------------------------------------------------------------- the HTTPS port


@implementer(IOpenSSLContextFactory)
class _ContextFactory:
    """The old-style context factory TLSMemoryBIOFactory takes: one context."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def getContext(self) -> Any:
        return self.context


@implementer(IHalfCloseableProtocol)
class SniRouter(Protocol):
    """A connection on the --https port: read its ClientHello's SNI
    (bounded in size and time), then pass the raw bytes to a "tls" tunnel of
    that name, or terminate TLS with the name's certificate and serve HTTP;
    with neither, answer an unrecognized_name alert."""

    log = Logger()

    def __init__(self, edge: HttpEdge) -> None:
        self.edge = edge
        self.buffer = b""
        self.inner: Protocol | None = None
        self.timer: Any = None

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.timer = self.edge.reactor.callLater(self.edge.settings.request_head_timeout, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        try:
            hello = parse_client_hello(self.buffer)
        except NotClientHello as e:
            self.log.debug("not TLS on the https port: {why}", why=str(e), event="https_refused")
            self._stop_timer()
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if hello is None:
            return
        self._stop_timer()
        name = host_of(hello.server_name) if hello.server_name else None
        tunnel = self.edge.route(name)
        if name is not None and tunnel is not None and tunnel.kind == "tls":
            self._pass_through(tunnel)
            return
        certificates = self.edge.certificates
        context = certificates.context_for(name) if certificates is not None and name else None
        if context is None:
            self.transport.write(UNRECOGNIZED_NAME_ALERT)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        assert name is not None
        factory = TLSMemoryBIOFactory(_ContextFactory(context), False, HttpFactory(self.edge, "https", name))
        self._hand_to(factory.buildProtocol(self.transport.getPeer()))  # type: ignore[union-attr]

    def _pass_through(self, tunnel: HostTunnel) -> None:
        self.edge.stats(tunnel.name).tls_passthrough += 1
        carry = getattr(tunnel, "carry", None)  # held at another fleet member: its edge carries the bytes
        if carry is not None:
            self._hand_to(carry())
            return
        why = tunnel.room()
        peer = list(host_port(self.transport.getPeer()))  # type: ignore[union-attr]
        local = list(host_port(self.transport.getHost()))  # type: ignore[union-attr]
        stream = tunnel.open_stream(peer, local) if why is None else None
        if stream is None:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._hand_to(StreamProtocol(stream))

    def _hand_to(self, inner: Protocol) -> None:
        data, self.buffer = self.buffer, b""
        self.inner = inner
        inner.makeConnection(self.transport)
        if data:
            inner.dataReceived(data)

    def _stop_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def readConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self._stop_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)


class HttpsFactory(Factory):
    noisy = False

    def __init__(self, edge: HttpEdge) -> None:
        self.edge = edge

    def buildProtocol(self, addr: Any) -> Protocol:
        return SniRouter(self.edge)


def edge_factories(edge: HttpEdge) -> dict[str, Callable[[], Factory]]:
    """The factories of the shared ports, by option."""
    return {"http": lambda: HttpFactory(edge, "http"), "https": lambda: HttpsFactory(edge)}
