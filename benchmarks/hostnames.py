"""Hostname routing (#15) beside a port tunnel, on 127.0.0.1.

One rtunnel server with --http and --https (a static certificate made here)
and one client that publishes the same nginx both as a port (-f) and as a
hostname (--http). wrk measures, for 1 KiB responses:

* keep-alive requests/s and p99 (`wrk -t2 -c32`), and
* new connections/s (`Connection: close`: one request per TCP, and per TLS,
  connection),

through: the port tunnel; --http; --https (TLS terminated by rtunnel); and
nginx terminating TLS in front of the port tunnel (the --https target);
with each end's CPU µs per request from /proc (rtunnel server and client,
and the TLS nginx), which the machine's other load moves less than the rates.

The hostname is `localhost` (it resolves to 127.0.0.1 without touching
/etc/hosts, and wrk sends it as SNI), claimed by a clients-file client
whose `hosts` lists it. Run through `bash benchmarks/run.sh hostnames`, or
`.venv/bin/python benchmarks/hostnames.py [--seconds 5]`; prints a markdown
table and writes benchmarks/results/<date>-hostnames.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import parse_wrk  # noqa: E402
from procs import LOOP, Procs, cpu_seconds, descendants, free_port, listening, run_tool, wait_for  # noqa: E402
from services import start_nginx  # noqa: E402

NAME = "localhost"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` (wrk does not verify)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "edge.crt", directory / "edge.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def start_nginx_tls(procs: Procs, tmp: Path, nginx: str, cert: Path, key: Path, upstream: int) -> int:
    """nginx terminating TLS (same certificate) and proxying to the port tunnel, keep-alive upstream."""
    d = tmp / "nginx-tls"
    for sub in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / "tmp" / sub).mkdir(parents=True)
    port = free_port()
    user = "user root;" if __import__("os").geteuid() == 0 else ""
    (d / "nginx.conf").write_text(f"""daemon off;
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/client;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 10000000;
    upstream tunnel {{ server {LOOP}:{upstream}; keepalive 64; }}
    server {{
        listen {LOOP}:{port} ssl backlog=4096;
        server_name {NAME};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {{
            proxy_pass http://tunnel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
""")
    proc = procs.start("nginx-tls", [nginx, "-p", d, "-c", d / "nginx.conf", "-e", d / "error.log"], cwd=d)
    wait_for(lambda: listening(port), 10, [(proc, procs)], "nginx (TLS)")
    return port


def probe(url: str, host: str | None) -> str:
    """One request with curl: its status (a path that answers anything but 200 is not measured blind)."""
    cmd = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", url]
    if host:
        cmd += ["-H", f"Host: {host}"]
    return run_tool(cmd, timeout=20).stdout.strip()


def wrk(url: str, seconds: float, close: bool, host: str | None = None,
        ends: dict[str, list[int]] | None = None) -> dict:
    """One wrk run; with `ends` (name -> pids), each one's CPU µs per request
    too (from /proc: a figure the machine's other load disturbs less than the rate)."""
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds:g}s", "--latency"]
    if host:
        cmd += ["-H", f"Host: {host}"]
    if close:
        cmd += ["-H", "Connection: close"]
    ends = ends or {}
    before = {name: cpu_seconds(pids) for name, pids in ends.items()}
    out = run_tool([*cmd, url], timeout=seconds + 30)
    try:
        result = parse_wrk(out.stdout)
    except Exception as e:  # a path that fails reads n/a, with why
        return {"error": str(e)}
    if result.get("requests"):
        result["cpu_us_per_request"] = {
            name: round(1e6 * (cpu_seconds(pids) - before[name]) / result["requests"], 1) for name, pids in ends.items()
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="set everything up and wait (for debugging)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop what we started (finally) on SIGTERM too
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: bash benchmarks/run.sh installs it", file=sys.stderr)
            return 1
    bindir = Path(sys.executable).parent
    server_bin, client_bin = bindir / "rtunnel_server", bindir / "rtunnel_client"
    tmp = Path(tempfile.mkdtemp(prefix="rtunnel-bench-hostnames-"))
    (tmp / "logs").mkdir()
    procs = Procs(tmp / "logs")
    try:
        nginx_port = start_nginx(procs, tmp, shutil.which("nginx") or "nginx")
        cert, key = make_certificate(tmp)
        token = secrets.token_hex(16)
        (tmp / "clients.toml").write_text(
            f'[clients.bench]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
            f'ports = ["1024-65535"]\nbind = ["{LOOP}"]\nhosts = ["{NAME}"]\nmax_streams = 8192\n'
        )
        ports: set[int] = {nginx_port}
        while len(ports) < 5:  # free_port may give the same port twice in a row
            ports.add(free_port())
        control, http_port, https_port, pub = sorted(ports - {nginx_port})
        state = tmp / "state"
        server = procs.start("rtunnel-server", [
            server_bin, "--listen", f"tcp:{control}:interface={LOOP}", "--state-dir", state,
            "--clients", tmp / "clients.toml", "--session-buffer", 1 << 30,
            "--http", f"tcp:{http_port}:interface={LOOP}:backlog=4096",
            "--https", f"tcp:{https_port}:interface={LOOP}:backlog=4096",
            "--https-cert", cert, "--https-key", key, "--no-https-redirect",
        ], cwd=tmp)
        wait_for(lambda: listening(control) and listening(https_port) and (state / "server.crt").exists(), 20,
                 [(server, procs)], "rtunnel_server")
        der = __import__("ssl").PEM_cert_to_DER_cert((state / "server.crt").read_text())
        client = procs.start("rtunnel-client", [
            client_bin, "-c", f"{LOOP}:{control}", "--token", token,
            "--fingerprint", hashlib.sha256(der).hexdigest(), "--session-buffer", 1 << 30,
            "-f", f"{LOOP}:{pub}", "-t", f"{LOOP}:{nginx_port}", "--http", NAME, "-t", f"{LOOP}:{nginx_port}",
        ], cwd=tmp)
        wait_for(lambda: listening(pub), 20, [(client, procs), (server, procs)], "rtunnel_client")
        time.sleep(1.0)
        front = start_nginx_tls(procs, tmp, shutil.which("nginx") or "nginx", cert, key, pub)
        front_proc = procs.procs[-1]
        paths = {
            "port tunnel (-f)": (f"http://{LOOP}:{pub}/1k.bin", None),
            "--http (Host routing)": (f"http://{LOOP}:{http_port}/1k.bin", NAME),
            "--https (TLS at rtunnel)": (f"https://{NAME}:{https_port}/1k.bin", None),
            "nginx TLS -> port tunnel": (f"https://{NAME}:{front}/1k.bin", None),
        }
        if args.keep:
            print(f"keeping: {paths}; logs in {tmp}; Ctrl-C ends", file=sys.stderr)
            try:
                time.sleep(3600)
            except KeyboardInterrupt:
                return 0
        results: dict[str, dict] = {}
        tunnel_ends = {"server": [server.pid], "client": [client.pid]}
        for label, (url, host) in paths.items():
            ends = dict(tunnel_ends)
            if url.endswith(f":{front}/1k.bin"):
                ends["nginx TLS"] = [front_proc.pid, *descendants(front_proc.pid)]
            results[label] = {
                "probe": probe(url, host),
                "keepalive": wrk(url, args.seconds, False, host, ends),
                "close": wrk(url, args.seconds, True, host, ends),
            }
            print(f"measured {label} (a single request: HTTP {results[label]['probe']})", file=sys.stderr)
    finally:
        procs.stop_all()
    print(report(results))
    out = args.out or HERE / "results" / f"{datetime.datetime.now():%Y-%m-%dT%H-%M-%S}-hostnames.json"
    out.write_text(json.dumps({"seconds": args.seconds, "results": results}, indent=2) + "\n")
    print(f"\nsaved {out}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict[str, dict]) -> str:
    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "n/a"

    base = results["port tunnel (-f)"]["keepalive"].get("rps")
    def cpu(r: dict) -> str:
        us = r.get("cpu_us_per_request")
        return " + ".join(f"{v:.0f}" for v in us.values()) if us else "n/a"

    lines = [
        "| path | keep-alive req/s | vs port | p99 ms | new conn/s | p99 ms | errors (close) "
        "| CPU µs/req keep-alive | CPU µs/conn new |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for label, r in results.items():
        ka, cl = r["keepalive"], r["close"]
        ratio = f"{ka['rps'] / base:.2f}x" if base and "rps" in ka else "n/a"
        errors = cl.get("socket_errors", {}) | ({"non_2xx": cl["non_2xx"]} if "non_2xx" in cl else {})
        lines.append(
            f"| {label} | {cell(ka, 'rps', ',.0f')} | {ratio} | {cell(ka, 'p99_ms', '.2f')} | "
            f"{cell(cl, 'rps', ',.0f')} | {cell(cl, 'p99_ms', '.2f')} | {errors or '-'} | {cpu(ka)} | {cpu(cl)} |"
        )
    lines.append("\nCPU: rtunnel server + client (+ nginx terminating TLS, its master and worker), from /proc.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
