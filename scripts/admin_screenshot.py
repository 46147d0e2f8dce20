"""Reproduce docs/status-page.png: a server with --admin, two clients with a
few tunnels, live traffic and one detached session, captured by headless
Chromium (Debian's /usr/bin/chromium).

    .venv/bin/python scripts/admin_screenshot.py [docs/status-page.png]

Everything runs in this process on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.protocol import ClientFactory, Factory, Protocol  # noqa: E402
from twisted.web.client import Agent, readBody  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from rtunnel.config import ClientConfig, ServerConfig, TunnelSpec  # noqa: E402
from rtunnel.tap.client import ClientMainService  # noqa: E402
from rtunnel.tap.server import ServerService  # noqa: E402
from rtunnel.tls import fingerprint_of_pem  # noqa: E402
from tests.chromium import Chromium, chromium_missing  # noqa: E402

TOKENS = {"web-team": "token-web-team-0123456789", "ci-runner": "token-ci-runner-0123456789"}
PUBLIC = {"web-team": [4600, 4601], "ci-runner": [4610], "ci-runner-old": [4611]}


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Pusher(Protocol):
    """A visitor that keeps sending `rate` bytes a second and reads the echo."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.loop: task.LoopingCall | None = None

    def connectionMade(self) -> None:
        self.loop = task.LoopingCall(self.transport.write, b"x" * (self.rate // 10))
        self.loop.start(0.1)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()


def client(reactor: Any, control: int, fingerprint: str, name: str, tunnels: list[int], target: int,
           retry: float = 0.5) -> ClientMainService:
    config = ClientConfig(
        server_host="127.0.0.1", server_port=control,
        tunnels=tuple(TunnelSpec(i, "127.0.0.1", p, "127.0.0.1", target) for i, p in enumerate(tunnels, 1)),
        token=TOKENS[name], fingerprint=fingerprint, initial_retry_delay=retry, max_retry_delay=retry,
    )
    service = ClientMainService(config, reactor, exit_on_fatal=False)
    service.startService()
    return service


def connect(reactor: Any, port: int, protocol: Protocol) -> None:
    factory = ClientFactory.forProtocol(lambda: protocol)
    reactor.connectTCP("127.0.0.1", port, factory)


@defer.inlineCallbacks
def main(reactor: Any, out: str = "docs/status-page.png") -> Any:
    missing = chromium_missing()
    if missing:
        raise SystemExit(missing)
    state = Path(tempfile.mkdtemp(prefix="rtunnel-screenshot-"))
    target = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1").getHost().port
    server = ServerService(ServerConfig(
        listen="tcp:0:interface=127.0.0.1", state_dir=state, token=None,
        extra_clients=tuple(TOKENS.items()), admin="tcp:0:interface=127.0.0.1",
    ), reactor)
    server.startService()
    control = (yield server.ready).getHost().port
    fingerprint = fingerprint_of_pem((state / "server.crt").read_bytes())
    services = [
        client(reactor, control, fingerprint, "web-team", PUBLIC["web-team"], target),
        client(reactor, control, fingerprint, "ci-runner", PUBLIC["ci-runner"], target),
    ]
    # an older ci-runner client whose link dropped: detached, waiting for it to resume
    old = client(reactor, control, fingerprint, "ci-runner", PUBLIC["ci-runner-old"], target, retry=600)
    for service in [*services, old]:
        yield service.client.when_bound()
    old.client.link.transport.abortConnection()
    connect(reactor, PUBLIC["web-team"][0], Pusher(400_000))
    connect(reactor, PUBLIC["web-team"][0], Pusher(150_000))
    connect(reactor, PUBLIC["web-team"][1], Pusher(20_000))
    connect(reactor, PUBLIC["ci-runner"][0], Pusher(60_000))

    admin = server.admin
    assert admin is not None and admin.port is not None
    url = f"http://127.0.0.1:{admin.port.getHost().port}/"
    headers = Headers({b"authorization": [f"Bearer {admin.token}".encode()]})
    yield task.deferLater(reactor, 2.0, lambda: None)
    response = yield Agent(reactor).request(b"GET", (url + "api/sessions").encode(), headers)
    with warnings.catch_warnings():  # Twisted's notice about the transport's abortConnection
        warnings.simplefilter("ignore", DeprecationWarning)
        yield readBody(response)  # the first rate sample; the page's request is the second
    yield task.deferLater(reactor, 1.5, lambda: None)

    browser = Chromium(reactor)
    try:
        code, _, err = yield browser.run(
            f"{url}?token={admin.token}",
            [f"--screenshot={Path(out).resolve()}", "--window-size=1200,700", "--virtual-time-budget=1500"],
            timeout=60,
        )
    finally:
        browser.cleanup()
    if code != 0:
        raise SystemExit(f"chromium exited with {code}: {err[-2000:].decode(errors='replace')}")
    print(f"wrote {out}")
    for service in [*services, old]:
        yield service.stopService()
    yield server.stopService()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
