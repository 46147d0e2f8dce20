"""The three paths to a local service -- direct, ``ssh -R`` and rtunnel --
each opened as a `Tunnel` whose public port leads to the service.

Standard library only.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import secrets
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from procs import LOOP, BenchError, descendants, free_port, listening, wait_for

AES = "aes128-gcm@openssh.com"


class Tunnel:
    """An open path: its public port, the processes it stops on close, and the
    pids of its server and client ends (for CPU and RSS readings)."""

    def __init__(self, bench, pub_port, procs=None, server_pids=None, client_pids=None):
        self.bench = bench
        self.pub_port = pub_port
        self.procs = procs if procs is not None else []  # stopped in this order
        self.server_pids = server_pids or (lambda: [])
        self.client_pids = client_pids or (lambda: [])

    def close(self) -> None:
        for proc in self.procs:
            self.bench.procs.stop(proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DirectPath:
    """No tunnel: the tool connects to the service (through the delay proxy for wan)."""

    name = "direct"
    has_procs = False

    def __init__(self, bench):
        self.b = bench

    def unavailable(self):
        return None

    def open(self, service_port: int, wan: bool = False, udp: bool = False) -> Tunnel:
        if not wan:
            return Tunnel(self.b, service_port)
        proxy, port = self.b.start_delay_proxy(service_port)
        return Tunnel(self.b, port, [proxy])


class SshPath:
    """``ssh -R`` through a private sshd started per tunnel (optionally a cipher, or ``-tt``)."""

    has_procs = True

    def __init__(self, bench, name, cipher=None, tty=False):
        self.b = bench
        self.name = name
        self.cipher = cipher
        self.tty = tty

    def unavailable(self):
        missing = [t for t in ("sshd", "ssh", "ssh-keygen") if not self.b.tools[t]]
        if missing:
            return "missing " + ", ".join(missing)
        if not os.path.isdir("/run/sshd"):
            try:
                os.makedirs("/run/sshd", mode=0o755)
            except OSError as e:
                return f"sshd needs /run/sshd: {e}"
        try:
            self.b.ssh_keys()
        except BenchError as e:
            return str(e)
        return None

    def open(self, service_port: int, wan: bool = False) -> Tunnel:
        d = self.b.ssh_keys()
        sshd_port = free_port()
        conf = d / f"sshd_config.{sshd_port}"
        conf.write_text(
            "\n".join(
                [
                    f"Port {sshd_port}",
                    f"ListenAddress {LOOP}",
                    f"HostKey {d / 'host_key'}",
                    f"PidFile {d / f'sshd.{sshd_port}.pid'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    "UsePAM no",
                    "PermitRootLogin yes",
                    "StrictModes no",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "AllowTcpForwarding yes",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "UseDNS no",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        procs = self.b.procs
        sshd = procs.start("sshd", [self.b.tools["sshd"], "-D", "-e", "-f", conf], cwd=d)
        stop = [sshd]
        tunnel = Tunnel(self.b, 0, stop)
        try:
            wait_for(lambda: listening(sshd_port), 10, [(sshd, procs)], "sshd")
            connect = sshd_port
            if wan:
                proxy, connect = self.b.start_delay_proxy(sshd_port)
                stop.insert(0, proxy)
            pub = free_port()
            cmd = [
                self.b.tools["ssh"],
                "-F", "/dev/null",
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes",
                "-o", "ExitOnForwardFailure=yes",
                "-o", "LogLevel=ERROR",
                "-i", d / "client_key",
                "-p", connect,
                "-R", f"{pub}:{LOOP}:{service_port}",
            ]  # fmt: skip
            if self.cipher:
                cmd += ["-c", self.cipher]
            user = f"{getpass.getuser()}@{LOOP}"
            if self.tty:
                cmd += ["-tt", user, "sleep", "3600"]
                ssh = procs.start("ssh-tt", cmd, cwd=d, stdin=subprocess.PIPE)
            else:
                cmd += ["-N", user]
                ssh = procs.start("ssh", cmd, cwd=d)
            stop.insert(0, ssh)
            wait_for(lambda: listening(pub), 15, [(ssh, procs), (sshd, procs)], "ssh -R")
            time.sleep(0.2)
        except BaseException:
            tunnel.close()
            raise
        tunnel.pub_port = pub
        # the sshd listener itself is not part of the connection
        tunnel.server_pids = lambda: descendants(sshd.pid)
        tunnel.client_pids = lambda: [ssh.pid, *descendants(ssh.pid)]
        return tunnel


class RtunnelPath:
    """``rtunnel_server`` + ``rtunnel_client`` per tunnel, the server's state dir kept across them."""

    name = "rtunnel"
    has_procs = True

    def __init__(self, bench):
        self.b = bench
        self.server = self.b.venv_tool("rtunnel_server")
        self.client = self.b.venv_tool("rtunnel_client")
        self.token = secrets.token_hex(16)
        self.state = None
        window = bench.args.rtunnel_window
        # Both ends: the receiver grants the window, the sender caps its resend
        # buffer at it. --session-buffer 1 GiB: each open connection reserves
        # 512 KiB of it (docs/security.md "Memory per session"), and the scaling
        # test holds 1,000 at once; a reservation is a bound, not an allocation.
        self.window_args = ["--session-buffer", 1 << 30] if window is None else [
            "--max-stream-window", window, "--session-buffer", max(4 * window, 1 << 30),
        ]

    def unavailable(self):
        if not self.server or not self.client:
            return "rtunnel_server/rtunnel_client not installed"
        return None

    def open(self, service_port: int, wan: bool = False, udp: bool = False) -> Tunnel:
        """With `udp`, a UDP tunnel of the same port number beside the TCP
        one (iperf3 -u: TCP control connection, UDP datagrams)."""
        procs = self.b.procs
        if self.state is None:
            self.state = self.b.tmp / "rtunnel-state"
            self.state.mkdir()
        crt = self.state / "server.crt"
        ctrl = free_port()
        srv_cwd = Path(tempfile.mkdtemp(prefix="srv-", dir=self.b.tmp))
        cli_cwd = Path(tempfile.mkdtemp(prefix="cli-", dir=self.b.tmp))
        server = procs.start(
            "rtunnel-server",
            [
                self.server,
                "--port", ctrl,
                "--interface", LOOP,
                "--state-dir", self.state,
                "--token", self.token,
                *self.window_args,
            ],
            cwd=srv_cwd,
        )  # fmt: skip
        stop = [server]
        tunnel = Tunnel(self.b, 0, stop)
        try:
            fp: list[str] = []

            def server_ready():
                if not listening(ctrl):
                    return False
                try:
                    fp[:] = [cert_fingerprint(crt)]
                except (OSError, ValueError):
                    return False
                return True

            wait_for(server_ready, 15, [(server, procs)], "rtunnel_server")
            connect = ctrl
            if wan:
                proxy, connect = self.b.start_delay_proxy(ctrl)
                stop.insert(0, proxy)
            pub = free_udp_port() if udp else free_port()
            udp_args = ["-f", f"udp:{LOOP}:{pub}", "-t", f"udp:{LOOP}:{service_port}"] if udp else []
            client = procs.start(
                "rtunnel-client",
                [
                    self.client,
                    "-c", f"{LOOP}:{connect}",
                    "-f", pub,
                    "-t", f"{LOOP}:{service_port}",
                    "--token", self.token,
                    "--fingerprint", fp[0],
                    *udp_args,
                    *self.window_args,
                ],
                cwd=cli_cwd,
            )  # fmt: skip
            stop.insert(0, client)
            wait_for(
                lambda: listening(pub),
                15,
                [(client, procs), (server, procs)],
                "rtunnel_client -f",
            )
            time.sleep(0.5)
        except BaseException:
            tunnel.close()
            raise
        tunnel.pub_port = pub
        tunnel.server_pids = lambda: [server.pid, *descendants(server.pid)]
        tunnel.client_pids = lambda: [client.pid, *descendants(client.pid)]
        return tunnel


def free_udp_port() -> int:
    """A port number free for TCP and for UDP on the loopback address."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((LOOP, port))
            except OSError:
                continue
        return port
    raise BenchError("no port free for both TCP and UDP")


def cert_fingerprint(path: Path) -> str:
    """SHA-256 of the first certificate in the PEM file (ValueError until one is written)."""
    text = path.read_text()
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    if not m:
        raise ValueError("no certificate yet")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest()
