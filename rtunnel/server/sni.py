"""Reading the server name (SNI) out of a TLS ClientHello without
decrypting anything (RFC 8446 4.1.2 and 4.2, RFC 6066 3), so the HTTPS port
can route a connection before choosing to terminate TLS or pass it through.

Pure functions on bytes; bounded: a ClientHello larger than MAX_HELLO is
refused, whatever its records say.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO = 16 * 1024  # handshake bytes we are willing to buffer
HANDSHAKE_RECORD = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME_EXTENSION = 0x0000

#: A fatal unrecognized_name alert (RFC 6066 3), sent in place of a handshake
#: for a name the server has no certificate or tunnel for.
UNRECOGNIZED_NAME_ALERT = bytes([0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 112])


class NotClientHello(ValueError):
    """The bytes are not the start of a TLS ClientHello (the message says what is wrong)."""


@dataclass(frozen=True)
class Hello:
    """A complete ClientHello: its server name ("" if it sent none)."""

    server_name: str


def _handshake_bytes(data: bytes) -> bytes | None:
    """The handshake layer of the records in `data`, or None if the first
    record is not complete yet."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        content_type, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if content_type != HANDSHAKE_RECORD:
            raise NotClientHello(f"record type {content_type}, not a handshake (22)")
        if major != 3:
            raise NotClientHello("not a TLS record (version major byte is not 3)")
        if length == 0 or length > 16384 + 2048:
            raise NotClientHello(f"bad record length {length}")
        if pos + 5 + length > len(data):
            break
        out += data[pos + 5:pos + 5 + length]
        pos += 5 + length
    return bytes(out) if out else None


def parse_client_hello(data: bytes) -> Hello | None:
    """The ClientHello at the start of `data`: None while more bytes are
    needed; NotClientHello if it is none (or larger than MAX_HELLO)."""
    if len(data) > MAX_HELLO + 5 * 4:
        raise NotClientHello(f"ClientHello larger than {MAX_HELLO} bytes")
    if data and data[0] != HANDSHAKE_RECORD:
        raise NotClientHello("the connection does not start with a TLS handshake")
    hs = _handshake_bytes(data)
    if hs is None or len(hs) < 4:
        return None
    if hs[0] != CLIENT_HELLO:
        raise NotClientHello(f"handshake message type {hs[0]}, not ClientHello (1)")
    length = int.from_bytes(hs[1:4], "big")
    if length > MAX_HELLO:
        raise NotClientHello(f"ClientHello of {length} bytes, more than {MAX_HELLO}")
    if len(hs) < 4 + length:
        return None
    body = hs[4:4 + length]
    return Hello(_server_name(body))


def _server_name(body: bytes) -> str:
    """The host_name of the server_name extension of a ClientHello body ("" if none)."""

    def take(pos: int, size: int) -> tuple[bytes, int]:
        if pos + size > len(body):
            raise NotClientHello("ClientHello truncated")
        return body[pos:pos + size], pos + size

    def vector(pos: int, length_bytes: int) -> tuple[bytes, int]:
        raw, pos = take(pos, length_bytes)
        return take(pos, int.from_bytes(raw, "big"))

    pos = 2 + 32  # legacy_version, random
    _, pos = vector(pos, 1)  # legacy_session_id
    _, pos = vector(pos, 2)  # cipher_suites
    _, pos = vector(pos, 1)  # legacy_compression_methods
    if pos == len(body):
        return ""  # no extensions
    extensions, pos = vector(pos, 2)
    i = 0
    while i + 4 <= len(extensions):
        ext_type = int.from_bytes(extensions[i:i + 2], "big")
        ext_len = int.from_bytes(extensions[i + 2:i + 4], "big")
        data = extensions[i + 4:i + 4 + ext_len]
        if len(data) != ext_len:
            raise NotClientHello("extension truncated")
        i += 4 + ext_len
        if ext_type != SERVER_NAME_EXTENSION:
            continue
        if len(data) < 2:
            raise NotClientHello("server_name extension truncated")
        names = data[2:2 + int.from_bytes(data[:2], "big")]
        j = 0
        while j + 3 <= len(names):
            name_type, name_len = names[j], int.from_bytes(names[j + 1:j + 3], "big")
            name = names[j + 3:j + 3 + name_len]
            j += 3 + name_len
            if name_type == 0:
                try:
                    return name.decode("ascii")
                except UnicodeDecodeError:
                    raise NotClientHello("server name is not ASCII") from None
        return ""
    return ""
