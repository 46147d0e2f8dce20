"""Command-line options -> typed config -> Twisted services.

`rtunnel.tap.server` and `rtunnel.tap.client` are the modules named by the
twistd plugins (each has `Options` and `makeService`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.logger import Logger

from rtunnel.link import Keepalive

log = Logger()


def keepalive_from(options: Any) -> Keepalive:
    interval, dead = options["ping-interval"], options["dead-after"]
    if interval <= 0 or dead <= interval:
        from twisted.python import usage

        raise usage.UsageError("--dead-after must be greater than --ping-interval > 0")
    return Keepalive(interval=interval, dead_after=dead)


def exit_process(reactor: Any, code: int) -> None:
    """Stop the reactor, then leave with `code` (twistd itself always exits 0)."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
