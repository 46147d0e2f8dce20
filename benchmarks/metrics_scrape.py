"""What one /metrics scrape costs, by number of open tunnelled connections.

A real TunnelServer with sessions whose streams are open (no sockets: the
collector only reads the streams' counters), scraped with
prometheus_client.generate_latest, as the /metrics page does.

    .venv/bin/python benchmarks/metrics_scrape.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest
from twisted.internet.task import Clock

from rtunnel.config import ServerConfig
from rtunnel.metrics import ServerCollector, registry_for
from rtunnel.server import ServerSession, TunnelServer


def server_with(streams: int, sessions: int = 10, tunnels: int = 4) -> TunnelServer:
    config = ServerConfig(listen="tcp:0", state_dir=Path(tempfile.mkdtemp()))
    server = TunnelServer(Clock(), config, "token")
    for i in range(sessions):
        owner = ServerSession(server, f"client{i}")
        server.sessions[owner.id] = owner
        for t in range(tunnels):
            owner.tunnel_names[t] = f"0.0.0.0:{4000 + i * tunnels + t}"
        for s in range(streams // sessions):
            stream = owner.mux_session.open_stream(s % tunnels, {})
            stream.read_total, stream.received = 1000 * s, 2000 * s
    return server


def main() -> None:
    print(f"{'open streams':>12} {'scrape ms':>10} {'bytes':>7}")
    for streams in (0, 1_000, 10_000, 40_000):
        server = server_with(streams)
        registry = registry_for(ServerCollector(lambda server=server: server))
        rounds = 20
        start = time.perf_counter()
        for _ in range(rounds):
            body = generate_latest(registry)
        elapsed = (time.perf_counter() - start) / rounds
        print(f"{streams:>12} {elapsed * 1000:>10.2f} {len(body):>7}")


if __name__ == "__main__":
    main()
