"""The local services the paths lead to: an echo server and a delay proxy
(run as subprocesses: ``python services.py --serve-echo PORT`` or
``--serve-delay LISTEN:TARGET:DELAY``) and nginx with its two files.

Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import selectors
import socket
import sys
from pathlib import Path

from procs import LOOP, Procs, free_port, listening, raise_nofile, wait_for


def serve_udp_echo(port: int) -> None:
    """UDP echo server: each datagram back to its sender (UDP round trips)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOP, port))
    while True:
        data, addr = sock.recvfrom(65535)
        sock.sendto(data, addr)


def serve_echo(port: int) -> None:
    """Echo server (epoll, TCP_NODELAY) for ping-pong and idle connections."""
    raise_nofile()
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((LOOP, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    pending: dict[socket.socket, bytearray] = {}

    def close(c):
        sel.unregister(c)
        pending.pop(c, None)
        c.close()

    while True:
        for key, events in sel.select():
            if key.data is None:
                try:
                    c, _ = lsock.accept()
                except OSError:
                    continue
                c.setblocking(False)
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pending[c] = bytearray()
                sel.register(c, selectors.EVENT_READ, "c")
                continue
            c = key.fileobj
            buf = pending[c]
            if events & selectors.EVENT_READ:
                try:
                    data = c.recv(65536)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    close(c)
                    continue
                if data:
                    buf += data
            if buf:
                try:
                    del buf[: c.send(buf)]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    close(c)
                    continue
            want = selectors.EVENT_WRITE if buf else selectors.EVENT_READ
            if key.events != want:
                sel.modify(c, want, "c")


def serve_delay(listen_port: int, target_port: int, delay: float) -> None:
    """TCP proxy holding every chunk `delay` seconds in each direction."""
    limit = 256 * 1024 * 1024  # ample buffering per direction

    async def pump(reader, writer):
        loop = asyncio.get_running_loop()
        queue: collections.deque = collections.deque()
        ready = asyncio.Event()
        room = asyncio.Event()
        room.set()
        held = [0]

        async def read_side():
            while True:
                await room.wait()
                try:
                    data = await reader.read(1 << 18)
                except OSError:
                    data = b""
                queue.append((loop.time() + delay, data))
                held[0] += len(data)
                if held[0] > limit:
                    room.clear()
                ready.set()
                if not data:
                    return

        async def write_side():
            while True:
                while not queue:
                    ready.clear()
                    await ready.wait()
                due, data = queue.popleft()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                held[0] -= len(data)
                if held[0] <= limit:
                    room.set()

        tasks = [asyncio.ensure_future(read_side()), asyncio.ensure_future(write_side())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def handle(creader, cwriter):
        try:
            ureader, uwriter = await asyncio.open_connection(LOOP, target_port, limit=1 << 20)
        except OSError:
            cwriter.close()
            return
        for w in (cwriter, uwriter):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tasks = [
            asyncio.ensure_future(pump(creader, uwriter)),
            asyncio.ensure_future(pump(ureader, cwriter)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    break
            else:
                await asyncio.gather(*tasks)
        except Exception:
            pass
        finally:
            for t in tasks:
                t.cancel()
            cwriter.close()
            uwriter.close()

    async def main():
        server = await asyncio.start_server(handle, LOOP, listen_port, limit=1 << 20, reuse_address=True)
        async with server:
            await server.serve_forever()

    raise_nofile()
    asyncio.run(main())


def start_nginx(procs: Procs, tmp: Path, nginx: str) -> int:
    """nginx serving 1k.bin and 1m.bin from a fresh dir under tmp; its port once it listens."""
    d = tmp / "nginx"
    www = d / "www"
    www.mkdir(parents=True)
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / "tmp" / sub).mkdir(parents=True)
    (www / "1k.bin").write_bytes(os.urandom(1024))
    (www / "1m.bin").write_bytes(os.urandom(1024 * 1024))
    for p in [d, www, *www.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    (d / "nginx.conf").write_text(
        f"""daemon off;
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    default_type application/octet-stream;
    client_body_temp_path {d}/tmp/client;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen {LOOP}:{port} backlog=4096;
        root {www};
    }}
}}
"""
    )
    proc = procs.start(
        "nginx",
        [nginx, "-p", d, "-c", d / "nginx.conf", "-e", d / "error.log"],
        cwd=d,
    )
    wait_for(lambda: listening(port), 10, [(proc, procs)], "nginx")
    return port


def main(argv: list[str] | None = None) -> int:
    """Run one helper service until killed (started by `Bench.start_helper`)."""
    ap = argparse.ArgumentParser(description="A helper service of the benchmark, run until killed.")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--serve-echo", type=int, metavar="PORT", help="echo server on 127.0.0.1:PORT")
    what.add_argument("--serve-udp-echo", type=int, metavar="PORT", help="UDP echo server on 127.0.0.1:PORT")
    what.add_argument("--serve-delay", metavar="LISTEN:TARGET:DELAY",
                      help="proxy from LISTEN to TARGET holding each chunk DELAY seconds each way")  # fmt: skip
    args = ap.parse_args(argv)
    if args.serve_echo:
        serve_echo(args.serve_echo)
    elif args.serve_udp_echo:
        serve_udp_echo(args.serve_udp_echo)
    else:
        listen, target, delay = args.serve_delay.split(":")
        serve_delay(int(listen), int(target), float(delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
