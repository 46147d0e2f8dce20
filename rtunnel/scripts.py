"""Console scripts: `rtunnel_server` and `rtunnel_client` run the twistd
plugins in the foreground with no pid file, so they share every option,
plus `--log-format json|text` (twistd's --logger, rtunnel.logs).
`rtunnel_server add-client NAME --ports …` is a plain command (not twistd)
that adds a client to the clients file and prints its token once;
`fleet-init` and `fleet-add-member NAME` make a fleet CA and member
certificates (rtunnel.tap.fleet_commands)."""

from __future__ import annotations

import os
import sys

from rtunnel.logs import JSON_OBSERVER, LOG_FORMATS, TEXT_OBSERVER


def twistd_argv(argv: list[str], plugin: str) -> list[str]:
    """twistd's arguments for a console script's `argv` (without argv[0]):
    `--log-format json|text` becomes twistd's `--logger`, placed before the
    plugin name (twistd's own options must come before it)."""
    rest: list[str] = []
    fmt = "text"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg == "--log-format" or arg.startswith("--log-format="):
            if "=" in arg:
                fmt = arg.partition("=")[2]
            elif i + 1 < len(argv):
                i += 1
                fmt = argv[i]
            else:
                raise ValueError("--log-format needs a value: json or text")
            if fmt not in LOG_FORMATS:
                raise ValueError(f"--log-format {fmt!r}: expected json or text")
        else:
            rest.append(arg)
        i += 1
    logger = JSON_OBSERVER if fmt == "json" else TEXT_OBSERVER
    return ["--nodaemon", "--pidfile=", f"--logger={logger}", plugin, *rest]


def _run(plugin: str) -> None:
    from twisted.scripts import twistd

    try:
        sys.argv = [sys.argv[0], *twistd_argv(sys.argv[1:], plugin)]
    except ValueError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: {e}\n(see '{os.path.basename(sys.argv[0])} --help' for every option)")
    twistd.run()


def server_main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "add-client":
        from rtunnel.tap.server import add_client_main

        sys.exit(add_client_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] in ("fleet-init", "fleet-add-member"):
        from rtunnel.tap.fleet_commands import COMMANDS

        sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
    _run("rtunnel-server")


def client_main() -> None:
    _run("rtunnel-client")
