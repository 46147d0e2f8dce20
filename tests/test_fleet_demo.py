"""`bash scripts/fleet-demo.sh --keep` (the README's fleet demo) run as a
user runs it: etcd, three members on 127.0.0.1/.2/.3, a client, a visitor
reaching the tunnel at each member; --keep leaves them running and prints
KEY=VALUE lines a script reads (each checked here: the PIDs live, the
addresses serve the page, HOME_MEMBER is the claim's member), then the
test kills the home member (the client, behind haproxy, moves to another
and the port is served again within 10 s) and stops everything it
printed. (The default mode, which stops
everything itself, runs in .ci/run beside the quick start.)"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.etcd import SKIP_NO_ETCD, etcd_get
from tests.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "fleet-demo.sh"
KEYS = [
    "ETCD_PID", "MEMBER1_PID", "MEMBER2_PID", "MEMBER3_PID", "MEMBER1_ADDRESS", "MEMBER2_ADDRESS",
    "MEMBER3_ADDRESS", "CLIENT_PID", "PUBLIC_PORT", "HOME_MEMBER",
]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class FleetDemoTests(SynchronousTestCase):
    def test_fleet_demo_keep_leaves_a_three_member_fleet_running_and_prints_what_a_script_needs(self) -> None:
        if SKIP_NO_ETCD:
            raise SkipTest(SKIP_NO_ETCD)
        ports = {
            "FLEET_DEMO_ETCD_PORT": free_port(), "FLEET_DEMO_ETCD_PEER_PORT": free_port(),
            "FLEET_DEMO_CONTROL_PORT": free_port(),
            "FLEET_DEMO_LINK_PORT": free_port(), "FLEET_DEMO_PUBLIC_PORT": free_port(),
            "FLEET_DEMO_TARGET_PORT": free_port(), "FLEET_DEMO_HAPROXY_PORT": free_port(),
        }
        env = {**os.environ, **{key: str(value) for key, value in ports.items()}}
        run = subprocess.run(
            ["bash", str(DEMO), "--keep"], env=env, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
        )
        values = dict(re.findall(r"^([A-Z0-9_]+)=(\S*)$", run.stdout, re.MULTILINE))
        pids = [int(values[key]) for key in values if key.endswith("_PID") and values[key].isdigit()]
        self.addCleanup(self._stop, pids, values.get("WORK_DIR"))
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        for key in KEYS:
            self.assertIn(key, values, run.stdout)
        self.assertEqual(values["PUBLIC_PORT"], str(ports["FLEET_DEMO_PUBLIC_PORT"]))
        for index in (1, 2, 3):
            self.assertIn(f"ok: member m{index} served the tunnel", run.stdout)
        for key in ("ETCD_PID", "MEMBER1_PID", "MEMBER2_PID", "MEMBER3_PID", "CLIENT_PID"):
            self.assertTrue(_alive(int(values[key])), f"{key} {values[key]} is not running")
        # left running: each MEMBERn_ADDRESS serves the page, and HOME_MEMBER is etcd's home of the port
        for index in (1, 2, 3):
            address = values[f"MEMBER{index}_ADDRESS"]
            self.assertEqual(address, f"127.0.0.{index}:{ports['FLEET_DEMO_PUBLIC_PORT']}")
            with urllib.request.urlopen(f"http://{address}/", timeout=10) as page:
                self.assertIn(b"Hello through the rtunnel fleet", page.read())
        claim = etcd_get(values["ETCD_URL"], f"/rtunnel/claims/tcp/default/{values['PUBLIC_PORT']}")
        self.assertIsNotNone(claim)
        self.assertEqual(claim["member"], f"m{values['HOME_MEMBER']}")
        if not values.get("HAPROXY_PID"):
            return  # no haproxy here: the client cannot move (the demo said so)
        # the client is behind haproxy: SIGKILL of its home, and the other two serve the page again
        home = int(values["HOME_MEMBER"])
        killed = time.monotonic()
        os.kill(int(values[f"MEMBER{home}_PID"]), signal.SIGKILL)
        for index in {1, 2, 3} - {home}:
            address = values[f"MEMBER{index}_ADDRESS"]
            while not self._page(address):
                self.assertLess(time.monotonic() - killed, 10.0, f"{address} not served 10 s after the kill")
                time.sleep(0.05)
        print(f"\nfleet demo: home m{home} killed, served at both other members after {time.monotonic() - killed:.2f} s")

    def _page(self, address: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{address}/", timeout=1) as page:
                return b"Hello through the rtunnel fleet" in page.read()
        except OSError:
            return False

    def _stop(self, pids: list[int], work: str | None) -> None:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in pids:
            while _alive(pid) and time.monotonic() < deadline:
                try:  # our grandchildren are not ours to reap: poll until they are gone
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if work and work.startswith(("/tmp/", os.environ.get("TMPDIR", "/tmp"))) and "rtunnel-fleet-demo" in work:
            shutil.rmtree(work, ignore_errors=True)
