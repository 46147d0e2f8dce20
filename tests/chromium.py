"""Run Debian's headless Chromium against a local page, bounded in time.

Used by tests/test_admin.py and scripts/admin_screenshot.py. Chromium runs
as a child of the reactor (the page's requests are served by this process),
with a throw-away profile and HOME, no sandbox (we may be root) and nothing
that reaches for the internet.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.python.failure import Failure

CHROMIUM = os.environ.get("RTUNNEL_CHROMIUM", "/usr/bin/chromium")


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} not found: install Debian's 'chromium' package (or set RTUNNEL_CHROMIUM)"
    return None


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        if sum(map(len, self.err)) < 1 << 20:
            self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (error.ProcessDone, error.ProcessTerminated)) else None
        self.ended.callback(code)


class Chromium:
    """One headless Chromium run; `kill()` is safe to call at any time."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.profile = tempfile.mkdtemp(prefix="rtunnel-chromium-")
        self.transport: Any = None
        self._group = False
        self._pid: int | None = None

    def run(self, url: str, extra: list[str], timeout: float = 60.0) -> defer.Deferred[tuple[int | None, bytes, bytes]]:
        """Fires with (exit code, stdout, stderr); kills Chromium after `timeout` s."""
        home = os.path.join(self.profile, "home")
        os.makedirs(home, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"),
            "XDG_RUNTIME_DIR": home,
            "LANG": "C.UTF-8",
            "TZ": "UTC",
        }
        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={os.path.join(self.profile, 'data')}",
            *extra, url,
        ]
        collect = _Collect()
        setsid = shutil.which("setsid")
        if setsid:  # its own process group, so kill() ends its helper processes too
            args = [setsid, *args]
        self.transport = self.reactor.spawnProcess(collect, args[0], args, env=env, path=self.profile)
        self._group = setsid is not None
        self._pid = self.transport.pid
        timer = self.reactor.callLater(timeout, self.kill)

        def ended(code: int | None) -> tuple[int | None, bytes, bytes]:
            if timer.active():
                timer.cancel()
            self.transport = None
            return code, b"".join(collect.out), b"".join(collect.err)

        return collect.ended.addCallback(ended)

    def kill(self) -> None:
        """Kill the Chromium we started (and, when it runs in its own process
        group, the helpers it started)."""
        transport = self.transport
        if transport is None or transport.pid is None:
            return
        try:
            if self._group:
                os.killpg(transport.pid, signal.SIGKILL)
            else:
                transport.signalProcess("KILL")
        except (ProcessLookupError, error.ProcessExitedAlready):
            pass

    def cleanup(self) -> None:
        self.kill()
        if self._group and self._pid:  # helpers that outlived the main process
            try:
                os.killpg(self._pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.profile, ignore_errors=True)
