"""The benchmark: the services started once, each path's measurements
(bulk, HTTP, round trip, memory, 50 ms RTT, scaling) and their results.

What a path could not measure is recorded as an error and left out (a
"n/a" cell in the report), never fatal.  Standard library only.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import services
from measure import parse_wrk, percentile, ping_pong
from paths import AES, DirectPath, RtunnelPath, SshPath
from procs import (
    LOOP,
    SBIN_PATH,
    BenchError,
    Procs,
    cpu_seconds,
    free_port,
    listening,
    log,
    rss_kb,
    run_tool,
    wait_for,
)

# Scaling: nginx 1 KiB keep-alive through each path with this many concurrent
# connections (wrk -c N, -t2 or -t1 for one connection), each run bounded by
# the wrk duration.  For ssh the better of -N and -tt is kept at each level.
SCALE_LEVELS = (1, 10, 100, 1000)
SCALE_PATHS = ("direct", "ssh", "ssh-tt", "rtunnel")

# --tests names of the measurements
TEST_NAMES = {
    "bulk": "bulk",
    "http": "http",
    "rtt": "rtt",
    "memory": "memory",
    "50 ms RTT": "wan",
    "scaling": "scale",
    "udp": "udp",
}

# UDP (#16): iperf3 -u datagram sizes, and the loss a rate may have to count
UDP_SIZES = (64, 1200)
UDP_MAX_LOSS = 1.0  # percent
UDP_PATHS = ("direct", "rtunnel")  # ssh -R forwards no UDP

# Small-request groups: for ssh the better of -N and -tt is reported,
# chosen per group by the first key (higher rate, or lower mean round trip).
SMALL_GROUPS = [
    (("http1k_rps", "http1k_p50", "http1k_p99"), "hi"),
    (("http1m_rps", "http1m_p50", "http1m_p99"), "hi"),
    (("conn_rate", "conn_p50", "conn_p99"), "hi"),
    (("rtt_mean", "rtt_p50", "rtt_p99"), "lo"),
]


class Bench:
    """One run of the benchmark: its temp dir, processes, tools and services,
    and per path its results, raw tool output, errors and scaling levels."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.bulk_secs = 2 if args.quick else 5
        self.wrk_secs = 2 if args.quick else 5
        self.wan_secs = 4 if args.quick else 8
        self.rtt_rounds, self.rtt_warmup = 2000, 100
        self.idle_conns = 2000
        self.delay = 0.025
        self.tmp = Path(tempfile.mkdtemp(prefix="rtunnel-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers may run as another user
        self.procs = Procs(self.tmp)
        self.tools = {
            name: shutil.which(name, path=SBIN_PATH)
            for name in ("iperf3", "wrk", "nginx", "ssh", "ssh-keygen")
        }
        # sshd must be started by absolute path (it re-executes itself)
        self.tools["sshd"] = shutil.which("sshd", path=SBIN_PATH)
        self._ssh_dir: Path | None = None
        self.echo_port = self.iperf_port = self.nginx_port = self.udp_echo_port = None
        self.udp_secs = 2 if args.quick else 3
        self.results: dict[str, dict] = {}
        self.raw: dict[str, dict] = {}
        self.errors: dict[str, list[str]] = {}
        self.notes: dict[str, list[str]] = {}
        self.scale_levels: tuple[int, ...] = tuple(args.scale_levels)
        self.tests = set(args.tests)
        self.scale: dict[str, dict[int, dict]] = {}

    # -- tools and services -------------------------------------------------

    @staticmethod
    def venv_tool(name: str) -> str | None:
        cand = Path(sys.executable).parent / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
        return shutil.which(name)

    def ssh_keys(self) -> Path:
        if self._ssh_dir is None:
            d = self.tmp / "ssh"
            d.mkdir()
            for key in ("host_key", "client_key"):
                cp = run_tool(
                    [self.tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "",
                     "-C", "rtunnel-bench", "-f", d / key],
                    30,
                )  # fmt: skip
                if cp.returncode:
                    raise BenchError(f"ssh-keygen failed: {cp.stderr.strip()}")
            (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
            os.chmod(d / "authorized_keys", 0o600)
            self._ssh_dir = d
        return self._ssh_dir

    def start_helper(self, name, args, port):
        """Run services.py with `args` (--serve-echo or --serve-delay); the process once `port` listens."""
        proc = self.procs.start(name, [sys.executable, Path(services.__file__).resolve(), *args])
        wait_for(lambda: listening(port), 10, [(proc, self.procs)], name)
        return proc

    def start_delay_proxy(self, target_port: int):
        port = free_port()
        proc = self.start_helper("delay-proxy", ["--serve-delay", f"{port}:{target_port}:{self.delay}"], port)
        return proc, port

    def start_services(self) -> None:
        self.echo_port = free_port()
        self.start_helper("echo", ["--serve-echo", str(self.echo_port)], self.echo_port)
        self.udp_echo_port = free_port()
        self.procs.start(
            "udp-echo", [sys.executable, Path(services.__file__).resolve(), "--serve-udp-echo", self.udp_echo_port],
        )
        if self.tools["iperf3"]:
            self.iperf_port = free_port()  # server started afresh for each run
        if self.tools["nginx"]:
            try:
                self.nginx_port = self.start_nginx()
            except BenchError as e:
                self.errors.setdefault("setup", []).append(str(e))

    def start_nginx(self) -> int:
        return services.start_nginx(self.procs, self.tmp, self.tools["nginx"])

    # -- measurements ---------------------------------------------------------

    def iperf(self, port: int, secs: int, parallel: int = 1, reverse: bool = False):
        server = self.procs.start(
            "iperf3-server",
            [self.tools["iperf3"], "-s", "-1", "-B", LOOP, "-p", self.iperf_port],
            cwd=self.tmp,
        )
        try:
            wait_for(lambda: listening(self.iperf_port), 10, [(server, self.procs)], "iperf3 -s")
            cmd = [self.tools["iperf3"], "-c", LOOP, "-p", port, "-t", secs, "-J",
                   "--connect-timeout", "5000"]  # fmt: skip
            if parallel > 1:
                cmd += ["-P", parallel]
            if reverse:
                cmd.append("-R")
            cp = run_tool(cmd, secs + 40)
            try:
                data = json.loads(cp.stdout)
            except ValueError:
                raise BenchError(
                    f"iperf3 exit {cp.returncode}: {(cp.stdout + cp.stderr).strip()[-300:]}"
                ) from None
            if data.get("error"):
                raise BenchError(f"iperf3: {data['error']}")
            summary = data["end"]["sum_received"]
            return {
                "MBps": summary["bits_per_second"] / 8e6,
                "bytes": summary["bytes"],
                "seconds": summary["seconds"],
                "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
            }
        finally:
            self.procs.stop(server)

    def iperf_udp(self, port: int, size: int, rate: int) -> dict:
        """iperf3 -u for udp_secs at `rate` datagrams/s of `size` bytes: what arrived."""
        server = self.procs.start(
            "iperf3-server", [self.tools["iperf3"], "-s", "-1", "-B", LOOP, "-p", self.iperf_port], cwd=self.tmp,
        )
        try:
            wait_for(lambda: listening(self.iperf_port), 10, [(server, self.procs)], "iperf3 -s")
            cmd = [self.tools["iperf3"], "-c", LOOP, "-p", port, "-u", "-l", size, "-b", rate * size * 8, "-w", "4M",
                   "-t", self.udp_secs, "-J", "--connect-timeout", "5000"]  # fmt: skip
            cp = run_tool(cmd, self.udp_secs + 40)
            try:
                data = json.loads(cp.stdout)
            except ValueError:
                raise BenchError(f"iperf3 -u exit {cp.returncode}: {(cp.stdout + cp.stderr).strip()[-300:]}") from None
            if data.get("error"):
                raise BenchError(f"iperf3 -u: {data['error']}")
            end = data["end"]["sum"]
            received = end["packets"] - end["lost_packets"]
            return {
                "offered_dps": rate, "size": size, "loss_percent": end["lost_percent"],
                "jitter_ms": end["jitter_ms"], "received_dps": received / end["seconds"],
                "mbit": received * size * 8 / end["seconds"] / 1e6,
            }
        finally:
            self.procs.stop(server)

    def udp_rate(self, port: int, size: int, runs: list[dict]) -> dict | None:
        """The best run (most datagrams/s received) with < UDP_MAX_LOSS % loss:
        offered rates double from 4,000 datagrams/s until the loss reaches it
        (or iperf3 fails), then 3 bisection steps; every run goes to `runs`."""
        def attempt(rate: int) -> dict:
            try:
                run = self.iperf_udp(port, size, rate)
            except BenchError as e:  # e.g. the control connection lost under overload: a failed rate
                run = {"offered_dps": rate, "size": size, "loss_percent": 100.0, "error": str(e)}
            runs.append(run)
            return run

        good: list[dict] = []
        low, high, rate = 0, 0, 4000
        while rate <= 2_048_000:
            run = attempt(rate)
            if run["loss_percent"] >= UDP_MAX_LOSS:
                high = rate
                break
            good.append(run)
            low, rate = rate, rate * 2
        if low and high:
            for _ in range(3):
                mid = (low + high) // 2
                run = attempt(mid)
                if run["loss_percent"] < UDP_MAX_LOSS:
                    good.append(run)
                    low = mid
                else:
                    high = mid
        return max(good, key=lambda r: r["received_dps"], default=None)

    def test_udp(self, path) -> None:
        """UDP tunnels: datagrams/s and Mbit/s at < 1 % loss (iperf3 -u, 64 and
        1,200 bytes), and the round trip of a 64-byte request/reply."""
        if path.name not in UDP_PATHS:
            return
        if self.tools["iperf3"]:
            with path.open(self.iperf_port, udp=True) as t:
                time.sleep(0.3)
                for size in UDP_SIZES:
                    def one(size=size):
                        runs = self.raw[path.name][f"udp{size}_runs"] = []
                        best = self.udp_rate(t.pub_port, size, runs)
                        if best is None:
                            raise BenchError(f"iperf3 -u -l {size}: over 1 % loss even at 4,000 datagrams/s")
                        self.put(path.name, f"udp{size}_dps", best["received_dps"], best)
                        self.put(path.name, f"udp{size}_mbit", best["mbit"])
                        log(f"  [{path.name}] udp {size} B: {best['received_dps']:,.0f} datagrams/s, "
                            f"{best['mbit']:.1f} Mbit/s, loss {best['loss_percent']:.2f} %")  # fmt: skip

                    self.attempt(path.name, f"udp {size} B", one)
        with path.open(self.udp_echo_port, udp=True) as t:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.settimeout(1.0)
                s.connect((LOOP, t.pub_port))
                msg = os.urandom(64)
                times, lost = [], 0
                for i in range(self.rtt_warmup + self.rtt_rounds):
                    t0 = time.perf_counter_ns()
                    s.send(msg)
                    try:
                        while s.recv(2048) != msg:
                            pass
                    except TimeoutError:
                        lost += 1
                        continue
                    t1 = time.perf_counter_ns()
                    if i >= self.rtt_warmup:
                        times.append((t1 - t0) / 1000)
            finally:
                s.close()
        if not times:
            raise BenchError("no UDP echo came back")
        times.sort()
        raw = {"rounds": len(times), "lost": lost, "mean_us": sum(times) / len(times), "max_us": times[-1]}
        self.put(path.name, "udp_rtt_mean", raw["mean_us"], raw)
        self.put(path.name, "udp_rtt_p50", percentile(times, 50))
        self.put(path.name, "udp_rtt_p99", percentile(times, 99))
        log(f"  [{path.name}] udp rtt p50 {percentile(times, 50):.0f} us p99 {percentile(times, 99):.0f} us"
            f" ({lost} lost)")  # fmt: skip

    def wrk(self, port: int, path: str, close: bool = False, conns: int = 32) -> dict:
        threads = min(2, conns)
        cmd = [self.tools["wrk"], f"-t{threads}", f"-c{conns}", f"-d{self.wrk_secs}s",
               "--latency", "--timeout", "10s"]  # fmt: skip
        if close:
            cmd += ["-H", "Connection: close"]
        cmd.append(f"http://{LOOP}:{port}/{path}")
        cp = run_tool(cmd, self.wrk_secs + 40)
        if cp.returncode:
            raise BenchError(f"wrk exit {cp.returncode}: {cp.stderr.strip()[-300:]}")
        return parse_wrk(cp.stdout)

    def attempt(self, path_name: str, what: str, fn) -> None:
        try:
            fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BenchError as e:
            self.fail(path_name, f"{what}: {e}")
        except Exception as e:  # a harness bug: report it, go on
            self.fail(path_name, f"{what}: {type(e).__name__}: {e}")
            if self.args.verbose:
                traceback.print_exc()

    def fail(self, path_name: str, msg: str) -> None:
        log(f"  [{path_name}] n/a: {msg}")
        self.errors.setdefault(path_name, []).append(msg)

    def put(self, path_name: str, key: str, value, raw=None) -> None:
        self.results[path_name][key] = value
        if raw is not None:
            self.raw[path_name][key] = raw

    def test_bulk(self, path) -> None:
        if not self.tools["iperf3"]:
            raise BenchError("iperf3 not installed")
        with path.open(self.iperf_port) as t:
            for streams in (1, 8):
                for direction in ("up", "down"):

                    def one(streams=streams, direction=direction):
                        srv0 = cpu_seconds(t.server_pids())
                        cli0 = cpu_seconds(t.client_pids())
                        r = self.iperf(t.pub_port, self.bulk_secs, streams, direction == "down")
                        srv1 = cpu_seconds(t.server_pids())
                        cli1 = cpu_seconds(t.client_pids())
                        self.put(path.name, f"bulk{streams}_{direction}", r["MBps"], r)
                        log(f"  [{path.name}] bulk {streams}x {direction}: "
                            f"{r['MBps']:.1f} MB/s")  # fmt: skip
                        if streams == 1 and path.has_procs and r["bytes"]:
                            gb = r["bytes"] / 1e9
                            self.put(path.name, f"cpu_srv_{direction}", (srv1 - srv0) / gb)
                            self.put(path.name, f"cpu_cli_{direction}", (cli1 - cli0) / gb)

                    self.attempt(path.name, f"bulk {streams}x {direction}", one)

    def test_http(self, path) -> None:
        if not self.tools["wrk"]:
            raise BenchError("wrk not installed")
        if not self.nginx_port:
            raise BenchError("nginx not available")
        with path.open(self.nginx_port) as t:
            conn = http.client.HTTPConnection(LOOP, t.pub_port, timeout=10)
            try:
                conn.request("GET", "/1k.bin")
                resp = conn.getresponse()
                body = resp.read()
            except OSError as e:
                raise BenchError(f"GET /1k.bin through the path: {e}") from e
            finally:
                conn.close()
            if resp.status != 200 or len(body) != 1024:
                raise BenchError(f"GET /1k.bin: {resp.status}, {len(body)} bytes")
            for prefix, url, close in (
                ("http1k", "1k.bin", False),
                ("http1m", "1m.bin", False),
                ("conn", "1k.bin", True),
            ):

                def one(prefix=prefix, url=url, close=close):
                    r = self.wrk(t.pub_port, url, close)
                    rate = "conn_rate" if prefix == "conn" else f"{prefix}_rps"
                    self.put(path.name, rate, r["rps"], r)
                    self.put(path.name, f"{prefix}_p50", r.get("p50_ms"))
                    self.put(path.name, f"{prefix}_p99", r.get("p99_ms"))
                    errs = sum(r.get("socket_errors", {}).values()) + r.get("non_2xx", 0)
                    log(f"  [{path.name}] wrk {prefix}: {r['rps']:.0f}/s "
                        f"p50 {r.get('p50_ms')} ms p99 {r.get('p99_ms')} ms"
                        + (f" ({errs} errors)" if errs else ""))  # fmt: skip

                self.attempt(path.name, f"wrk {prefix}", one)

    def test_rtt(self, path) -> None:
        with path.open(self.echo_port) as t:
            s = socket.create_connection((LOOP, t.pub_port), timeout=10)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                msg = os.urandom(64)
                buf = bytearray(64)
                view = memoryview(buf)
                times = []
                for i in range(self.rtt_warmup + self.rtt_rounds):
                    t0 = time.perf_counter_ns()
                    ping_pong(s, msg, view)
                    t1 = time.perf_counter_ns()
                    if i >= self.rtt_warmup:
                        times.append((t1 - t0) / 1000)
                if bytes(buf) != msg:
                    raise BenchError("echo returned other bytes")
            finally:
                s.close()
        times.sort()
        raw = {
            "rounds": len(times),
            "min_us": times[0],
            "mean_us": sum(times) / len(times),
            "max_us": times[-1],
        }
        self.put(path.name, "rtt_mean", raw["mean_us"], raw)
        self.put(path.name, "rtt_p50", percentile(times, 50))
        self.put(path.name, "rtt_p99", percentile(times, 99))
        log(f"  [{path.name}] rtt p50 {percentile(times, 50):.0f} us "
            f"p99 {percentile(times, 99):.0f} us")  # fmt: skip

    def test_memory(self, path) -> None:
        if not path.has_procs:
            return
        n = self.idle_conns
        socks: list[socket.socket] = []
        with path.open(self.echo_port) as t:
            try:
                time.sleep(0.5)
                srv0, cli0 = rss_kb(t.server_pids()), rss_kb(t.client_pids())
                deadline = time.monotonic() + 120
                while len(socks) < n:
                    if time.monotonic() > deadline:
                        raise BenchError(f"only {len(socks)}/{n} connections in 120 s")
                    batch = []
                    for _ in range(min(100, n - len(socks))):
                        s = socket.create_connection((LOOP, t.pub_port), timeout=15)
                        batch.append(s)
                        s.sendall(b"x")
                    for s in batch:
                        if s.recv(1) != b"x":
                            raise BenchError("idle connection not echoed")
                    socks.extend(batch)
                time.sleep(1.0)
                srv1, cli1 = rss_kb(t.server_pids()), rss_kb(t.client_pids())
            except OSError as e:
                raise BenchError(f"after {len(socks)} connections: {e}") from e
            finally:
                for s in socks:
                    s.close()
        raw = {"connections": n, "server_kb": [srv0, srv1], "client_kb": [cli0, cli1]}
        self.put(path.name, "rss_srv_base", srv0, raw)
        self.put(path.name, "rss_cli_base", cli0)
        self.put(path.name, "rss_srv_conn", (srv1 - srv0) / n)
        self.put(path.name, "rss_cli_conn", (cli1 - cli0) / n)
        log(f"  [{path.name}] rss server {srv0}->{srv1} KB, client {cli0}->{cli1} KB "
            f"for {n} connections")  # fmt: skip

    def test_wan(self, path) -> None:
        if not self.tools["iperf3"]:
            raise BenchError("iperf3 not installed")
        with path.open(self.iperf_port, wan=True) as t:
            for direction in ("up", "down"):

                def one(direction=direction):
                    r = self.iperf(t.pub_port, self.wan_secs, 1, direction == "down")
                    self.put(path.name, f"wan_{direction}", r["MBps"], r)
                    log(f"  [{path.name}] 50 ms RTT {direction}: {r['MBps']:.1f} MB/s")

                self.attempt(path.name, f"50 ms RTT {direction}", one)

    def test_scale(self, path) -> None:
        """nginx 1 KiB keep-alive with 1, 10, 100, 1000 concurrent connections."""
        if not self.tools["wrk"]:
            raise BenchError("wrk not installed")
        if not self.nginx_port:
            raise BenchError("nginx not available")
        results = self.scale.setdefault(path.name, {})
        with path.open(self.nginx_port) as t:
            for conns in self.scale_levels:

                def one(conns=conns):
                    srv0, cli0 = cpu_seconds(t.server_pids()), cpu_seconds(t.client_pids())
                    t0 = time.monotonic()
                    r = self.wrk(t.pub_port, "1k.bin", conns=conns)
                    wall = time.monotonic() - t0
                    srv1, cli1 = cpu_seconds(t.server_pids()), cpu_seconds(t.client_pids())
                    errs = sum(r.get("socket_errors", {}).values()) + r.get("non_2xx", 0)
                    r["errors"] = errs
                    if path.has_procs:
                        # share of one core used by each tunnel end during the run
                        r["cpu_srv_core"] = (srv1 - srv0) / wall
                        r["cpu_cli_core"] = (cli1 - cli0) / wall
                    results[conns] = r
                    log(f"  [{path.name}] scale c={conns}: {r['rps']:.0f}/s "
                        f"p50 {r.get('p50_ms')} ms p99 {r.get('p99_ms')} ms"
                        + (f" ({errs} errors)" if errs else ""))  # fmt: skip

                self.attempt(path.name, f"scale c={conns}", one)

    # -- orchestration ----------------------------------------------------------

    def plan(self, only: set[str]):
        paths = []
        if "direct" in only:
            paths.append((DirectPath(self), "all"))
        if "ssh" in only:
            paths += [
                (SshPath(self, "ssh"), "all"),
                (SshPath(self, "ssh-tt", tty=True), "small"),
                (SshPath(self, "ssh-aes", cipher=AES), "all"),
                (SshPath(self, "ssh-aes-tt", cipher=AES, tty=True), "small"),
            ]
        if "rtunnel" in only:
            paths.append((RtunnelPath(self), "all"))
        return paths

    def run(self, only: set[str]) -> None:
        self.start_services()
        for path, which in self.plan(only):
            self.results[path.name] = {}
            self.raw[path.name] = {}
            reason = path.unavailable()
            if reason:
                self.fail(path.name, reason)
                continue
            log(f"[{path.name}]")
            tests = [("http", self.test_http), ("rtt", self.test_rtt)]
            if which == "all":
                tests = [
                    ("bulk", self.test_bulk),
                    *tests,
                    ("memory", self.test_memory),
                    ("50 ms RTT", self.test_wan),
                    ("udp", self.test_udp),
                ]
            if path.name in SCALE_PATHS and self.scale_levels:
                tests.append(("scaling", self.test_scale))
            tests = [(w, t) for w, t in tests if TEST_NAMES[w] in self.tests]
            if not tests:
                continue
            for what, test in tests:
                self.attempt(path.name, what, lambda test=test, path=path: test(path))
        self.merge_tty()
        self.merge_scale_tty()

    def merge_scale_tty(self) -> None:
        """ssh scaling: at each level keep the better of -N and -tt."""
        a, b = self.scale.get("ssh"), self.scale.pop("ssh-tt", None)
        if a is None or b is None:
            if b is not None:
                self.scale["ssh"] = b
            return
        for conns in self.scale_levels:
            va, vb = a.get(conns), b.get(conns)
            if vb is not None and (va is None or vb["rps"] > va["rps"]):
                a[conns] = dict(vb, variant="-tt")
            elif va is not None:
                va["variant"] = "-N"

    def merge_tty(self) -> None:
        """ssh: for small requests, keep the better of -N and -tt."""
        for base in ("ssh", "ssh-aes"):
            tty = f"{base}-tt"
            if base not in self.results:
                continue
            a, b = self.results[base], self.results.get(tty, {})
            for keys, better in SMALL_GROUPS:
                va, vb = a.get(keys[0]), b.get(keys[0])
                use_tty = vb is not None and (va is None or (vb > va if better == "hi" else vb < va))
                variant = "-tt" if use_tty else "-N"
                if va is None and vb is None:
                    continue
                self.notes.setdefault(base, []).append(f"{keys[0]}: {variant}")
                if use_tty:
                    for k in keys:
                        a[k] = b.get(k)
