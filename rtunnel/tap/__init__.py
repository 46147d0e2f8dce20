"""Command-line options -> typed config -> Twisted services.

`rtunnel.tap.server` and `rtunnel.tap.client` are the modules named by the
twistd plugins (each has `Options` and `makeService`).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import error
from twisted.logger import Logger
from twisted.python import usage

from rtunnel.tap.options import MIN_MAX_STREAM_WINDOW, MIN_SESSION_BUFFER, usage_errors

log = Logger()


class CommandOptions:
    """Mixed into the plugins' Options (first, before FileOptions).

    On twistd's command line (a console script runs twistd too), a usage
    error is written as one line on stderr, the problem first, with where
    the usage is, and the process exits 1: twistd would print the whole
    usage, then the problem behind its first two words ("rtunnel_client
    --nodaemon:"). Parsed any other way (a reload, a test), UsageError is
    raised as usual. It also takes --log-format, which the console scripts
    take before twistd sees the command line (its help is in the option table).
    """

    def opt_log_format(self, value: str) -> None:
        raise usage.UsageError(
            "--log-format is an option of the rtunnel_server and rtunnel_client commands; with "
            "twistd, give --logger rtunnel.logs.json_observer (or text_observer) before the plugin name"
        )

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)  # type: ignore[misc]
        except usage.UsageError as e:
            parent = getattr(self, "parent", None)
            if parent is None or getattr(parent, "subOptions", None) is not self:
                raise
            command = os.path.basename(sys.argv[0]) if sys.argv else "twistd"
            if not command.startswith("rtunnel"):
                command = f"{command} {parent.subCommand}"
            sys.stderr.write(f"{command}: {e}\n(see '{command} --help' for every option)\n")
            sys.stderr.flush()
            sys.exit(1)


_exit_status: list[int] = []  # the status exit_process was asked for, first call wins


def exit_process(reactor: Any, code: int) -> None:
    """Stop the reactor, then leave with `code` (twistd itself exits 0).

    The status is set only as the interpreter exits, after twistd has
    finished its own shutdown: stopped the services, removed its pidfile
    (a daemon's supervisor must not find a stale one) and closed its log.
    """
    if not _exit_status:
        _exit_status.append(code)
        atexit.register(_leave_with_status)
    try:
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)
    except error.ReactorNotRunning:
        pass  # already stopping (a signal, or a second fatal error)


def _leave_with_status() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status[0])


class StartFailed(Exception):
    """A service could not start before the reactor ran (the reason is
    logged already). Raised out of startService so that twistd reports it:
    it removes its pidfile, and a daemon's parent prints this message on
    stderr and exits 1."""


def fail_start(reactor: Any, reason: str, code: int, under_twistd: bool) -> None:
    """End a process whose service cannot start. While twistd is still
    starting the application (`under_twistd`, the service made by the
    plugin's makeService, and the reactor not yet running), raise
    StartFailed for twistd to report, the process then ending with status
    1 and no traceback (the reason is logged); else stop the reactor and
    exit with `code`."""
    if not under_twistd or reactor.running:
        exit_process(reactor, code)
        return
    previous = sys.excepthook

    def quiet(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not isinstance(value, StartFailed):  # its reason is logged: no traceback
            previous(kind, value, tb)

    sys.excepthook = quiet
    raise StartFailed(reason)


def stop_once_on_signals(reactor: Any) -> None:
    """Make SIGTERM and SIGINT stop the reactor once.

    The reactor's own handlers call reactor.stop() for every signal; a
    second one before the reactor has stopped (`timeout` sends two within a
    millisecond) raised ReactorNotRunning, logged as a critical traceback.
    Once the reactor runs (it installs its handlers then), each of its own
    handlers is wrapped so that signals after the first, or after a stop
    begun another way, are only logged. Calling it again changes nothing.
    """
    reactor.callWhenRunning(_wrap_stop_signals, reactor)


def _wrap_stop_signals(reactor: Any) -> None:
    stopping: list[int] = []

    def wrap(previous: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
        def handle(signum: int, frame: Any) -> None:
            if stopping:
                log.info(
                    "received signal {signal} while stopping; already stopping",
                    signal=signum, event="signal_ignored",
                )
                return
            stopping.append(signum)
            previous(signum, frame)

        return handle

    wrapped = False
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if callable(previous) and getattr(previous, "__self__", None) is reactor:  # the reactor's own
            signal.signal(signum, wrap(previous))
            wrapped = True
    if wrapped:
        reactor.addSystemEventTrigger("before", "shutdown", stopping.append, 0)


class SighupReload:
    """Calls `reload` in the reactor thread on SIGHUP, from install() until
    restore() (which puts the previous handler back). A previous Python
    handler (e.g. another service's in the same process) is called too."""

    def __init__(self, reactor: Any, reload: Callable[[], None], what: str) -> None:
        self._reactor = reactor
        self._reload = reload
        self._what = what  # "the clients file", "the config file": for the log line
        self._previous: Any = None
        self.installed = False

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGHUP, self._handle)
        except (ValueError, OSError, AttributeError) as e:  # not the main thread, or no SIGHUP
            log.warn(
                "cannot reload {what} on SIGHUP: {why}",
                what=self._what, why=str(e), event="sighup_unavailable", reason=str(e),
            )
            return
        self.installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload)
        if callable(self._previous):
            self._previous(signum, frame)

    def restore(self) -> None:
        if self.installed:
            self.installed = False
            try:
                signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
            except (ValueError, OSError):
                pass


__all__ = [
    "MIN_MAX_STREAM_WINDOW",
    "MIN_SESSION_BUFFER",
    "CommandOptions",
    "SighupReload",
    "StartFailed",
    "exit_process",
    "fail_start",
    "stop_once_on_signals",
    "usage_errors",
]
