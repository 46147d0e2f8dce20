"""The numbers in README.md and docs/*.md are the code's.

Defaults and limits are read from the code (the options' defaults,
SessionSettings, rtunnel.wire, rtunnel.guard, …) and looked for in the
documents: every default in README's option tables and in security.md's
"Every limit" table, the frame header's layout in protocol.md, and the
sentences that repeat a number in prose. A default changed in the code and
not in the docs (or the other way round) fails here, with the place.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from rtunnel import DEFAULT_CONTROL_PORT, auth, descriptors, guard, wire
from rtunnel.config import ClientConfig
from rtunnel.limits import MAX_KINDS
from rtunnel.mux import SessionSettings
from rtunnel.server import sni, udp
from rtunnel.tap import MIN_MAX_STREAM_WINDOW, MIN_SESSION_BUFFER
from rtunnel.tap import client as tap_client
from rtunnel.tap import server as tap_server
from rtunnel.tunnels import BIND_RETRY_DELAY

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = SessionSettings()
INITIAL_RETRY_DELAY = {f.name: f.default for f in fields(ClientConfig)}["initial_retry_delay"]
SERVER = tap_server.Options().defaults
CLIENT = tap_client.Options().defaults
UNITS = {"": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "s": 1}
# a number as the docs write it: 10 000 (grouped with spaces), 4096, 0.5
QUANTITY = re.compile(r"(\d{1,3}(?: \d{3})+|\d+(?:\.\d+)?)(?: ?(KiB|MiB|GiB|s)\b)?")


def size(n: int) -> str:
    """Bytes as the docs write them: 256 KiB, 64 MiB, 1 MiB."""
    for unit in ("GiB", "MiB", "KiB"):
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}"
    return str(n)


def grouped(n: int) -> str:
    """10 000, 65 536: thousands grouped with a space."""
    return f"{n:,}".replace(",", " ")


def number(value: Any) -> str:
    """30.0 -> 30, 0.5 -> 0.5."""
    return str(int(value)) if float(value).is_integer() else str(value)


def doc(name: str) -> str:
    """A document with every run of white space (line breaks too) made one space."""
    return re.sub(r"\s+", " ", (ROOT / name).read_text())


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of each row of the first table under `heading` (raw text)."""
    section = text.split(heading, 1)[1]
    rows = []
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # without the header row


def first_quantity(cell: str) -> float | None:
    """The first number of a table cell, in bytes or seconds; None if the cell has none."""
    match = QUANTITY.search(cell.replace("`", ""))
    if match is None:
        return None
    return float(match.group(1).replace(" ", "")) * UNITS[match.group(2) or ""]


class OptionTableTests(SynchronousTestCase):
    """README's "Every option" tables give each option's real default."""

    def check_table(self, heading: str, defaults: dict[str, Any]) -> int:
        """Check the defaults of one table; the number of options checked."""
        readme = (ROOT / "README.md").read_text().split("## Every option", 1)[1]
        checked = 0
        for cells in table_rows(readme, heading):
            names = re.findall(r"`--([a-z0-9-]+)", cells[0])
            shown = cells[1].replace("`", "").strip()
            for name in names:
                default = defaults.get(name)
                where = f"README {heading}, --{name}: default cell {cells[1]!r}, code {default!r}"
                if isinstance(default, bool) or default is None or default == "":
                    continue
                if isinstance(default, (int, float)):
                    if default == 0 and shown.startswith("0 (none)"):
                        checked += 1
                        continue
                    match = QUANTITY.match(shown)
                    if match is None:
                        continue  # e.g. "`--bandwidth`": another option's value
                    self.assertEqual(float(match.group(1).replace(" ", "")), float(default), where)
                    for value, unit in re.findall(r"\((\d+) (KiB|MiB|GiB)\)", shown):
                        self.assertEqual(int(value) * UNITS[unit], default, where)
                else:
                    self.assertEqual(shown.split()[0], str(default), where)
                checked += 1
        return checked

    def test_server_option_defaults(self) -> None:
        self.assertGreater(self.check_table("### `rtunnel_server`", SERVER), 15)

    def test_client_option_defaults(self) -> None:
        self.assertGreater(self.check_table("### `rtunnel_client`", CLIENT), 6)


class LimitTableTests(SynchronousTestCase):
    """security.md's "Every limit": each default is the code's."""

    FIXED = {
        "addresses remembered by the rate limit": guard.DEFAULT_MAX_ADDRESSES,
        "frame size before the handshake": wire.HANDSHAKE_MAX_FRAME,
        "ClientHello read for SNI on `--https`": sni.MAX_HELLO,
        "datagrams written to a backed-up link, until it drains": SessionSettings().datagram_backlog,
        "UDP datagrams read per socket per reactor turn": udp.DATAGRAMS_PER_TURN,
    }
    # rows whose limit is the system's, not a number of ours (rtunnel.descriptors)
    SYSTEM = {
        "open files": "the hard limit",
        "descriptors visitors may use": f"the open files limit minus min({descriptors.MAX_RESERVE}, a quarter of it)",
    }

    def test_every_row(self) -> None:
        rows = table_rows((ROOT / "docs" / "security.md").read_text(), "## Every limit")
        self.assertGreater(len(rows), 15)
        for label, shown, setting in rows:
            if label in self.SYSTEM:
                self.assertTrue(shown.startswith(self.SYSTEM[label]), f"security.md 'Every limit', {label!r}: {shown!r}")
                continue
            option = re.search(r"`--([a-z0-9-]+)`", setting)
            if label in self.FIXED:
                expected: Any = self.FIXED[label]
            elif option is not None:
                expected = SERVER[option.group(1)]
            else:
                self.fail(f"security.md 'Every limit': row {label!r} names no option and is not a known fixed limit")
            where = f"security.md 'Every limit', {label!r}: {shown!r}, code {expected!r}"
            if shown == "none":
                self.assertIn(expected, (0, None), where)
            elif isinstance(expected, str):
                self.assertEqual(shown, expected, where)
            else:
                self.assertEqual(first_quantity(shown), float(expected), where)


class FrameHeaderTests(SynchronousTestCase):
    def test_protocol_md_header_table_is_the_struct(self) -> None:
        rows = table_rows((ROOT / "docs" / "protocol.md").read_text(), "## Frames")
        sizes = [int(row[1]) for row in rows]
        offsets = [int(row[0]) for row in rows]
        self.assertEqual(sum(sizes), wire.HEADER_SIZE)
        self.assertEqual(sizes, [wire.struct.calcsize(">" + c) for c in wire.HEADER.format.lstrip(">")])
        self.assertEqual(offsets, [sum(sizes[:i]) for i in range(len(sizes))])


class ProseNumbersTests(SynchronousTestCase):
    """Sentences that repeat a default say the code's value."""

    CLAIMS: dict[str, list[str]] = {
        "README.md": [
            f"the resume grace ({number(SERVER['resume-grace'])} s by default)",
            f"each with its own credit window ({size(SETTINGS.initial_window)} to start",
            f"up to {size(SETTINGS.max_stream_window)} per connection and "
            f"{size(SETTINGS.session_window_budget)} per session",
            f"`--dead-after` ({number(SERVER['dead-after'])} s)",
            f"control port {DEFAULT_CONTROL_PORT} by default",
            f"(at least {MIN_SESSION_BUFFER})",
            f"({MIN_MAX_STREAM_WINDOW} to `--session-buffer`)",
            f"max_tunnels = {auth.DEFAULT_MAX_TUNNELS} # tunnels per session (default {auth.DEFAULT_MAX_TUNNELS})",
        ],
        "docs/security.md": [
            f"the header's {wire.HEADER_SIZE} bytes are in",
            f"(`--max-frame`, {size(wire.DEFAULT_MAX_FRAME)}; {size(wire.MIN_MAX_FRAME)} to "
            f"{size(tap_server.MAX_MAX_FRAME)})",
            f"| per-stream window | {size(SETTINGS.max_stream_window)} max (256 KiB – session buffer), "
            f"{size(SETTINGS.initial_window)} initial |",
            f"`--session-buffer` (default {size(SETTINGS.session_window_budget)}, at least 1 MiB;",
            f"the decoder accepts frames of at most {size(wire.HANDSHAKE_MAX_FRAME)}",
            f"(`--handshake-timeout`, {number(SERVER['handshake-timeout'])} s)",
            f"(`--max-unauthenticated`, {SERVER['max-unauthenticated']})",
            f"a token bucket of `--auth-failures` ({SERVER['auth-failures']}) wrong tokens, refilled by one "
            f"every `--auth-failure-window` ({number(SERVER['auth-failure-window'])} s)",
            f"the table holds at most {grouped(guard.DEFAULT_MAX_ADDRESSES)} addresses",
            f"a clients-file client's `max_tunnels` ({auth.DEFAULT_MAX_TUNNELS})",
            f"`--max-streams` ({SERVER['max-streams']})",
            f"(`--max-sessions-per-client`, {SERVER['max-sessions-per-client']})",
            f"The first {size(SETTINGS.initial_window)} of each stream",
            f"and at most {grouped(MAX_KINDS)} (beyond that",
        ],
        "docs/protocol.md": [
            f"Every frame is a {wire.HEADER_SIZE}-byte header",
            f"that maximum is {grouped(wire.HANDSHAKE_MAX_FRAME)} bytes",
            f"(absent: {grouped(wire.DEFAULT_MAX_FRAME)})",
            f"each direction | {grouped(SETTINGS.initial_window)} bytes ({size(SETTINGS.initial_window)}), not negotiated",
            f"up to `max_stream_window` (default {size(SETTINGS.max_stream_window)}",
            f"the session budget (default {size(SETTINGS.session_window_budget)}",
            f"idle for longer than {number(SETTINGS.idle_window_reset)} s",
            f"every `ping_interval`, default {number(SERVER['ping-interval'])} s",
            f"`dead_after` (default {number(SERVER['dead-after'])} s)",
            f"the resume grace (default {number(SERVER['resume-grace'])} s)",
            f"control port (default {DEFAULT_CONTROL_PORT})",
        ],
        "docs/reliability.md": [
            f"`--dead-after` (default {number(SERVER['dead-after'])} s)",
            f"`--ping-interval` (default {number(SERVER['ping-interval'])} s)",
            f"`--resume-grace` (default {number(SERVER['resume-grace'])} s)",
            f"from {number(INITIAL_RETRY_DELAY)} s, doubling to `--max-retry-delay` "
            f"(default {number(CLIENT['max-retry-delay'])} s)",
            f"({size(SETTINGS.initial_window)} to start, up to {size(SETTINGS.max_stream_window)} with "
            f"autotuning, and the sum of windows is capped per session at {size(SETTINGS.session_window_budget)})",
        ],
        "docs/operations.md": [
            f"backoff from {number(INITIAL_RETRY_DELAY)} s up to `--max-retry-delay` "
            f"({number(CLIENT['max-retry-delay'])} s)",
            f"asked again every {number(BIND_RETRY_DELAY)} s",
        ],
        "docs/configuration.md": [
            f"A port still in use is retried every {number(BIND_RETRY_DELAY)} s",
            f"port {DEFAULT_CONTROL_PORT} by default",
        ],
        "docs/performance.md": [
            f"starts with a **{size(SETTINGS.initial_window)}** window",
            f"at **{size(SETTINGS.max_stream_window)} per stream**",
            f"of its **{size(SETTINGS.session_window_budget)}** `--session-buffer`",
            f"idle for **{number(SETTINGS.idle_window_reset)} s** falls back to {size(SETTINGS.initial_window)}",
        ],
    }

    def test_every_claim_is_in_its_document(self) -> None:
        missing = [
            f"{name}: {claim!r}"
            for name, claims in self.CLAIMS.items()
            for claim in claims
            if claim not in doc(name)
        ]
        self.assertEqual(missing, [], "documents that no longer say what the code does (or were reworded)")

    def test_the_helpers_write_numbers_as_the_docs_do(self) -> None:
        self.assertEqual(
            (size(256 * 1024), size(64 << 20), size(1 << 20), size(1000)), ("256 KiB", "64 MiB", "1 MiB", "1000")
        )
        self.assertEqual((grouped(10_000), grouped(65536), grouped(256)), ("10 000", "65 536", "256"))
        self.assertEqual((number(30.0), number(0.5), number(8)), ("30", "0.5", "8"))
        self.assertEqual(first_quantity("64 MiB max (256 KiB – session buffer)"), 64 * 1024**2)
        self.assertEqual(first_quantity("10 000"), 10_000)
