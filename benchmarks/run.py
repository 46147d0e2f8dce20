#!/usr/bin/env python3
"""Side-by-side benchmark of three paths to one local service on 127.0.0.1.

* direct  -- the client tool connects straight to the service port;
* ssh -R  -- through a private sshd started here (default cipher and
  aes128-gcm; for the small-request tests also ``ssh -tt``, best of both);
* rtunnel -- ``rtunnel_server`` + ``rtunnel_client`` from the venv.

Every figure is reported with its ratio to direct and to ssh -R (default
cipher).  The benchmark asserts nothing: a missing tool, or an rtunnel that
is not installed, gives "n/a" cells.  Results go to
``benchmarks/results/<date>.json`` and a markdown table on stdout.

This file holds the command line; the work is in its neighbours:
procs.py (ports, /proc readings, child processes), services.py (echo
server, delay proxy, nginx), paths.py (the three paths), measure.py
(tool output, percentiles), bench.py (the measurements) and report.py
(the JSON document and the tables).

Standard library only.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import sys
import time
from pathlib import Path

from bench import SCALE_LEVELS, TEST_NAMES, Bench
from procs import log, raise_nofile
from report import build_report, table

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark direct vs ssh -R vs rtunnel on 127.0.0.1.")
    ap.add_argument(
        "--only",
        default="direct,ssh,rtunnel",
        help="comma-separated subset of direct,ssh,rtunnel (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="shorter runs, for development")
    ap.add_argument(
        "--tests",
        type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
        default=list(TEST_NAMES.values()),
        help="comma-separated subset of " + ",".join(TEST_NAMES.values()) + " (default: all)",
    )
    ap.add_argument("--out", help="JSON output path (default benchmarks/results/<date>.json)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    ap.add_argument(
        "--scale",
        dest="scale_levels",
        type=lambda text: [int(x) for x in text.split(",") if x.strip()],
        default=list(SCALE_LEVELS),
        help="concurrent connections for the scaling test, comma-separated "
        "(default 1,10,100,1000; empty to skip)",
    )
    ap.add_argument(
        "--rtunnel-window",
        type=int,
        metavar="BYTES",
        help="rtunnel's --max-stream-window on both ends (default: its own default, 16 MiB)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    args = ap.parse_args(argv)

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {"direct", "ssh", "rtunnel"}
    if unknown:
        ap.error(f"--only: unknown path(s) {', '.join(sorted(unknown))}")
    unknown = set(args.tests) - set(TEST_NAMES.values())
    if unknown:
        ap.error(f"--tests: unknown test(s) {', '.join(sorted(unknown))}")

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    raise_nofile()

    bench = Bench(args)
    started = time.monotonic()
    try:
        loadavg_start = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        loadavg_start = None
    try:
        bench.run(only)
    finally:
        bench.procs.stop_all()
        if args.keep_tmp:
            log(f"configs and logs kept in {bench.tmp}")
        else:
            shutil.rmtree(bench.tmp, ignore_errors=True)

    report = build_report(bench)
    report["elapsed_seconds"] = round(time.monotonic() - started, 1)
    report["system"]["loadavg_at_start"] = loadavg_start
    if args.out:
        out = Path(args.out)
    else:
        stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
        out = HERE / "results" / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(table(report))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
