#!/usr/bin/env python3
"""Benchmark (d) of issue #14: failover time over repeated kills of the home member.

One etcd (Debian's etcd-server), three `rtunnel_server --fleet-etcd` members on
127.0.0.1, .2 and .3 (default settings: lease TTL 5 s), haproxy in front of
their control ports (scripts/fleet-haproxy.cfg), one `rtunnel_client` through
haproxy with one tunnel (-f PORT, served by every member) to an echo service.
Each round: SIGKILL the member that is the session's home (etcd's claim names
it), then poll a visitor (connect, 64 bytes, the echo back; 1 s timeout) at
each surviving member; the time from the kill until a visitor gets through at
the first survivor, and at both ("served fleet-wide"); then restart the killed
member (same name, ports and state) and wait until it serves the port again.

    .venv/bin/python benchmarks/failover.py [--kills 10] [--out FILE]

Prints the per-kill times and median/max; writes
benchmarks/results/<date>-failover.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
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
import time
import urllib.request
from pathlib import Path

import services
from paths import cert_fingerprint
from procs import BenchError, Procs, free_port, listening, log, wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
TOKEN = "failover-benchmark-token-0123"
ADDRESSES = {1: "127.0.0.1", 2: "127.0.0.2", 3: "127.0.0.3"}
PAYLOAD = os.urandom(64)


def visit(host: str, port: int, timeout: float = 1.0) -> bool:
    """A visitor at host:port: True if its 64 bytes came back through the tunnel."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(PAYLOAD)
            got = b""
            while len(got) < len(PAYLOAD):
                chunk = s.recv(4096)
                if not chunk:
                    return False
                got += chunk
            return got == PAYLOAD
    except OSError:
        return False


def etcd_claim(url: str, port: int) -> dict | None:
    key = base64.b64encode(f"/rtunnel/claims/tcp/default/{port}".encode()).decode()
    request = urllib.request.Request(url + "/v3/kv/range", json.dumps({"key": key}).encode())
    try:
        kvs = json.loads(urllib.request.urlopen(request, timeout=2).read()).get("kvs", [])
    except OSError:
        return None
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


class Fleet:
    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.procs = procs
        self.tmp = tmp
        self.etcd_port, self.peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.control = {i: free_port() for i in ADDRESSES}
        self.links = {i: free_port() for i in ADDRESSES}
        self.members: dict[int, subprocess.Popen] = {}

    def start_etcd(self) -> None:
        etcd = shutil.which("etcd")
        if not etcd:
            raise BenchError("etcd is not installed: apt-get install etcd-server")
        peer = f"http://127.0.0.1:{self.peer_port}"
        proc = self.procs.start("etcd", [
            etcd, "--name", "bench", "--data-dir", self.tmp / "etcd", "--listen-client-urls", self.etcd_url,
            "--advertise-client-urls", self.etcd_url, "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer, "--initial-cluster", f"bench={peer}", "--log-level", "warn",
        ])

        def healthy() -> bool:
            try:
                return b"true" in urllib.request.urlopen(self.etcd_url + "/health", timeout=1).read()
            except OSError:
                return False

        wait_for(healthy, 30, [(proc, self.procs)], "etcd")

    def prepare(self) -> None:
        from rtunnel.fleet import ca
        from rtunnel.tls import load_server_identity

        ca.init_ca(self.tmp / "ca", "bench")
        for i in ADDRESSES:
            ca.issue_member(self.tmp / "ca", f"m{i}", self.tmp / f"m{i}")
        load_server_identity(self.tmp / "m1")  # one server certificate for all three (the client pins it)
        for i in (2, 3):
            for name in ("server.crt", "server.key"):
                shutil.copy(self.tmp / "m1" / name, self.tmp / f"m{i}" / name)

    def start_member(self, i: int) -> None:
        address = ADDRESSES[i]
        proc = self.procs.start(f"m{i}", [
            BIN / "rtunnel_server", "--interface", address, "--port", self.control[i], "--public-host", address,
            "--state-dir", self.tmp / f"m{i}", "--token", TOKEN, "--fleet-etcd", self.etcd_url,
            "--fleet-member", f"m{i}", "--fleet-listen", f"tcp:{self.links[i]}:interface={address}",
        ])
        self.members[i] = proc
        wait_for(lambda: "rtunnel server listening" in self.procs.tail(proc, 60), 30, [(proc, self.procs)], f"m{i}")

    def start_haproxy(self) -> int:
        haproxy = shutil.which("haproxy")
        if not haproxy:
            raise BenchError("haproxy is not installed: apt-get install haproxy")
        front = free_port()
        env = {
            **os.environ, "RTUNNEL_FRONT": f"127.0.0.1:{front}", "RTUNNEL_HAPROXY_STATS": f"127.0.0.1:{free_port()}",
            **{f"RTUNNEL_MEMBER{i}": f"{ADDRESSES[i]}:{self.control[i]}" for i in ADDRESSES},
        }
        path = self.tmp / "haproxy.log"
        with open(path, "wb") as out:
            proc = subprocess.Popen(
                [haproxy, "-db", "-f", str(ROOT / "scripts" / "fleet-haproxy.cfg")], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.procs.procs.append(proc)
        self.procs.logs[proc.pid] = path
        wait_for(lambda: listening(front), 10, [(proc, self.procs)], "haproxy")
        return front


def main() -> int:
    ap = argparse.ArgumentParser(description="Failover time over repeated SIGKILLs of the home member.")
    ap.add_argument("--kills", type=int, default=10, help="rounds (default 10)")
    ap.add_argument("--limit", type=float, default=30.0, help="give up on a round after this many seconds")
    ap.add_argument("--out", help="JSON output (default benchmarks/results/<date>-failover.json)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-failover-"))
    procs = Procs(tmp)
    rounds: list[dict] = []
    try:
        echo_port = free_port()
        echo = procs.start("echo", [sys.executable, Path(services.__file__).resolve(), "--serve-echo", echo_port])
        wait_for(lambda: visit("127.0.0.1", echo_port), 10, [(echo, procs)], "echo")
        fleet = Fleet(procs, tmp)
        fleet.start_etcd()
        fleet.prepare()
        for i in ADDRESSES:
            fleet.start_member(i)
        front = fleet.start_haproxy()
        public = free_port()
        client = procs.start("client", [
            BIN / "rtunnel_client", "-c", f"127.0.0.1:{front}", "-f", public, "-t", f"127.0.0.1:{echo_port}",
            "--token", TOKEN, "--fingerprint", cert_fingerprint(tmp / "m1" / "server.crt"),
        ])
        for i in ADDRESSES:
            wait_for(lambda i=i: visit(ADDRESSES[i], public), 30, [(client, procs)], f"the tunnel at m{i}")
        for n in range(1, args.kills + 1):
            claim = etcd_claim(fleet.etcd_url, public)
            if claim is None:
                raise BenchError("etcd holds no claim for the tunnel's port")
            home = int(claim["member"][1:])
            survivors = [i for i in ADDRESSES if i != home]
            killed = time.monotonic()
            fleet.members[home].send_signal(signal.SIGKILL)
            served: dict[int, float] = {}
            while len(served) < len(survivors):
                for i in survivors:
                    if i not in served and visit(ADDRESSES[i], public):
                        served[i] = time.monotonic() - killed
                if time.monotonic() - killed > args.limit:
                    raise BenchError(f"round {n}: not served at every survivor within {args.limit:.0f} s: {served}")
                time.sleep(0.02)
            new_home = (etcd_claim(fleet.etcd_url, public) or {}).get("member")
            first, everywhere = min(served.values()), max(served.values())
            log(f"kill {n}: home m{home} killed; served at the first survivor after {first:.2f} s, at both "
                f"after {everywhere:.2f} s; new home {new_home}")
            rounds.append({"killed": f"m{home}", "new_home": new_home, "first_s": first, "fleet_wide_s": everywhere,
                           "per_member_s": {f"m{i}": t for i, t in served.items()}})
            procs.stop(fleet.members[home])  # reaped
            fleet.start_member(home)
            wait_for(lambda h=home: visit(ADDRESSES[h], public), 30, [], f"the restarted m{home} serving the port")
            time.sleep(1.0)
    finally:
        procs.stop_all()
    if not rounds:
        return 1
    firsts = [r["first_s"] for r in rounds]
    wides = [r["fleet_wide_s"] for r in rounds]
    print(f"| {len(rounds)} kills of the home member | median | max |")
    print("|---|---:|---:|")
    print(f"| a visitor gets through at the first surviving member (s) | {statistics.median(firsts):.2f} | {max(firsts):.2f} |")
    print(f"| a visitor gets through at both surviving members (s) | {statistics.median(wides):.2f} | {max(wides):.2f} |")
    out = Path(args.out) if args.out else HERE / "results" / f"{datetime.date.today()}-failover.json"
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "cpus": os.cpu_count(), "rounds": rounds,
        "first_s": {"median": statistics.median(firsts), "max": max(firsts)},
        "fleet_wide_s": {"median": statistics.median(wides), "max": max(wides)},
    }, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"failover benchmark failed: {e}")
        sys.exit(1)
