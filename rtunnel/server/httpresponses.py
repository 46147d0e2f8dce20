"""The responses of a visitor connection (part of
`rtunnel.server.httpedge.HttpVisitor`), as rtunnel.server.httpupstream
hands them over: each head framed for the visitor (the service's own
Content-Length kept; otherwise chunked to HTTP/1.1, until close to
HTTP/1.0), bodies passed on, gathered and written once per reactor turn;
a 101 turns the connection into a byte relay; the end of a response
accounts it and reads the next request."""

from __future__ import annotations

import h11

from rtunnel.server.httpmessages import EdgeError, ResponseHead
from rtunnel.server.httpstate import VisitorState
from rtunnel.server.httpupstream import Upstream
from rtunnel.transports import write_now

STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 6)}


class Responses(VisitorState):
    """HttpVisitor's response steps (called by its Upstream)."""

    def is_head_request(self) -> bool:
        return self.request is not None and self.request.method == b"HEAD"

    def response_head(self, head: ResponseHead, has_body: bool) -> None:
        """The service's response head, framed for the visitor: its own
        Content-Length kept; otherwise chunked (HTTP/1.1) or until close."""
        request = self.request
        if self.conn is None or self.closed or request is None:
            return
        self.response_started = True
        self.status = head.status
        extra: list[bytes] = []
        if not has_body or head.length is not None:
            self.framing = "raw"
            if head.length is not None:
                extra.append(b"content-length: %d" % head.length)
        elif request.http_version == b"1.1":
            self.framing = "chunked"
            extra.append(b"transfer-encoding: chunked")
        else:
            self.framing = "close"
            self.keep_alive = False
        if not self.keep_alive:
            extra.append(b"connection: close")
        self._to_visitor(head.to_visitor(extra))

    def response_body(self, data: bytes) -> None:
        if self.closed:
            return
        self.sent += len(data)
        if self.framing == "chunked":
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._to_visitor(data)

    def response_end(self, upstream: Upstream) -> None:
        if self.conn is None or self.closed or upstream is not self.upstream:
            return
        if self.framing == "chunked":
            self._to_visitor(b"0\r\n\r\n")
        self._finish()

    def informational(self, head: ResponseHead) -> None:
        """A 1xx other than 101 (100 Continue, 103 Early Hints): passed on; the response follows."""
        if not self.closed:
            self._to_visitor(head.to_visitor([]))

    def switch(self, head: ResponseHead, rest: bytes) -> None:
        """A 101: write it, then relay bytes both ways."""
        conn, upstream = self.conn, self.upstream
        if conn is None or upstream is None or self.closed:
            return
        asked = self.request is not None and b"upgrade" in self.fields
        if not asked or conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            self._fail(EdgeError(502, "the service switched protocols without the visitor asking"))
            return
        self.response_started = True
        self.status = 101
        extra = [b"connection: Upgrade"] + ([b"upgrade: " + head.upgrade] if head.upgrade else [])
        self._to_visitor(head.to_visitor(extra))
        self.relaying = True
        self._account(101)
        self._resume("pipelined")
        visitor_rest, _ = self._rest(conn)
        self.inbox = b""
        self._resume("inbox")
        if rest:
            self._to_visitor(rest)
        if visitor_rest:
            self._to_upstream(visitor_rest)

    def _to_visitor(self, data: bytes) -> None:
        if data and not self.closed:
            if self.stats is not None and self.tunnel is not None and self.tunnel.claim is not None:
                self.stats.bytes_out += len(data)
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
            self.transport.write(data)

    def _account(self, status: int) -> None:
        """Count the response (and log it, with --access-log)."""
        name = self.stats_name
        routes = self.edge.routes
        if name and name in routes.stats:
            routes.stats[name].statuses[STATUS_CLASSES.get(status // 100) or f"{status // 100}xx"] += 1
        if self.edge.access_log and self.request is not None:
            request, fields = self.request, self.fields
            self.edge.access({
                "time": self.started, "client": self.peer[0], "method": request.method.decode("latin-1"),
                "target": request.target.decode("latin-1")[:2000], "host": self.host_name, "status": status,
                "bytes": self.sent, "referer": fields.get(b"referer", b"-").decode("latin-1") or "-",
                "user_agent": fields.get(b"user-agent", b"-").decode("latin-1") or "-", "scheme": self.scheme,
            })

    def _finish(self) -> None:
        """The response is complete: the next request, or the end."""
        conn, upstream = self.conn, self.upstream
        assert conn is not None
        self._account(self.status)
        self.request, self.tunnel, self.stats, self.response_started = None, None, None, False
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
