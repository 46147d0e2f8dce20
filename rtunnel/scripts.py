"""Console scripts: `rtunnel_server` and `rtunnel_client` run the twistd
plugins in the foreground with no pid file, so they share every option."""

from __future__ import annotations

import sys


def _run(plugin: str) -> None:
    from twisted.scripts import twistd

    sys.argv = [sys.argv[0], "--nodaemon", "--pidfile=", plugin, *sys.argv[1:]]
    twistd.run()


def server_main() -> None:
    _run("rtunnel-server")


def client_main() -> None:
    _run("rtunnel-client")
