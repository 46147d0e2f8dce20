"""An rtunnel client written from docs/protocol.md alone.

This is the evidence that the protocol document is enough to write a
compatible peer: it uses only the standard library (socket, ssl, struct,
json, selectors), imports neither rtunnel nor Twisted, and was written
by reading the document, not the code. It does the handshake, binds its
tunnels, accepts OPENs, connects to the targets, relays DATA both ways
within WINDOW credit, carries half-closes (FIN), resets (RST),
acknowledges reliable frames (ACK) and answers PINGs, and relays the
datagrams of UDP tunnels (a socket per flow, "Datagrams"). It does not resume:
a new link would start a new session ("Writing a peer: what is required",
resume is optional for a client), so it simply ends when its link ends.

One thread runs everything with a selector. Run it by hand with

    python tests/spec_peer.py --server 127.0.0.1:19050 --token T \
        --fingerprint HEX -f 0 -t 127.0.0.1:8000

or from a test with SpecPeer(...).start().
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------- constants (docs/protocol.md "Constants")

HEADER = struct.Struct(">BBII")  # type, flags, stream id, length: 10 bytes
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
WINDOW_BODY = struct.Struct(">QI")

HANDSHAKE_MAX_FRAME = 65536
MY_MAX_FRAME = 1 << 20  # what this peer announces in HELLO
INITIAL_WINDOW = 256 * 1024  # each stream, each direction, not negotiated
MY_WINDOW = INITIAL_WINDOW  # this peer never grows its windows
ACK_EVERY = 32
ACK_DELAY = 0.2  # within 1 s is required; sooner is allowed
PING_INTERVAL = 10.0
DEAD_AFTER = 30.0
MAX_STREAMS = 1024
BIND_RETRY = 5.0
LINK_HIGH_WATER = 1 << 20  # stop reading targets while this much waits for the link

DATA, WINDOW, OPEN, FIN, RST, PING, ACK, HELLO, WELCOME, RESUME = range(10)
BIND, BOUND, BIND_FAILED, GOAWAY, ERROR, UNBIND, DATAGRAM = range(10, 17)
RELIABLE = {OPEN, FIN, RST, BIND, BOUND, BIND_FAILED, UNBIND}
STREAM_TYPES = {DATA, WINDOW, OPEN, FIN, RST}
EXACT = {WINDOW: 12, FIN: 8, PING: 8, ACK: 8}
MINIMUM = {DATA: 1, OPEN: 6, RST: 2, GOAWAY: 2, ERROR: 2, RESUME: 12,
           HELLO: 2, WELCOME: 2, BIND: 2, BOUND: 2, BIND_FAILED: 2, UNBIND: 2, DATAGRAM: 8}
FLAG_PONG = 0x01
FLAG_ADDRESS = 0x01  # on DATAGRAM from the server: the visitor's address follows the flow id
DATAGRAM_HEAD = struct.Struct(">II")  # tunnel, flow

# RST codes
REFUSED, UNREACHABLE, TIMEOUT, ABORTED, EXPIRED, LIMIT, SHUTDOWN = range(1, 8)
# ERROR / GOAWAY codes
PROTOCOL_ERROR, UNSUPPORTED_VERSION, AUTH_FAILED, LIMIT_EXCEEDED, INTERNAL, FLOW_CONTROL = range(1, 7)
ERROR_NAMES = {1: "protocol_error", 2: "unsupported_version", 3: "auth_failed", 4: "limit_exceeded",
               5: "internal", 6: "flow_control", 7: "shutdown"}
FATAL_BIND = {"not_permitted", "bad_address", "limit"}


class PeerError(Exception):
    """The server broke the protocol: send ERROR `code` and close."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Tunnel:
    tunnel_id: int
    bind_host: str
    bind_port: int
    target_host: str
    target_port: int
    bound_port: int | None = None
    failed: str | None = None
    kind: str = "tcp"  # "udp": datagrams (docs "Datagrams")


@dataclass
class Flow:
    """One flow of a UDP tunnel: a socket connected to the target."""

    tunnel: Tunnel
    flow_id: int
    sock: socket.socket
    address: tuple[str, int] | None = None  # the visitor's, once the server says
    last: float = 0.0


@dataclass
class Stream:
    """One tunnelled connection; the two halves of docs/protocol.md "Stream
    state machines". Receive half: server -> target. Send half: target ->
    server."""

    sid: int
    tunnel: Tunnel
    sock: socket.socket | None = None
    connected: bool = False
    started: float = 0.0
    # receive half
    received: int = 0
    consumed: int = 0  # written to the target socket
    reported: int = 0
    recv_limit: int = INITIAL_WINDOW
    final: int | None = None
    recv_done: bool = False
    out: bytearray = field(default_factory=bytearray)
    # send half
    sent: int = 0
    acked: int = 0
    send_limit: int = INITIAL_WINDOW
    fin_sent: bool = False
    send_done: bool = False


def frame(ftype: int, sid: int, body: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(ftype, flags, sid, len(body)) + body


def coded(ftype: int, sid: int, code: int, reason: str) -> bytes:
    return frame(ftype, sid, U16.pack(code) + reason.encode()[:1024])


class SpecPeer:
    """A minimal rtunnel client. `bound` maps tunnel id -> public port once
    BOUND arrives; `ready` is set when every tunnel is bound (or failed)."""

    def __init__(
        self, server: tuple[str, int], token: str | None, fingerprint: str | None,
        tunnels: list[tuple[str, int, str, int]], log: Any = None,
    ) -> None:
        self.server = server
        self.token = token
        self.fingerprint = fingerprint.lower().replace(":", "").removeprefix("sha256") if fingerprint else None
        self.tunnels = {i: Tunnel(i, *spec[:4]) for i, spec in enumerate(tunnels, start=1)}
        for i, spec in enumerate(tunnels, start=1):
            if len(spec) > 4:
                self.tunnels[i].kind = spec[4]
        self.flows: dict[tuple[int, int], Flow] = {}
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.error: str | None = None  # why the link ended, if not by stop()
        self.session: str | None = None
        self.features: list[str] = ["tcp"]
        self.streams: dict[int, Stream] = {}
        self.highest_open = 0
        self.peer_max_frame = 1 << 20
        # reliable frames (docs "Reliable frames and ACK")
        self.reliable_sent = 0
        self.reliable_received = 0
        self.reliable_reported = 0
        self.ack_due: float | None = None
        # counters a test can read
        self.stats = {"datagrams_received": 0, "datagrams_sent": 0, "datagrams_dropped": 0, "acks_sent": 0, "pongs_sent": 0, "windows_sent": 0, "opens": 0, "rst_sent": 0,
                      "rst_received": 0, "fins_sent": 0, "fins_received": 0, "acks_received": 0}
        self._sel = selectors.DefaultSelector()
        self._link: ssl.SSLSocket | None = None
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._max_in = HANDSHAKE_MAX_FRAME
        self._handshaken = False
        self._last_in = time.monotonic()
        self._next_ping = 0.0
        self._ping_seq = 0
        self._retries: list[tuple[float, int]] = []
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._registered: dict[socket.socket, int] = {}

    # ------------------------------------------------------------ running

    def start(self) -> SpecPeer:
        self._thread = threading.Thread(target=self.run, name="spec-peer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """A deliberate stop: RST shutdown, GOAWAY shutdown, close (docs
        "GOAWAY and ERROR")."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        try:
            self._connect()
            self._loop()
        except PeerError as e:
            self._fail(e)
        except (OSError, ssl.SSLError, ValueError) as e:
            self.error = self.error or f"link failed: {e}"
        finally:
            self._close_all()
            self.ready.set()
            self.finished.set()

    def _connect(self) -> None:
        raw = socket.create_connection(self.server, timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the self-signed certificate is pinned below instead
        link = ctx.wrap_socket(raw, server_hostname=self.server[0])
        der = link.getpeercert(binary_form=True) or b""
        seen = hashlib.sha256(der).hexdigest()
        if self.fingerprint is not None and seen != self.fingerprint:
            link.close()
            raise PeerError(f"server certificate sha256:{seen} is not the pinned {self.fingerprint}")
        link.setblocking(False)
        self._link = link
        hello: dict[str, Any] = {"protocol": "rtunnel", "versions": [1], "max_frame": MY_MAX_FRAME}
        hello["token"] = self.token  # null when a client certificate authenticates
        self._send(frame(HELLO, 0, json.dumps(hello).encode()))
        self._sel.register(self._wake_r, selectors.EVENT_READ)

    def _loop(self) -> None:
        while not self.finished.is_set():
            if self._stop and not self._closing:
                self._goodbye()
            now = time.monotonic()
            if self._handshaken:
                self._timers(now)
            if now - self._last_in > DEAD_AFTER:
                raise OSError(f"nothing from the server for {DEAD_AFTER:.0f} s: link dead")
            self._update_interest()
            timeout = 0.05 if (self.ack_due or self._retries or self._closing) else 1.0
            for key, events in self._sel.select(timeout):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(64)
                elif sock is self._link:
                    if events & selectors.EVENT_READ:
                        self._read_link()
                    if events & selectors.EVENT_WRITE:
                        self._flush_link()
                elif isinstance(key.data, Flow):
                    self._flow_readable(key.data)
                else:
                    self._target_event(key.data, events)
                if self.finished.is_set():
                    return
            if self._closing and not self._outbuf:
                return

    def _timers(self, now: float) -> None:
        if self.ack_due is not None and now >= self.ack_due:
            self._send_ack()
        if now >= self._next_ping:
            self._ping_seq += 1
            self._send(frame(PING, 0, U64.pack(self._ping_seq)))
            self._next_ping = now + PING_INTERVAL
        due = [t for t in self._retries if t[0] <= now]
        for item in due:
            self._retries.remove(item)
            self._bind(self.tunnels[item[1]])
        for stream in list(self.streams.values()):
            if not stream.connected and stream.sock is not None and now - stream.started > 10:
                self._reset(stream, TIMEOUT, "target connect timed out")

    def _update_interest(self) -> None:
        """Register each socket for what it can do now (backpressure)."""
        wanted: dict[socket.socket, tuple[int, Any]] = {}
        if self._link is not None:
            wanted[self._link] = (selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbuf else 0), None)
        link_full = len(self._outbuf) >= LINK_HIGH_WATER
        for stream in self.streams.values():
            if stream.sock is None:
                continue
            events = 0
            if not stream.connected or stream.out:
                events |= selectors.EVENT_WRITE
            if (stream.connected and not stream.fin_sent and not link_full
                    and stream.sent < stream.send_limit):
                events |= selectors.EVENT_READ
            wanted[stream.sock] = (events, stream)
        for flow in self.flows.values():
            if not link_full:  # a datagram the link cannot take now waits in the socket (or is lost)
                wanted[flow.sock] = (selectors.EVENT_READ, flow)
        for sock in list(self._registered):
            if sock not in wanted or not wanted[sock][0]:
                self._sel.unregister(sock)
                del self._registered[sock]
        for sock, (events, data) in wanted.items():
            if not events:
                continue
            if sock not in self._registered:
                self._sel.register(sock, events, data)
            elif self._registered[sock] != events:
                self._sel.modify(sock, events, data)
            self._registered[sock] = events

    # ------------------------------------------------------------ the link

    def _send(self, data: bytes) -> None:
        self._outbuf += data
        self._flush_link()

    def _flush_link(self) -> None:
        link = self._link
        while self._outbuf and link is not None:
            try:
                n = link.send(self._outbuf[:256 * 1024])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            del self._outbuf[:n]

    def _read_link(self) -> None:
        assert self._link is not None
        while True:
            try:
                data = self._link.recv(256 * 1024)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            if not data:
                raise OSError("the server closed the link")
            self._last_in = time.monotonic()
            self._inbuf += data
        self._parse()

    def _parse(self) -> None:
        buf = self._inbuf
        pos = 0
        try:
            while len(buf) - pos >= HEADER.size and not self.finished.is_set():
                ftype, flags, sid, length = HEADER.unpack_from(buf, pos)
                if ftype > DATAGRAM:
                    raise PeerError(f"unknown frame type {ftype}")
                if length > self._max_in:
                    raise PeerError(f"frame of {length} bytes exceeds my maximum {self._max_in}")
                if flags and not (ftype in (PING, DATAGRAM) and flags == 0x01):
                    raise PeerError(f"frame type {ftype} with flags {flags:#x}")
                if (ftype in STREAM_TYPES) != (sid != 0):
                    raise PeerError(f"frame type {ftype} on the wrong stream id {sid}")
                if (ftype in EXACT and length != EXACT[ftype]) or length < MINIMUM.get(ftype, 0):
                    raise PeerError(f"frame type {ftype} with a body of {length} bytes")
                if len(buf) - pos - HEADER.size < length:
                    break
                body = bytes(buf[pos + HEADER.size:pos + HEADER.size + length])
                pos += HEADER.size + length
                self._frame(ftype, flags, sid, body)
        finally:
            del buf[:pos]

    def _json(self, body: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(body.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise PeerError(f"JSON body is not valid: {e}") from None
        if not isinstance(obj, dict):
            raise PeerError("JSON body is not an object")
        return obj

    def _frame(self, ftype: int, flags: int, sid: int, body: bytes) -> None:
        if ftype == ERROR:
            (code,) = U16.unpack_from(body)
            reason = body[2:].decode("utf-8", "replace")
            self.error = f"server sent ERROR {ERROR_NAMES.get(code, code)}: {reason}"
            self.finished.set()
            return
        if not self._handshaken:
            if ftype != WELCOME:
                raise PeerError(f"expected WELCOME, got frame type {ftype}")
            self._welcome(self._json(body))
            return
        if ftype in RELIABLE:
            self._count_reliable()
        if ftype == DATA:
            stream = self._stream(sid, ftype)
            if stream is not None:
                self._data(stream, body)
        elif ftype == WINDOW:
            stream = self._stream(sid, ftype)
            if stream is not None:
                self._window(stream, *WINDOW_BODY.unpack(body))
        elif ftype == OPEN:
            self._open(sid, body)
        elif ftype == FIN:
            self.stats["fins_received"] += 1
            stream = self._stream(sid, ftype)
            if stream is not None:
                self._fin(stream, U64.unpack(body)[0])
        elif ftype == RST:
            self.stats["rst_received"] += 1
            stream = self._stream(sid, ftype)
            if stream is not None:
                self._forget(stream, abort=True)
        elif ftype == PING:
            if not flags & FLAG_PONG:
                self.stats["pongs_sent"] += 1
                self._send(frame(PING, 0, body, FLAG_PONG))
        elif ftype == ACK:
            (received,) = U64.unpack(body)
            if received > self.reliable_sent:
                raise PeerError(f"ACK of {received} reliable frames, only {self.reliable_sent} sent")
            self.stats["acks_received"] += 1
        elif ftype == BOUND:
            self._bound(self._json(body))
        elif ftype == BIND_FAILED:
            self._bind_failed(self._json(body))
        elif ftype == DATAGRAM:
            self._datagram(flags, body)
        elif ftype == GOAWAY:
            self.log("server says GOAWAY: it accepts no new streams; existing ones drain")
        else:  # HELLO, WELCOME again, RESUME (never negotiated), BIND, UNBIND
            raise PeerError(f"frame type {ftype} is not allowed from the server here")

    # ------------------------------------------------------------ handshake, tunnels

    def _welcome(self, body: dict[str, Any]) -> None:
        session, secret, max_frame = body.get("session"), body.get("secret"), body.get("max_frame", 1 << 20)
        if not isinstance(session, str) or not isinstance(secret, str):
            raise PeerError("WELCOME lacks session or secret")
        if not isinstance(max_frame, int) or isinstance(max_frame, bool) or max_frame < 16384:
            raise PeerError("WELCOME max_frame must be an integer >= 16384")
        self.session = session
        self.features = body.get("features", ["tcp"])
        self.peer_max_frame = min(max_frame, 2**32 - 1)
        self._handshaken = True
        self._max_in = MY_MAX_FRAME
        self._next_ping = time.monotonic()
        for tunnel in self.tunnels.values():
            self._bind(tunnel)

    def _send_reliable(self, data: bytes) -> None:
        self.reliable_sent += 1
        self._send(data)

    def _bind(self, tunnel: Tunnel) -> None:
        body: dict[str, Any] = {"tunnel": tunnel.tunnel_id, "host": tunnel.bind_host, "port": tunnel.bind_port}
        if tunnel.kind != "tcp":
            if tunnel.kind not in self.features:
                tunnel.failed = f"the server does not serve {tunnel.kind} tunnels"
                self._check_ready()
                return
            body["kind"] = tunnel.kind
        self._send_reliable(frame(BIND, 0, json.dumps(body).encode()))

    def _tunnel_of(self, body: dict[str, Any]) -> Tunnel:
        tunnel = self.tunnels.get(body.get("tunnel"))  # type: ignore[arg-type]
        if tunnel is None:
            raise PeerError(f"answer for tunnel {body.get('tunnel')!r}, which I never asked for")
        return tunnel

    def _bound(self, body: dict[str, Any]) -> None:
        tunnel = self._tunnel_of(body)
        port = body.get("port")
        if not isinstance(port, int):
            raise PeerError("BOUND without an integer port")
        tunnel.bound_port = port
        self._check_ready()

    def _bind_failed(self, body: dict[str, Any]) -> None:
        tunnel = self._tunnel_of(body)
        code, message = str(body.get("code")), str(body.get("message", ""))
        tunnel.bound_port = None
        if code in FATAL_BIND:
            tunnel.failed = f"{code}: {message}"
            self.log(f"the server refused tunnel {tunnel.tunnel_id}: {code}: {message}")
            self._check_ready()
        elif code == "closed":
            tunnel.failed = f"{code}: {message}"
        else:  # in_use, shutdown, taken_over, unknown codes: retry later
            self._retries.append((time.monotonic() + BIND_RETRY, tunnel.tunnel_id))

    def _check_ready(self) -> None:
        if all(t.bound_port is not None or t.failed for t in self.tunnels.values()):
            self.ready.set()

    # ------------------------------------------------------------ reliable frames

    def _count_reliable(self) -> None:
        self.reliable_received += 1
        if self.reliable_received - self.reliable_reported >= ACK_EVERY:
            self._send_ack()
        elif self.ack_due is None:
            self.ack_due = time.monotonic() + ACK_DELAY

    def _send_ack(self) -> None:
        self.ack_due = None
        if self.reliable_received > self.reliable_reported:
            self.reliable_reported = self.reliable_received
            self.stats["acks_sent"] += 1
            self._send(frame(ACK, 0, U64.pack(self.reliable_received)))

    # ------------------------------------------------------------ streams

    def _stream(self, sid: int, ftype: int) -> Stream | None:
        """The stream a frame is for; None for a forgotten one (ignored)."""
        stream = self.streams.get(sid)
        if stream is None and (sid % 2 == 1 or sid > self.highest_open):
            raise PeerError(f"frame type {ftype} for stream {sid}, never opened")
        return stream

    def _open(self, sid: int, body: bytes) -> None:
        if sid % 2 == 1 or sid <= self.highest_open:
            raise PeerError(f"OPEN on stream id {sid}: not even or not above {self.highest_open}")
        self.highest_open = sid
        self.stats["opens"] += 1
        (tunnel_id,) = U32.unpack_from(body)
        self._json(body[4:])  # src/dst: this peer has no use for them
        tunnel = self.tunnels.get(tunnel_id)
        stream = Stream(sid, tunnel or Tunnel(tunnel_id, "", 0, "", 0), started=time.monotonic())
        self.streams[sid] = stream
        if tunnel is None:
            self._reset(stream, REFUSED, f"no tunnel {tunnel_id} on this client")
            return
        if len(self.streams) > MAX_STREAMS:
            self._reset(stream, LIMIT, f"more than {MAX_STREAMS} connections open")
            return
        try:
            info = socket.getaddrinfo(tunnel.target_host, tunnel.target_port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
        except OSError as e:
            self._reset(stream, UNREACHABLE, f"target {tunnel.target_host}: {e}")
            return
        sock.setblocking(False)
        stream.sock = sock
        err = sock.connect_ex(info[4])
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._target_failed(stream, err)

    def _target_failed(self, stream: Stream, err: int) -> None:
        code = REFUSED if err == errno.ECONNREFUSED else TIMEOUT if err == errno.ETIMEDOUT else UNREACHABLE
        self._reset(stream, code, f"target: {os.strerror(err)}")

    def _target_event(self, stream: Stream, events: int) -> None:
        if stream.sid not in self.streams or stream.sock is None:
            return
        if not stream.connected:
            err = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._target_failed(stream, err)
                return
            stream.connected = True
            stream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if events & selectors.EVENT_WRITE or stream.out:
            self._write_target(stream)
        if events & selectors.EVENT_READ and stream.sid in self.streams:
            self._read_target(stream)

    def _data(self, stream: Stream, data: bytes) -> None:
        if stream.received + len(data) > stream.recv_limit:
            raise PeerError(f"stream {stream.sid}: DATA beyond the limit {stream.recv_limit}", FLOW_CONTROL)
        if stream.final is not None and stream.received + len(data) > stream.final:
            raise PeerError(f"stream {stream.sid}: DATA beyond its FIN at {stream.final}")
        stream.received += len(data)
        stream.out += data
        if stream.connected:
            self._write_target(stream)

    def _write_target(self, stream: Stream) -> None:
        """Hand bytes to the target; what it takes is consumed, and credit
        for it goes back (docs "Credit: WINDOW", receiver rules)."""
        assert stream.sock is not None
        while stream.out:
            try:
                n = stream.sock.send(stream.out)
            except BlockingIOError:
                break
            except OSError as e:
                self._reset(stream, ABORTED, f"target: {e}")
                return
            del stream.out[:n]
            stream.consumed += n
        unreported = stream.consumed - stream.reported
        if unreported > 0 and (unreported >= MY_WINDOW // 4 or not stream.out):
            self._grant(stream)
        self._maybe_finish_receive(stream)

    def _grant(self, stream: Stream) -> None:
        stream.reported = stream.consumed
        stream.recv_limit = max(stream.recv_limit, stream.consumed + MY_WINDOW)
        self.stats["windows_sent"] += 1
        self._send(frame(WINDOW, stream.sid, WINDOW_BODY.pack(stream.consumed, MY_WINDOW)))

    def _fin(self, stream: Stream, final: int) -> None:
        if stream.final is not None or final < stream.received:
            raise PeerError(f"stream {stream.sid}: invalid FIN at {final}")
        stream.final = final  # the bytes before it may still be on their way
        self._maybe_finish_receive(stream)

    def _maybe_finish_receive(self, stream: Stream) -> None:
        if stream.recv_done or stream.final is None or stream.consumed != stream.final or not stream.connected:
            return  # (a FIN may come before its bytes, or before the target is connected)
        assert stream.sock is not None
        stream.recv_done = True
        try:
            stream.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if stream.reported < stream.final:
            self._grant(stream)  # the final grant: lets the server forget its half
        self._maybe_forget(stream)

    def _read_target(self, stream: Stream) -> None:
        assert stream.sock is not None
        credit = stream.send_limit - stream.sent
        if credit <= 0 or stream.fin_sent:
            return
        try:
            data = stream.sock.recv(min(credit, self.peer_max_frame, 256 * 1024))
        except BlockingIOError:
            return
        except OSError as e:
            self._reset(stream, ABORTED, f"target: {e}")
            return
        if data:
            stream.sent += len(data)
            self._send(frame(DATA, stream.sid, data))
            return
        stream.fin_sent = True  # EOF: every byte read has been sent
        self.stats["fins_sent"] += 1
        self._send_reliable(frame(FIN, stream.sid, U64.pack(stream.sent)))
        self._maybe_forget(stream)

    def _window(self, stream: Stream, consumed: int, window: int) -> None:
        if not stream.acked <= consumed <= stream.sent:
            raise PeerError(f"stream {stream.sid}: WINDOW consumed {consumed} outside {stream.acked}..{stream.sent}")
        stream.acked = consumed
        stream.send_limit = max(stream.send_limit, consumed + window)
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.fin_sent and stream.acked == stream.sent:
            stream.send_done = True
        if stream.send_done and stream.recv_done:
            self._forget(stream, abort=False)

    def _reset(self, stream: Stream, code: int, reason: str) -> None:
        self.stats["rst_sent"] += 1
        self._send_reliable(coded(RST, stream.sid, code, reason))
        self._forget(stream, abort=True)

    def _forget(self, stream: Stream, abort: bool) -> None:
        self.streams.pop(stream.sid, None)
        sock, stream.sock = stream.sock, None
        if sock is None:
            return
        if sock in self._registered:
            self._sel.unregister(sock)
            del self._registered[sock]
        if abort:  # a TCP reset towards the target
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    # ------------------------------------------------------------ datagrams

    def _datagram(self, flags: int, body: bytes) -> None:
        """A visitor's datagram: to the target from the flow's own socket."""
        tunnel_id, flow_id = DATAGRAM_HEAD.unpack_from(body)
        pos = DATAGRAM_HEAD.size
        address = None
        if flags & FLAG_ADDRESS:
            family = body[pos] if len(body) > pos else 0
            size = {4: 4, 6: 16}.get(family)
            if size is None or len(body) < pos + 1 + size + 2:
                raise PeerError(f"DATAGRAM with a bad address block (family {family})")
            raw = body[pos + 1:pos + 1 + size]
            host = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)
            address = (host, U16.unpack_from(body, pos + 1 + size)[0])
            pos += 1 + size + 2
        payload = body[pos:]
        self.stats["datagrams_received"] += 1
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or tunnel.kind != "udp":
            self.stats["datagrams_dropped"] += 1  # not an error: dropped
            return
        flow = self.flows.get((tunnel_id, flow_id))
        if flow is None:
            info = socket.getaddrinfo(tunnel.target_host, tunnel.target_port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(info[4])
            flow = self.flows[(tunnel_id, flow_id)] = Flow(tunnel, flow_id, sock)
        if address is not None:
            flow.address = address
        flow.last = time.monotonic()
        try:
            flow.sock.send(payload)
        except OSError:
            self.stats["datagrams_dropped"] += 1

    def _flow_readable(self, flow: Flow) -> None:
        """The target answered on a flow's socket: a DATAGRAM back, no flag."""
        for _ in range(64):
            try:
                payload = flow.sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if len(payload) + DATAGRAM_HEAD.size > self.peer_max_frame:
                self.stats["datagrams_dropped"] += 1
                continue
            self.stats["datagrams_sent"] += 1
            self._send(frame(DATAGRAM, 0, DATAGRAM_HEAD.pack(flow.tunnel.tunnel_id, flow.flow_id) + payload))

    # ------------------------------------------------------------ ending

    def _goodbye(self) -> None:
        self._closing = True
        if not self._handshaken:
            self.finished.set()
            return
        for stream in list(self.streams.values()):
            self._reset(stream, SHUTDOWN, "client stopped")
        self._send(coded(GOAWAY, 0, SHUTDOWN, "client stopped"))

    def _fail(self, error: PeerError) -> None:
        self.error = f"protocol error by the server: {error}"
        self.log(self.error)
        if self._link is not None:  # after what is queued: a frame may be half written
            self._send(coded(ERROR, 0, error.code, str(error)))
            deadline = time.monotonic() + 1
            while self._outbuf and time.monotonic() < deadline:
                self._flush_link()
                time.sleep(0.01)

    def _close_all(self) -> None:
        for stream in list(self.streams.values()):
            self._forget(stream, abort=True)
        for flow in self.flows.values():
            flow.sock.close()
        self.flows.clear()
        if self._link is not None:
            try:
                self._link.close()
            except OSError:
                pass
            self._link = None
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


def _host_port(text: str, default_host: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host.strip("[]") or default_host), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a minimal rtunnel client written from docs/protocol.md")
    parser.add_argument("--server", required=True, help="HOST:PORT of the rtunnel server")
    parser.add_argument("--token", default=os.environ.get("RTUNNEL_TOKEN"))
    parser.add_argument("--fingerprint", help="sha256 of the server certificate (DER), hex")
    parser.add_argument("-f", dest="public", action="append", required=True, help="[HOST:]PORT to bind")
    parser.add_argument("-t", dest="target", action="append", required=True, help="[HOST:]PORT to connect")
    args = parser.parse_args(argv)
    tunnels = [(*_host_port(p if ":" in p else f":{p}", ""), *_host_port(t if ":" in t else f":{t}", "127.0.0.1"))
               for p, t in zip(args.public, args.target, strict=True)]
    peer = SpecPeer(_host_port(args.server, "127.0.0.1"), args.token, args.fingerprint, tunnels).start()
    peer.ready.wait()
    for tunnel in peer.tunnels.values():
        print(f"tunnel {tunnel.tunnel_id}: port {tunnel.bound_port} {tunnel.failed or ''}", flush=True)
    try:
        peer.finished.wait()
    except KeyboardInterrupt:
        peer.stop()
    if peer.error:
        print(peer.error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
