"""Frame codec: bytes <-> frames. Pure, no I/O, no Twisted.

Every size limit of the wire format is enforced here: a frame longer than the
receiver's maximum is rejected from its header alone, before its body is
buffered. See docs/protocol.md for the format.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
WINDOW_BODY = struct.Struct(">QI")
RESUME_HEAD = struct.Struct(">QI")
RESUME_ENTRY = struct.Struct(">IQQ")
DATAGRAM_HEAD = struct.Struct(">II")  # tunnel, flow

HANDSHAKE_MAX_FRAME = 65536
DEFAULT_MAX_FRAME = 1 << 20
MIN_MAX_FRAME = 16384
MAX_U32 = (1 << 32) - 1
MAX_U64 = (1 << 64) - 1

FLAG_PONG = 0x01
FLAG_ADDRESS = 0x01  # on DATAGRAM (server -> client): the visitor's address follows the flow id
MAX_REASON = 1024  # bytes of UTF-8 in an RST/GOAWAY/ERROR reason

# HELLO's fields (docs/protocol.md "Handshake")
PROTOCOL_NAME = "rtunnel"
MAX_TOKEN = 1024  # bytes of UTF-8
MAX_VERSIONS = 16
MAX_VERSION = 0xFFFF
SESSION_ID_HEX = 32  # a session id: 16 random bytes in lower-case hex
SESSION_SECRET_HEX = 64  # its secret: 32 random bytes in lower-case hex


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW = 1
    OPEN = 2
    FIN = 3
    RST = 4
    PING = 5
    ACK = 6
    HELLO = 7
    WELCOME = 8
    RESUME = 9
    BIND = 10
    BOUND = 11
    BIND_FAILED = 12
    GOAWAY = 13
    ERROR = 14
    UNBIND = 15
    DATAGRAM = 16


#: Frames kept until the peer acknowledges them, and replayed on resume.
RELIABLE = frozenset(
    {
        FrameType.OPEN,
        FrameType.FIN,
        FrameType.RST,
        FrameType.BIND,
        FrameType.BOUND,
        FrameType.BIND_FAILED,
        FrameType.UNBIND,
    }
)

#: Frames that belong to a stream (id != 0); all others use stream 0.
STREAM_FRAMES = frozenset(
    {FrameType.DATA, FrameType.WINDOW, FrameType.OPEN, FrameType.FIN, FrameType.RST}
)

#: Frames whose body is a JSON object.
JSON_FRAMES = frozenset(
    {
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.BIND,
        FrameType.BOUND,
        FrameType.BIND_FAILED,
        FrameType.UNBIND,
    }
)


class ErrorCode(enum.IntEnum):
    """Codes of ERROR and GOAWAY frames."""

    PROTOCOL_ERROR = 1
    UNSUPPORTED_VERSION = 2
    AUTH_FAILED = 3
    LIMIT_EXCEEDED = 4
    INTERNAL = 5
    FLOW_CONTROL = 6
    SHUTDOWN = 7
    MOVED = 8  # the session lives at another fleet member: reason "HOST:PORT text" (rtunnel.moved)


class ResetCode(enum.IntEnum):
    """Codes of RST frames."""

    REFUSED = 1
    UNREACHABLE = 2
    TIMEOUT = 3
    ABORTED = 4
    EXPIRED = 5
    LIMIT = 6
    SHUTDOWN = 7


class FrameError(Exception):
    """The byte stream is not valid rtunnel framing; the link must end."""


class HandshakeError(FrameError):
    """A handshake message with a missing or invalid field; the message
    names the field and says what it must be."""


class Frame(NamedTuple):
    """One decoded frame (a named tuple: made once per frame, cheaply)."""

    type: FrameType
    flags: int
    stream_id: int
    body: bytes


@dataclass(frozen=True, slots=True)
class ResumeEntry:
    stream_id: int
    received: int
    limit: int


@dataclass(frozen=True, slots=True)
class ResumeState:
    reliable_received: int
    streams: tuple[ResumeEntry, ...]


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """HELLO's `resume`: the session the client holds and its secret."""

    session: str
    secret: str


@dataclass(frozen=True, slots=True)
class Hello:
    """The client's first message, every field checked (`decode_hello`):
    whatever a peer sends before it is authenticated reaches the server
    only as one of these, or as a HandshakeError."""

    versions: tuple[int, ...]
    token: str | None = None  # None: absent (a TLS client certificate may authenticate)
    max_frame: int = DEFAULT_MAX_FRAME
    resume: ResumeRequest | None = None
    follows_moved: bool = False  # "accepts": ["moved"]: the client follows ERROR/GOAWAY MOVED

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"protocol": PROTOCOL_NAME, "versions": list(self.versions), "max_frame": self.max_frame}
        if self.token is not None:
            body["token"] = self.token
        if self.resume is not None:
            body["resume"] = {"session": self.resume.session, "secret": self.resume.secret}
        if self.follows_moved:
            body["accepts"] = ["moved"]
        return body


# ---------------------------------------------------------------- encoding

#: One encoder for every JSON body (json.dumps with separators builds a new
#: encoder per call; OPEN is encoded once per tunnelled connection).
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def encode(ftype: FrameType, stream_id: int, body: bytes = b"", flags: int = 0) -> bytes:
    """Return one whole frame (header and body in one bytes object)."""
    return HEADER.pack(ftype, flags, stream_id, len(body)) + body


def header(ftype: FrameType, stream_id: int, length: int, flags: int = 0) -> bytes:
    return HEADER.pack(ftype, flags, stream_id, length)


def encode_json(ftype: FrameType, obj: dict[str, Any]) -> bytes:
    return encode(ftype, 0, _COMPACT_JSON.encode(obj).encode())


def encode_window(stream_id: int, consumed: int, window: int) -> bytes:
    return encode(FrameType.WINDOW, stream_id, WINDOW_BODY.pack(consumed, window))


def encode_open(stream_id: int, tunnel_id: int, info: dict[str, Any]) -> bytes:
    body = U32.pack(tunnel_id) + _COMPACT_JSON.encode(info).encode()
    return encode(FrameType.OPEN, stream_id, body)


def encode_fin(stream_id: int, final_offset: int) -> bytes:
    return encode(FrameType.FIN, stream_id, U64.pack(final_offset))


def encode_coded(ftype: FrameType, stream_id: int, code: int, reason: str) -> bytes:
    """RST, GOAWAY and ERROR: a u16 code and a UTF-8 reason."""
    return encode(ftype, stream_id, U16.pack(code) + _truncate_utf8(reason, MAX_REASON))


def _truncate_utf8(text: str, limit: int) -> bytes:
    """At most `limit` bytes of UTF-8, never cutting a character in half."""
    data = text.encode()
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()


def encode_ping(opaque: int, pong: bool = False) -> bytes:
    return encode(FrameType.PING, 0, U64.pack(opaque), FLAG_PONG if pong else 0)


def encode_ack(received: int) -> bytes:
    return encode(FrameType.ACK, 0, U64.pack(received))


def encode_resume(state: ResumeState) -> bytes:
    parts = [RESUME_HEAD.pack(state.reliable_received, len(state.streams))]
    parts.extend(RESUME_ENTRY.pack(e.stream_id, e.received, e.limit) for e in state.streams)
    return encode(FrameType.RESUME, 0, b"".join(parts))


#: A DATAGRAM's frame header and head without an address, packed at once.
_DATAGRAM_FRAME_HEAD = struct.Struct(">BBIIII")
_DATAGRAM_TYPE = int(FrameType.DATAGRAM)


def datagram_header(
    tunnel_id: int, flow_id: int, payload_size: int, address: tuple[str, int] | None = None,
) -> bytes:
    """The frame header and DATAGRAM head of a datagram of `payload_size`
    bytes (the payload follows unjoined): tunnel and flow id, and with
    `address` (an IP literal and a port) the FLAG_ADDRESS block."""
    if address is None:  # all but a flow's first datagram on a link: one pack
        return _DATAGRAM_FRAME_HEAD.pack(_DATAGRAM_TYPE, 0, 0, DATAGRAM_HEAD.size + payload_size, tunnel_id, flow_id)
    head = DATAGRAM_HEAD.pack(tunnel_id, flow_id) + encode_address(*address)
    return HEADER.pack(FrameType.DATAGRAM, FLAG_ADDRESS, 0, len(head) + payload_size) + head


def encode_datagram(
    tunnel_id: int, flow_id: int, payload: bytes, address: tuple[str, int] | None = None,
) -> bytes:
    """One whole DATAGRAM frame."""
    return datagram_header(tunnel_id, flow_id, len(payload), address) + payload


def encode_address(host: str, port: int) -> bytes:
    """A DATAGRAM's address block: family (4 or 6), the address, the port.
    An IPv4-mapped IPv6 address is sent as IPv4."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bytes((ip.version,)) + ip.packed + U16.pack(port)


#: The largest DATAGRAM head: tunnel, flow and an IPv6 address block.
DATAGRAM_OVERHEAD = DATAGRAM_HEAD.size + 1 + 16 + U16.size


def max_datagram_payload(peer_max_frame: int) -> int:
    """The largest payload a DATAGRAM to a peer with `peer_max_frame` may
    carry, whatever its head (a UDP datagram is at most 65 507 bytes)."""
    return min(peer_max_frame - DATAGRAM_OVERHEAD, MAX_UDP_PAYLOAD)


MAX_UDP_PAYLOAD = 65507  # the largest UDP payload over IPv4


class Datagram(NamedTuple):
    """A decoded DATAGRAM: `address` is the visitor's (host, port), present
    only when the server sent FLAG_ADDRESS. (A named tuple: one is made per
    datagram, cheaply.)"""

    tunnel: int
    flow: int
    address: tuple[str, int] | None
    payload: bytes


def decode_datagram(frame: Frame) -> Datagram:
    """Parse a DATAGRAM body; FrameError for a malformed address block."""
    body = frame.body
    tunnel, flow = DATAGRAM_HEAD.unpack_from(body)
    if not frame.flags:
        return Datagram(tunnel, flow, None, bytes(body[DATAGRAM_HEAD.size:]))
    pos = DATAGRAM_HEAD.size
    address = None
    if frame.flags & FLAG_ADDRESS:
        family = body[pos] if len(body) > pos else 0
        size = {4: 4, 6: 16}.get(family)
        if size is None:
            raise FrameError(f"DATAGRAM address family must be 4 or 6, got {family}")
        end = pos + 1 + size + U16.size
        if len(body) < end:
            raise FrameError(f"DATAGRAM body of {len(body)} bytes is too short for its IPv{family} address")
        raw = bytes(body[pos + 1:pos + 1 + size])
        host = str(ipaddress.IPv4Address(raw) if family == 4 else ipaddress.IPv6Address(raw))
        (port,) = U16.unpack_from(body, pos + 1 + size)
        address = (host, port)
        pos = end
    return Datagram(tunnel, flow, address, bytes(body[pos:]))


# ---------------------------------------------------------------- decoding


def decode_json(frame: Frame) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(frame.body).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FrameError(f"{frame.type.name} body is not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"{frame.type.name} body must be a JSON object")
    return obj


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8_size(text: str) -> int | None:
    """Bytes of `text` in UTF-8; None if it cannot be encoded (a lone
    surrogate, which JSON's \\udXXX escapes can carry)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return None


def _hex_field(value: object, size: int, name: str) -> str:
    if not isinstance(value, str) or len(value) != size or not all(c in "0123456789abcdef" for c in value):
        raise HandshakeError(f"HELLO resume.{name} must be {size} lower-case hex digits, as WELCOME gave it")
    return value


def decode_hello(frame: Frame) -> Hello:
    """Parse and check every field of a HELLO (docs/protocol.md); raise
    HandshakeError (or FrameError for a body that is no JSON object) saying
    which field is wrong and what it must be. Unknown keys are ignored."""
    body = decode_json(frame)
    if body.get("protocol") != PROTOCOL_NAME:
        raise HandshakeError(
            f"HELLO protocol must be {PROTOCOL_NAME!r}: this is an rtunnel server, and the peer is "
            "not an rtunnel client"
        )
    versions = body.get("versions")
    if (
        not isinstance(versions, list)
        or not 1 <= len(versions) <= MAX_VERSIONS
        or not all(_is_int(v) and 1 <= v <= MAX_VERSION for v in versions)
    ):
        raise HandshakeError(
            f"HELLO versions must be a list of 1 to {MAX_VERSIONS} protocol versions "
            f"(integers 1..{MAX_VERSION})"
        )
    token = body.get("token")
    if token is not None:
        size = _utf8_size(token) if isinstance(token, str) else None
        if size is None or size > MAX_TOKEN:
            raise HandshakeError(f"HELLO token must be a string of at most {MAX_TOKEN} bytes of UTF-8")
    max_frame = body.get("max_frame", DEFAULT_MAX_FRAME)
    if not _is_int(max_frame) or not MIN_MAX_FRAME <= max_frame <= MAX_U32:
        raise HandshakeError(f"HELLO max_frame must be an integer from {MIN_MAX_FRAME} to {MAX_U32}")
    resume = body.get("resume")
    request = None
    if resume is not None:
        if not isinstance(resume, dict):
            raise HandshakeError("HELLO resume must be an object {\"session\": ..., \"secret\": ...}")
        request = ResumeRequest(
            _hex_field(resume.get("session"), SESSION_ID_HEX, "session"),
            _hex_field(resume.get("secret"), SESSION_SECRET_HEX, "secret"),
        )
    accepts = body.get("accepts", [])
    if not isinstance(accepts, list) or len(accepts) > MAX_VERSIONS:
        raise HandshakeError(f"HELLO accepts must be a list of at most {MAX_VERSIONS} strings")
    return Hello(tuple(versions), token, max_frame, request, "moved" in accepts)


def decode_window(frame: Frame) -> tuple[int, int]:
    return WINDOW_BODY.unpack(frame.body)


def decode_open(frame: Frame) -> tuple[int, dict[str, Any]]:
    (tunnel_id,) = U32.unpack_from(frame.body)
    info = decode_json(Frame(frame.type, 0, 0, bytes(frame.body[4:])))
    return tunnel_id, info


def decode_u64(frame: Frame) -> int:
    return U64.unpack(frame.body)[0]


def decode_coded(frame: Frame) -> tuple[int, str]:
    (code,) = U16.unpack_from(frame.body)
    return code, bytes(frame.body[2:]).decode("utf-8", "replace")


def decode_resume(frame: Frame) -> ResumeState:
    body = frame.body
    received, count = RESUME_HEAD.unpack_from(body)
    if len(body) != RESUME_HEAD.size + count * RESUME_ENTRY.size:
        raise FrameError(f"RESUME body says {count} streams but has {len(body)} bytes")
    entries = tuple(
        ResumeEntry(*RESUME_ENTRY.unpack_from(body, RESUME_HEAD.size + i * RESUME_ENTRY.size))
        for i in range(count)
    )
    return ResumeState(received, entries)


#: Exact or minimum body sizes, checked by the decoder for every frame.
_EXACT_SIZE = {
    FrameType.WINDOW: WINDOW_BODY.size,
    FrameType.FIN: U64.size,
    FrameType.PING: U64.size,
    FrameType.ACK: U64.size,
}
_MIN_SIZE = {
    FrameType.DATA: 1,
    FrameType.OPEN: U32.size + 2,
    FrameType.RST: U16.size,
    FrameType.GOAWAY: U16.size,
    FrameType.ERROR: U16.size,
    FrameType.RESUME: RESUME_HEAD.size,
    FrameType.HELLO: 2,
    FrameType.WELCOME: 2,
    FrameType.BIND: 2,
    FrameType.BOUND: 2,
    FrameType.BIND_FAILED: 2,
    FrameType.UNBIND: 2,
    FrameType.DATAGRAM: DATAGRAM_HEAD.size,
}


def check_frame(ftype: FrameType, flags: int, stream_id: int, length: int) -> None:
    """Raise FrameError if a header is invalid for its type (size, flags, id)."""
    if flags and not (ftype in (FrameType.PING, FrameType.DATAGRAM) and flags == FLAG_PONG):
        raise FrameError(f"{ftype.name} frame has unknown flags 0x{flags:02x}")
    if (ftype in STREAM_FRAMES) != (stream_id != 0):
        where = "a stream id" if ftype in STREAM_FRAMES else "stream id 0"
        raise FrameError(f"{ftype.name} frame must carry {where}, got {stream_id}")
    exact = _EXACT_SIZE.get(ftype)
    if exact is not None and length != exact:
        raise FrameError(f"{ftype.name} body must be {exact} bytes, got {length}")
    minimum = _MIN_SIZE.get(ftype, 0)
    if length < minimum:
        raise FrameError(f"{ftype.name} body must be at least {minimum} bytes, got {length}")


#: Per type byte: (type, exact body size or -1, minimum body size, whether it
#: belongs to a stream); None for a byte that is no frame type. The decoder's
#: fast check; check_frame says precisely what is wrong.
_RULES: list[tuple[FrameType, int, int, bool] | None] = [None] * 256
for _type in FrameType:
    _RULES[_type] = (_type, _EXACT_SIZE.get(_type, -1), _MIN_SIZE.get(_type, 0), _type in STREAM_FRAMES)
del _type


class FrameDecoder:
    """Incremental decoder: feed bytes, get frames.

    The maximum body size may be raised after the handshake with
    `max_frame`. A header announcing a longer body raises FrameError at once.
    """

    def __init__(self, max_frame: int = HANDSHAKE_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Yield every complete frame in the bytes received so far.

        Bytes that arrive with nothing buffered are decoded where they are;
        only an incomplete frame's bytes are kept for the next feed."""
        buf = self._buffer
        if buf or type(data) is not bytes:
            buf += data
            source: bytes | bytearray = buf
        else:
            source = data
        unpack = HEADER.unpack_from
        rules = _RULES
        pos = 0
        end = len(source)
        try:
            while end - pos >= HEADER_SIZE:
                raw_type, flags, stream_id, length = unpack(source, pos)
                rule = rules[raw_type]
                if rule is None:
                    raise FrameError(f"unknown frame type {raw_type}")
                ftype, exact, minimum, on_stream = rule
                if length > self.max_frame:  # read each time: the handshake raises it
                    raise FrameError(
                        f"{ftype.name} frame of {length} bytes exceeds the maximum "
                        f"of {self.max_frame}"
                    )
                if flags or (stream_id != 0) is not on_stream or length < minimum or (
                    exact >= 0 and length != exact
                ):
                    check_frame(ftype, flags, stream_id, length)  # raises unless a PONG
                if end - pos - HEADER_SIZE < length:
                    break
                start = pos + HEADER_SIZE
                pos = start + length
                if source is buf:
                    with memoryview(buf) as view:  # one copy of the body, not two
                        body = bytes(view[start:pos])
                else:
                    body = data[start:pos]  # source is data itself here
                yield Frame(ftype, flags, stream_id, body)
        finally:
            if source is buf:
                del buf[:pos]
            elif pos < end:
                buf += memoryview(source)[pos:]


# --- tunnel messages (server)


def _u32_field(body: dict[str, Any], message: str, key: str, top: int = MAX_U32) -> int:
    value = body.get(key)
    if not _is_int(value) or not 0 <= value <= top:
        raise FrameError(f"{message} {key} must be an integer 0..{top}")
    return value


#: Tunnel kinds a BIND may ask for (its "kind"; absent means "tcp"). A
#: server announces the ones it serves in WELCOME's "features"; a BIND of a
#: kind the server does not serve gets BIND_FAILED "unsupported".
TUNNEL_KINDS = ("tcp", "udp", "http", "tls")
MAX_HOSTNAME = 253  # characters of a DNS name (RFC 1035), after normalisation


@dataclass(frozen=True, slots=True)
class Bind:
    """BIND: the client asks for a public name as its tunnel `tunnel`.

    `kind` "tcp" or "udp": a public port, `host` "" (absent or null on the
    wire) meaning the server's default address; whether `host` is an IP
    address the server decides (a BIND_FAILED, not a broken frame).
    `kind` "http" or "tls": a `hostname` (a label the server completes
    with its domain, or a full name); `host` and `port` are unused (0).
    An unknown kind parses (the server refuses it with BIND_FAILED)."""

    tunnel: int
    host: str
    port: int
    kind: str = "tcp"
    hostname: str = ""

    @classmethod
    def parse(cls, body: bytes) -> Bind:
        """Check every field; raise FrameError naming the one that is wrong."""
        obj = decode_json(Frame(FrameType.BIND, 0, 0, body))
        tunnel = _u32_field(obj, "BIND", "tunnel")
        kind = obj.get("kind", "tcp")
        if not isinstance(kind, str) or not kind:
            raise FrameError('BIND kind must be a non-empty string: "tcp", "udp", "http" or "tls"')
        host = obj.get("host") or ""
        if not isinstance(host, str):
            raise FrameError("BIND host must be a string: an IP address, or empty for the server's default")
        hostname = obj.get("hostname") or ""
        if not isinstance(hostname, str):
            raise FrameError("BIND hostname must be a string: a DNS name or a label of the server's domain")
        if kind in ("http", "tls"):
            if not hostname:
                raise FrameError(f'BIND of kind "{kind}" needs a "hostname"')
            return cls(tunnel, host, 0, kind, hostname)
        if kind not in TUNNEL_KINDS:
            return cls(tunnel, host, 0, kind, hostname)
        return cls(tunnel, host, _u32_field(obj, "BIND", "port", 65535), kind, hostname)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"tunnel": self.tunnel, "host": self.host, "port": self.port}
        if self.kind != "tcp":  # a BIND of a TCP port stays what servers before "kind" read
            body["kind"] = self.kind
        if self.hostname:
            body["hostname"] = self.hostname
        return body


@dataclass(frozen=True, slots=True)
class Unbind:
    """UNBIND: the client gives up its tunnel `tunnel` (a reload dropped it)."""

    tunnel: int

    @classmethod
    def parse(cls, body: bytes) -> Unbind:
        return cls(_u32_field(decode_json(Frame(FrameType.UNBIND, 0, 0, body)), "UNBIND", "tunnel"))

    def to_json(self) -> dict[str, Any]:
        return {"tunnel": self.tunnel}


# --- handshake and tunnel answers (client)
#
# What the client receives from the server, as typed values: each `parse`
# checks every field it reads and raises FrameError (HandshakeError for
# WELCOME) naming the field and saying what it must be; unknown keys are
# ignored. `to_json` gives the body a server sends.


def _welcome_hex(body: dict[str, Any], name: str, size: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or len(value) != size or not all(c in "0123456789abcdef" for c in value):
        raise HandshakeError(
            f"WELCOME {name} must be a string of {size} lower-case hex digits (the client sends it back "
            "to resume)"
        )
    return value


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server's answer to HELLO: the session to keep (and its secret, to
    resume it), whether the HELLO's resume was accepted, the version chosen
    and the largest frame body the server accepts (above 2**32-1 is taken
    as 2**32-1: no frame can be longer)."""

    session: str
    secret: str
    resumed: bool = False
    version: int = 1
    max_frame: int = DEFAULT_MAX_FRAME
    features: tuple[str, ...] = ("tcp",)  # the tunnel kinds the server serves

    @classmethod
    def parse(cls, frame: Frame) -> Welcome:
        body = decode_json(frame)
        session = _welcome_hex(body, "session", SESSION_ID_HEX)
        secret = _welcome_hex(body, "secret", SESSION_SECRET_HEX)
        resumed = body.get("resumed", False)
        if not isinstance(resumed, bool):
            raise HandshakeError("WELCOME resumed must be true or false")
        version = body.get("version", 1)
        if not _is_int(version) or not 1 <= version <= MAX_VERSION:
            raise HandshakeError(f"WELCOME version must be an integer from 1 to {MAX_VERSION}")
        max_frame = body.get("max_frame", DEFAULT_MAX_FRAME)
        if not _is_int(max_frame) or max_frame < MIN_MAX_FRAME:
            raise HandshakeError(f"WELCOME max_frame must be an integer >= {MIN_MAX_FRAME}")
        features = body.get("features", ["tcp"])  # servers before "features" serve TCP ports only
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise HandshakeError('WELCOME features must be a list of strings (tunnel kinds, e.g. ["tcp", "udp"])')
        return cls(session, secret, resumed, version, min(max_frame, MAX_U32), tuple(features))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "session": self.session, "secret": self.secret,
            "resumed": self.resumed, "max_frame": self.max_frame, "features": list(self.features),
        }

    def encode(self) -> bytes:
        """The whole WELCOME frame (it is sent before any session exists)."""
        return encode_json(FrameType.WELCOME, self.to_json())


@dataclass(frozen=True, slots=True)
class Bound:
    """BOUND: tunnel `tunnel` is served. A port ("tcp", "udp"): `host` is
    the address the server bound (None if the server did not say) and
    `port` the real port. A hostname ("http", "tls"): `hostname` is the
    full name claimed and `urls` the public addresses to print."""

    tunnel: int
    host: str | None
    port: int
    kind: str = "tcp"
    hostname: str = ""
    urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, frame: Frame) -> Bound:
        body = decode_json(frame)
        tunnel = _u32_field(body, "BOUND", "tunnel")
        kind = body.get("kind", "tcp")
        hostname = body.get("hostname", "")
        if not isinstance(kind, str) or not isinstance(hostname, str):
            raise FrameError("BOUND kind and hostname must be strings")
        port = body.get("port", 0 if kind in ("http", "tls") else None)
        if not _is_int(port) or not 0 <= port <= 65535:
            raise FrameError("BOUND port must be an integer from 0 to 65535")
        host = body.get("host")
        if host is not None and not isinstance(host, str):
            raise FrameError("BOUND host must be a string (an IP address)")
        urls = body.get("urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise FrameError("BOUND urls must be a list of strings")
        return cls(tunnel, host, port, kind, hostname, tuple(urls))

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"tunnel": self.tunnel, "port": self.port}
        if self.host is not None:
            body["host"] = self.host
        if self.kind != "tcp":
            body["kind"] = self.kind
        if self.hostname:
            body["hostname"] = self.hostname
        if self.urls:
            body["urls"] = list(self.urls)
        return body


@dataclass(frozen=True, slots=True)
class BindFailed:
    """BIND_FAILED: the server refused (or took back) tunnel `tunnel`.
    `code` says what the client does (docs/protocol.md; an unknown code
    means "retry later"), `message` names what to change ("" if none)."""

    tunnel: int
    code: str
    message: str = ""

    @classmethod
    def parse(cls, frame: Frame) -> BindFailed:
        body = decode_json(frame)
        tunnel = _u32_field(body, "BIND_FAILED", "tunnel")
        code = body.get("code", "")
        if not isinstance(code, str):
            raise FrameError("BIND_FAILED code must be a string (e.g. \"in_use\")")
        message = body.get("message", "")
        if not isinstance(message, str):
            raise FrameError("BIND_FAILED message must be a string")
        return cls(tunnel, code, message)

    def to_json(self) -> dict[str, Any]:
        return {"tunnel": self.tunnel, "code": self.code, "message": self.message}
