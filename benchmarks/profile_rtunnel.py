#!/usr/bin/env python3
"""Profile rtunnel_server and rtunnel_client under load with py-spy.

Each load runs through a fresh tunnel (the same set-up as run.py: paths.RtunnelPath, on
127.0.0.1): the load is started, after a warm-up both tunnel processes are
sampled at once with ``py-spy record --idle -f raw`` for a fixed time, then the
load ends and its throughput is recorded (so the cost of sampling shows).

Loads:
  bulk-up      iperf3, 1 stream, visitor->service
  bulk-down    iperf3, 1 stream, service->visitor (-R)
  http1k       wrk -t2 -c32, nginx 1 KiB keep-alive
  http1k-1000  wrk -t2 -c1000, nginx 1 KiB keep-alive
  conn         wrk -t2 -c32 -H "Connection: close", nginx 1 KiB (new connections)

The raw stacks and a summary (JSON and markdown: self and inclusive time of
the top functions, time by component) go to --out (default
benchmarks/results/profiles/<date>/).  Needs py-spy (pip install py-spy) and
root or ptrace rights.  Usage:

  .venv/bin/python benchmarks/profile_rtunnel.py [--loads bulk-up,http1k] [--seconds 8]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import Bench  # noqa: E402  (benchmarks/bench.py and its neighbours)
from measure import parse_wrk  # noqa: E402
from paths import RtunnelPath  # noqa: E402
from procs import CLK_TCK, LOOP, SBIN_PATH, listening, log, raise_nofile, stat_fields, wait_for  # noqa: E402

LOADS = ("bulk-up", "bulk-down", "http1k", "http1k-1000", "conn")

# What the innermost Python frame of a sample is doing; first match wins.
# Self time of a Python frame includes the C code it calls (syscalls, OpenSSL).
KINDS = [
    ("idle: epoll_wait", re.compile(r"^EPollReactor\.doPoll \(.*epollreactor\.py")),
    ("syscall send() (tcp.py writeSomeData)", re.compile(r"^untilConcludes \(twisted/python/util\.py")),
    ("syscall recv() (tcp.py doRead)", re.compile(r"^Connection\.doRead \(twisted/internet/tcp\.py:278\)")),
    ("syscall epoll_ctl (start/stop reading/writing)", re.compile(r"^EPollReactor\.(_add|_remove) \(")),
    ("OpenSSL via pyOpenSSL (SSL_read/SSL_write/BIO)", re.compile(r"\(OpenSSL/SSL\.py")),
    ("rtunnel mux", re.compile(r"\(rtunnel/mux/")),
    ("rtunnel wire.py", re.compile(r"\(rtunnel/wire\.py")),
    ("rtunnel link.py, tlslink.py", re.compile(r"\(rtunnel/(tls)?link\.py")),
    ("rtunnel other", re.compile(r"\(rtunnel/")),
    ("twisted tls.py (Python)", re.compile(r"\(twisted/protocols/tls\.py")),
    ("twisted tcp.py (Python)", re.compile(r"\(twisted/internet/tcp\.py")),
    ("twisted abstract.py (Python)", re.compile(r"\(twisted/internet/abstract\.py")),
    ("twisted reactor (Python)", re.compile(r"\(twisted/internet/(epollreactor|posixbase|base)\.py")),
    ("twisted other (Python)", re.compile(r"\(twisted/")),
    ("cffi/cryptography (Python)", re.compile(r"\((cffi|cryptography)/")),
]

# Components for inclusive time: a sample counts once per component on its stack.
COMPONENTS = [
    ("rtunnel mux", re.compile(r"^rtunnel/mux/")),
    ("rtunnel wire.py", re.compile(r"^rtunnel/wire\.py")),
    ("rtunnel link.py, tlslink.py", re.compile(r"^rtunnel/(tls)?link\.py")),
    ("rtunnel server, client", re.compile(r"^rtunnel/(server/|client\.py|tunnels\.py|mover\.py|targets\.py)")),
    ("twisted tls.py", re.compile(r"^twisted/protocols/tls\.py")),
    ("pyOpenSSL SSL.py", re.compile(r"^OpenSSL/SSL\.py")),
    ("twisted tcp.py", re.compile(r"^twisted/internet/tcp\.py")),
    ("twisted abstract.py", re.compile(r"^twisted/internet/abstract\.py")),
]

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
ROOT = re.compile(r"^ReactorBase\.mainLoop \(twisted/internet/base\.py")
# A worker thread (Twisted's thread pool): not the reactor, counted apart.
THREAD = re.compile(r"^Thread\._bootstrap \(threading\.py")


def is_python(file: str) -> bool:
    return file.endswith(".py") or file.startswith("<")


def kind_of(frame: str) -> str:
    for name, pat in KINDS:
        if pat.search(frame):
            return name
    return "other Python"


def component(file: str) -> str | None:
    for name, pat in COMPONENTS:
        if pat.search(file):
            return name
    return None


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        # drop the start-up frames down to the reactor's main loop
        for i in range(len(frames) - 1, -1, -1):
            if ROOT.match(frames[i]):
                frames = frames[i + 1 :]
                break
        stacks.append((frames, n))
    return stacks


def summarise(path: Path, top: int = 15) -> dict:
    stacks = parse_raw(path)
    other_thread = sum(n for frames, n in stacks if any(THREAD.match(f) for f in frames))
    stacks = [(frames, n) for frames, n in stacks if not any(THREAD.match(f) for f in frames)]
    total = sum(n for _, n in stacks)
    idle = 0
    kinds: collections.Counter = collections.Counter()
    self_fn: collections.Counter = collections.Counter()
    self_line: collections.Counter = collections.Counter()
    native_leaf: collections.Counter = collections.Counter()
    incl_fn: collections.Counter = collections.Counter()
    incl_comp: collections.Counter = collections.Counter()
    for frames, n in stacks:
        parsed = []
        for frame in frames:
            m = FRAME.match(frame)
            if m:
                parsed.append((frame, m["func"], m["file"], m["line"]))
        py = [p for p in parsed if is_python(p[2])]
        if not py:
            continue
        inner = py[-1]
        kind = kind_of(inner[0])
        if kind.startswith("idle"):
            idle += n
            continue
        kinds[kind] += n
        self_fn[f"{inner[1]} ({inner[2]})"] += n
        self_line[inner[0]] += n
        if not is_python(parsed[-1][2]):
            native_leaf[f"{parsed[-1][1]} ({parsed[-1][2]})"] += n
        else:
            native_leaf["(in the interpreter, no native frame)"] += n
        seen_fn, seen_comp = set(), set()
        for _, func, file, _ in py:
            fn = f"{func} ({file})"
            if fn not in seen_fn:
                seen_fn.add(fn)
                incl_fn[fn] += n
            comp = component(file)
            if comp and comp not in seen_comp:
                seen_comp.add(comp)
                incl_comp[comp] += n
    busy = total - idle

    def pct(c, k=top):
        return [(key, v, v / busy if busy else 0.0) for key, v in c.most_common(k)]

    return {
        "samples": total,
        "worker_thread_samples": other_thread,
        "idle_samples": idle,
        "busy_share": busy / total if total else 0.0,
        "self_by_kind": pct(kinds, 40),
        "inclusive_by_component": pct(incl_comp, 40),
        "self_by_function": pct(self_fn),
        "self_by_line": pct(self_line),
        "self_by_native_leaf": pct(native_leaf),
        "inclusive_by_function": pct(incl_fn, 25),
    }


def summary_markdown(name: str, s: dict, top: int = 12) -> str:
    out = [
        f"#### {name}: {s['samples']} samples of the reactor thread, {s['busy_share']:.0%} busy "
        f"({s['idle_samples']} idle in epoll_wait); shares below are of busy samples",
        "",
    ]
    for title, key in (
        ("self time by kind (innermost Python frame)", "self_by_kind"),
        ("inclusive time by component", "inclusive_by_component"),
        ("self time by function (innermost Python frame)", "self_by_function"),
        ("self time by line (innermost Python frame)", "self_by_line"),
        ("self time by native leaf (--native only)", "self_by_native_leaf"),
        ("inclusive time by function", "inclusive_by_function"),
    ):
        if not s[key]:
            continue
        out.append(f"| {title} | samples | share |")
        out.append("|---|---:|---:|")
        for k, v, p in s[key][: top if "kind" not in key and "component" not in key else 40]:
            out.append(f"| `{k}` | {v} | {p:.1%} |")
        out.append("")
    return "\n".join(out)


def sched(pid: int) -> dict:
    """CPU time (user, system) and run-queue wait of one process, in seconds."""
    fields = stat_fields(pid) or []
    out = {}
    if len(fields) > 12:
        out["user"] = int(fields[11]) / CLK_TCK
        out["system"] = int(fields[12]) / CLK_TCK
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting, _ = f.read().split()
        out["on_cpu"] = int(on_cpu) / 1e9
        out["runqueue_wait"] = int(waiting) / 1e9
    except (OSError, ValueError):
        pass
    return out


def sched_delta(before: dict, after: dict, wall: float) -> dict:
    """Share of the wall time spent in user, system, on a CPU, waiting for one."""
    return {k: round((after[k] - before[k]) / wall, 3) for k in before if k in after}


def start_load(bench: Bench, load: str, port: int, secs: float) -> subprocess.Popen:
    tools = bench.tools
    if load.startswith("bulk"):
        server = bench.procs.start(
            "iperf3-server", [tools["iperf3"], "-s", "-1", "-B", LOOP, "-p", bench.iperf_port]
        )
        wait_for(lambda: listening(bench.iperf_port), 10, [(server, bench.procs)], "iperf3 -s")
        cmd = [tools["iperf3"], "-c", LOOP, "-p", port, "-t", int(secs), "-J"]
        if load == "bulk-down":
            cmd.append("-R")
    else:
        conns = 1000 if load == "http1k-1000" else 32
        cmd = [tools["wrk"], "-t2", f"-c{conns}", f"-d{int(secs)}s", "--latency", "--timeout", "10s"]
        if load == "conn":
            cmd += ["-H", "Connection: close"]
        cmd.append(f"http://{LOOP}:{port}/1k.bin")
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def load_result(load: str, out: str) -> dict:
    if load.startswith("bulk"):
        data = json.loads(out)
        s = data["end"]["sum_received"]
        return {"MBps": s["bits_per_second"] / 8e6}
    r = parse_wrk(out)
    return {"rps": r["rps"], "p50_ms": r.get("p50_ms"), "p99_ms": r.get("p99_ms")}


def resummarise(out: Path) -> int:
    report = json.loads((out / "summary.json").read_text())
    md = []
    for load, entry in report["loads"].items():
        md.append(f"### {load} (load while sampled: {entry['load_result_while_sampled']})\n")
        if entry.get("cpu_share_while_sampled"):
            md.append(
                "share of wall time while sampled (user, system, on a CPU, runnable but waiting): "
                f"{entry['cpu_share_while_sampled']}\n"
            )
        for end in list(entry["ends"]):
            s = summarise(out / f"{load}-{end}.raw")
            entry["ends"][end] = s
            md.append(summary_markdown(f"{load} / rtunnel_{end}", s))
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", default="bulk-up,http1k", help="comma-separated subset of " + ",".join(LOADS))
    ap.add_argument("--seconds", type=float, default=8.0, help="sampling time per process")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="also sample native frames (py-spy --native)")
    ap.add_argument("--out", help="output directory")
    ap.add_argument(
        "--from-raw", metavar="DIR", help="only re-summarise the raw files of an earlier run in DIR"
    )
    args = ap.parse_args(argv)
    if args.from_raw:
        return resummarise(Path(args.from_raw))
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    bad = set(loads) - set(LOADS)
    if bad:
        ap.error(f"unknown load(s): {', '.join(sorted(bad))}")
    pyspy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{SBIN_PATH}")
    if not pyspy:
        ap.error("py-spy not found: pip install py-spy")
    out = (
        Path(args.out)
        if args.out
        else HERE / "results" / "profiles" / datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    )
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile()

    bench_args = argparse.Namespace(
        quick=False, verbose=True, scale_levels=[], tests=[], only="rtunnel", keep_tmp=False,
        rtunnel_window=None,
    )
    bench = Bench(bench_args)
    path = RtunnelPath(bench)
    if path.unavailable():
        ap.error(path.unavailable())
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/profile_rtunnel.py", *(argv or sys.argv[1:])]
        ),
        "py_spy": subprocess.run([pyspy, "--version"], capture_output=True, text=True).stdout.strip(),
        "sampling": f"py-spy record --idle -r {args.rate} -d {args.seconds:g} -f raw"
        + (" --native" if args.native else "")
        + " (both ends at once)",
        "loads": {},
    }
    md = []
    try:
        bench.start_services()
        for load in loads:
            service = bench.iperf_port if load.startswith("bulk") else bench.nginx_port
            warm = 2.0
            with path.open(service) as t:
                srv, cli = t.server_pids()[0], t.client_pids()[0]
                log(f"[{load}] server pid {srv}, client pid {cli}")
                proc = start_load(bench, load, t.pub_port, args.seconds + warm + 2)
                time.sleep(warm)
                spies = {}
                t0 = time.monotonic()
                sched0 = {"server": sched(srv), "client": sched(cli)}
                for end, pid in (("server", srv), ("client", cli)):
                    raw = out / f"{load}-{end}.raw"
                    cmd = [pyspy, "record", "-p", str(pid), "-d", f"{args.seconds:g}", "-r", str(args.rate),
                           "--idle", "-f", "raw", "-o", str(raw)]  # fmt: skip
                    if args.native:
                        cmd.append("--native")
                    spies[end] = (
                        raw,
                        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
                    )
                for _raw, spy in spies.values():
                    spy.wait(args.seconds + 60)
                wall = time.monotonic() - t0
                cpu = {
                    "server": sched_delta(sched0["server"], sched(srv), wall),
                    "client": sched_delta(sched0["client"], sched(cli), wall),
                }
                stdout, stderr = proc.communicate(timeout=args.seconds + 60)
                try:
                    result = load_result(load, stdout)
                except Exception as e:  # report, go on
                    result = {"error": f"{e}: {stderr.strip()[-300:]}"}
                entry = {"load_result_while_sampled": result, "cpu_share_while_sampled": cpu, "ends": {}}
                md.append(f"### {load} (load while sampled: {result})\n")
                md.append(
                    f"share of wall time while sampled (user, system, on a CPU, runnable but waiting): {cpu}\n"
                )
                for end, (raw, _) in spies.items():
                    s = summarise(raw)
                    entry["ends"][end] = s
                    md.append(summary_markdown(f"{load} / rtunnel_{end}", s))
                report["loads"][load] = entry
                log(f"[{load}] {result}")
    finally:
        bench.procs.stop_all()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nprofiles: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
