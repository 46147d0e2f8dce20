#!/usr/bin/env python3
"""Benchmark (b) of issue #14: `rtunnel_server --workers 2` against one
server process, on this machine.

For each configuration — `one` (a plain rtunnel_server, no etcd) and
`workers2` (`--workers 2 --fleet-etcd`, a local etcd from apt) — it starts
the server, two rtunnel_client processes each with a tunnel to nginx (1 KiB
file; with workers, one client homed at each worker), and measures:

* CPU per operation: two wrk runs at once (one per tunnel, `-t1 -c16`),
  keep-alive requests and then `Connection: close` (a new tunnelled
  connection per request); the server's CPU (every worker and the parent)
  over the requests served;
* sessions spread (workers2): `--sessions` idle sessions opened by
  benchmarks/capacity.py's generator through the shared control port,
  counted per worker from their claims in etcd;
* no stall while a worker restarts (workers2): 64-byte round trips through
  the tunnel homed at w-2 while w-1 is SIGKILLed; the slowest round trip
  before and after the kill, the time until w-1's client has its port back,
  and until the parent's restarted w-1 is registered again.

    .venv/bin/python benchmarks/workers.py [--seconds 5] [--repeat 3] [--sessions 400]

Prints a markdown table; writes benchmarks/results/<date>-workers.json.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import services
from measure import parse_wrk
from paths import cert_fingerprint
from procs import BenchError, Procs, cpu_seconds, descendants, free_port, log, run_tool, wait_for

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOKEN = "workers-benchmark-token-0123"
PREFIX = "/rtunnel/"


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def etcd_prefix(url: str, prefix: str) -> dict[str, dict]:
    """Every key under `prefix` with its JSON value."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = json.dumps({
        "key": base64.b64encode(prefix.encode()).decode(), "range_end": base64.b64encode(end.encode()).decode(),
    }).encode()
    request = urllib.request.Request(url + "/v3/kv/range", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        kvs = json.loads(answer.read()).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"])) for kv in kvs}


def start_etcd(procs: Procs, tmp: Path) -> str:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise BenchError("etcd is not installed (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = procs.start("etcd", [
        etcd, "--data-dir", tmp / "etcd", "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}", "--initial-cluster", f"default=http://127.0.0.1:{peer}", "--log-level", "warn",
    ])
    wait_for(lambda: reachable(client), 20, [(proc, procs)], "etcd")
    time.sleep(1.0)
    return url


class Setup:
    """A server (one process, or --workers 2) with two clients' tunnels to nginx."""

    def __init__(self, procs: Procs, tmp: Path, kind: str, nginx: int, etcd: str | None, prefix: str) -> None:
        self.procs, self.tmp, self.kind, self.etcd, self.prefix = procs, tmp, kind, etcd, prefix
        self.control = free_port()
        state = tmp / f"state-{kind}"
        args = [
            BIN / "rtunnel_server", "--port", self.control, "--interface", "127.0.0.1", "--public-host",
            "127.0.0.1", "--state-dir", state, "--token", TOKEN, "--max-sessions-per-client", "10000",
            "--max-unauthenticated-per-address", "256",
        ]
        if kind == "workers2":
            args += ["--workers", "2", "--fleet-etcd", etcd, "--fleet-member", "w", "--fleet-prefix", prefix]
        elif kind == "member":  # one process as a fleet member: what coordination costs without a second worker
            args += ["--fleet-etcd", etcd, "--fleet-member", "m", "--fleet-prefix", prefix]
        self.server = procs.start(f"server-{kind}", args)
        wait_for(lambda: reachable(self.control) and (state / "server.crt").exists(), 40,
                 [(self.server, procs)], f"server {kind}")
        time.sleep(2.0)  # every worker listening
        self.fingerprint = cert_fingerprint(state / "server.crt")
        self.nginx = nginx
        self.tunnels: dict[str, int] = {}  # home -> public port
        self.clients: dict[int, object] = {}
        want = ("w-1", "w-2") if kind == "workers2" else (f"{kind}-a", f"{kind}-b")
        for attempt in range(12):
            if set(want) <= set(self.tunnels):
                break
            port = free_port()
            client = procs.start(f"client-{kind}-{attempt}", [
                BIN / "rtunnel_client", "-c", f"127.0.0.1:{self.control}", "-f", port, "-t",
                f"127.0.0.1:{nginx}", "--token", TOKEN, "--fingerprint", self.fingerprint,
            ])
            wait_for(lambda p=port: reachable(p), 30, [(client, procs)], f"tunnel {port}")
            home = self.home(port) if kind == "workers2" else want[len(self.tunnels)]
            if home in self.tunnels:
                procs.stop(client)
                continue
            self.tunnels[home] = port
            self.clients[port] = client
        if not set(want) <= set(self.tunnels):
            raise BenchError(f"could not place a client at each of {want}: {self.tunnels}")
        time.sleep(1.0)

    def home(self, port: int) -> str | None:
        claims = etcd_prefix(self.etcd, f"{self.prefix}claims/tcp/default/{port}")
        value = next(iter(claims.values()), None)
        return value["member"] if value else None

    def server_pids(self) -> list[int]:
        return [self.server.pid, *descendants(self.server.pid)]

    def worker_pid(self, name: str) -> int:
        return int(etcd_prefix(self.etcd, f"{self.prefix}members/{name}")[f"{self.prefix}members/{name}"]["pid"])


def wrk_both(ports: list[int], seconds: int, close: bool) -> list[dict]:
    """wrk on every port at once; their parsed results."""
    cmd = ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    results: list[dict] = [{} for _ in ports]

    def one(i: int, port: int) -> None:
        cp = run_tool([*cmd, f"http://127.0.0.1:{port}/1k.bin"], seconds + 30)
        results[i] = parse_wrk(cp.stdout) if cp.returncode == 0 else {"error": cp.stderr[-300:]}

    threads = [threading.Thread(target=one, args=(i, port)) for i, port in enumerate(ports)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def context_switches(pids: list[int]) -> int:
    """Voluntary and involuntary context switches of these processes so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:
            pass
    return total


def cpu_per_operation(setup: Setup, seconds: int) -> dict:
    out = {}
    for label, close in (("keepalive", False), ("close", True)):
        pids = setup.server_pids()
        before, switches = cpu_seconds(pids), context_switches(pids)
        started = time.monotonic()
        results = wrk_both(list(setup.tunnels.values()), seconds, close)
        cpu = cpu_seconds(pids) - before
        switches = context_switches(pids) - switches
        elapsed = time.monotonic() - started
        requests = sum(r.get("requests", 0) for r in results)
        out[label] = {
            "requests": requests, "rps": requests / elapsed, "server_cpu_s": cpu,
            "server_cpu_us_per_op": cpu * 1e6 / max(requests, 1), "server_cores": cpu / elapsed,
            "server_switches_per_op": switches / max(requests, 1),
            "per_tunnel": results,
        }
    return out


def sessions_spread(setup: Setup, sessions: int) -> dict:
    """Open `sessions` idle sessions (capacity.py's generator); count them per worker."""
    gen = subprocess.Popen(
        [sys.executable, HERE / "capacity.py", "--generate-sessions", str(sessions), "--port", str(setup.control),
         "--token", TOKEN, "--fingerprint", setup.fingerprint, "--first-port", "2000"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        assert gen.stdout is not None
        while time.monotonic() < deadline and gen.stdout.readline().strip() not in ("ready", ""):
            pass
        time.sleep(1.0)
        claims = etcd_prefix(setup.etcd, f"{setup.prefix}claims/tcp/default/")
        counts = collections.Counter(
            value["member"] for key, value in claims.items() if 2000 <= int(key.rsplit("/", 1)[1]) < 2000 + sessions
        )
    finally:
        gen.terminate()
        gen.wait(10)
    total = sum(counts.values())
    return {
        "sessions": total, "per_worker": dict(sorted(counts.items())),
        "largest_share": max(counts.values()) / total if total else 0.0,
    }


def restart_stall(setup: Setup) -> dict:
    """Round trips through w-2's tunnel while w-1 is killed and restarted."""
    echo_port = setup.tunnels["w-2"]
    samples: list[tuple[float, float]] = []  # (time, round trip s)
    stop = threading.Event()

    def probe() -> None:
        # HTTP keep-alive requests through w-2's tunnel, one at a time
        request = b"GET /1k.bin HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", echo_port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not stop.is_set():
                t0 = time.monotonic()
                s.sendall(request)
                got = b""
                while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + 1024:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    got += chunk
                samples.append((t0, time.monotonic() - t0))
                time.sleep(0.002)

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(2.0)
    victim_pid = setup.worker_pid("w-1")
    victim_port = setup.tunnels["w-1"]
    killed = time.monotonic()
    os.kill(victim_pid, signal.SIGKILL)
    port_back = registered = None
    while time.monotonic() - killed < 30 and (port_back is None or registered is None):
        if port_back is None:
            try:
                with socket.create_connection(("127.0.0.1", victim_port), timeout=1) as s:
                    s.sendall(b"GET /1k.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    s.settimeout(2)
                    if s.recv(16).startswith(b"HTTP/1.1 200"):
                        port_back = time.monotonic() - killed
            except OSError:
                pass
        if registered is None:
            try:
                if setup.worker_pid("w-1") != victim_pid:
                    registered = time.monotonic() - killed
            except (KeyError, OSError):
                pass
        time.sleep(0.02)
    time.sleep(2.0)
    stop.set()
    thread.join(15)
    before = [rtt for t, rtt in samples if t < killed]
    after = [rtt for t, rtt in samples if killed <= t < killed + 5]
    gaps = [b[0] - a[0] for a, b in zip(samples, samples[1:], strict=False)]
    return {
        "round_trips_before": len(before), "round_trips_5s_after": len(after),
        "max_rtt_ms_before": max(before) * 1000 if before else None,
        "max_rtt_ms_after": max(after) * 1000 if after else None,
        "p50_rtt_ms_before": statistics.median(before) * 1000 if before else None,
        "p50_rtt_ms_after": statistics.median(after) * 1000 if after else None,
        "longest_gap_ms": max(gaps) * 1000 if gaps else None,
        "killed_port_back_s": port_back, "worker_registered_again_s": registered,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="--workers 2 against one server process.")
    ap.add_argument("--seconds", type=int, default=5, help="per wrk run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration, alternating (default 3)")
    ap.add_argument("--sessions", type=int, default=400, help="idle sessions for the spread (default 400)")
    ap.add_argument("--kinds", default="one,workers2", help="configurations, alternating: one, member, workers2")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/<date>-workers.json)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-workers-"))
    procs = Procs(tmp)
    kinds = args.kinds.split(",")
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    spread: list[dict] = []
    stalls: list[dict] = []
    try:
        nginx = services.start_nginx(procs, tmp, "nginx")
        etcd = start_etcd(procs, tmp)
        for i in range(args.repeat):
            for kind in kinds:
                log(f"run {i + 1}/{args.repeat}: {kind}")
                setup = Setup(procs, tmp, kind, nginx, etcd, f"{PREFIX}run{i}/")
                try:
                    runs[kind].append(cpu_per_operation(setup, args.seconds))
                    if kind == "workers2" and args.sessions:
                        spread.append(sessions_spread(setup, args.sessions))
                        stalls.append(restart_stall(setup))
                finally:
                    for client in setup.clients.values():
                        procs.stop(client)
                    procs.stop(setup.server, grace=10)
    finally:
        procs.stop_all()

    def med(kind: str, load: str, key: str) -> float:
        return statistics.median(run[load][key] for run in runs[kind])

    print(f"| median of {args.repeat} runs | " + " | ".join(kinds) + f" | {kinds[-1]}/{kinds[0]} |")
    print("|---|" + "---:|" * (len(kinds) + 1))
    table = []
    for label, load, key, fmt in (
        ("keep-alive req/s (2 x wrk -t1 -c16)", "keepalive", "rps", "{:,.0f}"),
        ("server CPU us/request (keep-alive)", "keepalive", "server_cpu_us_per_op", "{:.0f}"),
        ("server cores busy (keep-alive)", "keepalive", "server_cores", "{:.2f}"),
        ("new connections/s (Connection: close)", "close", "rps", "{:,.0f}"),
        ("server CPU us/connection", "close", "server_cpu_us_per_op", "{:.0f}"),
        ("server cores busy (close)", "close", "server_cores", "{:.2f}"),
        ("server context switches/request (keep-alive)", "keepalive", "server_switches_per_op", "{:.2f}"),
        ("server context switches/connection", "close", "server_switches_per_op", "{:.2f}"),
    ):
        values = {kind: med(kind, load, key) for kind in kinds}
        first, last = values[kinds[0]], values[kinds[-1]]
        print(f"| {label} | " + " | ".join(fmt.format(v) for v in values.values()) + f" | {last / first:.2f}x |")
        table.append({"row": label, **values})
    print()
    for s in spread:
        print(f"sessions spread: {s['per_worker']} (largest share {s['largest_share']:.1%})")
    for s in stalls:
        print(
            "worker w-1 killed: w-2's tunnel p50 {p50_rtt_ms_before:.2f} -> {p50_rtt_ms_after:.2f} ms, max "
            "{max_rtt_ms_before:.1f} -> {max_rtt_ms_after:.1f} ms, longest gap {longest_gap_ms:.0f} ms; "
            "w-1's client's port back after {killed_port_back_s} s, w-1 registered again after "
            "{worker_registered_again_s} s".format(**s)
        )
    out = Path(args.out) if args.out else HERE / "results" / f"{datetime.date.today()}-workers.json"
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "cpus": os.cpu_count(), "load": os.getloadavg(), "seconds": args.seconds,
        "repeat": args.repeat, "table": table, "spread": spread, "stalls": stalls, "runs": runs,
    }, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
