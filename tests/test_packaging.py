"""The wheel installs into a fresh virtualenv and brings its commands along.

Builds a wheel of this checkout (from a copy, so the checkout gets no build/
or *.egg-info), makes a new venv without the system's site-packages, installs
the wheel there (its dependencies come from the package index, or pip's cache
and configured wheel directories), and checks that `twistd --help` lists both
plugins and that `rtunnel_server --help` / `rtunnel_client --help` work.
Skips when the index cannot be reached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 290.0  # seconds for the whole test, under trial's timeout below

# Files and folders of a checkout that are not part of the source.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".tox", "build", "dist", "*.egg-info", "_trial_temp*", "__pycache__",
    ".hypothesis", ".mypy_cache", ".ruff_cache", "results", "dropin.cache",
)

# What pip says when it cannot reach an index or find a dependency there.
OFFLINE_SIGNS = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "NewConnectionError",
    "ProxyError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
)


class WheelInstallTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.deadline = time.monotonic() + BUDGET
        self.tmp = Path(tempfile.mkdtemp(prefix="rtunnel-packaging-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def run_cmd(self, argv: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "RTUNNEL_TOKEN"):
            env.pop(name, None)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        left = self.deadline - time.monotonic()
        if left <= 5:
            self.fail(f"no time left for: {what}")
        try:
            return subprocess.run(
                argv, cwd=cwd or self.tmp, env=env, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=left,
            )
        except subprocess.TimeoutExpired:
            self.fail(f"{what} did not finish in {left:.0f} s: {' '.join(argv)}")

    def test_wheel_installs_commands_and_twistd_plugins(self) -> None:
        # 1. a wheel, built from a copy of the source
        source = self.tmp / "source"
        shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
        dist = self.tmp / "dist"
        built = self.run_cmd(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(source)], "pip wheel"
        )
        if built.returncode != 0:
            if any(sign in built.stdout + built.stderr for sign in OFFLINE_SIGNS):
                raise SkipTest("pip cannot reach a package index to get the build backend (setuptools)")
            self.fail(f"pip wheel failed:\n{built.stdout}\n{built.stderr}")
        wheels = list(dist.glob("rtunnel-*.whl"))
        self.assertEqual(len(wheels), 1, f"expected one rtunnel wheel in {sorted(os.listdir(dist))}")
        wheel = wheels[0]
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
        self.assertIn("twisted/plugins/rtunnel_plugin.py", names)
        # twisted/plugins is Twisted's namespace: an __init__.py would shadow Twisted's
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertIn("rtunnel/tap/server.py", names)
        self.assertIn("rtunnel/assets/status.html", names)  # the admin status page
        self.assertIn("rtunnel/fleet/links.py", names)  # the fleet package (#14)
        self.assertFalse([n for n in names if n.startswith("tests/")], "tests must not be packaged")

        # 2. a fresh venv without the system's packages
        venv = self.tmp / "venv"
        made = self.run_cmd([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        if made.returncode != 0:
            raise SkipTest(f"cannot create a venv with {sys.executable} (python3-venv missing?): {made.stderr.strip()}")
        bin_dir = venv / "bin"
        installed = self.run_cmd([str(bin_dir / "python"), "-m", "pip", "install", str(wheel)], "pip install")
        if installed.returncode != 0:
            output = installed.stdout + installed.stderr
            if any(sign in output for sign in OFFLINE_SIGNS):
                raise SkipTest("pip cannot reach a package index for rtunnel's dependencies (Twisted, ...)")
            self.fail(f"installing the wheel failed:\n{output}")

        # 3. the plugins and console scripts, run from an unrelated directory
        elsewhere = self.tmp / "elsewhere"
        elsewhere.mkdir()
        twistd = self.run_cmd([str(bin_dir / "twistd"), "--help"], "twistd --help", cwd=elsewhere)
        self.assertEqual(twistd.returncode, 0, twistd.stderr)
        self.assertIn("rtunnel-server", twistd.stdout)
        self.assertIn("rtunnel-client", twistd.stdout)

        for script, option in (("rtunnel_server", "--state-dir"), ("rtunnel_client", "--fingerprint")):
            result = self.run_cmd([str(bin_dir / script), "--help"], f"{script} --help", cwd=elsewhere)
            self.assertEqual(result.returncode, 0, f"{script} --help:\n{result.stdout}\n{result.stderr}")
            self.assertIn(option, result.stdout)
            self.assertNotIn("Traceback", result.stdout + result.stderr)

        # the venv's rtunnel is the wheel's, not this checkout
        where = self.run_cmd(
            [str(bin_dir / "python"), "-c", "import rtunnel; print(rtunnel.__file__)"], "import rtunnel",
            cwd=elsewhere,
        )
        self.assertEqual(where.returncode, 0, where.stderr)
        self.assertTrue(Path(where.stdout.strip()).is_relative_to(venv), where.stdout)
        page = self.run_cmd(
            [str(bin_dir / "python"), "-c", "from rtunnel.admin import status_page; print(len(status_page()))"],
            "load the status page", cwd=elsewhere,
        )
        self.assertEqual(page.returncode, 0, page.stderr)
        self.assertGreater(int(page.stdout), 1000)
        # a plain command of the installed rtunnel_server: the fleet CA
        fleet_init = self.run_cmd(
            [str(bin_dir / "rtunnel_server"), "fleet-init", "-s", str(self.tmp / "fleet")], "fleet-init", cwd=elsewhere,
        )
        self.assertEqual(fleet_init.returncode, 0, fleet_init.stdout + fleet_init.stderr)
        self.assertTrue((self.tmp / "fleet" / "fleet-ca.key").exists())

