"""One option table per end: each option is declared once, here.

An `Option` holds everything about one option: its name and short flag,
its type and range (with the message a value outside it gets), its default,
its `--help` text, its config-file key, whether the client's reload
(SIGHUP) applies it, where its value goes in the typed config, and its rows
in README.md and docs/configuration.md. An `OptionTable` (one per end, in
`rtunnel.tap.server_options` and `rtunnel.tap.client_options`) turns them
into the twistd `optParameters`/`optFlags` (`TableOptions`), the checks of
every value, the config-file schema (`rtunnel.configfile.FileOptions`
reads it), the keyword arguments of the frozen config dataclass, the
docs tables (`rtunnel.tap.optiondocs`) and the reload diff. What an end's
`postOptions` still checks by hand is what involves several options.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.python import usage

from rtunnel.errors import RtunnelError
from rtunnel.mux import SessionSettings


@contextmanager
def usage_errors() -> Iterator[None]:
    """Turn an RtunnelError (whose message is the sentence a user should
    read) into the UsageError that twistd prints as one line."""
    try:
        yield
    except RtunnelError as e:
        raise usage.UsageError(str(e)) from None


class Kind(enum.Enum):
    """How an option is given; the value is its type as a config file names it."""

    INT = "integer"  # a whole number
    FLOAT = "number"  # seconds: an integer or a float
    STR = "string"
    FLAG = "boolean"  # given or not; true or false in a file
    REPEAT = "string or array of strings"  # an opt_ method takes each value
    COMMAND = "command line only"  # an opt_ method of the program (--config, --log-format, -f, -t)
    TABLES = "tables"  # config file only: an array of tables ([[tunnel]])


FROM_NAME = "-"  # Option.key: the long name with '_' for '-'


@dataclass(frozen=True)
class Option:
    """One option of one end. `low`/`high` bound the value (inclusive; a
    name instead of a number means that option's value), `above` is an
    exclusive lower bound; `error` is the message of a value outside them,
    formatted with name, value, low, high. `field` is where the value goes
    in the typed config ("keepalive.interval": a field of a group the table
    builds); `computed` means the end's postOptions computes that field
    from several options. `fallback`: 0 means that other option's value."""

    name: str
    kind: Kind
    help: str
    default: Any = None
    short: str | None = None
    key: str | None = FROM_NAME  # config-file key; None: not settable in a file
    reload: bool = False  # the client's SIGHUP applies a change (else: logged as needing a restart)
    field: str | None = None
    computed: bool = False
    convert: Callable[[Any], Any] | None = None  # the checked value (or None) -> the config's value
    none_if_zero: bool = False
    fallback: str | None = None
    low: float | str | None = None
    high: float | str | None = None
    above: float | str | None = None
    choices: tuple[str, ...] = ()
    error: str = ""
    path: bool = False  # a file name: in a config file '~' is expanded, relative to the file's directory
    # the docs: README's "Every option" row and docs/configuration.md's client file table
    metavar: str = ""
    doc: str | None = None  # None: documented in the row of `doc_with`
    doc_with: str | None = None
    doc_default: str | None = None  # README's default cell, when not the default itself
    file_doc: str | None = None
    file_default: str | None = None

    def __post_init__(self) -> None:
        if self.key == FROM_NAME:
            object.__setattr__(self, "key", self.name.replace("-", "_"))

    @property
    def method(self) -> str:
        """The name of the opt_ method of a REPEAT or COMMAND option."""
        return "opt_" + self.name.replace("-", "_")

    def coerce(self) -> Callable[[str], Any]:
        """The command line's conversion of a value; a bad one is a
        UsageError naming the option ("--port 'x' is not a whole number")."""
        if self.kind is Kind.INT:
            convert: Callable[[str], Any] = int
            kind = "a whole number"
        elif self.kind is Kind.FLOAT:
            convert, kind = float, "a number"
        else:
            return str

        def coerce(text: str) -> Any:
            try:
                return convert(text)
            except ValueError:
                raise usage.UsageError(f"--{self.name} {text!r} is not {kind}") from None

        return coerce


def bounded(option: Option, value: Any, values: Mapping[str, Any]) -> None:
    """Raise the option's UsageError if `value` is outside its range."""
    if value is None:
        return

    def resolve(bound: float | str | None) -> Any:
        return values[bound] if isinstance(bound, str) else bound

    low, high, above = resolve(option.low), resolve(option.high), resolve(option.above)
    if (
        (low is not None and value < low)
        or (high is not None and value > high)
        or (above is not None and value <= above)
        or (option.choices and value not in option.choices)
    ):
        shown_low = above if low is None else low
        raise usage.UsageError(option.error.format(name=option.name, value=value, low=shown_low, high=high))


class OptionTable:
    """The options of one end, in the order the docs list them."""

    def __init__(
        self, end: str, options: Sequence[Option], groups: Mapping[str, Callable[..., Any]] | None = None
    ) -> None:
        self.end = end  # "server" or "client"
        self.options = tuple(options)
        self.groups = dict(groups or {})  # field group -> the frozen value it builds ("keepalive": Keepalive)
        self._by_name = {o.name: o for o in self.options}
        if len(self._by_name) != len(self.options):
            raise ValueError(f"{end}: an option is declared twice")

    def __getitem__(self, name: str) -> Option:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options)

    # ------------------------------------------------------------ twistd

    def parameters(self) -> list[list[Any]]:
        """usage.Options.optParameters: long, short, default, help, coerce."""
        return [
            [o.name, o.short, o.default, o.help, o.coerce()]
            for o in self.options if o.kind in (Kind.INT, Kind.FLOAT, Kind.STR)
        ]

    def flags(self) -> list[list[Any]]:
        """usage.Options.optFlags: long, short, help."""
        return [[o.name, o.short, o.help] for o in self.options if o.kind is Kind.FLAG]

    def handled(self) -> list[Option]:
        """Options an opt_ method of the Options class takes."""
        return [o for o in self.options if o.kind in (Kind.REPEAT, Kind.COMMAND)]

    # ------------------------------------------------------------ config file

    def file_keys(self) -> dict[str, Option]:
        """Config-file key -> option, for every key a file may hold."""
        return {o.key: o for o in self.options if o.key is not None}

    # ------------------------------------------------------------ checks and values

    def check(self, values: Mapping[str, Any]) -> None:
        """Every option's range, in table order (cross-option checks are the end's)."""
        for option in self.options:
            if option.error:
                bounded(option, values[option.name], values)

    def value(self, option: Option, values: Mapping[str, Any]) -> Any:
        """The option's value as its config field holds it."""
        value = values[option.name]
        if option.fallback is not None and not value:
            value = values[option.fallback]
        if option.none_if_zero and not value:
            return None
        if option.convert is not None:  # it is given None too (an option with no default)
            with usage_errors():
                return option.convert(value)
        return value

    def config(self, values: Mapping[str, Any], **computed: Any) -> dict[str, Any]:
        """Keyword arguments of the end's config dataclass: every option with
        a field (groups built as their frozen values), plus `computed`, the
        fields the end computes from several options."""
        flat: dict[str, Any] = {}
        grouped: dict[str, dict[str, Any]] = {}
        for option in self.options:
            if option.field is None or option.computed:
                continue
            group, _, name = option.field.rpartition(".")
            (grouped.setdefault(group, {}) if group else flat)[name] = self.value(option, values)
        missing = {o.field for o in self.options if o.computed and o.field} - set(computed)
        if missing:
            raise TypeError(f"{self.end}: computed fields not given: {', '.join(sorted(missing))}")  # a bug
        for group, kwargs in grouped.items():
            flat[group] = self.groups[group](**kwargs)
        return {**flat, **computed}

    # ------------------------------------------------------------ reload

    def restart_needed(
        self, running: Mapping[str, Any], fresh: Mapping[str, Any], old: Any, new: Any
    ) -> list[str]:
        """The file keys (or names) of the options a reload does not apply
        whose value changed: as given (`running`/`fresh`: the options' raw
        values), or only as a config value (a token file's new content
        changes `token`), named after the first option of that field."""
        changed: list[Option] = []
        fields: set[str] = set()
        for option in self.options:
            if option.reload or option.kind in (Kind.COMMAND, Kind.TABLES):
                continue
            if running.get(option.name) != fresh.get(option.name):
                changed.append(option)
                fields.add(option.field or "")
        for option in self.options:
            if option.reload or option.field is None or option.field in fields:
                continue
            if _get(old, option.field) != _get(new, option.field):
                changed.append(option)
                fields.add(option.field)
        ordered = [o for o in self.options if o in changed]
        return [o.key or o.name.replace("-", "_") for o in ordered]


def _get(value: Any, path: str) -> Any:
    for name in path.split("."):
        value = getattr(value, name)
    return value


def expand_user(text: str) -> str:
    """'~' expanded (a file name given on the command line)."""
    return os.path.expanduser(text)


def documented(option: Option, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` (an opt_ method) with the option's help as its docstring,
    which twistd prints in --help."""

    def handle(self: Any, value: str) -> Any:
        return method(self, value)

    handle.__doc__ = option.help
    handle.__name__ = option.method
    return handle


class TableOptions:
    """Mixed into an end's usage.Options: its optParameters, optFlags and
    the help of its opt_ methods come from `option_table`. The class
    defines an opt_ method (with no docstring) for each REPEAT and COMMAND
    option; its short flag becomes a synonym."""

    option_table: ClassVar[OptionTable]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = cls.__dict__.get("option_table")
        if table is None:
            return
        cls.optParameters = table.parameters()  # type: ignore[attr-defined]
        cls.optFlags = table.flags()  # type: ignore[attr-defined]
        for option in table.handled():
            method = documented(option, getattr(cls, option.method))
            setattr(cls, option.method, method)
            if option.short:
                setattr(cls, "opt_" + option.short, method)

    def check_options(self) -> None:
        """The range of every option (postOptions calls it first)."""
        self.option_table.check(self)  # type: ignore[arg-type]

    def config_values(self, **computed: Any) -> dict[str, Any]:
        """The config dataclass's keyword arguments (see OptionTable.config)."""
        return self.option_table.config(self, **computed)  # type: ignore[arg-type]


# Message styles shared by the tables (formatted with name, value, low, high)
AT_LEAST = "--{name} must be at least {low}"
OUTSIDE_BYTES = "--{name} {value} is outside {low}-{high} bytes"
NOT_NEGATIVE = "--{name} {value} is negative; give a whole number, or 0 for no limit"
KEEPALIVE = "--dead-after must be greater than --ping-interval > 0"


# ---------------------------------------------------------------- both ends

MIN_SESSION_BUFFER = 1024 * 1024
MIN_MAX_STREAM_WINDOW = 256 * 1024
_SESSION = SessionSettings()

# each end words its docs (README's row) with dataclasses.replace
CONFIG = Option(
    "config", Kind.COMMAND, key=None, metavar="FILE",
    help="TOML file of options (keys: the long option names with '_' for '-'; see "
    "docs/configuration.md); options given on the command line override it.",
)
LOG_FORMAT = Option(
    "log-format", Kind.COMMAND, key=None, metavar="json|text", doc_default="text",
    help="json (one JSON object a line) or text (default) -- rtunnel_server and rtunnel_client only; "
    "with twistd, give twistd --logger rtunnel.logs.json_observer.",
)
PING_INTERVAL = Option(
    "ping-interval", Kind.FLOAT, "Seconds between keepalive pings.", 10.0,
    field="keepalive.interval", above=0, error=KEEPALIVE, metavar="SECONDS", doc="keepalive ping interval",
    file_doc="keepalive ping interval, seconds",
)
DEAD_AFTER = Option(
    "dead-after", Kind.FLOAT, "Seconds of silence after which the link is declared dead.", 30.0,
    field="keepalive.dead_after", above="ping-interval", error=KEEPALIVE, metavar="SECONDS",
)
SESSION_BUFFER = Option(
    "session-buffer", Kind.INT,
    "Most bytes one session may hold for its peer: stream buffers, flow-control windows "
    "(512 KiB reserved per connection), unacknowledged reliable frames, unread replies "
    "(at least 1048576; see docs/security.md).",
    _SESSION.session_window_budget, field="session.session_window_budget",
    low=MIN_SESSION_BUFFER, error="--{name} {value} is below {low} bytes", metavar="BYTES",
)
MAX_STREAM_WINDOW = Option(
    "max-stream-window", Kind.INT,
    "Largest flow-control window of one tunnelled connection, in bytes (262144 to "
    "--session-buffer); a stream over a path of bandwidth B and round trip T needs B*T.",
    _SESSION.max_stream_window, field="session.max_stream_window",
    low=MIN_MAX_STREAM_WINDOW, high="session-buffer", metavar="BYTES",
    error="--{name} {value} is outside {low}-{high} bytes (at most --session-buffer)",
)
METRICS = Option(
    "metrics", Kind.STR, "", field="metrics", metavar="ENDPOINT", doc_default="off", file_default="(off)",
)


__all__ = [
    "AT_LEAST",
    "CONFIG",
    "DEAD_AFTER",
    "LOG_FORMAT",
    "MAX_STREAM_WINDOW",
    "METRICS",
    "MIN_MAX_STREAM_WINDOW",
    "MIN_SESSION_BUFFER",
    "PING_INTERVAL",
    "SESSION_BUFFER",
    "KEEPALIVE",
    "NOT_NEGATIVE",
    "OUTSIDE_BYTES",
    "FROM_NAME",
    "Kind",
    "Option",
    "OptionTable",
    "TableOptions",
    "documented",
    "expand_user",
    "usage_errors",
]
