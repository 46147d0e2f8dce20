"""Console scripts: `rtunnel_server` and `rtunnel_client` run the twistd
plugins in the foreground with no pid file, so they share every option,
plus `--log-format json|text` (twistd's --logger, rtunnel.logs).
`rtunnel_server add-client NAME --ports …` is a plain command (not twistd)
that adds a client to the clients file and prints its token once."""

from __future__ import annotations

import sys


def _run(plugin: str) -> None:
    from twisted.scripts import twistd

    from rtunnel.logs import twistd_argv

    try:
        sys.argv = [sys.argv[0], *twistd_argv(sys.argv[1:], plugin)]
    except ValueError as e:
        sys.exit(f"{sys.argv[0]}: {e}")
    twistd.run()


def server_main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "add-client":
        from rtunnel.tap.server import add_client_main

        sys.exit(add_client_main(sys.argv[2:]))
    _run("rtunnel-server")


def client_main() -> None:
    _run("rtunnel-client")
