"""The service's side of the HTTP edge: one stream to a tunnel's client, as
the stream's LocalPort (rtunnel.mux `LocalPort`).

Requests go in as bytes the visitor's side wrote (`send_head`, `send_body`,
`end_request`); the response comes back as stream data and is framed here
(rtunnel.server.httpmessages): the head parsed in one pass, then the body
passed to the visitor as it arrives, counted down by Content-Length, read
through its chunks, or until the service closes. No per-piece events: a
1 KiB response is one head parse and one slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from rtunnel.mux import Stream
from rtunnel.server.httpmessages import (
    HEAD_END,
    MAX_RESPONSE_HEAD,
    BadResponse,
    ChunkedReader,
    ResponseHead,
    parse_response_head,
)
from rtunnel.wire import ResetCode

if TYPE_CHECKING:
    from rtunnel.server.hostnames import HostTunnel
    from rtunnel.server.httpedge import HttpVisitor

# What the response reader waits for
HEAD, LENGTH, CHUNKED, UNTIL_CLOSE, DONE = range(5)


class Upstream:
    """The client end of one stream to a tunnel: the requests of one visitor
    to one name, one at a time, and their responses."""

    def __init__(self, visitor: HttpVisitor, tunnel: HostTunnel, stream: Stream) -> None:
        self.visitor = visitor
        self.tunnel = tunnel
        self.stream = stream
        self.ready = False  # the stream is attached: requests can be written
        self.retired = False
        self.request_chunked = False  # the request body is sent chunked
        self.request_done = False
        self.response = HEAD
        self.left = 0  # Content-Length still to come
        self.chunks: ChunkedReader | None = None
        self.pending = b""  # the start of a response head
        self.spoiled = False  # the service sent bytes after its response: never reused

    def reusable(self) -> bool:
        """The last exchange is complete and the stream can carry the next request."""
        return (
            not self.retired and not self.spoiled and not self.stream.closed and self.tunnel.claim is not None
            and self.request_done and self.response == DONE
        )

    def next_cycle(self) -> None:
        """Another request on this stream (after `reusable`)."""
        self.request_done = False
        self.response = HEAD

    # ------------------------------------------------------------ the request

    def send_head(self, head: bytes, chunked: bool) -> None:
        self.request_chunked = chunked
        self.stream.local_data(head)

    def send_body(self, data: bytes) -> None:
        if self.request_chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self.stream.local_data(data)

    def end_request(self) -> None:
        self.request_done = True
        if self.request_chunked:
            self.stream.local_data(b"0\r\n\r\n")

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
        visitor.gather()
        try:
            self._response_bytes(data)
        except BadResponse as e:  # the visitor hears why (502), then the stream is reset
            self.retired = True
            visitor.upstream_failed(self, f"malformed response: {e}")
            if not self.stream.closed:
                self.stream.reset(ResetCode.ABORTED, "malformed response")
        finally:
            visitor.flush()

    def _response_bytes(self, data: bytes) -> None:
        """Frame the response bytes in `data` for the visitor."""
        visitor = self.visitor
        while data and not self.retired and not visitor.relaying and not visitor.closed:
            state = self.response
            if state == LENGTH:
                left = self.left
                if len(data) <= left:
                    piece, data = data, b""
                else:
                    piece, data = data[:left], data[left:]
                self.left = left - len(piece)
                visitor.response_body(piece)
                if not self.left:
                    self._done(data)
                    return
            elif state == HEAD:
                if self.pending:
                    data, self.pending = self.pending + data, b""
                end = HEAD_END.search(data)
                if end is None or end.end() > MAX_RESPONSE_HEAD:
                    if len(data) > MAX_RESPONSE_HEAD:
                        raise BadResponse(f"the response head is larger than {MAX_RESPONSE_HEAD} bytes")
                    self.pending = data
                    return
                cut = end.end()
                data = self._head(parse_response_head(data[:cut]), data[cut:])
            elif state == CHUNKED:
                assert self.chunks is not None
                pieces, rest = self.chunks.feed(data)
                for piece in pieces:
                    visitor.response_body(piece)
                if rest is None:
                    return
                self._done(rest)
                return
            elif state == UNTIL_CLOSE:
                visitor.response_body(data)
                return
            else:
                self._done(data)
                return

    def _head(self, head: ResponseHead, rest: bytes) -> bytes:
        """A response head: pass it on and set how its body is read; what of `rest` is left to read."""
        visitor = self.visitor
        status = head.status
        if status < 200:
            if status == 101:
                visitor.switch(head, rest)
                return b""
            visitor.informational(head)
            return rest  # another head follows
        if status in (204, 304) or visitor.is_head_request():
            visitor.response_head(head, has_body=False)
            self._done(rest)
            return b""
        visitor.response_head(head, has_body=True)
        if head.chunked:
            self.response, self.chunks = CHUNKED, ChunkedReader()
        elif head.length is not None:
            self.response, self.left = LENGTH, head.length
            if not head.length:
                self._done(rest)
                return b""
        else:
            self.response = UNTIL_CLOSE
        return rest

    def _done(self, extra: bytes) -> None:
        """The response is complete; `extra` bytes after it mean the service is
        out of step with its requests: the stream is not used again."""
        self.response = DONE
        self.chunks = None
        if extra:
            self.spoiled = True
        if not self.retired:
            self.visitor.response_end(self)
        if extra:
            self.retire()

    def half_close(self) -> None:
        self._contained(self._eof)

    def _eof(self) -> None:
        if self.retired:
            return
        visitor = self.visitor
        if visitor.relaying:
            visitor.relay_eof()
            return
        if self.response == UNTIL_CLOSE:  # the body's end; the stream carries no more requests
            self.spoiled = True
            visitor.gather()
            try:
                self._done(b"")
            finally:
                visitor.flush()
            return
        why = "it closed the connection" if self.response in (HEAD, DONE) and not self.pending else (
            "it closed the connection in the middle of a response")
        visitor.upstream_failed(self, why)

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
