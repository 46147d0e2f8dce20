"""The report of a run: the metrics and their labels, the JSON document
with every figure's ratios to direct and to ssh -R, the markdown tables
printed at the end, and the system the figures were taken on.

Standard library only.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from paths import AES

if TYPE_CHECKING:
    from bench import Bench

HERE = Path(__file__).resolve().parent

# key, label, unit, better ("hi" or "lo")
METRICS = [
    ("bulk1_up", "bulk, 1 stream, visitor->service", "MB/s", "hi"),
    ("bulk1_down", "bulk, 1 stream, service->visitor", "MB/s", "hi"),
    ("bulk8_up", "bulk, 8 streams, visitor->service", "MB/s", "hi"),
    ("bulk8_down", "bulk, 8 streams, service->visitor", "MB/s", "hi"),
    ("cpu_srv_up", "CPU server side, 1 stream up", "s/GB", "lo"),
    ("cpu_cli_up", "CPU client side, 1 stream up", "s/GB", "lo"),
    ("cpu_srv_down", "CPU server side, 1 stream down", "s/GB", "lo"),
    ("cpu_cli_down", "CPU client side, 1 stream down", "s/GB", "lo"),
    ("http1k_rps", "HTTP 1 KiB, keep-alive", "req/s", "hi"),
    ("http1k_p50", "HTTP 1 KiB, keep-alive, p50", "ms", "lo"),
    ("http1k_p99", "HTTP 1 KiB, keep-alive, p99", "ms", "lo"),
    ("http1m_rps", "HTTP 1 MiB, keep-alive", "req/s", "hi"),
    ("http1m_p50", "HTTP 1 MiB, keep-alive, p50", "ms", "lo"),
    ("http1m_p99", "HTTP 1 MiB, keep-alive, p99", "ms", "lo"),
    ("conn_rate", "new connections (Connection: close)", "conn/s", "hi"),
    ("conn_p50", "new connections, p50", "ms", "lo"),
    ("conn_p99", "new connections, p99", "ms", "lo"),
    ("rtt_mean", "64 B ping-pong round trip, mean", "us", "lo"),
    ("rtt_p50", "64 B ping-pong round trip, p50", "us", "lo"),
    ("rtt_p99", "64 B ping-pong round trip, p99", "us", "lo"),
    ("rss_srv_base", "RSS server side, tunnel idle", "KB", "lo"),
    ("rss_cli_base", "RSS client side, tunnel idle", "KB", "lo"),
    ("rss_srv_conn", "RSS server side per idle connection", "KB/conn", "lo"),
    ("rss_cli_conn", "RSS client side per idle connection", "KB/conn", "lo"),
    ("wan_up", "bulk, 1 stream, 50 ms RTT, visitor->service", "MB/s", "hi"),
    ("wan_down", "bulk, 1 stream, 50 ms RTT, service->visitor", "MB/s", "hi"),
    ("udp64_dps", "UDP 64 B at < 1 % loss (iperf3 -u)", "datagrams/s", "hi"),
    ("udp64_mbit", "UDP 64 B at < 1 % loss", "Mbit/s", "hi"),
    ("udp1200_dps", "UDP 1,200 B at < 1 % loss (iperf3 -u)", "datagrams/s", "hi"),
    ("udp1200_mbit", "UDP 1,200 B at < 1 % loss", "Mbit/s", "hi"),
    ("udp_rtt_mean", "UDP 64 B request/reply round trip, mean", "us", "lo"),
    ("udp_rtt_p50", "UDP 64 B request/reply round trip, p50", "us", "lo"),
    ("udp_rtt_p99", "UDP 64 B request/reply round trip, p99", "us", "lo"),
]
METRIC_KEYS = [m[0] for m in METRICS]

# Paths as reported, in table order; "ssh" is the reference.
PATH_LABELS = {
    "direct": "direct",
    "ssh": "ssh -R",
    "ssh-aes": "ssh -R aes128-gcm",
    "rtunnel": "rtunnel",
}


def build_report(bench: Bench) -> dict:
    """The run's results as the JSON document: each figure with its ratios to direct and ssh -R."""
    direct = bench.results.get("direct", {})
    ssh = bench.results.get("ssh", {})
    paths = {}
    for name, label in PATH_LABELS.items():
        if name not in bench.results:
            continue
        vals = bench.results[name]
        metrics = {}
        for key in METRIC_KEYS:
            v = vals.get(key)
            metrics[key] = {
                "value": v,
                "vs_direct": ratio(v, direct.get(key)),
                "vs_ssh": ratio(v, ssh.get(key)),
            }
        paths[name] = {"label": label, "metrics": metrics}
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": bench.quick,
        "settings": {
            "scaling": f"wrk -t2 (-t1 for 1) -c N -d{bench.wrk_secs}s --latency, "
            f"nginx /1k.bin keep-alive, N in {list(bench.scale_levels)}",
            "bulk_seconds": bench.bulk_secs,
            "wrk": f"-t2 -c32 -d{bench.wrk_secs}s --latency",
            "wan_seconds": bench.wan_secs,
            "wan_rtt_ms": bench.delay * 2000,
            "rtt_rounds": bench.rtt_rounds,
            "rtt_warmup": bench.rtt_warmup,
            "idle_connections": bench.idle_conns,
            "ssh_cipher_default": "OpenSSH default",
            "ssh_cipher_aes": AES,
        },
        "system": system_info(bench.tools),
        "metrics": [{"key": k, "label": lab, "unit": u, "better": b} for k, lab, u, b in METRICS],
        "paths": paths,
        "ssh_small_request_variant": bench.notes,
        "scaling": scale_report(bench),
        "raw": bench.raw,
        "errors": bench.errors,
    }


def scale_report(bench: Bench) -> dict:
    """The scaling levels of each path, with ratios to direct and ssh -R at the same level."""
    direct, ssh = bench.scale.get("direct", {}), bench.scale.get("ssh", {})
    paths = {}
    for name in PATH_LABELS:
        if name not in bench.scale:
            continue
        levels = {}
        for conns in bench.scale_levels:
            r = bench.scale[name].get(conns)
            if r is None:
                levels[str(conns)] = None
                continue
            d, s = direct.get(conns, {}), ssh.get(conns, {})
            levels[str(conns)] = {
                "rps": r["rps"],
                "p50_ms": r.get("p50_ms"),
                "p99_ms": r.get("p99_ms"),
                "errors": r.get("errors", 0),
                "rps_vs_direct": ratio(r["rps"], d.get("rps")),
                "rps_vs_ssh": ratio(r["rps"], s.get("rps")),
                "p99_vs_ssh": ratio(r.get("p99_ms"), s.get("p99_ms")),
                "cpu_srv_core": r.get("cpu_srv_core"),
                "cpu_cli_core": r.get("cpu_cli_core"),
                "ssh_variant": r.get("variant"),
            }
        paths[name] = {"label": PATH_LABELS[name], "levels": levels}
    return {"levels": list(bench.scale_levels), "paths": paths}


def ratio(v, ref):
    if v is None or ref is None or ref == 0:
        return None
    return v / ref


def fmt(v) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(r) -> str:
    return "n/a" if r is None else f"{r:.2f}x"



def markdown_table(rows: list[list[str]], left: int = 1) -> str:
    """A markdown table of `rows` (the first is the header): the first
    `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        cells = [c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) if j < left else "-" * (w + 1) + ":"
                                        for j, w in enumerate(widths)) + "|")  # fmt: skip
    return "\n".join(lines)


def table(report: dict) -> str:
    paths = report["paths"]
    header = ["metric", "unit", "better"]
    cols = []  # (path, field)
    for name in paths:
        label = paths[name]["label"]
        header.append(label)
        cols.append((name, "value"))
        if name != "direct":
            header.append("/direct")
            cols.append((name, "vs_direct"))
        if name != "ssh":
            header.append("/ssh")
            cols.append((name, "vs_ssh"))
    rows = [header]
    for key, label, unit, better in METRICS:
        row = [label, unit, "higher" if better == "hi" else "lower"]
        for name, field in cols:
            v = paths[name]["metrics"][key][field]
            row.append(fmt(v) if field == "value" else fmt_ratio(v))
        rows.append(row)
    out = markdown_table(rows, left=3)
    scale = scale_table(report.get("scaling") or {})
    if scale:
        out += "\n\n" + scale
    notes = []
    for base, picks in report["ssh_small_request_variant"].items():
        notes.append(f"{PATH_LABELS[base]}: small requests best of -N/-tt ("
                     + ", ".join(picks) + ")")  # fmt: skip
    for name, errs in report["errors"].items():
        for e in errs:
            notes.append(f"{name}: {e}")
    if notes:
        out += "\n\n" + "\n".join(f"* {n}" for n in notes)
    return out


def scale_table(scaling: dict) -> str:
    """Markdown table: one row per (path, connections)."""
    paths = scaling.get("paths") or {}
    if not paths:
        return ""
    header = ["scaling, 1 KiB keep-alive", "conns", "req/s", "/direct", "/ssh",
              "p50 ms", "p99 ms", "p99 /ssh", "errors", "CPU srv", "CPU cli"]  # fmt: skip
    rows = [header]
    for name, entry in paths.items():
        for conns, r in entry["levels"].items():
            label = entry["label"]
            if r is None:
                rows.append([label, conns] + ["n/a"] * (len(header) - 2))
                continue
            if r.get("ssh_variant"):
                label += f" ({r['ssh_variant']})"
            rows.append([
                label, conns, fmt(r["rps"]),
                "" if name == "direct" else fmt_ratio(r["rps_vs_direct"]),
                "" if name == "ssh" else fmt_ratio(r["rps_vs_ssh"]),
                fmt(r["p50_ms"]), fmt(r["p99_ms"]),
                "" if name == "ssh" else fmt_ratio(r["p99_vs_ssh"]),
                str(r["errors"]),
                "" if r.get("cpu_srv_core") is None else f"{r['cpu_srv_core']:.0%}",
                "" if r.get("cpu_cli_core") is None else f"{r['cpu_cli_core']:.0%}",
            ])  # fmt: skip
    return markdown_table(rows)


def system_info(tools) -> dict:
    def first_line(cmd):
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (cp.stdout + cp.stderr).strip()
        return text.splitlines()[0] if text else None

    info = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
        info["cpu_model"] = m.group(1) if m else None
    except OSError:
        pass
    try:
        info["loadavg_at_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        pass
    # the tunnel's libraries, as the venv's rtunnel sees them
    probe = (
        "import twisted, OpenSSL; from OpenSSL import SSL; "
        "print(twisted.__version__, OpenSSL.__version__, "
        "SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(), sep='|')"
    )
    try:
        cp = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
        twisted_v, pyopenssl_v, openssl_v = cp.stdout.strip().split("|")
        info.update(twisted=twisted_v, pyopenssl=pyopenssl_v, openssl_pyopenssl=openssl_v)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    if tools.get("ssh"):
        info["ssh"] = first_line([tools["ssh"], "-V"])
    if tools.get("iperf3"):
        info["iperf3"] = first_line([tools["iperf3"], "--version"])
    if tools.get("nginx"):
        info["nginx"] = first_line([tools["nginx"], "-v"])
    if tools.get("wrk"):
        info["wrk"] = first_line([tools["wrk"], "--version"])
    try:
        from importlib.metadata import version

        info["rtunnel"] = version("rtunnel")
    except Exception:
        info["rtunnel"] = None
    git = shutil.which("git")
    if git:
        cp = subprocess.run(
            [git, "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        )
        info["commit"] = cp.stdout.strip() or None
    return info
