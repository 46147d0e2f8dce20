"""What a server restart costs a tunnel: seconds from SIGTERM to the server
until a visitor gets through the tunnel again (docs/operations.md).

    .venv/bin/python benchmarks/restart_cost.py [--rounds 5] [--start-delay SECONDS]

Runs the installed `rtunnel_server` / `rtunnel_client` of this interpreter
(`pip install .` first) on loopback, with an echo target; the client has a
fixed public port (-f PORT), so it gets the same port back. Each round stops
the server with SIGTERM, waits for it to exit and starts it again at once
(as systemd's Restart= would), once binding the control port itself and
once socket-activated (this script holds the listening socket, as systemd
does, and hands it to every new server as fd 3). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
DEADLINE = 60.0  # seconds any one wait may take

# sleeps --start-delay seconds (a slow start: a loaded machine, a big clients
# file), then, given a descriptor, passes it as systemd does (fd 3), then
# becomes the server (exec keeps the pid that LISTEN_PID names)
WRAPPER = (
    "import os, sys, time\n"
    "time.sleep(float(sys.argv[1]))\n"
    "del sys.argv[1]\n"
    "fd = int(sys.argv[1])\n"
    "if fd < 0:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3, inheritable=True)\n"
    "    os.close(fd)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='control')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_text(path: Path, text: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            sys.exit(f"{text!r} did not appear in {path} within {DEADLINE:.0f} s")
        time.sleep(0.02)


def visit_until_echoed(port: int) -> None:
    """Connect to the public port until a byte comes back through the tunnel."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"x")
                if s.recv(1) == b"x":
                    return
        except OSError:
            pass
        time.sleep(0.01)
    sys.exit(f"no echo through 127.0.0.1:{port} within {DEADLINE:.0f} s")


class Server:
    """Starts rtunnel_server processes, binding or socket-activated."""

    def __init__(self, workdir: Path, control: int, activated: bool, delay: float) -> None:
        self.workdir, self.control, self.activated, self.delay = workdir, control, activated, delay
        self.listener: socket.socket | None = None
        if activated:
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", control))
            self.listener.listen(1024)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.workdir / f"server-{self.starts}.log"
        common = ["--state-dir", str(self.workdir / "state")]
        wrapper = [sys.executable, "-c", WRAPPER, str(self.delay if self.starts > 1 else 0)]
        if self.listener is not None:
            fd = self.listener.fileno()
            argv = [*wrapper, str(fd), str(BIN / "rtunnel_server"),
                    "--listen", "systemd:domain=INET:index=0", *common]
            pass_fds: tuple[int, ...] = (fd,)
        else:
            argv = [*wrapper, "-1", str(BIN / "rtunnel_server"), "--port", str(self.control),
                    "--interface", "127.0.0.1", *common]
            pass_fds = ()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, pass_fds=pass_fds)
        wait_for_text(log, "rtunnel server listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(DEADLINE)

    def close(self) -> None:
        self.stop()
        if self.listener is not None:
            self.listener.close()


def measure(rounds: int, activated: bool, delay: float) -> list[float]:
    workdir = Path(tempfile.mkdtemp(prefix="rtunnel-restart-"))
    target = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    target.daemon_threads = True
    threading.Thread(target=target.serve_forever, daemon=True).start()
    control, public = free_port(), free_port()
    server = Server(workdir, control, activated, delay)
    client: subprocess.Popen[bytes] | None = None
    costs = []
    try:
        server.start()
        token = (workdir / "state" / "token").read_text().strip()
        import hashlib
        import ssl

        der = ssl.PEM_cert_to_DER_cert((workdir / "state" / "server.crt").read_text())
        fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()
        client_log = workdir / "client.log"
        with open(client_log, "wb") as out:
            client = subprocess.Popen(
                [str(BIN / "rtunnel_client"), "-c", f"127.0.0.1:{control}", "-f", f"127.0.0.1:{public}",
                 "-t", str(target.server_address[1]), "--token", token, "--fingerprint", fingerprint],
                stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
            )
        visit_until_echoed(public)
        for _ in range(rounds):
            began = time.monotonic()
            server.stop()
            server.start()
            visit_until_echoed(public)
            costs.append(time.monotonic() - began)
            time.sleep(1.0)  # let the client's backoff settle between rounds
    finally:
        if client is not None and client.poll() is None:
            client.terminate()
            client.wait(DEADLINE)
        server.close()
        target.shutdown()
        target.server_close()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds each restarted server waits before starting")
    args = parser.parse_args()
    for name, activated in (("binding its own port", False), ("socket-activated", True)):
        costs = measure(args.rounds, activated, args.start_delay)
        print(
            f"server restart (start delay {args.start_delay:g} s), {name}: median {statistics.median(costs):.2f} s, "
            f"min {min(costs):.2f} s, max {max(costs):.2f} s over {len(costs)} restarts "
            f"({', '.join(f'{c:.2f}' for c in costs)})",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.pop("RTUNNEL_TOKEN", None)
    main()
