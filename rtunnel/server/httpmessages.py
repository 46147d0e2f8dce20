"""HTTP/1.1 messages at the edge, as bytes (pure functions and small
sans-IO readers, no Twisted): what a request head must not contain, the
pages the edge answers with, and the service's side: its response head
parsed in one pass and its body framed (RFC 9112 6.3) without an event per
piece, so body bytes are passed on as they come.

Requests are parsed by h11 (rtunnel.server.httpedge); responses come from
the tunnel's own service and are parsed here, strictly: a response the
edge cannot frame exactly (a bad status line, a header line that is not
`name: value`, obs-fold, a bare CR, Transfer-Encoding other than chunked,
Transfer-Encoding with Content-Length, disagreeing Content-Lengths, a bad
chunk) is refused (502), so the visitor never reads a response boundary
the edge did not see. A bare LF as a line end is tolerated in a response
head: the head is written again with CRLF, so the visitor sees the lines
the edge saw.
"""

from __future__ import annotations

import re

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"})
ACME_PREFIX = b"/.well-known/acme-challenge/"
REASONS = {
    400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 421: "Misdirected Request",
    431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 308: "Permanent Redirect", 200: "OK", 101: "Switching Protocols",
}
REASON_BYTES = {status: reason.encode() for status, reason in REASONS.items()}

MAX_RESPONSE_HEAD = 64 * 1024  # a service's response head, and a chunk-size or trailer line
HEAD_END = re.compile(rb"\n\r?\n")  # the blank line ending a head (CRLF, or a tolerated bare LF)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
# What sends a request head to check_head's line by line pass: a bare CR or LF, a line starting with
# whitespace or a colon, whitespace before a colon, a body's framing, a second Host.
SUSPECT_REQUEST = re.compile(
    rb"\r(?!\n)|(?<!\r)\n|\n[ \t:]|[ \t]:|\n(?:content-length|transfer-encoding)|(?s:\nhost:.*\nhost:)", re.I)
FIELD_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
# The response header lines read here (framing, hop-by-hop), not passed on as they are
FRAMING_LINE = re.compile(
    rb"\r\n(content-length|connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade):([^\r\n]*)",
    re.I)
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")


class EdgeError(Exception):
    """A request the edge answers itself, with `status` and a page saying `text`."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class BadResponse(Exception):
    """The service's response cannot be framed exactly (the message says how); the edge answers 502."""


def check_head(head: bytes) -> None:
    """Refuse what h11 would accept but a proxy must not pass on (request
    smuggling shapes, RFC 9112 2.2, 5.2, 6.1, 6.3); raise EdgeError(400).
    The usual head (CRLF only, no obs-fold, one Host, no body) costs one
    regular expression search; a head it finds suspect is read line by line."""
    if SUSPECT_REQUEST.search(head) is not None:
        _check_lines(head)


def _check_lines(head: bytes) -> None:
    """check_head's line by line pass, for a head its search found suspect (the error says which rule)."""
    if b"\n" in head.replace(b"\r\n", b""):
        raise EdgeError(400, "a line of the request ends in a bare LF; end every line with CRLF")
    if b"\r" in head.replace(b"\r\n", b""):
        raise EdgeError(400, "the request has a bare CR in its head (header injection?)")
    lengths = encodings = hosts = 0
    for line in head.split(b"\r\n")[1:]:
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


class ResponseHead:
    """A service's response head, parsed: the status, the reason, the header
    lines passed on (as the service wrote them, hop-by-hop ones and those
    its Connection names dropped), and the body's framing."""

    __slots__ = ("status", "reason", "block", "length", "chunked", "upgrade")

    def __init__(self, status: int, reason: bytes, block: bytes, length: int | None, chunked: bool,
                 upgrade: bytes | None) -> None:
        self.status = status
        self.reason = reason
        self.block = block  # the header lines passed on, each preceded by CRLF
        self.length = length  # Content-Length, if the service framed the body by it
        self.chunked = chunked  # Transfer-Encoding: chunked
        self.upgrade = upgrade  # the first Upgrade value (for a 101)

    def to_visitor(self, extra: list[bytes]) -> bytes:
        """The head as the visitor gets it: HTTP/1.1, CRLF, with `extra` lines appended."""
        reason = self.reason or REASON_BYTES.get(self.status, b"")
        tail = b"".join([b"\r\n" + line for line in extra]) if extra else b""
        return b"HTTP/1.1 %d %b%b%b\r\n\r\n" % (self.status, reason, self.block, tail)


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse `head` (through its blank line) in one pass; BadResponse if the
    edge cannot frame it exactly."""
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        head = head.replace(b"\r\n", b"\n")  # bare LF line ends: tolerated, written again with CRLF
        if b"\r" in head:
            raise BadResponse("a bare CR in the response head")
        head = head.replace(b"\n", b"\r\n")
    first = head.index(b"\r\n")
    status_line = STATUS_LINE.fullmatch(head, 0, first)
    if status_line is None:
        raise BadResponse(f"not an HTTP/1.x status line: {head[:min(first, 80)]!r}")
    end = len(head) - 2
    if FIELD_LINES.fullmatch(head, first + 2, end) is None:  # every line at once, in C
        for line in head[first + 2:-4].split(b"\r\n"):
            if FIELD_LINES.fullmatch(line + b"\r\n") is None:
                if line[:1] in (b" ", b"\t"):
                    raise BadResponse("obsolete line folding in the response head")
                raise BadResponse(f"a malformed header line in the response head: {line[:80]!r}")
    pieces: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    tokens: set[bytes] = set()
    upgrade: bytes | None = None
    start = first
    for found in FRAMING_LINE.finditer(head, first, end):
        pieces.append(head[start:found.start()])
        start = found.end()
        name = found[1].lower()
        if name == b"content-length":
            lengths.append(found[2])
        elif name == b"transfer-encoding":
            codings.append(found[2])
        elif name == b"connection":
            value = found[2].strip().lower()
            if value not in (b"keep-alive", b"close"):  # the usual values name no header
                tokens.update(t.strip() for t in value.split(b","))
        elif name == b"upgrade" and upgrade is None:
            upgrade = found[2].strip(b" \t")
    pieces.append(head[start:end - 2])
    block = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if tokens:
        tokens -= HOP_BY_HOP
        tokens.discard(b"close")
    if tokens:  # headers the service's Connection names are hop-by-hop too (RFC 9110 7.6.1)
        block = b"".join(b"\r\n" + line for line in block.split(b"\r\n")[1:]
                         if line.split(b":", 1)[0].lower() not in tokens)
    length = None
    chunked = False
    if codings:
        if lengths:
            raise BadResponse("the response has both Transfer-Encoding and Content-Length")
        if [c.strip().lower() for value in codings for c in value.split(b",")] != [b"chunked"]:
            raise BadResponse("the response has a transfer coding other than chunked")
        chunked = True
    elif lengths:
        if len(lengths) == 1 and b"," not in lengths[0]:
            value, values = lengths[0].strip(), set()
        else:
            values = {v.strip() for value in lengths for v in value.split(b",")}
            value = values.pop()
        if values or not value.isdigit() or len(value) > 18:
            raise BadResponse("the response's Content-Length is not one number")
        length = int(value)
    status = int(status_line[1])
    return ResponseHead(status, status_line[2] or b"", block, length, chunked, upgrade)


class ChunkedReader:
    """A chunked body (RFC 9112 7.1), read incrementally and bounded (a size
    or trailer line at most MAX_RESPONSE_HEAD): `feed` gives the body's data
    and, once the last chunk and the trailers are in, what follows them.
    Extensions and trailers are dropped."""

    SIZE, DATA, DATA_END, TRAILER = range(4)

    __slots__ = ("state", "left", "buffer")

    def __init__(self) -> None:
        self.state = self.SIZE
        self.left = 0
        self.buffer = b""

    def feed(self, data: bytes) -> tuple[list[bytes], bytes | None]:
        """The data in `data`, and None while the body goes on, else the bytes after its end."""
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            state = self.state
            if state == self.DATA:
                take = min(self.left, size - pos)
                out.append(data if take == size else data[pos:pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.state = self.DATA_END
            elif state == self.DATA_END:
                if size - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise BadResponse("a chunk of the response does not end with CRLF")
                pos += 2
                self.state = self.SIZE
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > MAX_RESPONSE_HEAD:
                        raise BadResponse("a chunk-size or trailer line of the response is too long")
                    break
                if state == self.SIZE:
                    line = CHUNK_SIZE.fullmatch(data, pos, end)
                    if line is None:
                        raise BadResponse("a bad chunk size in the response")
                    self.left = int(line[1], 16)
                    self.state = self.DATA if self.left else self.TRAILER
                elif end == pos:  # the blank line after the trailers: the body's end
                    return out, data[end + 2:]
                pos = end + 2
        self.buffer = data[pos:]
        return out, None
