"""The server's status page and admin API (`--admin ENDPOINT`), on twisted.web.

Every request needs the admin token (the state dir's `admin-token`, made on
first use): API requests send `Authorization: Bearer TOKEN`; the page itself
is opened as `/?token=TOKEN` and its script sends the header. State-changing
requests are POSTs that need the header, so a cross-site form cannot make
them. See docs/admin.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web import resource
from twisted.web.iweb import IRequest

from rtunnel.addresses import format_host_port, known_host_port
from rtunnel.endpoints import local_endpoint
from rtunnel.errors import ConfigError
from rtunnel.server import ServerSession, SessionState, TunnelServer
from rtunnel.tcp import port_number
from rtunnel.tls import load_or_create_secret
from rtunnel.web import QuietSite

ADMIN_TOKEN_FILE = "admin-token"
ADMIN_TOKEN_BYTES = 32  # random bytes of a new admin token
MIN_RATE_INTERVAL = 0.5  # seconds between the byte samples a rate is computed from
MAX_STREAMS_LISTED = 100  # per session in /api/sessions (the count is always exact)
_TOKEN_KEY = "rtunnel-admin-token"


@cache
def status_page() -> bytes:
    """The status page (rtunnel/assets/status.html), with the key under
    which its script keeps the token in the browser's sessionStorage."""
    page = files("rtunnel").joinpath("assets/status.html").read_text(encoding="utf-8")
    return page.replace("__TOKEN_KEY__", _TOKEN_KEY).encode()


def load_or_create_admin_token(state_dir: Path) -> tuple[str, bool]:
    """The admin token from `state_dir/admin-token`; made (0600, written
    atomically) if absent or empty. Returns (token, created)."""
    return load_or_create_secret(state_dir / ADMIN_TOKEN_FILE, "admin token", ADMIN_TOKEN_BYTES)


def _address(addr: IAddress | None) -> str | None:
    known = known_host_port(addr)
    return format_host_port(*known) if known is not None else None


class RateMeter:
    """Byte rates per session, computed on the server between snapshots at
    least MIN_RATE_INTERVAL apart (so any number of pollers see the same,
    steady figures, and a plain `curl` gets rates too)."""

    def __init__(self) -> None:
        self._samples: dict[str, tuple[float, int, int, float, float]] = {}

    def rates(self, session_id: str, now: float, bytes_in: int, bytes_out: int) -> tuple[float, float]:
        sample = self._samples.get(session_id)
        if sample is None:
            self._samples[session_id] = (now, bytes_in, bytes_out, 0.0, 0.0)
            return 0.0, 0.0
        then, was_in, was_out, rate_in, rate_out = sample
        if now - then >= MIN_RATE_INTERVAL:
            rate_in = (bytes_in - was_in) / (now - then)
            rate_out = (bytes_out - was_out) / (now - then)
            self._samples[session_id] = (now, bytes_in, bytes_out, rate_in, rate_out)
        return rate_in, rate_out

    def keep_only(self, session_ids: set[str]) -> None:
        for gone in set(self._samples) - session_ids:
            del self._samples[gone]


def describe_session(session: ServerSession, now: float, meter: RateMeter) -> dict[str, Any]:
    """One session as the API shows it. Directions are the server's: `in`
    is what came from the client, `out` what went to it."""
    mux = session.mux_session
    rate_in, rate_out = meter.rates(session.id, now, mux.bytes_in, mux.bytes_out)
    open_per_tunnel: dict[int, int] = {}
    for stream in mux.streams.values():
        open_per_tunnel[stream.tunnel_id] = open_per_tunnel.get(stream.tunnel_id, 0) + 1
    tunnels = []
    for tunnel_id, listener in sorted(session.tunnels.items()):
        port = port_number(listener.port) if listener.port is not None else 0
        tunnels.append({
            "id": tunnel_id,
            "host": listener.host,
            "port": port,
            "address": format_host_port(listener.host, port),
            "streams": open_per_tunnel.get(tunnel_id, 0),
        })
    routes = session.server.hostnames
    for tunnel_id, host_tunnel in sorted(session.hostnames.items()):  # hostnames on the shared ports (#15)
        if host_tunnel.claim is None:
            continue
        stats = routes.stats.get(host_tunnel.name)
        urls = routes.urls(host_tunnel.name, host_tunnel.kind)
        tunnels.append({
            "id": tunnel_id,
            "kind": host_tunnel.kind,
            "hostname": host_tunnel.name,
            "host": host_tunnel.name,
            "port": 0,
            "address": urls[0] if urls else host_tunnel.name,
            "urls": list(urls),
            "streams": open_per_tunnel.get(tunnel_id, 0),
            "requests": stats.requests if stats else 0,
            "responses": dict(stats.statuses) if stats else {},
            "bytes_in": stats.bytes_in if stats else 0,
            "bytes_out": stats.bytes_out if stats else 0,
        })
    flows: list[dict[str, Any]] = []
    for tunnel_id, udp in sorted(session.udp_tunnels.items()):  # UDP ports (docs/udp.md)
        port = udp.key[1] if udp.port is not None else 0
        tunnels.append({
            "id": tunnel_id, "kind": "udp", "host": udp.host, "port": port,
            "address": "udp:" + format_host_port(udp.host, port), "streams": 0, "flows": len(udp.flows),
            "datagrams_in": udp.datagrams_in, "datagrams_out": udp.datagrams_out,
            "dropped": dict(sorted(udp.drops.items())),
        })
        for flow in list(udp.flows.values())[:MAX_STREAMS_LISTED - len(flows)]:
            flows.append({
                "id": flow.id, "tunnel": tunnel_id, "visitor": format_host_port(*flow.address),
                "datagrams_in": flow.datagrams_in, "datagrams_out": flow.datagrams_out,
                "bytes_in": flow.bytes_in, "bytes_out": flow.bytes_out, "idle": round(now - flow.last_seen, 1),
            })
    streams = []
    for stream in list(mux.streams.values())[:MAX_STREAMS_LISTED]:
        visitor = None
        get_peer = getattr(stream.local, "getPeer", None)  # a socket, or a fleet member's bridge (rtunnel.fleet.bridge)
        if get_peer is not None:
            try:
                visitor = _address(get_peer())
            except Exception:
                visitor = None
        streams.append({
            "id": stream.id,
            "tunnel": stream.tunnel_id,
            "visitor": visitor,
            "bytes_in": stream.received,
            "bytes_out": stream.read_total,
        })
    return {
        "id": session.id,
        "state": session.state.value,
        "since": session.state_since,
        "started": session.started_at,
        "peer": format_host_port(*session.peer) if session.peer is not None else None,
        "bytes_in": mux.bytes_in,
        "bytes_out": mux.bytes_out,
        "rate_in": round(rate_in, 1),
        "rate_out": round(rate_out, 1),
        "tunnels": tunnels,
        "streams_open": len(mux.streams),
        "streams": streams,
        "flows_open": sum(len(udp.flows) for udp in session.udp_tunnels.values()),
        "flows": flows,
    }


def describe(server: TunnelServer, meter: RateMeter) -> dict[str, Any]:
    """The whole server as GET /api/sessions returns it: every client (the
    clients file's, and any credential with a session), its sessions."""
    now = server.reactor.seconds()
    sessions = [s for s in server.sessions.values() if s.state is not SessionState.EXPIRED]
    meter.keep_only({s.id for s in sessions})
    names = sorted(set(server.clients) | {s.credential for s in sessions})
    clients = []
    for name in names:
        mine = sorted((s for s in sessions if s.credential == name), key=lambda s: s.started_at)
        clients.append({"name": name, "sessions": [describe_session(s, now, meter) for s in mine]})
    described: dict[str, Any] = {"now": now, "clients": clients}
    if server.fleet is not None:  # a fleet member (docs/fleet.md): the fleet as it sees it
        described["fleet"] = server.fleet.describe()
    return described


# ---------------------------------------------------------------- web resources


def _common_headers(request: IRequest) -> None:
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")


def _json(request: IRequest, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(body, indent=1).encode() + b"\n"


class JsonError(resource.Resource):
    """A JSON error answer, whatever the method."""

    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render(self, request: IRequest) -> bytes:
        _common_headers(request)
        if self.code == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="rtunnel admin"')
        return _json(request, self.code, {"error": self.message})


NOT_FOUND = JsonError(404, "unknown admin path: the page is /, the API is /api/sessions (see docs/admin.md)")


class Unauthorized(resource.Resource):
    """401 for the page: says where the token is, with a form to paste it."""

    isLeaf = True

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def render(self, request: IRequest) -> bytes:
        _common_headers(request)
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="rtunnel admin"')
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
            b"frame-ancestors 'none'",
        )
        text = self.message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return (
            "<!doctype html><meta charset=utf-8><title>rtunnel: admin token needed</title>"
            "<link rel=icon href='data:,'>"
            "<body style='font-family:sans-serif;max-width:40em;margin:3em auto'>"
            f"<h1>Admin token needed</h1><p>{text}</p>"
            "<form method=get action='/'><input name=token size=48 autocomplete=off "
            "placeholder='admin token'> <button>Open the status page</button></form>"
        ).encode()


class ActionResource(resource.Resource):
    """POST-only: runs `action`, which returns (HTTP code, JSON body)."""

    isLeaf = True

    def __init__(self, action: Any) -> None:
        super().__init__()
        self.action = action

    def render_POST(self, request: IRequest) -> bytes:
        _common_headers(request)
        code, body = self.action()
        return _json(request, code, body)

    def render_GET(self, request: IRequest) -> bytes:
        _common_headers(request)
        request.setHeader(b"allow", b"POST")
        return _json(request, 405, {"error": "this changes state: use POST (with the Authorization header)"})


class SessionResource(resource.Resource):
    """/api/sessions/<id>/disconnect and /api/sessions/<id>/tunnels/<n>/close."""

    log = Logger()

    def __init__(self, admin: AdminServer, session_id: str) -> None:
        super().__init__()
        self.admin = admin
        self.session_id = session_id

    def _session(self) -> ServerSession | None:
        session = self.admin.server.sessions.get(self.session_id)
        if session is None or session.state is SessionState.EXPIRED:
            return None
        return session

    def _missing(self) -> tuple[int, dict[str, Any]]:
        return 404, {"error": f"no session {self.session_id[:64]!r}; GET /api/sessions lists the sessions"}

    def disconnect(self) -> tuple[int, dict[str, Any]]:
        session = self._session()
        if session is None:
            return self._missing()
        self.log.info(
            "admin disconnected session {id} of {cred}", id=session.id[:8], cred=session.credential, event="admin_disconnect", session=session.id[:8], credential=session.credential
        )
        session.expire("disconnected by the server's administrator")
        return 200, {"session": session.id, "client": session.credential, "state": session.state.value}

    def close_tunnel(self, tunnel: bytes) -> tuple[int, dict[str, Any]]:
        session = self._session()
        if session is None:
            return self._missing()
        tunnel_id = int(tunnel) if tunnel.isdigit() and len(tunnel) < 11 else -1
        listener = session.tunnels.get(tunnel_id)
        udp = session.udp_tunnels.get(tunnel_id)
        if udp is not None and udp.port is not None:
            address = "udp:" + format_host_port(*udp.key)
            session.close_tunnel(tunnel_id, "closed by the server's administrator")
            return 200, {"session": session.id, "tunnel": tunnel_id, "address": address, "closed": True}
        if listener is None:
            return 404, {"error": f"session {session.id} has no tunnel {tunnel.decode(errors='replace')[:20]!r}; "
                         "GET /api/sessions lists its tunnels"}
        address = format_host_port(listener.host, port_number(listener.port) if listener.port else 0)
        session.close_tunnel(tunnel_id, "closed by the server's administrator")
        return 200, {"session": session.id, "tunnel": tunnel_id, "address": address, "closed": True}

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        rest = request.postpath
        if path == b"disconnect" and not rest:
            return ActionResource(self.disconnect)
        if path == b"tunnels" and len(rest) == 2 and rest[1] == b"close":
            tunnel = rest[0]
            return ActionResource(lambda: self.close_tunnel(tunnel))
        return JsonError(404, "unknown admin API path; see docs/admin.md")

    def render(self, request: IRequest) -> bytes:
        return NOT_FOUND.render(request)


class ApiResource(resource.Resource):
    """/api: /api/sessions and below, and /api/fleet."""

    def __init__(self, admin: AdminServer) -> None:
        super().__init__()
        self.putChild(b"sessions", SessionsResource(admin))
        self.putChild(b"fleet", FleetResource(admin))

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        return NOT_FOUND

    def render(self, request: IRequest) -> bytes:
        return NOT_FOUND.render(request)


class SessionsResource(resource.Resource):
    """GET /api/sessions: every client and its sessions, tunnels, streams."""

    def __init__(self, admin: AdminServer) -> None:
        super().__init__()
        self.admin = admin

    def render_GET(self, request: IRequest) -> bytes:
        _common_headers(request)
        return _json(request, 200, describe(self.admin.server, self.admin.meter))

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        if path == b"":
            return self
        return SessionResource(self.admin, path.decode("ascii", errors="replace"))


class FleetResource(resource.Resource):
    """GET /api/fleet: the fleet as this member sees it, and POST
    /api/fleet/drain (404 on a server that is not a fleet member)."""

    def __init__(self, admin: AdminServer) -> None:
        super().__init__()
        self.admin = admin
        self.putChild(b"drain", ActionResource(self.drain))

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        if path == b"":
            return self
        return NOT_FOUND

    def render_GET(self, request: IRequest) -> bytes:
        _common_headers(request)
        fleet = self.admin.server.fleet
        if fleet is None:
            return _json(request, 404, _NOT_A_MEMBER)
        return _json(request, 200, fleet.describe())

    def drain(self) -> tuple[int, dict[str, Any]]:
        """Start draining this member, as SIGUSR2 does (docs/fleet.md
        "Draining a member"): 202 with what happens, 409 when no other
        member is up to take the clients."""
        fleet = self.admin.server.fleet
        if fleet is None:
            return 404, _NOT_A_MEMBER
        drain = getattr(fleet, "drain", None)
        if drain is None:
            return 503, {"error": "this member is still starting (its control port is not open yet); try again"}
        answer = drain.start()
        if not drain.draining:
            return 409, {"error": answer, "draining": False}
        return 202, {"draining": True, "state": answer, "target": drain.target[2]}


_NOT_A_MEMBER = {"error": "this server is not a fleet member (start it with --fleet-etcd; see docs/fleet.md)"}


class PageResource(resource.Resource):
    """The status page (static; its script polls the API)."""

    isLeaf = True

    def render_GET(self, request: IRequest) -> bytes:
        _common_headers(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src data:; form-action 'self'; base-uri 'none'; "
            b"frame-ancestors 'none'",
        )
        return status_page()


class AdminRoot(resource.Resource):
    """Checks the token on every request, then hands over to the tree."""

    def __init__(self, admin: AdminServer) -> None:
        super().__init__()
        self.admin = admin
        self.putChild(b"api", ApiResource(admin))
        self.putChild(b"", PageResource())

    def getChildWithDefault(self, path: bytes, request: IRequest) -> resource.Resource:
        is_page = path == b"" and not request.postpath
        if not self.admin.authorized(request, allow_query=is_page):
            if is_page:
                return Unauthorized(self.admin.how_to_authenticate())
            return JsonError(401, self.admin.how_to_authenticate())
        if path not in self.children or (path == b"" and request.postpath):
            return NOT_FOUND
        return self.children[path]


class _Connections(WrappingFactory):
    """Tracks open HTTP connections, so stopping closes them too."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._gone: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._gone = self._gone, []
            for d in waiters:
                d.callback(None)

    def close_all(self) -> defer.Deferred[None]:
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._gone.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


class AdminServer:
    """The admin endpoint of one TunnelServer: token, site, listening port."""

    log = Logger()

    def __init__(self, reactor: Any, server: TunnelServer, endpoint: str, state_dir: Path) -> None:
        self.reactor = reactor
        self.server = server
        self.endpoint = endpoint
        self.token_path = state_dir / ADMIN_TOKEN_FILE
        self.token, self.token_created = load_or_create_admin_token(state_dir)
        self._digest = hashlib.sha256(self.token.encode()).digest()
        self.meter = RateMeter()
        self.port: IListeningPort | None = None
        self._factory = _Connections(QuietSite(AdminRoot(self)))
        self._factory.noisy = False

    def authorized(self, request: IRequest, allow_query: bool) -> bool:
        """Constant-time check of the Authorization header (or, for the
        page only, of ?token=)."""
        presented = b""
        header = request.getHeader(b"authorization") or b""
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer":
            presented = value.strip()
        elif allow_query:
            presented = (request.args.get(b"token") or [b""])[0]
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest)

    def how_to_authenticate(self) -> str:
        return (
            "missing or wrong admin token. Send it as the header 'Authorization: Bearer TOKEN' "
            f"(API) or open /?token=TOKEN (status page); TOKEN is in {self.token_path} on the server"
        )

    @defer.inlineCallbacks
    def listen(self) -> Any:
        """Listen on the admin endpoint; fires with the port."""
        endpoint = serverFromString(self.reactor, local_endpoint(self.endpoint, "--admin", 9119))
        try:
            self.port = yield endpoint.listen(self._factory)
        except Exception as e:
            raise ConfigError(
                f"cannot listen on the admin endpoint {self.endpoint}: {str(e).rstrip('.')}; "
                "choose another --admin (or stop the program using it)"
            ) from None
        known = known_host_port(self.port.getHost())
        if known is None:  # e.g. a Unix socket: no URL to open
            where, hint = self.endpoint, "send it as the header 'Authorization: Bearer TOKEN'"
        else:
            host, port = known
            scheme = "https" if self.endpoint.startswith("ssl:") else "http"
            url = f"{scheme}://{format_host_port('127.0.0.1' if host in ('0.0.0.0', '::') else host, port)}/"
            where, hint = f"{url} ({self.endpoint})", f"open {url}?token=$(cat {self.token_path})"
        self.log.info(
            "admin status page and API on {where}; the admin token is in {path}{created}; {hint}",
            where=where, path=str(self.token_path), hint=hint,
            created=" (new)" if self.token_created else "",
        )
        return self.port

    def stop(self) -> defer.Deferred[None]:
        waits: list[defer.Deferred[Any]] = []
        if self.port is not None:
            port, self.port = self.port, None
            waits.append(defer.maybeDeferred(port.stopListening))
        waits.append(self._factory.close_all())
        return defer.gatherResults(waits).addCallback(lambda _: None)

