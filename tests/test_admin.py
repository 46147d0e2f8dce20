"""The status page and admin API (rtunnel/admin.py): real HTTP requests to a
real server with a real client and tunnels up; the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage
from twisted.trial import unittest
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from rtunnel.admin import ADMIN_TOKEN_FILE, load_or_create_admin_token
from rtunnel.endpoints import local_endpoint
from rtunnel.errors import ConfigError
from rtunnel.tap.server import Options
from tests.chromium import Chromium, chromium_missing
from tests.harness import (
    TWISTD,
    Echo,
    PageReader,
    Process,
    Tunnel,
    Visitor,
    free_port,
    free_ports,
    listen_target,
    plugins_installed,
    sleep,
    visit,
    wait_until,
    with_timeout,
)


class Admin:
    """HTTP access to a Tunnel's admin endpoint."""

    def __init__(self, tunnel: Tunnel) -> None:
        service = tunnel.server_service
        assert service is not None and service.admin is not None and service.admin.port is not None
        self.port = service.admin.port.getHost().port
        self.token = (tunnel.state_dir / ADMIN_TOKEN_FILE).read_text().strip()
        self.agent = Agent(reactor)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @defer.inlineCallbacks
    def request(self, method: str, path: str, token: str | None = "", body: Any = None) -> Any:
        """(status, headers, body bytes); token "" means the right one."""
        headers = Headers()
        if token == "":
            token = self.token
        if token is not None:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
        response = yield with_timeout(
            self.agent.request(method.encode(), self.url(path).encode(), headers, body), 10
        )
        data = yield readBody(response)
        return response.code, response.headers, data

    @defer.inlineCallbacks
    def sessions(self) -> Any:
        code, _, data = yield self.request("GET", "/api/sessions")
        assert code == 200, (code, data)
        return json.loads(data)


def only_session(listing: dict[str, Any], client: str = "default") -> dict[str, Any]:
    [entry] = [c for c in listing["clients"] if c["name"] == client]
    [session] = entry["sessions"]
    return session


@defer.inlineCallbacks
def refused(port: int) -> Any:
    """True if 127.0.0.1:port refuses a connection."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    try:
        connected = yield endpoint.connect(Factory.forProtocol(Protocol))
    except error.ConnectionRefusedError:
        return True
    connected.transport.abortConnection()
    return False


class AdminTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def up(self, tunnels: int = 1, **client: Any) -> Any:
        """A server with --admin on a free port and a client with `tunnels`
        echo tunnels on fixed free ports; fires with (tunnel, admin, ports)."""
        tunnel = Tunnel(self)
        yield tunnel.start_server(admin="tcp:0:interface=127.0.0.1")
        _, target = listen_target(self, Echo)
        ports = yield tunnel.connect([(port, target) for port in free_ports(tunnels)], **client)
        return tunnel, Admin(tunnel), ports

    def test_token_file_is_private_and_reused(self) -> None:
        state = Path(tempfile.mkdtemp(prefix="rtunnel-admin-"))
        token, created = load_or_create_admin_token(state)
        self.assertTrue(created)
        self.assertGreaterEqual(len(token), 40)
        path = state / ADMIN_TOKEN_FILE
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(load_or_create_admin_token(state), (token, False))
        self.assertEqual([p.name for p in state.iterdir()], [ADMIN_TOKEN_FILE])  # no temp file left

    def test_admin_option_defaults_to_localhost(self) -> None:
        self.assertEqual(local_endpoint("9119", "--admin", 9119), "tcp:9119:interface=127.0.0.1")
        self.assertEqual(local_endpoint(r"tcp:9119:interface=\:\:1", "--admin", 9119), r"tcp:9119:interface=\:\:1")
        self.assertRaises(ConfigError, local_endpoint, "70000", "--admin", 9119)
        options = Options()
        options.parseOptions(["--admin", "9119", "--state-dir", tempfile.mkdtemp()])
        self.assertEqual(options.config.admin, "tcp:9119:interface=127.0.0.1")
        options = Options()
        options.parseOptions(["--state-dir", tempfile.mkdtemp()])
        self.assertIsNone(options.config.admin)

    def test_a_bad_admin_endpoint_is_a_usage_error(self) -> None:
        """Checked while the options are parsed, before anything listens;
        unescaped IPv6 colons are the usual mistake."""
        for value in ("tcp:9119:interface=::1", "nosuchtype:1", "70000", ""):
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(["--admin", value, "--state-dir", tempfile.mkdtemp()])
            self.assertIn("--admin", str(caught.exception))
            self.assertIn("give a port", str(caught.exception))

    @defer.inlineCallbacks
    def test_refused_without_or_with_a_wrong_token(self) -> None:
        tunnel, admin, _ = yield self.up()
        where = str(tunnel.state_dir / ADMIN_TOKEN_FILE)
        for token in (None, "wrong-" + admin.token, admin.token[:-1]):
            code, headers, body = yield admin.request("GET", "/api/sessions", token=token)
            self.assertEqual(code, 401)
            message = json.loads(body)["error"]
            self.assertIn("Authorization: Bearer", message)
            self.assertIn(where, message)
            self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="rtunnel admin"'])
            code, _, body = yield admin.request("GET", "/" + ("" if token is None else f"?token={token}"), token=None)
            self.assertEqual(code, 401)
            self.assertIn(where.encode(), body)
            self.assertNotIn(b"/api/sessions", body)  # the page itself is not served
        # a state change refused without the header, even with the token in the query
        session = next(iter(tunnel.server.sessions.values()))
        code, _, _ = yield admin.request(
            "POST", f"/api/sessions/{session.id}/disconnect?token={admin.token}", token=None
        )
        self.assertEqual(code, 401)
        self.assertEqual(session.state.value, "connected")
        code, _, body = yield admin.request("GET", f"/?token={admin.token}", token=None)
        self.assertEqual(code, 200)
        self.assertIn(b"/api/sessions", body)

    @defer.inlineCallbacks
    def test_list_shows_client_session_tunnels_and_streams(self) -> None:
        tunnel, admin, ports = yield self.up(tunnels=2)
        payload = os.urandom(200_000)
        reply, _ = yield with_timeout(visit(ports[0], Visitor(payload)), 10)
        self.assertEqual(reply, payload)
        lingering = Visitor(b"hello", half_close=False)
        visit(ports[1], lingering)
        self.addCleanup(lambda: lingering.transport and lingering.transport.abortConnection())
        yield wait_until(lambda: lingering.received == 5)

        listing = yield admin.sessions()
        session = only_session(listing)
        server_session = next(iter(tunnel.server.sessions.values()))
        self.assertEqual(session["id"], server_session.id)
        self.assertEqual(session["state"], "connected")
        self.assertTrue(session["peer"].startswith("127.0.0.1:"))
        client_port = tunnel.client_service.client.link.transport.getHost().port
        self.assertEqual(session["peer"], f"127.0.0.1:{client_port}")
        self.assertLessEqual(session["started"], session["since"])
        self.assertLessEqual(session["since"], listing["now"])
        self.assertGreaterEqual(session["bytes_in"], len(payload))  # the echo came back through
        self.assertGreaterEqual(session["bytes_out"], len(payload))
        self.assertEqual(
            [(t["port"], t["address"], t["streams"]) for t in session["tunnels"]],
            [(ports[0], f"127.0.0.1:{ports[0]}", 0), (ports[1], f"127.0.0.1:{ports[1]}", 1)],
        )
        self.assertEqual(session["streams_open"], 1)
        [stream] = session["streams"]
        self.assertEqual(stream["tunnel"], session["tunnels"][1]["id"])
        self.assertEqual(stream["visitor"], f"127.0.0.1:{lingering.transport.getHost().port}")
        self.assertEqual((stream["bytes_in"], stream["bytes_out"]), (5, 5))

        # rates: bytes per second between samples at least 0.5 s apart
        yield sleep(0.6)
        more = os.urandom(300_000)
        reply, _ = yield with_timeout(visit(ports[0], Visitor(more)), 10)
        self.assertEqual(reply, more)
        later = only_session((yield admin.sessions()))
        self.assertGreater(later["rate_in"], 0)
        self.assertGreater(later["rate_out"], 0)
        self.assertGreaterEqual(later["bytes_in"] - session["bytes_in"], len(more))

    @defer.inlineCallbacks
    def test_a_dropped_link_shows_as_detached_since_the_drop(self) -> None:
        tunnel, admin, ports = yield self.up(initial_retry_delay=60, max_retry_delay=60)
        before = only_session((yield admin.sessions()))
        yield sleep(0.2)
        tunnel.client_service.client.link.transport.abortConnection()
        yield wait_until(lambda: next(iter(tunnel.server.sessions.values())).state.value == "detached")
        after = only_session((yield admin.sessions()))
        self.assertEqual((after["id"], after["state"], after["peer"]), (before["id"], "detached", before["peer"]))
        self.assertEqual(after["started"], before["started"])
        self.assertGreater(after["since"], before["since"] + 0.1)
        self.assertEqual([t["port"] for t in after["tunnels"]], ports)  # kept for the resume grace

    @defer.inlineCallbacks
    def test_disconnect_ends_the_session_and_the_client_starts_a_new_one(self) -> None:
        tunnel, admin, ports = yield self.up(initial_retry_delay=1.5, max_retry_delay=1.5)
        old = next(iter(tunnel.server.sessions.values()))
        visitor = Visitor(b"x", half_close=False)
        done = visit(ports[0], visitor)
        yield wait_until(lambda: visitor.received == 1)

        code, _, body = yield admin.request("POST", f"/api/sessions/{old.id}/disconnect")
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["state"], "expired")
        _, reason = yield with_timeout(done, 5)  # its visitor was reset
        self.assertNotIn(old.id, tunnel.server.sessions)
        self.assertTrue((yield refused(ports[0])), "the session's port stays open")
        listing = yield admin.sessions()
        self.assertEqual(listing["clients"], [])  # token credentials are listed while they have sessions

        # the client reconnects (its resume is refused) and binds again
        yield wait_until(lambda: any(s.tunnels for s in tunnel.server.sessions.values()), 15)
        new = only_session((yield admin.sessions()))
        self.assertNotEqual(new["id"], old.id)
        self.assertEqual([t["port"] for t in new["tunnels"]], ports)
        reply, _ = yield with_timeout(visit(ports[0], Visitor(b"again")), 10)
        self.assertEqual(reply, b"again")

        code, _, body = yield admin.request("POST", f"/api/sessions/{old.id}/disconnect")
        self.assertEqual(code, 404)
        self.assertIn(b"GET /api/sessions", body)

    @defer.inlineCallbacks
    def test_close_tunnel_closes_only_that_port(self) -> None:
        tunnel, admin, ports = yield self.up(tunnels=2)
        session = only_session((yield admin.sessions()))
        closing, keeping = session["tunnels"]
        visitor = Visitor(b"x", half_close=False)
        done = visit(ports[0], visitor)
        yield wait_until(lambda: visitor.received == 1)

        path = f"/api/sessions/{session['id']}/tunnels/{closing['id']}/close"
        code, _, body = yield admin.request("GET", path)
        self.assertEqual(code, 405)  # state changes are POSTs only
        code, _, body = yield admin.request("POST", path)
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["address"], f"127.0.0.1:{ports[0]}")
        yield with_timeout(done, 5)  # its open connection was reset
        self.assertTrue((yield refused(ports[0])))
        reply, _ = yield with_timeout(visit(ports[1], Visitor(b"still here")), 10)
        self.assertEqual(reply, b"still here")
        after = only_session((yield admin.sessions()))
        self.assertEqual(after["id"], session["id"])  # same session, no reconnect
        self.assertEqual([t["id"] for t in after["tunnels"]], [keeping["id"]])
        client = tunnel.client_service.client
        yield wait_until(lambda: closing["id"] not in client.bound)
        self.assertIn(keeping["id"], client.bound)

        code, _, _ = yield admin.request("POST", path)
        self.assertEqual(code, 404)
        code, _, _ = yield admin.request("POST", f"/api/sessions/{session['id']}/tunnels/x/close")
        self.assertEqual(code, 404)
        code, _, _ = yield admin.request("GET", "/api/nothing")
        self.assertEqual(code, 404)
        # a server alone has no fleet: /api/fleet says so, /api/sessions has no "fleet"
        code, _, body = yield admin.request("GET", "/api/fleet")
        self.assertEqual(code, 404)
        self.assertIn("not a fleet member (start it with --fleet-etcd", json.loads(body)["error"])
        self.assertNotIn("fleet", (yield admin.sessions()))

    @defer.inlineCallbacks
    def test_status_page_in_headless_chromium(self) -> None:
        missing = chromium_missing()
        if missing:
            raise unittest.SkipTest(missing)
        tunnel, admin, ports = yield self.up()
        payload = os.urandom(100_000)
        reply, _ = yield with_timeout(visit(ports[0], Visitor(payload)), 10)
        self.assertEqual(reply, payload)
        browser = Chromium(reactor)
        self.addCleanup(browser.cleanup)
        code, dom, err = yield browser.run(
            admin.url(f"/?token={admin.token}"),
            ["--dump-dom", "--virtual-time-budget=3000", "--window-size=1200,700"],
            timeout=60,
        )
        self.assertEqual(code, 0, err[-2000:])
        page = PageReader()
        page.feed(dom.decode())
        session = next(iter(tunnel.server.sessions.values()))
        self.assertIn("default", page.texts("name"))
        self.assertEqual(page.attrs("data-state", "span"), ["connected"])
        self.assertEqual(page.attrs("data-session", "div"), [session.id])
        self.assertEqual(page.attrs("data-port", "tr"), [str(ports[0])])
        self.assertEqual(page.texts("address"), [f"127.0.0.1:{ports[0]}"])
        [shown_in] = page.attrs("data-bytes", "span", cls="bytes-in")
        self.assertGreaterEqual(int(shown_in), len(payload))
        self.assertTrue(page.texts("peer")[0].startswith("127.0.0.1:"))


class InstalledAdminTests(SynchronousTestCase):
    """`twistd rtunnel-server --admin PORT` as a user runs it (the installed
    plugin; `pip install --no-deps .` first, as for tests/test_processes.py)."""

    def test_admin_option_of_the_installed_plugin(self) -> None:
        reason = plugins_installed()
        if reason:
            raise SkipTest(reason)
        workdir = Path(tempfile.mkdtemp(prefix="rtunnel-admin-process-"))
        self.addCleanup(shutil.rmtree, workdir, True)
        state = workdir / "state"
        port = free_port()
        server = Process(
            self, "server",
            [*TWISTD, "--nodaemon", "--pidfile=", "rtunnel-server", "--port", str(free_port()),
             "--interface", "127.0.0.1", "--state-dir", str(state), "--admin", str(port)],
            workdir,
        )
        token_path = state / ADMIN_TOKEN_FILE
        server.wait_for(
            re.escape(f"admin status page and API on http://127.0.0.1:{port}/ (tcp:{port}:interface=127.0.0.1); "
                      f"the admin token is in {token_path} (new); open http://127.0.0.1:{port}/?token=$(cat {token_path})")
        )
        self.assertEqual(stat.S_IMODE(token_path.stat().st_mode), 0o600)
        url = f"http://127.0.0.1:{port}/api/sessions"
        with self.assertRaises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        self.assertEqual(refused.exception.code, 401)
        self.assertIn(str(token_path), json.loads(refused.exception.read())["error"])
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token_path.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            self.assertEqual(json.loads(answer.read())["clients"], [])
        self.assertNotIn("GET /api/sessions", server.output)  # no access-log line per request
        server.stop()
        self.assertNotIn("Traceback", server.output)
