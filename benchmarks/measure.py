"""Reading what the tools report: wrk's output, percentiles, and one
ping-pong round trip on an echo connection.

Standard library only.
"""

from __future__ import annotations

import re
import socket

from procs import BenchError

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_duration_ms(text: str) -> float:
    """A wrk duration ("850.00us", "1.20ms", "2.00s") in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> dict:
    """Rate, latency percentiles, counts and errors from `wrk --latency` output."""
    res: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise BenchError("wrk: no Requests/sec in output: " + out.strip()[-300:])
    res["rps"] = float(m.group(1))
    dist = re.search(r"Latency Distribution\s*\n((?:\s+\d+%\s+\S+\s*\n)+)", out)
    if dist:
        for pct, val in re.findall(r"(\d+)%\s+(\S+)", dist.group(1)):
            res[f"p{pct}_ms"] = parse_duration_ms(val)
    m = re.search(r"(\d+) requests in ([\d.]+\w+), ([\d.]+\w*B) read", out)
    if m:
        res["requests"] = int(m.group(1))
        res["duration_ms"] = parse_duration_ms(m.group(2))
        res["read"] = m.group(3)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    return res


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-th percentile of sorted values, interpolated between neighbours."""
    k = (len(sorted_values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def ping_pong(s: socket.socket, msg: bytes, view: memoryview) -> None:
    """Send `msg` on `s` and read as many bytes back into `view`."""
    s.sendall(msg)
    got = 0
    while got < len(msg):
        n = s.recv_into(view[got:])
        if not n:
            raise BenchError("echo connection closed")
        got += n

