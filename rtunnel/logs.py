"""Log output: one JSON object a line, or twistd's text.

`json_observer` and `text_observer` are log observer factories for twistd's
`--logger` option (`twistd --logger rtunnel.logs.json_observer
rtunnel-server ...`); the console scripts' `--log-format json|text` passes
one for you. Both leave out ClientService's "Scheduling retry" line: the
client logs each failed attempt, with the wait, in one line of its own.
Each JSON line holds the
event's time (ISO 8601, UTC), level, namespace, its stable `event` name (see
docs/operations.md; null for events that have none, e.g. Twisted's own), the
rendered text, and its other fields. A field that JSON cannot hold is written
as its repr(); a log line never fails because of a field.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

LOG_FORMATS = ("text", "json")
JSON_OBSERVER = "rtunnel.logs.json_observer"
TEXT_OBSERVER = "rtunnel.logs.text_observer"
MAX_REPR = 500  # characters kept of a field JSON cannot hold

# fields of events from twisted.python.log (legacy) that the text already holds
_LEGACY = {"format", "message", "isError", "time", "why", "failure", "system"}


def _time(event: dict[str, Any]) -> str | None:
    when = event.get("log_time")
    if not isinstance(when, (int, float)):
        return None
    moment = datetime.fromtimestamp(when, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    """`value` if json can write it as it is, else its (shortened) repr."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return repr(value)[:MAX_REPR]
    return value


def event_as_json(event: dict[str, Any]) -> str:
    """One log event as one line of JSON (ending in a newline)."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _time(event),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "event": _jsonable(event.get("event")),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)[:MAX_REPR]
    dropped = _LEGACY if event.get("log_namespace") == "log_legacy" else ()
    fields = {
        str(key): _jsonable(value)
        for key, value in event.items()
        if not str(key).startswith("log_") and key != "event" and key not in dropped
    }
    record["fields"] = fields
    try:
        return json.dumps(record, allow_nan=False) + "\n"
    except (TypeError, ValueError, RecursionError):  # e.g. a field's key json cannot hold
        record["fields"] = {}
        return json.dumps(record, allow_nan=False, default=repr) + "\n"


@implementer(ILogFilterPredicate)
class _NotARetryLine:
    """Drop twisted.application.internet.ClientService's "Scheduling retry"
    event (rtunnel.tap.client logs the attempt and the wait itself)."""

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        namespace = str(event.get("log_namespace", ""))
        text = str(event.get("log_format", ""))
        if namespace.endswith(".ClientService") and text.startswith("Scheduling retry"):
            return PredicateResult.no
        return PredicateResult.maybe


_not_a_retry_line = _NotARetryLine()


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """A log observer writing one JSON object a line to `out` (default: the
    standard output as it is now, before twistd redirects it into the log)."""
    observer = FileLogObserver(out if out is not None else sys.stdout, event_as_json)
    return FilteringLogObserver(observer, [_not_a_retry_line])


def text_observer(out: IO[str] | None = None) -> ILogObserver:
    """twistd's own text format (to `out`, default the standard output)."""
    observer = textFileLogObserver(out if out is not None else sys.stdout)
    return FilteringLogObserver(observer, [_not_a_retry_line])


def twistd_log_file(twistd_options: Any) -> str | None:
    """The file twistd will log to, from its (parent) options: --logfile,
    or twistd.log for a daemon without one; None for standard output,
    syslog or a --logger observer."""
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    name = twistd_options.get("logfile")
    if name == "-" or (not name and twistd_options.get("nodaemon")):
        return None
    return name or "twistd.log"


def create_private_log_file(path: str | None) -> bool:
    """Create `path` empty with mode 0600 if it does not exist yet; True if
    this made it. twistd opens its log file before it applies a daemon's
    umask 077, so it would make it with the shell's umask (often 0644); an
    existing file it keeps, and its rotated files get the same mode. A log
    holds no secret (docs/security.md) but does hold who connected from
    where. A file that exists is left as it is; one that cannot be made is
    left to twistd, which reports why."""
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True
