"""What OpenSSL itself holds per server-side TLS connection, without Python
or sockets: the floor under the server's memory per idle session
(benchmarks/capacity.py measures the whole).

    .venv/bin/python benchmarks/tls_memory.py [--connections 1000] [--only NAME,...]

Makes pairs of pyOpenSSL connections on memory BIOs (as Twisted's
TLSMemoryBIOProtocol does), completes each handshake with rtunnel's own
self-signed key, moves 1 KB each way, then frees the client ends and then
the server ends, reading glibc's bytes in use (mallinfo2, heap and mmapped
chunks) at each step. Prints one JSON object: KB per server connection for
each variant (`VARIANTS`: each changes one setting from the line it names)
and the key exchange group each negotiated.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from rtunnel import tls
from rtunnel.openssl_private import renew_memory_bios


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _in_use() -> int:
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            if data:
                dst.bio_write(data)
                moved = True


def _groups(names: str) -> Callable[[SSL.Context], None]:
    def apply(ctx: SSL.Context) -> None:
        if lib.SSL_CTX_set1_curves_list(ctx._context, names.encode()) != 1:
            raise SystemExit(f"this OpenSSL refuses the group list {names!r}")

    return apply


def _rtunnel_context() -> SSL.Context:
    """The server's real context (rtunnel.tls.server_context: Twisted's
    CertificateOptions, no tickets, no session cache, a client certificate
    asked for)."""
    cert_pem, key_pem = tls._make_self_signed()
    identity = tls.ServerIdentity(cert_pem, key_pem, "", False)
    return tls.server_context(identity).getContext()


@dataclass(frozen=True)
class Variant:
    """One server set-up: the context's settings and what is done per connection."""

    tls13: bool = True
    release: bool = True  # SSL_MODE_RELEASE_BUFFERS
    context: Callable[[SSL.Context], None] | None = None  # one more setting
    rtunnel_context: bool = False  # rtunnel.tls.server_context instead of a bare one
    handshake: bool = True  # False: a connection just made (SSL_new and its BIOs)
    burst: int = 1024  # bytes moved each way after the handshake (in 64 KiB writes)
    renew_bios: bool = False  # rtunnel.openssl_private.renew_memory_bios after the traffic
    note: str = field(default="", compare=False)


#: Each changes one setting from the variant it names in its note.
VARIANTS: dict[str, Variant] = {
    "tls1.3": Variant(release=False, note="OpenSSL's defaults"),
    "tls1.3 release_buffers": Variant(note="the base of the lines below: SSL_MODE_RELEASE_BUFFERS"),
    "tls1.2": Variant(tls13=False, release=False),
    "tls1.2 release_buffers": Variant(tls13=False),
    "no handshake": Variant(handshake=False, note="SSL_new and two memory BIOs: OpenSSL's floor"),
    "groups X25519MLKEM768": Variant(context=_groups("X25519MLKEM768"), note="the default's first group only"),
    "groups X25519": Variant(context=_groups("X25519"), note="no post-quantum hybrid"),
    "rtunnel context": Variant(rtunnel_context=True, note="rtunnel.tls.server_context"),
    "aes-128-gcm": Variant(context=lambda c: c.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")),
    "chacha20-poly1305": Variant(context=lambda c: c.set_tls13_ciphersuites(b"TLS_CHACHA20_POLY1305_SHA256")),
    "memory BIOs renewed": Variant(renew_bios=True, note="after the handshake, as rtunnel.tlslink does"),
    "memory BIOs renewed, groups X25519": Variant(renew_bios=True, context=_groups("X25519")),
    "after 1 MiB each way": Variant(burst=1 << 20, note="an idle connection that was busy once"),
    "after 1 MiB each way, memory BIOs renewed": Variant(burst=1 << 20, renew_bios=True),
}


def _server_context(variant: Variant) -> SSL.Context:
    if variant.rtunnel_context:
        ctx = _rtunnel_context()
    else:
        cert_pem, key_pem = tls._make_self_signed()
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
        ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
    if not variant.tls13:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    if variant.release:
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if variant.context is not None:
        variant.context(ctx)
    return ctx


def _move(src: SSL.Connection, dst: SSL.Connection, size: int) -> None:
    for offset in range(0, size, 65536):
        src.send(b"x" * min(65536, size - offset))
        _pump(src, dst)
        while True:
            try:
                dst.recv(65536)
            except SSL.WantReadError:
                break


def server_connection_kb(n: int, variant: Variant) -> tuple[float, str]:
    """Bytes in use per server connection, in KB, and the group negotiated."""
    server_ctx = _server_context(variant)
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    servers, clients = [], []
    for _ in range(n):
        server = SSL.Connection(server_ctx, None)
        server.set_accept_state()
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        if variant.handshake:
            for _ in range(10):
                for end in (client, server):
                    try:
                        end.do_handshake()
                    except SSL.WantReadError:
                        pass
                _pump(client, server)
            _move(client, server, variant.burst)
            _move(server, client, variant.burst)
        if variant.renew_bios and not renew_memory_bios(server):
            raise RuntimeError("a memory BIO still held bytes")
        servers.append(server)
        clients.append(client)
    group = ffi.string(lib.SSL_get0_group_name(servers[0]._ssl)).decode() if variant.handshake else ""
    clients.clear()
    gc.collect()
    with_servers = _in_use()
    servers.clear()
    gc.collect()
    return round((with_servers - _in_use()) / n / 1024, 1), group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--only", help="variants to run, comma-separated (default: all)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    kb: dict[str, float] = {}
    groups: dict[str, str] = {}
    for name in names:
        kb[name], groups[name] = server_connection_kb(args.connections, VARIANTS[name])
    result = {
        "openssl": SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(),
        "connections": args.connections,
        "kb_per_server_connection": kb,
        "group": groups,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
