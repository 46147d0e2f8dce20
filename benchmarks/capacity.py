"""One server's capacity: idle sessions and idle streams held, and the
server's memory per idle session and per idle stream.

    .venv/bin/python benchmarks/capacity.py --sessions 2000 --streams 5000

starts one ``rtunnel_server`` on loopback, then

1. opens ``--sessions`` control connections from load-generator processes
   (each a real TLS client speaking the protocol: HELLO, one BIND of port 0,
   ACKs, PONGs; it never opens a local socket, so each visitor is an idle
   stream), reading the server's RSS before and after;
2. opens ``--streams`` visitor connections spread over the bound ports from
   visitor processes (plain sockets that send nothing), reading the RSS
   again once the server has sent every OPEN.

It prints one JSON object: the counts reached, RSS at each step and the
differences per session and per stream (KB). With ``--trace`` the server
runs under tracemalloc (which makes it slower and larger: compare RSS only
between runs without it) and the JSON also says where a session's memory
goes: glibc's bytes in use (mallinfo2, every C and large Python allocation)
and Python's traced bytes per session, and the source lines that allocated
the most per session. Memory per session includes
the TLS connection, the session's state and one bound port; per stream the
visitor's socket on the server and the stream's state.

Each process on this machine may hold at most the hard RLIMIT_NOFILE
descriptors (20,000 here, not raisable without CAP_SYS_RESOURCE): the server
needs two per session (its control connection and its port's listening
socket), one per stream and a few more, so 2 x sessions + streams stay under
it; the generators split their load over several processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import LOOP, free_port, listening, log, rss_kb, wait_for  # noqa: E402

PER_PROCESS = 8000  # connections per generator process (under its descriptor limit)
IN_FLIGHT = 48  # TLS handshakes a generator runs at once (under --max-unauthenticated-per-address)
SETTLE = 3.0
# Public ports are named, from below the kernel's ephemeral range (32768-60999
# here), which the generators' own connections use up: with port 0 the server
# runs out of ports to pick at about 10,000 sessions.
FIRST_PUBLIC_PORT = 2000  # seconds between the last connection and the RSS reading


# ---------------------------------------------------------------- generator of sessions (its own process)


def generate_sessions(port: int, token: str, fingerprint: str, count: int, first_port: int) -> None:
    """Hold `count` idle sessions, the i-th with public port `first_port + i`
    bound; print each port, then 'ready'."""
    from twisted.internet import endpoints, protocol, reactor, task
    from twisted.internet.interfaces import IReactorCore

    from rtunnel import wire
    from rtunnel.tls import PinnedCertificateCreator
    from rtunnel.wire import FrameType

    core: IReactorCore = reactor  # type: ignore[assignment]
    creator = PinnedCertificateCreator(fingerprint)
    state = {"bound": 0, "failed": 0, "started": 0}
    ports = iter(range(first_port, first_port + count))

    class IdleClient(protocol.Protocol):
        """The least a client must do to keep a session: ACK, PONG."""

        def connectionMade(self) -> None:
            self.decoder = wire.FrameDecoder()
            self.reliable = 0
            self.public_port = next(ports)
            hello = wire.Hello(versions=(1,), token=token)
            self.transport.write(wire.encode_json(FrameType.HELLO, hello.to_json()))

        def dataReceived(self, data: bytes) -> None:
            for frame in self.decoder.feed(data):
                if frame.type in wire.RELIABLE:
                    self.reliable += 1
                    self.transport.write(wire.encode(FrameType.ACK, 0, self.reliable.to_bytes(8, "big")))
                if frame.type is FrameType.WELCOME:
                    self.decoder.max_frame = wire.DEFAULT_MAX_FRAME
                    self.transport.write(wire.encode_json(FrameType.BIND, wire.Bind(1, "", self.public_port).to_json()))
                elif frame.type is FrameType.BOUND:
                    print(wire.Bound.parse(frame).port, flush=True)
                    state["bound"] += 1
                    self.factory.done(self)  # type: ignore[attr-defined]
                elif frame.type is FrameType.PING and not frame.flags & wire.FLAG_PONG:
                    self.transport.write(wire.encode(FrameType.PING, 0, frame.body, wire.FLAG_PONG))
                elif frame.type in (FrameType.ERROR, FrameType.BIND_FAILED, FrameType.GOAWAY):
                    print(f"error {frame.type.name} {frame.body[:200]!r}", file=sys.stderr, flush=True)
                    self.factory.done(self, failed=True)  # type: ignore[attr-defined]
                    self.transport.loseConnection()  # only sessions with their port count

        def connectionLost(self, reason: object = None) -> None:
            self.factory.done(self, failed=True)  # type: ignore[attr-defined]

    class Starter(protocol.Factory):
        protocol = IdleClient

        def __init__(self) -> None:
            self.pending = 0

        def done(self, proto: IdleClient, failed: bool = False) -> None:
            if getattr(proto, "counted", False):
                return
            proto.counted = True  # type: ignore[attr-defined]
            state["failed"] += failed
            self.pending -= 1
            if state["bound"] + state["failed"] == count:
                print("ready", flush=True)
            self.more()

        def more(self) -> None:
            while self.pending < IN_FLIGHT and state["started"] < count:
                state["started"] += 1
                self.pending += 1
                endpoint = endpoints.wrapClientTLS(
                    creator, endpoints.TCP4ClientEndpoint(reactor, LOOP, port, timeout=30)
                )
                endpoint.connect(self).addErrback(self.failed)

        def failed(self, failure: object) -> None:
            state["failed"] += 1
            self.pending -= 1
            print(f"connect failed: {failure}", file=sys.stderr, flush=True)
            self.more()

    starter = Starter()
    core.callWhenRunning(starter.more)
    task.LoopingCall(lambda: None).start(60)  # keeps nothing; the reactor runs until killed
    core.run()


def hold_visitors(ports: list[int], count: int) -> None:
    """Open `count` visitor connections spread over `ports`; print 'ready'; hold them."""
    held = []
    for i in range(count):
        held.append(socket.create_connection((LOOP, ports[i % len(ports)]), timeout=30))
    print("ready", flush=True)
    while True:
        time.sleep(60)


# ---------------------------------------------------------------- the traced server (its own process)


def traced_server(dump_dir: Path, argv: list[str]) -> None:
    """Run rtunnel_server with `argv` under tracemalloc; each SIGUSR1 writes
    a snapshot and glibc's bytes in use to `dump_dir` (snapshot-N.pickle,
    malloc-N.txt, N = 0, 1, ...)."""
    import ctypes
    import itertools
    import tracemalloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    counter = itertools.count()

    def dump(_signum: int, _frame: object) -> None:
        n = next(counter)
        tracemalloc.take_snapshot().dump(str(dump_dir / f"snapshot-{n}.pickle"))
        (dump_dir / f"malloc-{n}.txt").write_text(str(libc.mallinfo2().uordblks))

    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, dump)
    from rtunnel.scripts import server_main

    sys.argv = ["rtunnel_server", *argv]
    server_main()


def _dump_traces(pid: int, dump_dir: Path, n: int, timeout: float = 120) -> tuple[Path, int]:
    """Ask the traced server for dump `n` and wait for it."""
    os.kill(pid, signal.SIGUSR1)
    done = dump_dir / f"malloc-{n}.txt"
    wait_for(lambda: done.exists() and done.read_text().strip() != "", timeout, (), "the traced server's dump")
    return dump_dir / f"snapshot-{n}.pickle", int(done.read_text())


def _where_it_goes(before: tuple[Path, int], after: tuple[Path, int], sessions: int) -> dict[str, object]:
    """Bytes per session: glibc's in use, Python's traced, the top lines."""
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(before[0]))
    new = tracemalloc.Snapshot.load(str(after[0]))
    diff = new.compare_to(old, "lineno")
    python = sum(d.size_diff for d in diff)
    top = [
        {"where": f"{d.traceback[0].filename.split('site-packages/')[-1]}:{d.traceback[0].lineno}",
         "bytes_per_session": round(d.size_diff / sessions), "blocks_per_session": round(d.count_diff / sessions, 2)}
        for d in diff[:25] if d.size_diff > 0
    ]
    return {
        "malloc_in_use_kb_per_session": round((after[1] - before[1]) / sessions / 1024, 2),
        "python_traced_kb_per_session": round(python / sessions / 1024, 2),
        "top_lines": top,
    }


# ---------------------------------------------------------------- the run


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _read_lines_until_ready(proc: subprocess.Popen[str], timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"generator {proc.pid} ended early (status {proc.poll()})")
        line = line.strip()
        if line == "ready":
            return lines
        lines.append(line)
    raise RuntimeError(f"generator {proc.pid} not ready within {timeout:.0f} s")


def _spawn_split(total: int, arguments: Callable[[int, int], list[str]]) -> list[subprocess.Popen[str]]:
    """Generator processes of this script sharing `total` connections,
    PER_PROCESS each; `arguments(first, n)` gives one process's arguments."""
    return [
        subprocess.Popen(
            [sys.executable, __file__, *arguments(first, min(PER_PROCESS, total - first))],
            stdout=subprocess.PIPE, text=True,
        )
        for first in range(0, total, PER_PROCESS)
    ]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fingerprint(cert: Path) -> str:
    from rtunnel.tls import fingerprint_of_pem

    return fingerprint_of_pem(cert.read_bytes())


def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-capacity-"))
    token = secrets.token_hex(16)
    ctrl = free_port()
    server_cmd = [
        _tool("rtunnel_server"), "--port", str(ctrl), "--interface", LOOP, "--state-dir", str(tmp / "state"),
        "--token", token, "--public-host", LOOP,
        "--max-sessions-per-client", str(args.sessions + 10),
        "--max-unauthenticated-per-address", str(4 * IN_FLIGHT), "--max-unauthenticated", str(8 * IN_FLIGHT),
        "--max-tunnels", "4", "--max-connections-per-tunnel", str(args.streams + 10),
        "--session-buffer", str(1 << 30), *args.server_arg,
    ]  # fmt: skip
    procs: list[subprocess.Popen[str]] = []
    dump_dir = tmp / "traces"
    if args.trace:
        dump_dir.mkdir()
        server_cmd = [sys.executable, __file__, "--traced-server", str(dump_dir), "--", *server_cmd[1:]]
    server = subprocess.Popen(server_cmd, cwd=tmp, stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT, text=True)
    procs.append(server)
    try:
        wait_for(lambda: listening(ctrl) and (tmp / "state" / "server.crt").exists(), 30, (), "rtunnel_server")
        time.sleep(SETTLE)
        fingerprint = _fingerprint(tmp / "state" / "server.crt")
        base = rss_kb([server.pid])
        traced_before = _dump_traces(server.pid, dump_dir, 0) if args.trace else None
        log(f"server pid {server.pid}, RSS {base} KB idle; opening {args.sessions} sessions")
        started = time.monotonic()
        generators = _spawn_split(args.sessions, lambda first, n: [
            "--generate-sessions", str(n), "--port", str(ctrl), "--token", token,
            "--fingerprint", fingerprint, "--first-port", str(FIRST_PUBLIC_PORT + first),
        ])
        procs.extend(generators)
        ports = [int(p) for g in generators for p in _read_lines_until_ready(g, args.timeout)]
        if not ports:
            raise RuntimeError(f"no session bound its port; see {tmp / 'server.log'}")
        sessions_seconds = time.monotonic() - started
        time.sleep(SETTLE)
        with_sessions = rss_kb([server.pid])
        fds_sessions = _fds(server.pid)
        traced = (
            _where_it_goes(traced_before, _dump_traces(server.pid, dump_dir, 1), len(ports))
            if traced_before is not None else None
        )
        log(f"{len(ports)} sessions bound in {sessions_seconds:.1f} s; RSS {with_sessions} KB")
        started = time.monotonic()
        visitors = _spawn_split(args.streams, lambda first, n: [
            "--hold-visitors", str(n), "--ports", ",".join(map(str, ports)),
        ])
        procs.extend(visitors)
        for v in visitors:
            _read_lines_until_ready(v, args.timeout)
        # every visitor the server has accepted holds one descriptor there
        # (until all are, or the count has not grown for 10 s: the server keeps
        # descriptors back for control connections, docs/security.md)
        deadline = time.monotonic() + args.timeout
        held, grew = 0, time.monotonic()
        while held < args.streams and time.monotonic() < min(deadline, grew + 10):
            time.sleep(0.2)
            now_held = _fds(server.pid) - fds_sessions
            if now_held > held:
                held, grew = now_held, time.monotonic()
        streams_held = held
        streams_seconds = time.monotonic() - started
        time.sleep(SETTLE)
        with_streams = rss_kb([server.pid])
        alive = server.poll() is None
        log(f"{streams_held} of {args.streams} visitors accepted in {streams_seconds:.1f} s; RSS {with_streams} KB")
        return {
            "sessions_asked": args.sessions,
        "sessions": len(ports),
            "streams_asked": args.streams,
        "streams": streams_held,
            "server_alive": alive,
            "rss_kb": {"idle": base, "with_sessions": with_sessions, "with_streams": with_streams},
            "kb_per_idle_session": round((with_sessions - base) / max(1, len(ports)), 2),
            "kb_per_idle_stream": round((with_streams - with_sessions) / max(1, streams_held), 2),
            "seconds": {"sessions": round(sessions_seconds, 1), "streams": round(streams_seconds, 1)},
            "server_args": args.server_arg,
            "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
            **({"traced_per_session": traced} if traced is not None else {}),
        }
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for each step")
    parser.add_argument("--server-arg", action="append", default=[], help="one more rtunnel_server argument")
    parser.add_argument("--trace", action="store_true",
                        help="run the server under tracemalloc and report where a session's memory goes")
    parser.add_argument("--generate-sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--traced-server", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--hold-visitors", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--first-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.traced_server is not None:
        traced_server(args.traced_server, args.rest)
        return 0
    if args.generate_sessions is not None:
        generate_sessions(args.port, args.token, args.fingerprint, args.generate_sessions, args.first_port)
        return 0
    if args.hold_visitors is not None:
        hold_visitors([int(p) for p in args.ports.split(",")], args.hold_visitors)
        return 0
    if 2 * args.sessions + args.streams + 600 > hard:
        parser.error(
            f"2 x --sessions + --streams must stay under the server's descriptor limit ({hard} - 600 here; "
            "each session holds its control connection and its public port's listening socket, and "
            "visitors never get the last 512, rtunnel.descriptors): "
            "lower one of them"
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server and generators too
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
