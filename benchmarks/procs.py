"""Processes and the machine: free ports, listening sockets, CPU and RSS
readings from /proc, the benchmark's child processes and its tool runs.

The bottom layer of the benchmark: every other module imports from here,
this one from none of them.  Standard library only.
"""

from __future__ import annotations

import collections
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOOP = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class BenchError(Exception):
    """A measurement could not be taken (reported, never fatal)."""


def log(msg: str) -> None:
    """Progress and errors go to stderr; stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# /proc helpers


def free_port() -> int:
    """A port free on 127.0.0.1 just now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((LOOP, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """True when some socket of this network namespace listens on port."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state first), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # fields after "comm)": state ppid pgrp ... utime(11) stime(12)
    return stat[stat.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Every live process below pid, found by parent pid (also those that called setsid())."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields:
                children[int(fields[1])].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (10 ms ticks)."""
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    """Summed resident set size of these processes, in KB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def raise_nofile(want: int = 16384) -> int:
    """Raise the soft open-file limit towards want (for 1000+ connections); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------
# processes


class Procs:
    """Every long-running process the benchmark starts; all stopped at end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self.count = 0

    def start(self, name, cmd, cwd=None, stdin=subprocess.DEVNULL):
        self.count += 1
        path = self.logdir / f"{self.count:03d}-{name}.log"
        with open(path, "wb") as out:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=cwd,
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def tail(self, proc, lines: int = 6) -> str:
        try:
            text = self.logs[proc.pid].read_text(errors="replace")
        except (KeyError, OSError):
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, proc, grace: float = 3.0) -> None:
        if proc not in self.procs:
            return
        self.procs.remove(proc)
        # sshd's per-connection children call setsid(): find them by ppid
        # while the parent still lives, then signal each by pid.
        kids = descendants(proc.pid) if proc.poll() is None else []
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for pid in [proc.pid, *kids]:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace
        for pid in kids:
            while stat_fields(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for pid in [proc.pid, *kids]:
            if stat_fields(pid) is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_for(cond: Callable[[], bool], timeout: float, procs=(), what="") -> None:
    """Poll cond until true; BenchError if timeout passes or one of the (proc, Procs) pairs exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        for proc, procs_obj in procs:
            if proc.poll() is not None:
                raise BenchError(f"{what}: process exited with {proc.returncode}: {procs_obj.tail(proc)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)


def run_tool(cmd, timeout: float) -> subprocess.CompletedProcess:
    """Run a measuring tool to its end with captured output; BenchError if it outlives timeout."""
    try:
        return subprocess.run(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s") from e

