#!/usr/bin/env python3
"""Benchmark (c) of issue #14: the cost of the extra hop for a visitor at a
non-home fleet member.

Two member processes (benchmarks/fleet_member.py: an rtunnel server with
member links, its directory a JSON file) on 127.0.0.1 (m1, the home) and
127.0.0.2 (m2, an edge), a client process connected to m1 with two tunnels
(nginx 1 KiB, and an echo service), and the same loads at the home's
address and at the edge's: wrk keep-alive requests/s and latency, wrk
`Connection: close` new connections/s, and 64-byte ping-pong round trips
over one connection; the CPU each process spends per request. Runs
alternate home, edge, home, edge … (`--repeat`), medians reported.

    .venv/bin/python benchmarks/fleet_hop.py [--seconds 5] [--repeat 2] [--out FILE]

Prints a markdown table; writes the figures to
benchmarks/results/<date>-fleet-hop.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import services
from measure import parse_wrk, percentile, ping_pong
from paths import cert_fingerprint
from procs import BenchError, Procs, cpu_seconds, free_port, log, run_tool, wait_for

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOKEN = "fleet-hop-benchmark-token"
MEMBERS = {"m1": "127.0.0.1", "m2": "127.0.0.2"}


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_fleet(procs: Procs, tmp: Path, nginx_port: int, echo_port: int) -> dict:
    """The CA, two members and the client; the public ports once both members serve them."""
    ca_dir = tmp / "ca"
    subprocess.run([BIN / "rtunnel_server", "fleet-init", "-s", ca_dir], check=True, capture_output=True)
    taken: set[int] = set()

    def port() -> int:  # free_port() may hand out the port it handed out just before
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return p

    http_port, echo_pub = port(), port()
    ports = {m: (port(), port()) for m in MEMBERS}  # control, link
    directory = tmp / "directory.json"
    directory.write_text(json.dumps({
        "endpoints": {m: f"tcp:host={MEMBERS[m]}:port={ports[m][1]}" for m in MEMBERS},
        "homes": [["default", http_port, "m1"], ["default", echo_pub, "m1"]],
    }))
    pids = {}
    for member, address in MEMBERS.items():
        state = tmp / member
        subprocess.run(
            [BIN / "rtunnel_server", "fleet-add-member", member, "-s", ca_dir, "--out", state],
            check=True, capture_output=True,
        )
        proc = procs.start(member, [
            sys.executable, HERE / "fleet_member.py", "--member", member, "--address", address,
            "--control-port", ports[member][0], "--link-port", ports[member][1], "--state-dir", state,
            "--directory", directory, "--token", TOKEN,
        ])
        wait_for(lambda p=proc: "MEMBER READY" in procs.tail(p, 50), 30, [(proc, procs)], member)
        pids[member] = proc.pid
    client = procs.start("client", [
        BIN / "rtunnel_client", "-c", f"127.0.0.1:{ports['m1'][0]}",
        "-f", http_port, "-t", f"127.0.0.1:{nginx_port}", "-f", echo_pub, "-t", f"127.0.0.1:{echo_port}",
        "--token", TOKEN, "--fingerprint", cert_fingerprint(tmp / "m1" / "server.crt"),
    ])
    pids["client"] = client.pid
    for address in MEMBERS.values():
        for port in (http_port, echo_pub):
            wait_for(lambda a=address, p=port: reachable(a, p), 30, [(client, procs)], f"{address}:{port}")
    time.sleep(1.0)  # the home's BOUND reached the client
    return {"http": http_port, "echo": echo_pub, "pids": pids}


def wrk(address: str, port: int, seconds: int, close: bool) -> dict:
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cp = run_tool([*cmd, f"http://{address}:{port}/1k.bin"], seconds + 30)
    if cp.returncode != 0:
        raise BenchError(f"wrk exit {cp.returncode}: {cp.stderr.strip()[-300:]}")
    return parse_wrk(cp.stdout)


def rtt(address: str, port: int, rounds: int = 2000, warm: int = 100) -> dict:
    msg = b"x" * 64
    buf = bytearray(64)
    view = memoryview(buf)
    samples = []
    with socket.create_connection((address, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warm + rounds):
            t0 = time.perf_counter()
            ping_pong(s, msg, view)
            if i >= warm:
                samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {"mean_us": statistics.fmean(samples), "p50_us": percentile(samples, 50), "p99_us": percentile(samples, 99)}


def measure(address: str, fleet: dict, seconds: int) -> dict:
    pids = fleet["pids"]
    result: dict = {}
    for label, close in (("keepalive", False), ("close", True)):
        before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
        r = wrk(address, fleet["http"], seconds, close)
        after = {name: cpu_seconds([pid]) for name, pid in pids.items()}
        requests = max(r.get("requests", 1), 1)
        r["cpu_us_per_request"] = {n: (after[n] - before[n]) * 1e6 / requests for n in pids}
        result[label] = r
    result["rtt"] = rtt(address, fleet["echo"])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description="The cost of the extra hop at a non-home fleet member.")
    ap.add_argument("--seconds", type=int, default=5, help="per wrk run (default 5)")
    ap.add_argument("--repeat", type=int, default=2, help="home/edge pairs (default 2)")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/<date>-fleet-hop.json)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-fleet-hop-"))
    procs = Procs(tmp)
    runs: dict[str, list[dict]] = {"home": [], "edge": []}
    try:
        nginx_port = services.start_nginx(procs, tmp, "nginx")
        echo_port = free_port()
        echo = procs.start("echo", [sys.executable, Path(services.__file__).resolve(), "--serve-echo", echo_port])
        wait_for(lambda: reachable("127.0.0.1", echo_port), 10, [(echo, procs)], "echo")
        fleet = start_fleet(procs, tmp, nginx_port, echo_port)
        for i in range(args.repeat):
            for where, address in (("home", MEMBERS["m1"]), ("edge", MEMBERS["m2"])):
                log(f"run {i + 1}/{args.repeat}: {where} ({address})")
                runs[where].append(measure(address, fleet, args.seconds))
    finally:
        procs.stop_all()

    def median(where: str, *keys: str) -> float:
        values = []
        for run in runs[where]:
            value = run
            for key in keys:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    rows = [
        ("1 KiB keep-alive req/s (wrk -t2 -c32)", ("keepalive", "rps"), "{:,.0f}"),
        ("  p50 ms", ("keepalive", "p50_ms"), "{:.2f}"),
        ("  p99 ms", ("keepalive", "p99_ms"), "{:.2f}"),
        ("new connections/s (Connection: close)", ("close", "rps"), "{:,.0f}"),
        ("  p50 ms", ("close", "p50_ms"), "{:.2f}"),
        ("64 B round trip p50 us", ("rtt", "p50_us"), "{:.0f}"),
        ("64 B round trip p99 us", ("rtt", "p99_us"), "{:.0f}"),
        ("CPU us/request, home member (keep-alive)", ("keepalive", "cpu_us_per_request", "m1"), "{:.0f}"),
        ("CPU us/request, edge member (keep-alive)", ("keepalive", "cpu_us_per_request", "m2"), "{:.0f}"),
        ("CPU us/request, client (keep-alive)", ("keepalive", "cpu_us_per_request", "client"), "{:.0f}"),
        ("CPU us/connection, home member", ("close", "cpu_us_per_request", "m1"), "{:.0f}"),
        ("CPU us/connection, edge member", ("close", "cpu_us_per_request", "m2"), "{:.0f}"),
    ]
    print(f"| median of {args.repeat} runs | at the home (m1, 127.0.0.1) | at an edge (m2, 127.0.0.2) | edge/home |")
    print("|---|---:|---:|---:|")
    table = []
    for label, keys, fmt in rows:
        home, edge = median("home", *keys), median("edge", *keys)
        ratio = f"{edge / home:.2f}x" if home else "n/a"
        print(f"| {label} | {fmt.format(home)} | {fmt.format(edge)} | {ratio} |")
        table.append({"row": label, "home": home, "edge": edge})
    out = Path(args.out) if args.out else HERE / "results" / f"{datetime.date.today()}-fleet-hop.json"
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "cpus": os.cpu_count(), "seconds": args.seconds, "repeat": args.repeat,
        "table": table, "runs": runs,
    }, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
