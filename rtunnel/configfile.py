"""Configuration files: TOML read with tomllib and checked at the edge.

`rtunnel_client --config client.toml` and `rtunnel_server --config
server.toml` read their options from a file whose keys are the long option
names with '-' written '_'. The file's values go through the same option
dispatch as the command line (so the same coercions and checks apply), and
flags given on the command line override them. Every error names the file,
the line and key where it can, what is wrong and what to write instead.
"""

from __future__ import annotations

import difflib
import getopt
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from twisted.python import usage

from rtunnel import proxyproto
from rtunnel.config import TunnelSpec, same_forward, tunnel_spec
from rtunnel.errors import ConfigError
from rtunnel.tap.options import Kind, Option, OptionTable, usage_errors

TUNNEL_KEYS = ("forward", "to", "proxy_protocol")
_TOML_TYPES = {
    bool: "a boolean", int: "an integer", float: "a number", str: "a string",
    list: "an array", dict: "a table",
}


def toml_type(value: object) -> str:
    return _TOML_TYPES.get(type(value), "a date or time")


def _quotable(value: object) -> str:
    """A number as the string it should have been written as (9119 ->
    9119, for `admin = "9119"`); "..." for any other value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return "..."


def suggest(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or the list of choices."""
    choices = sorted(choices)
    word = word.replace("-", "_")
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    close = close or [c for c in choices if len(word) >= 3 and (c.startswith(word) or word.startswith(c))][:1]
    if close:
        return f"did you mean {close[0]!r}?"
    return "the known keys are " + ", ".join(choices)


class ConfigFile:
    """A parsed TOML file and its text, to point at the line of a key."""

    def __init__(self, path: Path, data: dict[str, Any], text: str) -> None:
        self.path = path
        self.data = data
        self.lines = text.splitlines()

    def line_of(self, key: str, table: str | None = None, index: int = 0) -> int | None:
        """The line (1-based) of `key` at the top level, or in the
        `index`-th (0-based) `[[table]]`; None when it cannot be found."""
        header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
        key_re = re.compile(r"^\s*(?:" + re.escape(key) + r"|\"" + re.escape(key) + r"\"|'" + re.escape(key) + r"')\s*=")
        section: str | None = None
        seen = -1
        for number, line in enumerate(self.lines, start=1):
            m = header.match(line)
            if m:
                section = m.group(1).strip("\"'")
                if table is None and key and section == key:
                    return number  # a [key] table where a value belongs
                if table is not None and section == table:
                    seen += 1
                    if seen == index and key == "":
                        return number
                continue
            if key and key_re.match(line):
                if table is None and section is None:
                    return number
                if table is not None and section == table and seen == index:
                    return number
        return None

    def where(self, key: str = "", table: str | None = None, index: int = 0) -> str:
        line = self.line_of(key, table, index)
        if line is None and table is not None:
            line = self.line_of("", table, index)
        return f"{self.path} line {line}" if line else str(self.path)

    def error(self, message: str, key: str = "", table: str | None = None, index: int = 0) -> ConfigError:
        return ConfigError(f"{self.where(key, table, index)}: {message}")


def read_toml(path: Path) -> ConfigFile:
    """Read and parse `path`; a missing, unreadable or malformed file is a ConfigError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file; check the path (or create it)") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it: {e.strerror}; check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if m:
            what = message[: m.start()].strip()
            raise ConfigError(
                f"{path} line {m.group(1)}, column {m.group(2)}: TOML syntax error: {what}. "
                'Check that line (values need quotes, e.g. to = "localhost:3000"; tables of tunnels '
                "are written [[tunnel]])"
            ) from None
        raise ConfigError(f"{path}: TOML syntax error: {message}") from None
    return ConfigFile(path, data, text)


def expand_path(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def read_token_file(path: Path, what: str) -> str:
    """The token in `path` (surrounding whitespace stripped)."""
    hint = (
        "copy the server's token into it (the file 'token' in the server's state dir; e.g. "
        "'printf %s TOKEN > FILE; chmod 600 FILE') "
        "or fix the path"
    )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist; {hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path} is a directory, not a file; {hint}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not UTF-8 text; {hint}") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}; check its permissions") from None
    token = text.strip()
    if not token:
        raise ConfigError(f"{what}: {path} is empty; {hint}")
    if any(c.isspace() for c in token):
        raise ConfigError(f"{what}: {path} holds more than one word; it must hold only the token")
    return token


# ------------------------------------------------------------------ tunnels


def parse_tunnel_tables(cf: ConfigFile, value: object, top_keys: Iterable[str] = ()) -> list[TunnelSpec]:
    """The file's [[tunnel]] tables as TunnelSpecs numbered from 1.
    `top_keys` are the file's other keys (to explain one written inside a tunnel)."""
    top_keys = set(top_keys)
    if isinstance(value, dict):
        raise cf.error(
            "'tunnel' is a single table; write each tunnel as [[tunnel]] (two brackets), "
            "which makes an array of tables", "", "tunnel", 0,
        )
    if not isinstance(value, list):
        raise cf.error(
            f"'tunnel' is {toml_type(value)}; write each tunnel as a [[tunnel]] table with "
            'forward = "PORT" and to = "HOST:PORT"', "tunnel",
        )
    specs: list[TunnelSpec] = []
    for index, entry in enumerate(value):
        name = f"[[tunnel]] #{index + 1}"
        if not isinstance(entry, dict):
            raise cf.error(f"{name} is {toml_type(entry)}; each tunnel must be a table", "tunnel")
        for key in entry:
            if key not in TUNNEL_KEYS and key in top_keys:
                raise cf.error(
                    f"{name}: {key!r} is not a tunnel setting, but every key after a [[tunnel]] line "
                    f"belongs to that tunnel; move {key} above the first [[tunnel]]", key, "tunnel", index,
                )
            if key not in TUNNEL_KEYS:
                raise cf.error(
                    f"{name}: unknown key {key!r}; {suggest(key, TUNNEL_KEYS)} "
                    "(a tunnel has forward, to and proxy_protocol)", key, "tunnel", index,
                )
        for key, example in (("forward", 'forward = "4000"'), ("to", 'to = "localhost:3000"')):
            if key not in entry:
                raise cf.error(
                    f"{name} has no {key!r}; add {example} "
                    + ("(the port opened on the server, [BIND:]PORT, 0 = the server picks)"
                       if key == "forward" else "(the local service visitors reach, [HOST:]PORT)"),
                    "", "tunnel", index,
                )
        texts = {}
        for key in ("forward", "to"):
            item = entry[key]
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise cf.error(
                    f'{name}: {key} is {toml_type(item)}; write a string such as {key} = "'
                    + ('127.0.0.1:4000"' if key == "forward" else 'localhost:3000"'),
                    key, "tunnel", index,
                )
            texts[key] = str(item)
        proxy = entry.get("proxy_protocol", proxyproto.OFF)
        if not isinstance(proxy, str) or proxy not in proxyproto.VERSIONS:
            shown = repr(proxy) if isinstance(proxy, str) else toml_type(proxy)
            raise cf.error(
                f'{name}: proxy_protocol is {shown}; write "off" (the default), "v1" or "v2"',
                "proxy_protocol", "tunnel", index,
            )
        try:
            spec = tunnel_spec(
                len(specs) + 1, texts["forward"], texts["to"], proxy,
                f"{cf.where('forward', 'tunnel', index)}: {name} forward",
                f"{cf.where('to', 'tunnel', index)}: {name} to",
            )
        except ConfigError as e:
            raise ConfigError(f"{e} (forward is [BIND:]PORT, to is [HOST:]PORT)") from None
        other = same_forward(specs, spec)
        if other is not None:
            raise cf.error(
                f"{name}: forward {texts['forward']} is also tunnel #{other.tunnel_id}'s; "
                "each port can be forwarded once", "forward", "tunnel", index,
            )
        specs.append(spec)
    return specs


@dataclass(frozen=True)
class TunnelChanges:
    """What a reload does to the live tunnels (ids of `added` are not yet assigned)."""

    removed: tuple[TunnelSpec, ...]
    retargeted: tuple[TunnelSpec, ...]  # same id and port, new target or PROXY setting
    added: tuple[TunnelSpec, ...]

    def __bool__(self) -> bool:
        return bool(self.removed or self.retargeted or self.added)


def _shape(spec: TunnelSpec) -> tuple[Any, ...]:
    return tuple(getattr(spec, f.name) for f in fields(spec) if f.name != "tunnel_id")


def plan_tunnel_changes(current: Iterable[TunnelSpec], wanted: Iterable[TunnelSpec]) -> TunnelChanges:
    """Match the wanted tunnels with the live ones: identical ones stay as
    they are; one with the same fixed [BIND:]PORT but another target is
    retargeted in place (it keeps its id and port); the rest are removed or added."""
    remaining = list(current)
    unmatched: list[TunnelSpec] = []
    for spec in wanted:
        same = next((c for c in remaining if _shape(c) == _shape(spec)), None)
        if same is None:
            unmatched.append(spec)
        else:
            remaining.remove(same)
    retargeted, added = [], []
    for spec in unmatched:
        same_port = next(
            (c for c in remaining
             if spec.bind_port
             and (c.kind, c.bind_host, c.bind_port) == (spec.kind, spec.bind_host, spec.bind_port)),
            None,
        )
        if same_port is None:
            added.append(spec)
        else:
            remaining.remove(same_port)
            retargeted.append(replace(spec, tunnel_id=same_port.tunnel_id))
    return TunnelChanges(tuple(remaining), tuple(retargeted), tuple(added))


# ------------------------------------------------------------------ options


class FileOptions:
    """Mix into a usage.Options (before it) to give it `--config FILE`.

    The file's keys, their types and which are file names come from the
    end's option table (`option_table`). The file is applied before the
    command line, so the command line wins: its values go into the options
    as the command line's would (the ranges are checked once, by the end's
    postOptions, for both). `argv` keeps the arguments (with the file's
    absolute path) so that a reload can parse them again.
    """

    synonyms: dict[str, str]  # usage.Options': every option name and short flag -> its long name

    option_table: ClassVar[OptionTable]
    config_file: ConfigFile | None = None  # set by parseOptions
    from_file: dict[str, str] = {}  # long option name -> "FILE line N: key" (set by parseOptions)
    given: set[str] = set()  # long option names given on the command line (set by parseOptions)

    def opt_config(self, path: str) -> None:
        pass  # applied by parseOptions, before the rest of the command line

    def config_keys(self) -> dict[str, str]:
        """file key -> long option name, for every option a file may set."""
        return {
            key: option.name for key, option in self.option_table.file_keys().items()
            if option.kind is not Kind.TABLES
        }

    def _long_name(self, opt: str) -> str:
        name = opt.lstrip("-")
        return self.synonyms.get(name, name)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        self.config_file: ConfigFile | None = None
        self.from_file: dict[str, str] = {}  # long option name -> "FILE line N: key"
        self.given: set[str] = set()  # long option names given on the command line
        self.argv = argv
        try:
            opts, args = getopt.getopt(argv, self.shortOpt, self.longOpt)  # type: ignore[attr-defined]
        except getopt.error:
            opts, args = [], []  # the real parse below reports it
        self.given = {self._long_name(opt) for opt, _ in opts}
        paths = [value for opt, value in opts if self._long_name(opt) == "config"]
        if len(paths) > 1:
            raise usage.UsageError(f"--config is given {len(paths)} times; give one file")
        if paths:
            path = Path(os.path.expanduser(paths[0])).absolute()
            with usage_errors():
                self.config_file = read_toml(path)
                self.apply_config_file(self.config_file)
            self.argv = ["--config", str(path)] + [
                word for opt, value in opts if self._long_name(opt) != "config"
                for word in ([opt, value] if self._takes_value(opt) else [opt])
            ] + list(args)
        try:
            super().parseOptions(argv)  # type: ignore[misc]
        except usage.UsageError as e:
            raise usage.UsageError(self._annotate(str(e))) from None

    def _takes_value(self, opt: str) -> bool:
        if opt.startswith("--"):
            return opt[2:] + "=" in self.longOpt  # type: ignore[attr-defined]
        i = self.shortOpt.find(opt[1:])  # type: ignore[attr-defined]
        return i >= 0 and self.shortOpt[i + 1 : i + 2] == ":"  # type: ignore[attr-defined]

    def _annotate(self, message: str) -> str:
        """Add where an option named in `message` came from, if from the file."""
        origins = []
        for name in dict.fromkeys(re.findall(r"--([a-z][a-z0-9-]*)", message)):
            if name in self.from_file and name not in self.given:
                origins.append(self.from_file[name])
        if not origins:
            return message
        return f"{message} (set in {'; '.join(origins)})"

    def apply_config_file(self, cf: ConfigFile) -> None:
        keys = self.option_table.file_keys()
        for key, value in cf.data.items():
            option = keys.get(key)
            if option is not None and option.kind is Kind.TABLES:
                self.apply_config_table(cf, key, value)
                continue
            if option is None and key in TUNNEL_KEYS and "tunnel" in keys:
                forward, to = (
                    v if isinstance(v, str) else d
                    for v, d in ((cf.data.get("forward"), "4000"), (cf.data.get("to"), "127.0.0.1:3000"))
                )
                raise cf.error(
                    f"{key} is a setting of each tunnel: it belongs under [[tunnel]], e.g. "
                    f'[[tunnel]] forward = "{forward}" to = "{to}" (one [[tunnel]] table per tunnel, '
                    "each key on its own line, after the top-level keys)", key,
                )
            if option is None:
                hint = suggest(key, keys)
                if "-" in key and key.replace("-", "_") in keys:
                    hint = f"write it {key.replace('-', '_')!r} ('_', not '-')"
                raise cf.error(f"unknown key {key!r}; {hint}", key)
            self._apply_value(cf, key, option, value)
            self.from_file[option.name] = f"{cf.where(key)}: {key}"

    def apply_config_table(self, cf: ConfigFile, key: str, value: object) -> None:
        raise NotImplementedError

    def _apply_value(self, cf: ConfigFile, key: str, option: Option, value: object) -> None:
        """Check the TOML type of `value` against the option's and set it."""
        kind, default = option.kind, option.default
        if kind is Kind.FLAG:
            if not isinstance(value, bool):
                raise cf.error(f"{key} is {toml_type(value)}; write {key} = true or {key} = false", key)
            if value:
                self.opts[option.name] = 1  # type: ignore[attr-defined]  # as twistd sets a flag
            return
        if kind is Kind.REPEAT:  # its opt_ method takes each string
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) for v in values):
                raise cf.error(
                    f"{key} is {toml_type(value)}; write a string, or an array of strings, "
                    f'e.g. {key} = ["{_quotable(value)}"]', key,
                )
            for item in values:
                try:
                    getattr(self, option.method)(item)
                except usage.UsageError as e:
                    raise cf.error(f"{key}: {e}", key) from None
            return
        if kind is Kind.FLOAT:
            ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            example = f"{key} = {float(default) if isinstance(default, (int, float)) else 30.0}"
        elif kind is Kind.INT:
            ok, wanted = type(value) is int, "an integer"
            example = f"{key} = {default if type(default) is int else 100}"
        else:
            ok, wanted = isinstance(value, str), "a string"
            example = f'{key} = "{_quotable(value)}"'
        if not ok:
            raise cf.error(f"{key} is {toml_type(value)} ({value!r}); it must be {wanted}, e.g. {example}", key)
        if kind is Kind.FLOAT:
            value = float(value)  # type: ignore[arg-type]
        elif option.path:
            value = str(expand_path(str(value), cf.path.parent))
        self.opts[option.name] = value  # type: ignore[attr-defined]


__all__ = [
    "ConfigFile",
    "FileOptions",
    "TunnelChanges",
    "expand_path",
    "parse_tunnel_tables",
    "plan_tunnel_changes",
    "read_toml",
    "read_token_file",
]
