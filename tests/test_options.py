"""The option tables (rtunnel.tap.options): each option declared once, and
what is made from it — twistd's options, the range checks and their
messages, the config-file keys, the docs tables and the reload diff."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from rtunnel.tap import client as tap_client
from rtunnel.tap import optiondocs
from rtunnel.tap import server as tap_server
from rtunnel.tap.client_options import CLIENT_OPTIONS
from rtunnel.tap.options import Kind, Option, OptionTable
from rtunnel.tap.server_options import SERVER_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
FP = "sha256:" + "ab" * 32
# the least a client needs, so that one option's check is reached
CLIENT_ARGS = ["-c", "127.0.0.1", "-f", "4000", "-t", "3000", "--fingerprint", FP, "--token", "t"]
ENDS: dict[str, tuple[OptionTable, Any, list[str]]] = {
    "server": (SERVER_OPTIONS, tap_server.Options, ["--token", "t"]),
    "client": (CLIENT_OPTIONS, tap_client.Options, CLIENT_ARGS),
}


class DocsTests(SynchronousTestCase):
    def test_readme_and_configuration_md_tables_are_made_from_the_option_tables(self) -> None:
        """Every generated block of README.md and docs/configuration.md is
        what `python -m rtunnel.tap.optiondocs` writes from the code."""
        self.assertEqual(
            optiondocs.refresh(ROOT, write=False), [],
            "run: .venv/bin/python -m rtunnel.tap.optiondocs (and edit docs in rtunnel/tap/*_options.py)",
        )

    def test_a_changed_help_makes_its_block_stale(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="rtunnel-optiondocs-"))
        self.addCleanup(shutil.rmtree, root, True)
        (root / "docs").mkdir()
        for name in ("README.md", "docs/configuration.md"):
            shutil.copy(ROOT / name, root / name)
        readme = (root / "README.md").read_text()
        (root / "README.md").write_text(readme.replace("| control port (clients connect here) |", "| port |"))
        self.assertEqual(optiondocs.refresh(root, write=False), ["README.md: rtunnel_server options"])
        optiondocs.refresh(root, write=True)
        self.assertEqual((root / "README.md").read_text(), readme)


class TableTests(SynchronousTestCase):
    def test_twisted_options_are_the_tables(self) -> None:
        """--help lists exactly the table's options (with their short flags)."""
        for end, (table, options_class, _) in ENDS.items():
            options = options_class()
            names = {o.rstrip("=") for o in options.longOpt} - {"help", "version"}
            self.assertEqual(names, {o.name for o in table if o.kind is not Kind.TABLES}, end)
            shorts = {s: long for s, long in options.synonyms.items() if len(s) == 1}
            self.assertEqual(shorts, {o.short: o.name for o in table if o.short}, end)
            for option in table:
                if option.kind is not Kind.TABLES:
                    self.assertEqual(options.docs[option.name], option.help, f"{end} --{option.name}")

    def test_config_file_keys_are_the_tables(self) -> None:
        self.assertEqual(tap_client.Options().config_keys()["server"], "connect")
        for end, (table, options_class, _) in ENDS.items():
            keys = {o.key: o.name for o in table if o.key is not None and o.kind is not Kind.TABLES}
            self.assertEqual(options_class().config_keys(), keys, end)

    def test_every_range_refuses_a_value_outside_it_with_its_message(self) -> None:
        checked = 0
        for end, (table, options_class, base) in ENDS.items():
            for option in table:
                bad = outside(option)
                if bad is None:
                    continue
                e = self.assertRaises(
                    usage.UsageError, options_class().parseOptions, [*base, f"--{option.name}", str(bad)]
                )
                low = table[option.low].default if isinstance(option.low, str) else option.low
                above = table[option.above].default if isinstance(option.above, str) else option.above
                high = table[option.high].default if isinstance(option.high, str) else option.high
                expected = option.error.format(
                    name=option.name, value=type(option.default or 0)(bad) if option.kind is not Kind.STR else bad,
                    low=above if low is None else low, high=high,
                )
                self.assertEqual(str(e), expected, f"{end} --{option.name} {bad}")
                checked += 1
        self.assertGreater(checked, 20)

    def test_values_reach_the_typed_config(self) -> None:
        options = tap_server.Options()
        options.parseOptions([
            "--token", "t", "--max-streams", "7", "--ping-interval", "2", "--dead-after", "5",
            "--bandwidth", "100", "--bandwidth-from-client", "50", "--auth-failures", "3",
        ])
        config = options.config
        self.assertEqual(config.session.max_streams, 7)
        self.assertEqual((config.keepalive.interval, config.keepalive.dead_after), (2.0, 5.0))
        self.assertEqual((config.limits.to_client, config.limits.from_client), (100, 50))
        self.assertIsNone(config.limits.max_connections_per_tunnel)
        self.assertEqual(config.auth_failure_burst, 3)


def outside(option: Option) -> Any:
    """A value the option's range refuses (None: it has no range)."""
    if not option.error:
        return None
    if option.choices:
        return "nope"
    for bound, step in ((option.low, -1), (option.above, 0)):
        if isinstance(bound, (int, float)) and not isinstance(bound, bool):
            value = bound + step if option.kind is Kind.INT or bound >= 1 else bound - (0.25 if step else 0)
            return int(value) if option.kind is Kind.INT else value
    if isinstance(option.high, (int, float)):
        return option.high + 1
    if isinstance(option.high, str):
        return 1 << 40  # above any default of the bounding option
    return None


class ReloadDiffTests(SynchronousTestCase):
    """Which changed options a client's reload (SIGHUP) names as needing a
    restart: those the table says a reload does not apply."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rtunnel-reload-diff-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        (self.dir / "token").write_text("one")
        (self.dir / "other").write_text("one")

    def parse(self, extra: str = "", tunnel: str = "3000", server: str = "127.0.0.1") -> tap_client.Options:
        path = self.dir / "client.toml"
        path.write_text(
            f'server = "{server}"\nfingerprint = "{FP}"\n{extra}\n[[tunnel]]\nforward = "4000"\nto = "{tunnel}"\n'
        )
        options = tap_client.Options()
        options.parseOptions(["--config", str(path)])
        return options

    def diff(self, before: tap_client.Options, after: tap_client.Options) -> list[str]:
        return CLIENT_OPTIONS.restart_needed(dict(before.opts), after.opts, before.config, after.config)

    def test_tunnels_are_applied(self) -> None:
        self.assertEqual(self.diff(self.parse('token = "t"'), self.parse('token = "t"', tunnel="3001")), [])

    def test_other_settings_need_a_restart(self) -> None:
        before = self.parse('token = "t"')
        self.assertEqual(self.diff(before, self.parse('token = "t"', server="127.0.0.2")), ["server"])
        after = self.parse('token = "t"\nping_interval = 5\nsession_buffer = 200000000')
        self.assertEqual(self.diff(before, after), ["ping_interval", "session_buffer"])

    def test_a_token_file_with_a_new_token_is_a_changed_token(self) -> None:
        before = self.parse('token_file = "token"')
        (self.dir / "token").write_text("two")
        self.assertEqual(self.diff(before, self.parse('token_file = "token"')), ["token"])

    def test_another_token_file_is_a_changed_token_file(self) -> None:
        before = self.parse('token_file = "token"')
        self.assertEqual(self.diff(before, self.parse('token_file = "other"')), ["token_file"])
