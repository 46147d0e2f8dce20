#!/usr/bin/env python3
"""One fleet member as a process, for benchmarks/fleet_hop.py: an rtunnel
server with member links, whose fleet directory is a JSON file written by
the benchmark (no etcd; benchmark-only, like the tests' StaticFleet):

    {"endpoints": {"m1": "tcp:host=127.0.0.1:port=19061", ...},
     "homes": [["default", 4000, "m1"], ...]}

Run with the venv's python (it imports rtunnel); prints "MEMBER READY" once
its control port and member link listen.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from rtunnel.config import ServerConfig
from rtunnel.fleet.ca import member_identity_in
from rtunnel.fleet.links import FleetLinks
from rtunnel.server.claims import TcpPort
from rtunnel.tap.server import ServerService


class JsonDirectory:
    """The FleetDirectory interface over a JSON file read once."""

    def __init__(self, path: Path, member: str) -> None:
        data = json.loads(path.read_text())
        self.member = member
        self.endpoints: dict[str, str] = data["endpoints"]
        self.homes = {TcpPort(host, port): home for host, port, home in data["homes"]}

    def link_endpoint(self, member: str) -> str | None:
        return self.endpoints.get(member)

    def home_of(self, name: Any) -> str | None:
        return self.homes.get(name)

    def remote_names(self) -> list[tuple[Any, str]]:
        return [(name, home) for name, home in self.homes.items() if home != self.member]

    def watch_names(self, callback: Callable[[Any, str | None], None]) -> None:
        pass

    def session_home(self, session_id: str) -> str | None:
        return None

    @property
    def fenced(self) -> bool:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--member", required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--control-port", type=int, required=True)
    ap.add_argument("--link-port", type=int, required=True)
    ap.add_argument("--state-dir", required=True, help="holds the member's NAME.crt/NAME.key and fleet-ca.crt")
    ap.add_argument("--directory", required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    state = Path(args.state_dir)
    config = ServerConfig(
        listen=f"tcp:{args.control_port}:interface={args.address}", state_dir=state, token=args.token,
        public_host=args.address,
    )
    service = ServerService(config, reactor)
    service.startService()

    def started(_: object) -> Any:
        links = FleetLinks(
            reactor, service.server, JsonDirectory(Path(args.directory), args.member),
            member_identity_in(state, args.member), f"tcp:{args.link_port}:interface={args.address}",
        )
        return links.start()

    service.ready.addCallback(started).addCallback(lambda _: print("MEMBER READY", flush=True))
    service.ready.addErrback(lambda failure: (print(failure, flush=True), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
