#!/usr/bin/env python3
"""A/B benchmark of two rtunnel trees on 127.0.0.1: one change, before and after.

B is the rtunnel installed in the venv of the Python running this script (its
``rtunnel_server`` / ``rtunnel_client``); install this tree there first with
``.venv/bin/pip install --no-deps .``.  A runs the same console scripts with
``PYTHONPATH=--base``, so ``rtunnel`` is imported from that other checkout
(``git worktree add /tmp/base <commit>``).

Each load runs ``--repeat`` times per tree, alternating A B A B ... so that
machine noise falls on both, each run through a fresh tunnel to the same local
service.  For each load a table gives every run's rate, latency and the CPU
time each tunnel end spent per operation (per GB for bulk), then the medians of
A and B and their ratio B/A.  ``--syscalls`` adds per-operation syscall counts
of each end (``perf stat`` on syscall tracepoints).

This is for comparing two trees quickly; the figures the docs report come from
``benchmarks/run.sh``.  Standard library only; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import Bench  # noqa: E402  (benchmarks/bench.py and its neighbours)
from measure import percentile, ping_pong  # noqa: E402
from paths import cert_fingerprint, free_udp_port  # noqa: E402
from procs import (  # noqa: E402
    LOOP,
    SBIN_PATH,
    BenchError,
    cpu_seconds,
    free_port,
    listening,
    log,
    raise_nofile,
    wait_for,
)
from report import fmt, fmt_ratio, markdown_table, ratio  # noqa: E402

BIN = Path(sys.executable).parent
RTT_WARMUP = 200
RTT_LIMIT = 60.0  # seconds: an rtt run stops there, however many --rounds
PERF_ATTACH = 0.3  # seconds given to perf stat to attach before counting starts
SYSCALLS = ("sendto", "recvfrom", "epoll_wait", "epoll_ctl", "accept4", "connect", "close",
            "setsockopt", "getsockopt", "mmap", "munmap", "brk")  # fmt: skip
PERF_EVENTS = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{s}" for s in SYSCALLS)]


@dataclass(frozen=True)
class Load:
    """One load: what it measures, what it needs, and the columns of its table."""

    title: str
    tools: tuple[str, ...]
    service: str  # "echo", "udpecho", "nginx" or "iperf3"
    per: str  # unit of one operation, for CPU and syscall counts
    columns: tuple[tuple[str, str], ...]  # (key, header)


LOADS = {
    "rtt": Load("64 B ping-pong over one connection", (), "echo", "op",
                (("rate", "round trips/s"), ("p50", "p50 us"), ("p99", "p99 us"),
                 ("srv", "server us/op"), ("cli", "client us/op"))),
    "http": Load("nginx 1 KiB, wrk -t2 -c32 keep-alive", ("wrk", "nginx"), "nginx", "req",
                 (("rate", "req/s"), ("p50", "p50 ms"), ("p99", "p99 ms"),
                  ("srv", "server us/req"), ("cli", "client us/req"))),
    "close": Load("nginx 1 KiB, wrk -t2 -c32, Connection: close", ("wrk", "nginx"), "nginx", "conn",
                  (("rate", "conn/s"), ("p50", "p50 ms"), ("p99", "p99 ms"),
                   ("srv", "server us/conn"), ("cli", "client us/conn"))),
    "up": Load("iperf3, 1 stream, visitor->service", ("iperf3",), "iperf3", "MB",
               (("rate", "MB/s"), ("srv", "server s/GB"), ("cli", "client s/GB"))),
    "down": Load("iperf3, 1 stream, service->visitor (-R)", ("iperf3",), "iperf3", "MB",
                 (("rate", "MB/s"), ("srv", "server s/GB"), ("cli", "client s/GB"))),
    "udprtt": Load("64 B request/reply datagrams through a UDP tunnel to a UDP echo", (), "udpecho", "op",
                   (("rate", "round trips/s"), ("p50", "p50 us"), ("p99", "p99 us"),
                    ("srv", "server us/op"), ("cli", "client us/op"))),
    "udp": Load("iperf3 -u, 1,200 B datagrams at --udp-rate, visitor->service", ("iperf3",), "iperf3", "datagram",
                (("rate", "datagrams/s"), ("loss", "loss %"), ("full", "public socket full"),
                 ("srv", "server us/datagram"), ("cli", "client us/datagram"))),
    "udp64": Load("iperf3 -u, 64 B datagrams at --udp-rate, visitor->service", ("iperf3",), "iperf3", "datagram",
                  (("rate", "datagrams/s"), ("loss", "loss %"), ("full", "public socket full"),
                   ("srv", "server us/datagram"), ("cli", "client us/datagram"))),
}  # fmt: skip
#: loads through a UDP tunnel (beside the TCP one, same port number: iperf3 -u's control connection)
UDP_LOADS = {"udp", "udp64", "udprtt"}


@dataclass
class Side:
    """One tree under test: how its tunnel ends are started, and their state."""

    name: str  # "A" or "B"
    env: list[str]  # `env` prefix choosing where `rtunnel` is imported from
    state: Path  # the server's state dir (key and cert), kept across runs
    origin: Path | None = None  # the rtunnel package these processes import


@dataclass
class Result:
    side: str
    figures: dict[str, float | None] = field(default_factory=dict)
    syscalls: dict[str, dict[str, float]] = field(default_factory=dict)  # end -> name -> per op
    note: str = ""
    error: str = ""


# --------------------------------------------------------------------------
# measuring the tunnel ends


def cpu_time(pid: int) -> float:
    """On-CPU time of a process's live threads, to the nanosecond.

    /proc/PID/stat counts in 10 ms ticks, too coarse for a short run; it is
    the fallback when schedstat is missing.
    """
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return cpu_seconds([pid])
    return total / 1e9


class Meter:
    """CPU time (and with perf, syscalls) of both tunnel ends between start and stop."""

    def __init__(self, bench: Bench, server: int, client: int, perf: str | None) -> None:
        self.bench = bench
        self.pids = {"server": server, "client": client}
        self.perf = perf
        self.counters: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.cpu0: dict[str, float] = {}

    def start(self) -> None:
        if self.perf:
            for end, pid in self.pids.items():
                out = self.bench.tmp / f"perf-{end}-{secrets.token_hex(4)}.csv"
                cmd = [self.perf, "stat", "-x", ",", "-o", out, "-e", ",".join(PERF_EVENTS), "-p", pid]
                self.counters[end] = (self.bench.procs.start(f"perf-{end}", cmd), out)
            time.sleep(PERF_ATTACH)
        self.cpu0 = {end: cpu_time(pid) for end, pid in self.pids.items()}

    def stop(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """CPU seconds and syscall counts of each end since start()."""
        cpu = {end: cpu_time(pid) - self.cpu0[end] for end, pid in self.pids.items()}
        counts = {}
        for end, (proc, out) in self.counters.items():
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                raise BenchError(f"perf stat on the {end} did not stop") from None
            counts[end] = parse_perf(out)
        self.close()
        return cpu, counts

    def close(self) -> None:
        for proc, _ in self.counters.values():
            self.bench.procs.stop(proc)
        self.counters.clear()


def parse_perf(path: Path) -> dict[str, float]:
    """perf stat -x, output: `count,unit,event,...` per line; "total" is every syscall."""
    counts = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].replace(".", "").isdigit():
            name = parts[2].rsplit(":", 1)[-1].removeprefix("sys_enter_")
            counts["total" if name == "sys_enter" else name] = float(parts[0])
    return counts


def perf_unavailable(perf: str | None) -> str | None:
    """Why syscall tracepoints cannot be counted here, or None."""
    if not perf:
        return "perf is not installed (apt-get install linux-perf, or linux-tools-$(uname -r) on Ubuntu)"
    try:
        cp = subprocess.run([perf, "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "--", "true"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"perf stat failed: {e}"
    if cp.returncode or "<not supported>" in cp.stderr:
        last = (cp.stderr.strip().splitlines() or ["?"])[-1]
        return (f"perf stat cannot count syscall tracepoints ({last}); it needs tracefs "
                "(/sys/kernel/tracing) and root or kernel.perf_event_paranoid <= -1")  # fmt: skip
    return None


# --------------------------------------------------------------------------
# trees and tunnels


def rtunnel_origin(bench: Bench, env: list[str]) -> Path:
    """The directory of the rtunnel package a process started with `env` imports."""
    cp = subprocess.run([*env, sys.executable, "-c", "import rtunnel; print(rtunnel.__path__[0])"],
                        cwd=bench.tmp, capture_output=True, text=True, timeout=60)  # fmt: skip
    if cp.returncode:
        raise BenchError(f"cannot import rtunnel: {cp.stderr.strip()[-300:]}")
    return Path(cp.stdout.strip()).resolve()


def differing_sources(a: Path, b: Path) -> list[str]:
    """The .py files that differ between two rtunnel package directories."""
    names = {p.relative_to(a) for p in a.rglob("*.py")} | {p.relative_to(b) for p in b.rglob("*.py")}
    out = []
    for name in sorted(names):
        fa, fb = a / name, b / name
        if not (fa.is_file() and fb.is_file() and fa.read_bytes() == fb.read_bytes()):
            out.append(str(name))
    return out


def describe(tree: Path) -> str:
    """Label of a checkout: its short commit, and whether its rtunnel/ has uncommitted changes."""
    git = shutil.which("git")
    if not git:
        return ""
    cp = subprocess.run([git, "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if cp.returncode:
        return ""
    dirty = subprocess.run([git, "-C", tree, "status", "--porcelain", "--", "rtunnel"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return cp.stdout.strip() + (" + uncommitted changes" if dirty else "")


@dataclass
class Tunnel:
    server: subprocess.Popen
    client: subprocess.Popen
    pub_port: int


def open_tunnel(bench: Bench, side: Side, service_port: int, udp: bool = False) -> Tunnel:
    """rtunnel_server + rtunnel_client of one side, forwarding a fresh port to the service
    (with `udp`, a UDP tunnel of the same port number too)."""
    procs, token = bench.procs, secrets.token_hex(16)
    ctrl, pub = free_port(), free_udp_port() if udp else free_port()
    udp_args = ["-f", f"udp:{LOOP}:{pub}", "-t", f"udp:{LOOP}:{service_port}"] if udp else []
    server = procs.start(f"{side.name}-server", [
        *side.env, BIN / "rtunnel_server", "--port", ctrl, "--interface", LOOP,
        "--state-dir", side.state, "--token", token,
    ], cwd=side.state)  # fmt: skip
    client = None
    try:
        fingerprint: list[str] = []

        def server_ready() -> bool:
            if not listening(ctrl):
                return False
            try:
                fingerprint[:] = [cert_fingerprint(side.state / "server.crt")]
            except (OSError, ValueError):
                return False
            return True

        wait_for(server_ready, 15, [(server, procs)], f"{side.name}: rtunnel_server")
        client = procs.start(f"{side.name}-client", [
            *side.env, BIN / "rtunnel_client", "-c", f"{LOOP}:{ctrl}", "-f", pub,
            "-t", f"{LOOP}:{service_port}", "--token", token, "--fingerprint", fingerprint[0], *udp_args,
        ], cwd=side.state)  # fmt: skip
        wait_for(lambda: listening(pub), 15, [(client, procs), (server, procs)],
                 f"{side.name}: rtunnel_client -f")  # fmt: skip
        time.sleep(0.5)  # as paths.RtunnelPath: let the control link settle
    except BaseException:
        if client is not None:
            procs.stop(client)
        procs.stop(server)
        raise
    return Tunnel(server, client, pub)


# --------------------------------------------------------------------------
# loads: each returns the load's figures, its number of operations and a note


def load_rtt(bench: Bench, port: int, meter: Meter, args) -> tuple[dict, float, str]:
    with socket.create_connection((LOOP, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = os.urandom(64)
        buf = bytearray(64)
        view = memoryview(buf)

        def round_trip() -> None:
            ping_pong(s, msg, view)

        for _ in range(RTT_WARMUP):
            round_trip()
        meter.start()
        deadline = time.monotonic() + RTT_LIMIT
        times, note = [], ""
        t0 = time.perf_counter_ns()
        for i in range(args.rounds):
            a = time.perf_counter_ns()
            round_trip()
            times.append((time.perf_counter_ns() - a) / 1000)
            if i % 256 == 255 and time.monotonic() > deadline:
                note = f"stopped after {i + 1} round trips ({RTT_LIMIT:.0f} s)"
                break
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        if bytes(buf) != msg:
            raise BenchError("echo returned other bytes")
    times.sort()
    figures = {
        "rate": len(times) / elapsed,
        "p50": percentile(times, 50),
        "p99": percentile(times, 99),
    }
    return figures, len(times), note


def load_wrk(close: bool):
    def load(bench: Bench, port: int, meter: Meter, args) -> tuple[dict, float, str]:
        meter.start()
        r = bench.wrk(port, "1k.bin", close=close)
        if not r.get("requests"):
            raise BenchError("wrk made no requests")
        errors = sum(r.get("socket_errors", {}).values()) + r.get("non_2xx", 0)
        figures = {"rate": r["rps"], "p50": r.get("p50_ms"), "p99": r.get("p99_ms")}
        return figures, r["requests"], f"{errors} wrk errors" if errors else ""

    return load


def load_iperf(reverse: bool):
    def load(bench: Bench, port: int, meter: Meter, args) -> tuple[dict, float, str]:
        meter.start()
        r = bench.iperf(port, args.seconds, 1, reverse)
        if not r["bytes"]:
            raise BenchError("iperf3 moved no bytes")
        return {"rate": r["MBps"]}, r["bytes"] / 1e6, ""

    return load


def load_udp_rtt(bench: Bench, port: int, meter: Meter, args) -> tuple[dict, float, str]:
    """As `rtt`, with datagrams (a lost one, after 1 s, is counted and not timed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.connect((LOOP, port))
        msg = os.urandom(64)

        def round_trip() -> bool:
            s.send(msg)
            try:
                while s.recv(2048) != msg:
                    pass
            except TimeoutError:
                return False
            return True

        for _ in range(RTT_WARMUP):
            round_trip()
        meter.start()
        deadline = time.monotonic() + RTT_LIMIT
        times, lost, note = [], 0, ""
        t0 = time.perf_counter_ns()
        for i in range(args.rounds):
            a = time.perf_counter_ns()
            if round_trip():
                times.append((time.perf_counter_ns() - a) / 1000)
            else:
                lost += 1
            if i % 256 == 255 and time.monotonic() > deadline:
                note = f"stopped after {i + 1} round trips ({RTT_LIMIT:.0f} s)"
                break
        elapsed = (time.perf_counter_ns() - t0) / 1e9
    if not times:
        raise BenchError("no datagram came back")
    times.sort()
    if lost:
        note = ", ".join(filter(None, [note, f"{lost} lost"]))
    figures = {"rate": len(times) / elapsed, "p50": percentile(times, 50), "p99": percentile(times, 99)}
    return figures, len(times) + lost, note


def udp_socket_drops(port: int) -> int | None:
    """Datagrams the kernel dropped because the UDP socket on `port` was full
    (/proc/net/udp's `drops`): loss before the tunnel read them."""
    try:
        with open("/proc/net/udp") as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    return sum(int(fields[-1]) for fields in map(str.split, lines) if int(fields[1].split(":")[1], 16) == port)


def load_udp(size: int):
    def load(bench: Bench, port: int, meter: Meter, args) -> tuple[dict, float, str]:
        drops = udp_socket_drops(port)
        meter.start()
        r = bench.iperf_udp(port, size, args.udp_rate)
        received = r["received_dps"] * bench.udp_secs
        if not received:
            raise BenchError("no datagram came through")
        after = udp_socket_drops(port)
        full = after - drops if after is not None and drops is not None else None
        return {"rate": r["received_dps"], "loss": r["loss_percent"], "full": full}, received, ""

    return load


RUNNERS = {"rtt": load_rtt, "http": load_wrk(False), "close": load_wrk(True),
           "up": load_iperf(False), "down": load_iperf(True), "udp": load_udp(1200), "udp64": load_udp(64),
           "udprtt": load_udp_rtt}  # fmt: skip


def run_once(bench: Bench, side: Side, name: str, service_port: int, perf: str | None, args) -> Result:
    """One run of one load through a fresh tunnel of one side; never raises BenchError."""
    result = Result(side.name)
    try:
        tunnel = open_tunnel(bench, side, service_port, udp=name in UDP_LOADS)
        meter = Meter(bench, tunnel.server.pid, tunnel.client.pid, perf)
        try:
            figures, ops, result.note = RUNNERS[name](bench, tunnel.pub_port, meter, args)
            cpu, counts = meter.stop()
        finally:
            meter.close()
            bench.procs.stop(tunnel.client)
            bench.procs.stop(tunnel.server)
    except (BenchError, OSError) as e:  # OSError: the load's own socket (rtt)
        result.error = str(e) or type(e).__name__
        return result
    # CPU per operation: microseconds, or seconds per GB (= per 1000 MB) for bulk
    scale = 1000 if LOADS[name].per == "MB" else 1e6
    result.figures = dict(figures, srv=cpu["server"] / ops * scale, cli=cpu["client"] / ops * scale)
    result.syscalls = {end: {k: v / ops for k, v in c.items()} for end, c in counts.items()}
    return result


# --------------------------------------------------------------------------
# report


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_table(name: str, results: list[Result], args) -> str:
    load = LOADS[name]
    length = f"{args.rounds} round trips" if name in ("rtt", "udprtt") else f"{args.seconds} s"
    out = [f"### {name}: {load.title}, {length} per run"]
    keys = [k for k, _ in load.columns]
    header = ["run", *(h for _, h in load.columns)]
    if args.syscalls:
        keys += ["srv_sys", "cli_sys"]
        header += [f"server syscalls/{load.per}", f"client syscalls/{load.per}"]
    rows, notes, count = [header], [], {"A": 0, "B": 0}

    def values(r: Result) -> dict[str, float | None]:
        v = dict(r.figures)
        v["srv_sys"] = r.syscalls.get("server", {}).get("total")
        v["cli_sys"] = r.syscalls.get("client", {}).get("total")
        return v

    for r in results:
        count[r.side] += 1
        label = f"{r.side}{count[r.side]}"
        if r.error:
            rows.append([label, *(["failed"] * len(keys))])
            notes.append(f"{label}: {r.error}")
            continue
        v = values(r)
        rows.append([label, *(fmt(v.get(k)) for k in keys)])
        if r.note:
            notes.append(f"{label}: {r.note}")
    med = {side: {k: median([values(r).get(k) for r in results if r.side == side and not r.error])
                  for k in keys} for side in "AB"}  # fmt: skip
    rows.append(["median A", *(fmt(med["A"][k]) for k in keys)])
    rows.append(["median B", *(fmt(med["B"][k]) for k in keys)])
    rows.append(["B/A", *(fmt_ratio(ratio(med["B"][k], med["A"][k])) for k in keys)])
    out.append(markdown_table(rows))
    if args.syscalls:
        out.append(syscall_table(load, results))
    if notes:
        out.append("\n".join(f"* {n}" for n in notes))
    return "\n\n".join(out)


def syscall_table(load: Load, results: list[Result]) -> str:
    """Median count per operation of each syscall, each end, A and B.

    A syscall made less than once per 100 operations by all four is left out.
    """
    rows = [
        [f"syscalls per {load.per} (median)", "server A", "server B", "B/A", "client A", "client B", "B/A"]
    ]
    for call in ("total", *SYSCALLS):
        row, seen = [call], 0.0
        for end in ("server", "client"):
            a, b = (median([r.syscalls[end].get(call) for r in results
                            if r.side == side and end in r.syscalls]) for side in "AB")  # fmt: skip
            row += [fmt(a), fmt(b), fmt_ratio(ratio(b, a))]
            seen = max(seen, a or 0.0, b or 0.0)
        if seen >= 0.01:
            rows.append(row)
    return markdown_table(rows) if len(rows) > 1 else "(no syscall counts)"


# --------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="A/B benchmark of two rtunnel trees on 127.0.0.1. "
        f"B is the rtunnel installed in this Python's venv ({BIN}): install the tree to "
        "measure there first, e.g. `.venv/bin/pip install --no-deps .`. A runs the same "
        "console scripts with PYTHONPATH=--base, so rtunnel is imported from that checkout. "
        "Runs alternate A B A B ..., each through a fresh tunnel.",
        epilog="example: git worktree add /tmp/base HEAD~1; "
        ".venv/bin/python benchmarks/ab.py --base /tmp/base --loads rtt,http --repeat 3",
    )
    ap.add_argument("--base", required=True, type=Path, metavar="DIR",
                    help="the other rtunnel checkout (A), with rtunnel/ at its top")  # fmt: skip
    ap.add_argument("--loads", default=",".join(LOADS),
                    help=f"comma-separated subset of {','.join(LOADS)} (default: all): "
                    + "; ".join(f"{k}: {v.title}" for k, v in LOADS.items()))  # fmt: skip
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tree per load (default 3)")
    ap.add_argument("--seconds", type=int, default=5, help="duration of each wrk/iperf3 run (default 5)")
    ap.add_argument("--rounds", type=int, default=5000,
                    help=f"round trips of each rtt run, after {RTT_WARMUP} warm-up (default 5000)")  # fmt: skip
    ap.add_argument("--syscalls", action="store_true",
                    help="also count each end's syscalls per operation with perf stat (needs perf "
                    "and syscall tracepoints; perf slows the tunnel, compare such runs only with each other)")  # fmt: skip
    ap.add_argument("--udp-rate", type=int, default=20000,
                    help="datagrams/s iperf3 -u offers in the udp and udp64 loads (default 20000; CPU per "
                    "datagram compares best below the rate where loss starts)")  # fmt: skip
    ap.add_argument("--keep-tmp", action="store_true", help="keep the state dirs and process logs")
    args = ap.parse_args(argv)

    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    unknown = set(loads) - set(LOADS)
    if unknown:
        ap.error(f"--loads: unknown load(s) {', '.join(sorted(unknown))}")
    if args.repeat < 1 or args.seconds < 1 or args.rounds < 1:
        ap.error("--repeat, --seconds and --rounds must be at least 1")
    base = args.base.resolve()
    if not (base / "rtunnel" / "__init__.py").is_file():
        ap.error(
            f"--base {base}: no rtunnel/__init__.py there; make one with `git worktree add {base} <commit>`"
        )
    missing = [s for s in ("rtunnel_server", "rtunnel_client") if not (BIN / s).is_file()]
    if missing:
        ap.error(
            f"{' and '.join(missing)} not in {BIN}: install this tree there with `{BIN}/pip install --no-deps .`"
        )

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    raise_nofile()

    bench = Bench(argparse.Namespace(quick=False, verbose=False, scale_levels=[], tests=[],
                                     rtunnel_window=None))  # fmt: skip
    bench.wrk_secs = bench.udp_secs = args.seconds
    try:
        return measure(bench, base, loads, args)
    except BenchError as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("interrupted; stopping every process started")
        return 130
    finally:
        bench.procs.stop_all()
        if args.keep_tmp:
            log(f"state dirs and logs kept in {bench.tmp}")
        else:
            shutil.rmtree(bench.tmp, ignore_errors=True)


def measure(bench: Bench, base: Path, loads: list[str], args) -> int:
    sides = [Side("A", ["env", f"PYTHONPATH={base}"], bench.tmp / "state-A"),
             Side("B", ["env", "-u", "PYTHONPATH"], bench.tmp / "state-B")]  # fmt: skip
    for side in sides:
        side.state.mkdir()
        try:
            side.origin = rtunnel_origin(bench, side.env)
        except BenchError as e:
            raise BenchError(f"{side.name} ({' '.join(side.env)}): {e}") from None
    a, b = sides
    if a.origin != base / "rtunnel":
        raise SystemExit(f"A imports rtunnel from {a.origin}, not from {base}")
    tree = HERE.parent / "rtunnel"
    header = [f"A: {a.origin} ({describe(base)})", f"B: {b.origin} (installed in {BIN.parent})"]
    if b.origin != tree.resolve():
        changed = differing_sources(tree, b.origin)
        header[1] += (", same sources as this tree" if not changed else
                      f", differs from this tree ({HERE.parent}, {describe(HERE.parent)}) in "
                      f"{', '.join(changed)}: `{BIN}/pip install --no-deps .` to measure this tree")  # fmt: skip
    if not differing_sources(a.origin, b.origin):
        header.append("note: A and B have the same rtunnel sources")

    perf = None
    if args.syscalls:
        perf = shutil.which("perf", path=SBIN_PATH)
        why = perf_unavailable(perf)
        if why:
            log(f"--syscalls: {why}; going on without syscall counts")
            args.syscalls, perf = False, None

    services: dict[str, int | None] = {}
    runnable = []
    for name in loads:
        load = LOADS[name]
        absent = [t for t in load.tools if not bench.tools.get(t)]
        if absent:
            log(f"skipping {name}: it needs {' and '.join(load.tools)}; not found: {', '.join(absent)}. "
                f"Install with `apt-get install {' '.join(absent)}` (benchmarks/run.sh installs "
                "them when missing)")  # fmt: skip
            continue
        try:
            if load.service not in services:
                if load.service == "echo":
                    port = free_port()
                    bench.start_helper("echo", ["--serve-echo", str(port)], port)
                elif load.service == "udpecho":
                    port = free_udp_port()
                    bench.procs.start("udp-echo", [sys.executable, HERE / "services.py", "--serve-udp-echo", str(port)])
                    time.sleep(0.5)  # (nothing to poll: a UDP socket does not "listen")
                elif load.service == "nginx":
                    port = bench.start_nginx()
                else:
                    port = bench.iperf_port = free_port()  # iperf3 -s started per run
                services[load.service] = port
        except BenchError as e:
            services[load.service] = None
            log(f"skipping {name}: {load.service} did not start: {e}")
        if services[load.service] is not None:
            runnable.append(name)

    if not runnable:
        log("no load can run")
        return 1
    log("\n".join(header))
    tables = []
    for name in runnable:
        results = []
        for i in range(args.repeat):
            for side in sides:
                r = run_once(bench, side, name, services[LOADS[name].service], perf, args)
                results.append(r)
                what = r.error or ", ".join(
                    f"{h} {fmt(r.figures.get(k))}" for k, h in LOADS[name].columns
                )
                log(f"[{name} {side.name} {i + 1}/{args.repeat}] {what}")
        tables.append(load_table(name, results, args))
    print("\n".join(header) + "\n")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
