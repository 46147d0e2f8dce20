"""Routing one request of a visitor connection (part of
`rtunnel.server.httpedge.HttpVisitor`): its Host (or absolute-form
authority) to the tunnel that claimed the name, the ACME challenge and the
https redirect, a stream to the owner (the connection's open one when it
goes there already; bounded waiting while the owner is detached), and the
request head written to that stream in one join: the visitor's headers but
hop-by-hop ones and (unless it is a trusted proxy) its forwarding ones,
then the server's X-Forwarded-* and Forwarded."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

import h11

from rtunnel.httpconfig import host_of
from rtunnel.server.hostnames import HostStats, HostTunnel
from rtunnel.server.httpmessages import ACME_PREFIX, FORWARDING, HOP_BY_HOP, EdgeError, page
from rtunnel.server.httpstate import VisitorState
from rtunnel.server.httpupstream import Upstream

if TYPE_CHECKING:
    from rtunnel.server.httpedge import HttpVisitor


class Routing(VisitorState):
    """HttpVisitor's routing steps."""

    def _start(self, request: h11.Request) -> None:
        self.request = request
        self.stats_name = ""
        self.status = self.sent = 0
        self.response_started = False
        self.headers = headers = list(request.headers)
        self.fields = fields = {}  # the first value of each header, by (lower-case) name: one pass
        for field_name, value in headers:
            if field_name not in fields:
                fields[field_name] = value
        if self.edge.access_log:
            self.started = time.time()
        self.keep_alive = request.http_version == b"1.1" and b"close" not in fields.get(b"connection", b"").lower()
        host_header = self._authority(request)
        if self.names[0] != host_header:  # keep-alive requests mostly repeat their Host
            self.names = (host_header, host_of(host_header.decode("latin-1")) if host_header else None)
        name = self.names[1]
        self.host_name = name or "-"
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
            self.stats_name = tunnel_name = tunnel.name  # the claim's name: "*.zone" for a name its wildcard serves
            stats = self.edge.stats(tunnel_name)
            stats.requests += 1
            if self.scheme == "http" and self._redirect(name, request):
                return
            if tunnel.kind == "tls":
                raise EdgeError(404, "this hostname is served over TLS only (https)")
            self.tunnel = tunnel
            self._connect(tunnel, None, stats)
        except EdgeError as e:
            self._fail(e)

    def _authority(self, request: h11.Request) -> bytes:
        target = request.target
        if target[:1] != b"/":
            for scheme in (b"http://", b"https://"):  # absolute-form: its authority is the host (RFC 9112 3.2.2)
                if target[:len(scheme)].lower() == scheme:
                    return target[len(scheme):].split(b"/", 1)[0]
        return self.fields.get(b"host", b"")

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

    def _connect(self, tunnel: HostTunnel, deadline: float | None, stats: HostStats | None = None) -> None:
        """Give the request a stream to `tunnel`'s owner: the open one if it
        goes there already, else a new one; wait (bounded: `deadline`, set
        on the first wait) while the owner is detached. `stats`: the
        tunnel was routed just now (on a wait, the route is looked up again)."""
        self.waiting = None
        if stats is None:
            current = self.edge.route(tunnel.name if tunnel.claim is not None else None) or tunnel
        else:
            current = tunnel
        owner = current.owner
        if owner is not None and owner.detached:
            if deadline is None:
                deadline = time.monotonic() + self.edge.settings.offline_wait
            if time.monotonic() < deadline:
                self._pause("waiting")  # the body waits in the socket, not here
                self.waiting = self.edge.reactor.callLater(0.05, self._connect, current, deadline)
                return
        self._resume("waiting")
        if owner is None or owner.expired or owner.detached:
            self._fail(EdgeError(502, "the tunnel for this hostname is offline (its client is not connected); "
                                      "try again later"))
            return
        self.tunnel = current
        self.stats = stats if stats is not None and current is tunnel else self.edge.stats(current.name)
        upstream = self.upstream
        if upstream is not None and upstream.tunnel is current and upstream.reusable():
            upstream.next_cycle()
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
            self.upstream = Upstream(cast("HttpVisitor", self), current, stream)
            stream.attach_local(self.upstream)
            if self.closed or self.upstream is None:
                return
        self._send_head()

    def _send_head(self) -> None:
        """Write the request's head to the stream, in one join: the visitor's
        headers but hop-by-hop ones and (unless it is a trusted proxy) its
        forwarding ones, then the server's X-Forwarded-* and Forwarded."""
        request, upstream = self.request, self.upstream
        assert request is not None and upstream is not None
        fields = self.fields
        connection = fields.get(b"connection")
        tokens = {t.strip().lower() for t in connection.split(b",")} if connection else set()
        lines = [b"%b %b HTTP/1.1" % (request.method, request.target)]
        trusted = self.trusted
        forwarded_for: list[bytes] = []
        for name, value in self.headers:
            if name in HOP_BY_HOP or name in tokens:
                continue
            if name in FORWARDING:
                if trusted and name == b"x-forwarded-for":
                    forwarded_for.append(value)
                elif trusted and name == b"forwarded":
                    lines.append(b"forwarded: " + value)
                continue
            lines.append(name + b": " + value)
        chunked = b"transfer-encoding" in fields
        if chunked:
            lines.append(b"transfer-encoding: chunked")
        upgrade = fields.get(b"upgrade")
        if upgrade and b"upgrade" in tokens:
            lines += [b"connection: upgrade", b"upgrade: " + upgrade]
        host = fields.get(b"host", b"")
        if self.forwarding[0] != host or forwarded_for:
            self.forwarding = (host, self._forwarding_lines(host, forwarded_for))
        lines.append(self.forwarding[1])
        if not host or b"host" in tokens:
            lines.append(b"host: " + (self.host_name if self.host_name != "-" else "").encode())
        upstream.send_head(b"\r\n".join(lines) + b"\r\n\r\n", chunked)
        self._pump()

    def _forwarding_lines(self, host_header: bytes, forwarded_for: list[bytes]) -> bytes:
        """The server's X-Forwarded-For/Proto/Host and Forwarded lines (joined)."""
        client = self.peer[0]
        host = self.host_name if self.host_name != "-" else ""
        node = f'"[{client}]"' if ":" in client else client
        return b"\r\n".join([
            b"x-forwarded-for: " + b", ".join([*forwarded_for, client.encode()]),
            b"x-forwarded-proto: " + self.scheme.encode(),
            b"x-forwarded-host: " + (host_header or host.encode()),
            f"forwarded: for={node};proto={self.scheme};host=\"{host}\"".encode("latin-1"),
        ])

    def _to_upstream(self, data: bytes) -> None:
        if self.upstream is not None:
            self._count_in(len(data))
            self.upstream.stream.local_data(data)
