"""The option tables of README.md and docs/configuration.md, made from the
option tables of the code (rtunnel.tap.server_options, client_options).

Each generated block sits between two HTML comments (invisible on the
rendered page). `python -m rtunnel.tap.optiondocs` rewrites the blocks;
`--check` only says which are stale (tests/test_options.py does the same).
Edit an option's docs in its table, never in the block.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from rtunnel.tap.client_options import CLIENT_OPTIONS
from rtunnel.tap.options import Kind, Option, OptionTable
from rtunnel.tap.server_options import SERVER_OPTIONS

MiB = 1024 * 1024
BEGIN = "<!-- generated from rtunnel/tap/{table}_options.py by `python -m rtunnel.tap.optiondocs`: {what} -->"
END = "<!-- end of the generated {what} -->"


def _row(*cells: str) -> str:
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _rows(table: OptionTable, included: Callable[[Option], bool]) -> list[tuple[Option, list[Option]]]:
    """Each documented option with the options documented in its row."""
    rows: list[tuple[Option, list[Option]]] = []
    for option in table:
        if not included(option):
            continue
        if option.doc_with is not None:
            next(row for row in rows if row[0].name == option.doc_with)[1].append(option)
        else:
            rows.append((option, [option]))
    return rows


def _default(option: Option) -> str:
    """The default as README shows it."""
    value = option.default
    if option.doc_default is not None:
        return option.doc_default
    if option.fallback is not None:
        return f"`--{option.fallback}`"
    if option.kind in (Kind.FLAG, Kind.COMMAND, Kind.REPEAT) or value in (None, ""):
        return ""
    if option.none_if_zero and value == 0:
        return "0 (none)"
    if option.kind is Kind.INT and option.metavar == "BYTES" and value >= MiB and value % MiB == 0:
        return f"{value} ({value // MiB} MiB)"
    if isinstance(value, (int, float)):
        return _number(value)
    return f"`{value}`"


def _file_default(option: Option) -> str:
    """The default as docs/configuration.md's file table shows it."""
    if option.file_default is not None:
        return option.file_default
    if option.kind is Kind.FLAG:
        return "false"
    if option.default in (None, ""):
        return ""
    if isinstance(option.default, (int, float)):
        return _number(option.default)
    return f"`{option.default}`"


def _flag(option: Option) -> str:
    metavar = " " + option.metavar.replace("|", "\\|") if option.metavar else ""
    return (f"`-{option.short}`, " if option.short else "") + f"`--{option.name}{metavar}`"


def options_table(table: OptionTable) -> str:
    """README's "Every option" table of one end."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for option, names in _rows(table, lambda o: o.kind is not Kind.TABLES):
        if option.doc is None:
            raise ValueError(f"{table.end} option --{option.name} has no docs")
        lines.append(_row(", ".join(_flag(o) for o in names), _default(option), option.doc))
    return "\n".join(lines)


def file_table(table: OptionTable) -> str:
    """docs/configuration.md's table of the keys of a config file."""
    lines = ["| key | type | default | meaning (same as the option) |", "|---|---|---|---|"]
    for option, names in _rows(table, lambda o: o.key is not None):
        if option.file_doc is None:
            raise ValueError(f"{table.end} file key {option.key} has no file_doc")
        keys = ", ".join(f"`[[{o.key}]]`" if o.kind is Kind.TABLES else f"`{o.key}`" for o in names)
        lines.append(_row(keys, option.kind.value, _file_default(option), option.file_doc))
    return "\n".join(lines)


def key_list(table: OptionTable) -> str:
    """The file keys of one end, as a sentence's list."""
    return ", ".join(f"`{o.key}`" for o in table if o.key is not None and o.kind is not Kind.TABLES)


# (document, table, what) -> the block's text
BLOCKS: dict[tuple[str, str, str], Callable[[], str]] = {
    ("README.md", "server", "rtunnel_server options"): lambda: options_table(SERVER_OPTIONS),
    ("README.md", "client", "rtunnel_client options"): lambda: options_table(CLIENT_OPTIONS),
    ("docs/configuration.md", "client", "client file keys"): lambda: file_table(CLIENT_OPTIONS),
    ("docs/configuration.md", "server", "server file keys"): lambda: key_list(SERVER_OPTIONS),
}


def refresh(root: Path, write: bool) -> list[str]:
    """The blocks whose text differs from the code's (rewritten if `write`).
    A document without a block's markers counts as stale (and is not written)."""
    stale = []
    for (name, table, what), render in BLOCKS.items():
        path = root / name
        text = path.read_text(encoding="utf-8")
        begin, end = BEGIN.format(table=table, what=what), END.format(what=what)
        if begin not in text or end not in text:
            stale.append(f"{name}: no {what} block ({begin} ... {end})")
            continue
        head, rest = text.split(begin, 1)
        body, tail = rest.split(end, 1)
        wanted = f"\n{render()}\n"
        if body != wanted:
            stale.append(f"{name}: {what}")
            if write:
                path.write_text(head + begin + wanted + end + tail, encoding="utf-8")
    return stale


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[2]
    stale = refresh(root, write="--check" not in args)
    for line in stale:
        print(("stale: " if "--check" in args else "rewritten: ") + line)
    return 1 if stale and "--check" in args else 0


if __name__ == "__main__":
    sys.exit(main())
