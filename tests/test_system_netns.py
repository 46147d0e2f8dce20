"""System test: a real network outage between rtunnel server and client.

Two network namespaces made by this test (and only those) are joined by a
veth pair, rate-limited with tbf. The rtunnel server runs in one, the client
and an echo target in the other, all as real processes (``python -m twisted
rtunnel-server`` / ``rtunnel-client``). A visitor in the server namespace
pushes data through the tunnel and reads the echo back; mid-transfer the
client's end of the veth is taken down for 15 s, a true blackhole (no FIN, no
RST reaches either side). Both ends must declare the link dead, the client
must reconnect and resume the session, and the visitor's transfer must finish
intact on its original connection.

Needs root, ``ip netns`` and ``tc``, and the rtunnel twisted plugins installed
for ``sys.executable``; otherwise it is skipped with the reason. Every process
and namespace it makes is removed in cleanups, also on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from twisted.trial import unittest

TOKEN = "netns-test-token-0123456789"
CONTROL_PORT = 19050
PUBLIC_PORT = 4000
TARGET_PORT = 7000
MiB = 1024 * 1024
TRANSFER_BYTES = int(os.environ.get("RTUNNEL_NETNS_BYTES", 48 * MiB))
OUTAGE_AFTER = 3.0  # seconds into the transfer
OUTAGE = 15.0  # seconds the link stays down
RATE = "50mbit"
TEST_BUDGET = 115.0  # seconds for the whole test, cleanups excluded

ECHO_TARGET = textwrap.dedent(
    """
    import socket, sys, threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(16)
    print("echo target ready", flush=True)

    def handle(conn, peer):
        count = 0
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                conn.sendall(data)
                count += len(data)
            print(f"{peer}: EOF after {count} bytes, half-closing", flush=True)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            print(f"{peer}: closed", flush=True)
        except OSError as e:
            print(f"{peer}: error after {count} bytes: {e!r}", flush=True)
        finally:
            conn.close()

    while True:
        conn, peer = srv.accept()
        print(f"{peer}: connected", flush=True)
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()
    """
)

VISITOR = textwrap.dedent(
    """
    import hashlib, json, socket, sys, threading, time

    host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    CHUNK = 65536

    def chunk(i):
        return hashlib.sha256(b"rtunnel-netns-%d" % i).digest() * (CHUNK // 32)

    result = {"total": total, "sent": 0, "received": 0}
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    timeline = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            timeline.append((time.time(), result["sent"], result["received"]))

    def send(sock):
        try:
            i = 0
            while result["sent"] < total:
                data = chunk(i)[: total - result["sent"]]
                sock.sendall(data)
                sent_hash.update(data)
                result["sent"] += len(data)
                i += 1
            sock.shutdown(socket.SHUT_WR)
            result["t_sent_all"] = time.time()
        except Exception as e:
            result["send_error"] = repr(e)

    result["t_start"] = time.time()
    threading.Thread(target=sample, daemon=True).start()
    try:
        sock = socket.create_connection((host, port), timeout=10)
        sock.settimeout(60)
        result["t_connected"] = time.time()
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        while True:
            data = sock.recv(1 << 20)
            if not data:
                result["t_eof"] = time.time()
                break
            recv_hash.update(data)
            result["received"] += len(data)
            if result["received"] >= total:
                result["t_received_all"] = time.time()
                sock.settimeout(15)  # all echoed back: the EOF must follow promptly
        sender.join(10)
        sock.close()
    except Exception as e:
        result["recv_error"] = repr(e)
    result["t_end"] = time.time()
    stop.set()
    timeline.append((time.time(), result["sent"], result["received"]))
    result["early_eof"] = "t_eof" in result and result["received"] < total
    result["sent_sha256"] = sent_hash.hexdigest()
    result["received_sha256"] = recv_hash.hexdigest()
    result["ok"] = (
        "send_error" not in result
        and "recv_error" not in result
        and result["sent"] == total
        and result["received"] == total
        and result["sent_sha256"] == result["received_sha256"]
    )
    result["timeline"] = timeline
    print(json.dumps(result), flush=True)
    """
)


def say(message: str) -> None:
    print(f"[netns] {message}", flush=True)


def _run(argv: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _why_skip() -> str | None:
    """None if this machine can run the test, else the reason it cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (creates network namespaces and veth interfaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (apt-get install -y iproute2)"
    probe = f"rt-probe-{os.getpid()}"
    try:
        made = _run(["ip", "netns", "add", probe])
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"'ip netns' unavailable: {e}"
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe])
    try:
        plugins = _run([sys.executable, "-m", "twisted", "--help"], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {sys.executable} -m twisted: {e}"
    if "rtunnel-server" not in plugins.stdout or "rtunnel-client" not in plugins.stdout:
        return (
            f"the rtunnel twisted plugins are not installed for {sys.executable} "
            "(pip install the project into that interpreter's environment)"
        )
    return None


class NetnsOutageTest(unittest.TestCase):
    """Resume across a 15 s blackhole on a rate-limited veth between namespaces."""

    def setUp(self) -> None:
        why = _why_skip()
        if why is not None:
            raise unittest.SkipTest(why)
        self.started = time.monotonic()
        self.tmp = Path(self.mktemp()).absolute()
        self.tmp.mkdir(parents=True)
        pid = os.getpid()
        self.srv_ns, self.cli_ns = f"rt-srv-{pid}", f"rt-cli-{pid}"
        self.srv_dev, self.cli_dev = "veth-rtsrv", "veth-rtcli"
        net = 10 + pid % 240
        self.srv_addr, self.cli_addr = f"10.231.{net}.1", f"10.231.{net}.2"
        self.logs: dict[str, Path] = {}
        self.netem = False

    # ------------------------------------------------------------ helpers

    def remaining(self) -> float:
        return max(TEST_BUDGET - (time.monotonic() - self.started), 1.0)

    def must(self, argv: list[str]) -> str:
        done = _run(argv)
        if done.returncode != 0:
            self.fail(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def make_network(self) -> None:
        for ns in (self.srv_ns, self.cli_ns):
            _run(["ip", "netns", "del", ns])  # leftover of a killed run with our pid
            self.must(["ip", "netns", "add", ns])
            self.addCleanup(_run, ["ip", "netns", "del", ns])
            self.must(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
        self.must(
            ["ip", "-n", self.srv_ns, "link", "add", "name", self.srv_dev]
            + f"type veth peer name {self.cli_dev} netns {self.cli_ns}".split()
        )
        for ns, dev, addr in (
            (self.srv_ns, self.srv_dev, self.srv_addr),
            (self.cli_ns, self.cli_dev, self.cli_addr),
        ):
            self.must(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            self.must(["ip", "-n", ns, "link", "set", "dev", dev, "up"])
            tbf = f"root handle 1: tbf rate {RATE} burst 64kb latency 50ms"
            self.must(["tc", "-n", ns, "qdisc", "add", "dev", dev, *tbf.split()])
        netem_errors = []
        for ns, dev in ((self.srv_ns, self.srv_dev), (self.cli_ns, self.cli_dev)):
            netem = "parent 1:1 handle 10: netem delay 10ms loss 0.1%"
            done = _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, *netem.split()])
            if done.returncode != 0:
                netem_errors.append(done.stderr.strip() or f"exit {done.returncode}")
        self.netem = not netem_errors
        if self.netem:
            say("netem available: 10 ms delay and 0.1% loss on both veth ends")
        else:
            say(f"netem unavailable on this kernel: no delay/loss emulation ({netem_errors[0]})")
        say(
            f"namespaces {self.srv_ns} ({self.srv_addr}) and {self.cli_ns} ({self.cli_addr}), "
            f"veth rate-limited to {RATE} each way"
        )

    def spawn(
        self, name: str, ns: str, argv: list[str], stdout: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start argv inside ns in its own process group, output in <tmp>/<name>.log."""
        cwd = self.tmp / name
        cwd.mkdir()
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out if stdout is None else stdout,
                stderr=out,
                start_new_session=True,
            )
        self.addCleanup(self.stop, name, proc)
        return proc

    def stop(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue
        say(f"{name} (pid {proc.pid}) did not exit after SIGKILL")

    def log_text(self, name: str) -> str:
        try:
            return self.logs[name].read_text(errors="replace")
        except (KeyError, OSError):
            return ""

    def all_logs(self) -> str:
        parts = []
        for name in self.logs:
            parts.append(f"----- {name} log ({self.logs[name]}) -----\n{self.log_text(name)[-6000:]}")
        return "\n".join(parts)

    def wait_for(
        self, what: str, check: Callable[[], bool], timeout: float, procs: dict[str, subprocess.Popen[bytes]]
    ) -> None:
        deadline = time.monotonic() + min(timeout, self.remaining())
        while not check():
            for name, proc in procs.items():
                if proc.poll() is not None:
                    self.fail(
                        f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.all_logs()}"
                    )
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}\n{self.all_logs()}")
            time.sleep(0.1)

    def fingerprint(self, cert: Path) -> str | None:
        try:
            der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        except (OSError, ValueError):
            return None
        return hashlib.sha256(der).hexdigest()

    def twisted(self, plugin: str, *args: str) -> list[str]:
        # `python -m twisted` is `twist`: always in the foreground, no pid file.
        return [sys.executable, "-m", "twisted", "--log-format=text", "--log-file=-", plugin, *args]

    # ------------------------------------------------------------ the test

    def test_blackhole_outage_mid_transfer_resumes_without_breaking_the_visitor(self) -> None:
        self.make_network()
        state = self.tmp / "state"
        server = self.spawn(
            "server",
            self.srv_ns,
            self.twisted(
                "rtunnel-server",
                *f"--port {CONTROL_PORT} --interface {self.srv_addr}".split(),
                *("--state-dir", str(state)),  # a path: may hold spaces
                *f"--token {TOKEN} --ping-interval 2 --dead-after 6 --resume-grace 60".split(),
            ),
        )
        procs = {"server": server}
        self.wait_for(
            "the server to listen",
            lambda: "rtunnel server listening" in self.log_text("server"),
            30,
            procs,
        )
        fingerprint: list[str] = []

        def have_fingerprint() -> bool:
            fp = self.fingerprint(state / "server.crt")
            if fp:
                fingerprint.append(fp)
            return bool(fp)

        self.wait_for("the server certificate", have_fingerprint, 10, procs)

        target_script = self.tmp / "echo_target.py"
        target_script.write_text(ECHO_TARGET)
        procs["target"] = self.spawn(
            "target", self.cli_ns, [sys.executable, str(target_script), str(TARGET_PORT)]
        )
        self.wait_for("the echo target", lambda: "echo target ready" in self.log_text("target"), 15, procs)

        procs["client"] = self.spawn(
            "client",
            self.cli_ns,
            self.twisted(
                "rtunnel-client",
                *f"-c {self.srv_addr}:{CONTROL_PORT} -f {self.srv_addr}:{PUBLIC_PORT}".split(),
                *f"-t 127.0.0.1:{TARGET_PORT} --token {TOKEN} --fingerprint {fingerprint[0]}".split(),
                *"--ping-interval 2 --dead-after 6 --max-retry-delay 2".split(),
            ),
        )
        self.wait_for("the tunnel", lambda: "tunnel ready" in self.log_text("client"), 30, procs)
        say(f"tunnel up {time.monotonic() - self.started:.1f} s after the test started")

        visitor_script = self.tmp / "visitor.py"
        visitor_script.write_text(VISITOR)
        visitor = self.spawn(
            "visitor",
            self.srv_ns,
            [sys.executable, str(visitor_script), self.srv_addr, str(PUBLIC_PORT), str(TRANSFER_BYTES)],
            stdout=subprocess.PIPE,
        )
        time.sleep(OUTAGE_AFTER)
        self.must(["ip", "-n", self.cli_ns, "link", "set", "dev", self.cli_dev, "down"])
        t_down = time.time()
        say(f"link down ({self.cli_dev} in {self.cli_ns}) for {OUTAGE:.0f} s")
        time.sleep(OUTAGE)
        self.must(["ip", "-n", self.cli_ns, "link", "set", "dev", self.cli_dev, "up"])
        t_up = time.time()
        say("link up again")

        try:
            out, _ = visitor.communicate(timeout=self.remaining())
        except subprocess.TimeoutExpired:
            self.stop("visitor", visitor)
            self.fail(f"the visitor did not finish within the test's time budget\n{self.all_logs()}")
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.fail(f"the visitor printed no result: {out!r}\n{self.all_logs()}")

        # Did the outage hit the middle of the transfer?
        timeline = result.get("timeline", [])
        at_down = [recv for t, _, recv in timeline if t <= t_down]
        during = [recv for t, _, recv in timeline if t_down + 1 <= t <= t_up]
        received_at_down = at_down[-1] if at_down else 0
        moved_during = (max(during) - min(during)) if during else 0
        t_start = result.get("t_start", t_down)
        t_end = result.get("t_end", t_up)
        resumed_flow = [t for t, _, recv in timeline if t > t_up and recv > (max(during) if during else 0)]
        say(
            f"summary: outage {t_up - t_down:.1f} s (from {t_down - t_start:.1f} s into the transfer); "
            f"transfer of {TRANSFER_BYTES / MiB:.0f} MiB echoed took {t_end - t_start:.1f} s "
            f"({received_at_down / MiB:.1f} MiB back before the outage, "
            f"{moved_during / MiB:.2f} MiB during it, data flowing again "
            f"{(resumed_flow[0] - t_up) if resumed_flow else float('nan'):.1f} s after link up); "
            f"netem {'available' if self.netem else 'unavailable (no delay/loss emulation)'}"
        )

        details = (
            f"visitor result: { {k: v for k, v in result.items() if k != 'timeline'} }\n{self.all_logs()}"
        )
        if "t_received_all" in result and "t_eof" not in result:
            self.fail(
                "every byte came back intact but the visitor never saw EOF: the target's "
                f"half-close did not reach it (a FIN lost in the tunnel)\n{details}"
            )
        self.assertTrue(result["ok"], f"transfer failed or corrupted\n{details}")
        self.assertFalse(result["early_eof"], f"visitor connection closed early\n{details}")
        self.assertGreater(received_at_down, 0, f"no data moved before the outage\n{details}")
        self.assertLess(received_at_down, TRANSFER_BYTES, f"transfer finished before the outage\n{details}")
        self.assertGreater(t_end, t_up, f"transfer finished before the link came back\n{details}")

        server_log, client_log = self.log_text("server"), self.log_text("client")
        self.assertIn("is dead", server_log, f"server never declared the link dead\n{details}")
        self.assertIn("detached", server_log, f"server never detached the session\n{details}")
        self.assertIn("resumed session", server_log, f"server never resumed the session\n{details}")
        self.assertTrue(
            "is dead" in client_log or "cannot reach the rtunnel server" in client_log,
            f"client log shows neither a dead link nor a reconnect\n{details}",
        )
        self.assertIn("session resumed", client_log, f"client never resumed the session\n{details}")
        for name, log in (("server", server_log), ("client", client_log)):
            self.assertNotIn("expired", log, f"{name}: session expired\n{details}")
            self.assertNotIn("did not resume", log, f"{name}: session not resumed\n{details}")
            for sign in ("Traceback", "internal error", "closing link to"):
                self.assertNotIn(sign, log, f"{name}: link closed on an error after the outage\n{details}")
        resumes = server_log.count("resumed session")
        self.assertEqual(resumes, 1, f"expected one resume, the server resumed {resumes} times\n{details}")
        self.assertIsNone(server.poll(), f"server exited\n{details}")
        self.assertIsNone(procs["client"].poll(), f"client exited\n{details}")
        say(
            "client: "
            + ("declared the link dead" if "is dead" in client_log else "did not see the link die")
            + ("; retried while the link was down" if "cannot reach the rtunnel server" in client_log else "")
            + f"; whole test {time.monotonic() - self.started:.1f} s before cleanup"
        )
