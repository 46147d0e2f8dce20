"""What OpenSSL itself holds per server-side TLS connection, without Python
or sockets: the floor under the server's memory per idle session
(benchmarks/capacity.py measures the whole).

    .venv/bin/python benchmarks/tls_memory.py [--connections 1000]

Makes pairs of pyOpenSSL connections on memory BIOs (as Twisted's
TLSMemoryBIOProtocol does), completes each handshake with rtunnel's own
self-signed key, moves 1 KB each way, then frees the client ends and then
the server ends, reading glibc's bytes in use (mallinfo2) at each step. Prints
one JSON object: KB per server connection for TLS 1.3 and TLS 1.2, with and
without SSL_MODE_RELEASE_BUFFERS.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json

from OpenSSL import SSL, crypto

from rtunnel import tls


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _in_use() -> int:
    return int(_libc.mallinfo2().uordblks)


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


def server_connection_kb(n: int, tls13: bool, release: bool) -> float:
    """Bytes in use per server connection after a handshake and 1 KB each way, in KB."""
    cert_pem, key_pem = tls._make_self_signed()
    server_ctx = SSL.Context(SSL.TLS_METHOD)
    server_ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
    server_ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
    if not tls13:
        server_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    if release:
        server_ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    servers, clients = [], []
    for _ in range(n):
        server = SSL.Connection(server_ctx, None)
        server.set_accept_state()
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        for _ in range(10):
            for end in (client, server):
                try:
                    end.do_handshake()
                except SSL.WantReadError:
                    pass
            _pump(client, server)
        client.send(b"x" * 1024)
        _pump(client, server)
        server.recv(65536)
        server.send(b"y" * 1024)
        _pump(client, server)
        client.recv(65536)
        servers.append(server)
        clients.append(client)
    clients.clear()
    gc.collect()
    with_servers = _in_use()
    servers.clear()
    gc.collect()
    return round((with_servers - _in_use()) / n / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    result = {
        "openssl": SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(),
        "connections": args.connections,
        "kb_per_server_connection": {
            f"tls{'1.3' if v13 else '1.2'}{' release_buffers' if release else ''}": server_connection_kb(
                args.connections, v13, release
            )
            for v13 in (True, False)
            for release in (False, True)
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
