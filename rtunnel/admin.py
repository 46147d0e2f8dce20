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
from rtunnel.tls import load_or_create_secret
from rtunnel.web import QuietSite

ADMIN_TOKEN_FILE = "admin-token"
ADMIN_TOKEN_BYTES = 32  # random bytes of a new admin token
MIN_RATE_INTERVAL = 0.5  # seconds between the byte samples a rate is computed from
MAX_STREAMS_LISTED = 100  # per session in /api/sessions (the count is always exact)
_TOKEN_KEY = "rtunnel-admin-token"


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
    mux = session.session
    rate_in, rate_out = meter.rates(session.id, now, mux.bytes_in, mux.bytes_out)
    open_per_tunnel: dict[int, int] = {}
    for stream in mux.streams.values():
        open_per_tunnel[stream.tunnel_id] = open_per_tunnel.get(stream.tunnel_id, 0) + 1
    tunnels = []
    for tunnel_id, listener in sorted(session.tunnels.items()):
        port = listener.port.getHost().port if listener.port is not None else 0
        tunnels.append({
            "id": tunnel_id,
            "host": listener.host,
            "port": port,
            "address": format_host_port(listener.host, port),
            "streams": open_per_tunnel.get(tunnel_id, 0),
        })
    streams = []
    for stream in list(mux.streams.values())[:MAX_STREAMS_LISTED]:
        visitor = None
        if stream.local is not None:
            try:
                visitor = _address(stream.local.getPeer())
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
    return {"now": now, "clients": clients}


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
        if listener is None:
            return 404, {"error": f"session {session.id} has no tunnel {tunnel.decode(errors='replace')[:20]!r}; "
                         "GET /api/sessions lists its tunnels"}
        address = format_host_port(listener.host, listener.port.getHost().port if listener.port else 0)
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
    """/api: only /api/sessions and below."""

    def __init__(self, admin: AdminServer) -> None:
        super().__init__()
        self.putChild(b"sessions", SessionsResource(admin))

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
        return PAGE.encode()


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
        waits = []
        if self.port is not None:
            port, self.port = self.port, None
            waits.append(defer.maybeDeferred(port.stopListening))
        waits.append(self._factory.close_all())
        return defer.gatherResults(waits).addCallback(lambda _: None)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>rtunnel server status</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
 header { background: #1d2330; color: #fff; padding: 10px 20px; display: flex; align-items: baseline; gap: 16px; }
 header h1 { font-size: 17px; margin: 0; }
 header .meta { color: #aab; font-size: 12px; }
 main { padding: 14px 20px; }
 .client { background: #fff; border: 1px solid #d8dbe2; border-radius: 6px; margin-bottom: 14px; }
 .client h2 { font-size: 15px; margin: 0; padding: 8px 12px; border-bottom: 1px solid #e4e6eb; }
 .client h2 .count { color: #667; font-weight: normal; font-size: 12px; margin-left: 8px; }
 .session { padding: 8px 12px; border-bottom: 1px solid #eef0f3; }
 .session:last-child { border-bottom: none; }
 .row { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 18px; }
 .state { font-weight: 600; border-radius: 10px; padding: 1px 9px; font-size: 12px; }
 .state.connected { background: #d9f2df; color: #14662b; }
 .state.detached { background: #fdecc8; color: #7a5200; }
 .sid { font-family: ui-monospace, monospace; color: #556; }
 .label { color: #778; font-size: 12px; }
 .num { font-variant-numeric: tabular-nums; }
 table { border-collapse: collapse; margin: 6px 0 2px; font-size: 13px; }
 th, td { text-align: left; padding: 2px 14px 2px 0; }
 th { color: #778; font-weight: normal; font-size: 12px; }
 button { font: inherit; font-size: 12px; padding: 1px 8px; cursor: pointer; border: 1px solid #b9bfca; background: #fff; border-radius: 4px; }
 button.danger { border-color: #d49a9a; color: #8a1f1f; }
 button:hover { background: #f0f1f4; }
 .spacer { flex: 1; }
 .empty { color: #889; padding: 8px 12px; }
 #error { display: none; background: #fbe3e3; color: #8a1f1f; padding: 8px 20px; }
</style></head>
<body>
<header><h1>rtunnel server</h1><span class="meta" id="updated">loading…</span></header>
<div id="error"></div>
<main id="clients"></main>
<script>
"use strict";
const KEY = "__TOKEN_KEY__";
const params = new URLSearchParams(location.search);
const token = params.get("token") || sessionStorage.getItem(KEY) || "";
if (token) sessionStorage.setItem(KEY, token);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}
function ago(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return seconds + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
  const h = Math.floor(seconds / 3600);
  return h < 48 ? h + " h " + Math.floor((seconds % 3600) / 60) + " min" : Math.floor(h / 24) + " days";
}
function stamp(t) { return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC"; }

async function api(method, path) {
  const response = await fetch(path, { method, headers: { "Authorization": "Bearer " + token }, cache: "no-store" });
  const body = await response.json().catch(() => ({ error: "HTTP " + response.status }));
  if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
  return body;
}
async function act(what, path) {
  if (!confirm(what + "?")) return;
  try { await api("POST", path); } catch (e) { showError(e.message); }
  refresh();
}
function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.style.display = message ? "block" : "none";
}

function renderSession(client, s, now) {
  const sid = encodeURIComponent(s.id);
  const head = el("div", { class: "row" },
    el("span", { class: "state " + s.state, "data-state": s.state }, s.state),
    el("span", {}, el("span", { class: "label" }, "since "),
       el("span", { title: stamp(s.since) }, ago(now - s.since) + " ago")),
    el("span", {}, el("span", { class: "label" }, "from "), el("span", { class: "peer" }, s.peer || "–")),
    el("span", { class: "num" }, el("span", { class: "label" }, "in "),
       el("span", { class: "bytes-in", "data-bytes": s.bytes_in }, bytes(s.bytes_in)),
       el("span", { class: "label" }, " (" + bytes(s.rate_in) + "/s)")),
    el("span", { class: "num" }, el("span", { class: "label" }, "out "),
       el("span", { class: "bytes-out", "data-bytes": s.bytes_out }, bytes(s.bytes_out)),
       el("span", { class: "label" }, " (" + bytes(s.rate_out) + "/s)")),
    el("span", {}, el("span", { class: "label" }, "streams "), el("span", { class: "num streams-open" }, s.streams_open)),
    el("span", { class: "spacer" }),
    el("span", { class: "sid", title: s.id }, s.id.slice(0, 8)),
    el("button", { class: "danger", onclick: () => act("Disconnect session " + s.id.slice(0, 8) + " of " + client,
                                                       "/api/sessions/" + sid + "/disconnect") }, "Disconnect"));
  const node = el("div", { class: "session", "data-session": s.id, "data-state": s.state }, head);
  if (s.tunnels.length) {
    const table = el("table", { class: "tunnels" },
      el("tr", {}, el("th", {}, "tunnel"), el("th", {}, "public address"), el("th", {}, "open streams"), el("th", {}, "")));
    for (const t of s.tunnels) {
      table.append(el("tr", { class: "tunnel", "data-port": t.port },
        el("td", { class: "num" }, "#" + t.id), el("td", { class: "address" }, t.address),
        el("td", { class: "num" }, t.streams),
        el("td", {}, el("button", { onclick: () => act("Close port " + t.address, "/api/sessions/" + sid + "/tunnels/" + t.id + "/close") }, "Close"))));
    }
    node.append(table);
  } else {
    node.append(el("div", { class: "label" }, "no tunnels"));
  }
  if (s.streams.length) {
    const table = el("table", { class: "streams" },
      el("tr", {}, el("th", {}, "stream"), el("th", {}, "tunnel"), el("th", {}, "visitor"), el("th", {}, "from client"), el("th", {}, "to client")));
    for (const st of s.streams) {
      table.append(el("tr", {}, el("td", { class: "num" }, st.id), el("td", { class: "num" }, "#" + st.tunnel),
        el("td", {}, st.visitor || "–"), el("td", { class: "num" }, bytes(st.bytes_in)), el("td", { class: "num" }, bytes(st.bytes_out))));
    }
    if (s.streams_open > s.streams.length) table.append(el("tr", {}, el("td", { colspan: 5, class: "label" }, "… and " + (s.streams_open - s.streams.length) + " more")));
    node.append(table);
  }
  return node;
}

function render(data) {
  const root = document.getElementById("clients");
  root.replaceChildren();
  if (!data.clients.length) root.append(el("div", { class: "client empty" }, "No clients yet."));
  for (const c of data.clients) {
    const connected = c.sessions.filter(s => s.state === "connected").length;
    const card = el("section", { class: "client", "data-client": c.name },
      el("h2", {}, el("span", { class: "name" }, c.name),
         el("span", { class: "count" }, c.sessions.length + " session(s), " + connected + " connected")));
    if (!c.sessions.length) card.append(el("div", { class: "empty" }, "no session"));
    for (const s of c.sessions) card.append(renderSession(c.name, s, data.now));
    root.append(card);
  }
  document.getElementById("updated").textContent = "updated " + stamp(data.now);
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try { render(await api("GET", "/api/sessions")); showError(""); }
  catch (e) { showError("cannot load /api/sessions: " + e.message); }
  finally { busy = false; }
}
refresh();
setInterval(refresh, 1000);
</script>
</body></html>
""".replace("__TOKEN_KEY__", _TOKEN_KEY)
