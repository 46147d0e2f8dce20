"""`rtunnel_server --workers N`: N server processes on one machine, one per
core, sharing the control port, coordinated as members of a fleet
(docs/fleet.md, "Every core").

The parent (`Workers`, a twistd service) serves nothing itself: it starts
N workers, each the same `rtunnel-server` command with `--workers 1`,
`--fleet-member NAME-k` and `--fleet-listen` on a port of its own, and
the environment variable RTUNNEL_WORKER=k. A worker binds the control port
with SO_REUSEPORT (`ServerConfig.reuse_port`), so the kernel spreads new
control connections over the workers (a hash of each connection's
addresses and ports). Each worker is an ordinary fleet member: its claims
are made in etcd, so a credential's port is one claim whichever worker its
session reached, and a client whose worker died gets its ports back at
the worker its reconnection reaches.

Public ports are not shared: a port is open only at its home worker (the
worker whose session holds it), without SO_REUSEPORT, so every visitor of
a port reaches its home directly, with no hop (docs/fleet.md says why).

The parent restarts a worker that exits unasked (backing off 0.5 s, doubling
to 30 s, back to 0.5 s after 60 s of running), passes SIGHUP on to every
worker and turns SIGUSR2 into MACHINE_DRAIN_SIGNAL to each (every worker of
this machine drains, so none may take another's clients), and on SIGTERM/SIGINT stops them (SIGTERM, SIGKILL after
`STOP_TIMEOUT`) and exits. A worker whose parent went away (killed with
SIGKILL) stops itself (`watch_parent`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from rtunnel.errors import ConfigError

#: set in a worker's environment: its number, 1..N
WORKER_ENV = "RTUNNEL_WORKER"
#: set in a worker's environment: every worker's member name, comma-separated
WORKER_NAMES_ENV = "RTUNNEL_WORKER_NAMES"
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STEADY_AFTER = 60.0  # a worker that ran this long is restarted at once (FIRST_BACKOFF) when it dies
START_GRACE = 5.0  # a worker that exits this soon on its very first start: the start failed
STOP_TIMEOUT = 30.0  # SIGTERM, then SIGKILL after this long
PARENT_CHECK = 1.0  # a worker checks its parent this often


def worker_name(base: str, index: int) -> str:
    """Worker `index`'s member name: NAME-k (a DNS label, like any member's)."""
    return f"{base}-{index}"


def sibling_workers(member: str) -> frozenset[str]:
    """The other workers of this machine's `--workers N` (empty for a
    process that is not a worker). Their public ports are open on this
    machine's addresses at their home worker, so member links must not
    serve them here as an edge (rtunnel.fleet.links): a visitor of such a
    port reaches its home directly."""
    if WORKER_ENV not in os.environ:
        return frozenset()
    names = os.environ.get(WORKER_NAMES_ENV, "")
    return frozenset(name for name in names.split(",") if name and name != member)


def check_workers(options: Any) -> None:
    """The usage errors of --workers N > 1 (Options.postOptions calls it).

    A fleet is what lets N processes serve one set of tunnels (one claim per
    port, whichever process a client reached), so --fleet-etcd is needed.
    The shared HTTP/HTTPS ports and a systemd socket are refused: hostnames
    and inherited sockets are served by one process (run --workers 1)."""
    config = options.config
    if config.workers <= 1:
        return
    if not config.fleet_etcd:
        raise usage.UsageError(
            f"--workers {config.workers} needs --fleet-etcd URL: the workers coordinate their claims "
            "through etcd as members of a fleet (start etcd, e.g. apt install etcd-server, and give "
            "--fleet-etcd http://127.0.0.1:2379; see docs/fleet.md, \"Every core\"), or leave --workers out"
        )
    if config.listen.startswith("systemd:"):
        raise usage.UsageError(
            "--workers cannot share a socket systemd passes (--listen systemd:…): give --port/--interface "
            "or a tcp: --listen, which every worker binds with SO_REUSEPORT, or leave --workers out"
        )
    if config.http.enabled:
        raise usage.UsageError(
            "--workers with --http/--https is not supported yet (hostname tunnels are served by one "
            "process): run --workers 1, or several single-process members"
        )
    if config.fleet_cert is not None:
        first, last = worker_name(config.fleet_member, 1), worker_name(config.fleet_member, config.workers)
        raise usage.UsageError(
            f"--workers with --fleet-cert: each worker is a member of its own name ({first}..{last}) with "
            f"its own member certificate: issue them ('rtunnel_server fleet-add-member {first} -s DIR', … "
            f"{last}) into the state directory, where each worker finds its own, and leave out "
            "--fleet-cert/--fleet-key/--fleet-ca"
        )
    from rtunnel.tap.server_options import _member_name  # the same check as --fleet-member's

    for index in (1, config.workers):
        try:
            _member_name(worker_name(config.fleet_member, index))
        except ConfigError as e:
            raise usage.UsageError(
                f"--workers: the worker names are --fleet-member NAME with -1..-{config.workers} added; {e}"
            ) from None
    for what, endpoint in (("--metrics", config.metrics), ("--admin", config.admin)):
        if endpoint:
            try:
                offset_endpoint(endpoint, config.workers - 1)
            except ValueError as e:
                raise usage.UsageError(f"{what} with --workers: {e}") from None
    if config.fleet_listen:
        try:
            offset_endpoint(config.fleet_listen, config.workers - 1)
        except ValueError as e:
            raise usage.UsageError(f"--fleet-listen with --workers: {e}") from None


def offset_endpoint(endpoint: str, offset: int) -> str:
    """A tcp: server endpoint string with its port raised by `offset` (port
    0 stays 0): worker k listens on PORT+k-1. ValueError for another kind."""
    fields = re.split(r"(?<!\\):", endpoint)  # colons in values are escaped: interface=\:\:1
    if fields[0] not in ("tcp", "tcp6") or len(fields) < 2:
        raise ValueError(
            f"{endpoint!r} is not a tcp: endpoint with a port; worker k listens on PORT+k-1, so give "
            "tcp:PORT[:interface=ADDR]"
        )
    for i, value in enumerate(fields[1:], 1):
        key, sep, number = value.partition("=")
        if not sep and key.isdigit():
            fields[i] = str(int(key) + offset) if int(key) else key
            return ":".join(fields)
        if sep and key == "port" and number.isdigit():
            fields[i] = f"port={int(number) + offset}" if int(number) else value
            return ":".join(fields)
    raise ValueError(f"{endpoint!r} has no port; give tcp:PORT[:interface=ADDR]")


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now, for a worker's member link."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def plugin_arguments(argv: list[str], plugin: str = "rtunnel-server") -> list[str]:
    """The plugin's own arguments in a twistd command line (after its name),
    without --workers (a worker is given --workers 1)."""
    try:
        rest = argv[argv.index(plugin) + 1:]
    except ValueError:
        rest = []
    kept: list[str] = []
    skip = False
    for arg in rest:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return kept


def watch_parent(reactor: Any) -> LoopingCall | None:
    """In a worker (RTUNNEL_WORKER set): stop when the parent is gone (it
    was killed: its workers must not serve on alone, unsupervised)."""
    if WORKER_ENV not in os.environ:
        return None
    parent = os.getppid()
    log = Logger()

    def check() -> None:
        if os.getppid() != parent:
            log.warn(
                "the --workers parent (pid {pid}) is gone; stopping this worker", pid=parent,
                event="worker_orphaned",
            )
            loop.stop()
            reactor.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(PARENT_CHECK, now=False)
    return loop



#: what a --workers parent sends each worker for its own SIGUSR2: every worker of this
#: machine drains at once, so each moves its clients to a member of another machine only
#: (a plain SIGUSR2 to one worker may move them to its siblings)
MACHINE_DRAIN_SIGNAL = signal.SIGRTMIN + 1

class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def processEnded(self, reason: Failure) -> None:
        self.worker.ended(reason)


class Worker:
    """One worker process: started, watched, restarted."""

    def __init__(self, parent: Workers, index: int) -> None:
        self.parent = parent
        self.index = index
        self.name = worker_name(parent.config.fleet_member, index)
        self.transport: Any = None
        self.started_at = 0.0
        self.starts = 0
        self.backoff = FIRST_BACKOFF
        self.restart_call: Any = None
        self.stopped: defer.Deferred[None] | None = None

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None) if self.transport is not None else None

    def start(self) -> None:
        self.restart_call = None
        argv = self.parent.worker_argv(self)
        env = dict(os.environ)
        env[WORKER_ENV] = str(self.index)
        env[WORKER_NAMES_ENV] = ",".join(worker.name for worker in self.parent.workers)
        env["PYTHONUNBUFFERED"] = "1"
        self.started_at = time.monotonic()
        self.starts += 1
        self.transport = self.parent.reactor.spawnProcess(
            _WorkerProcess(self), argv[0], argv, env=env,
            childFDs={0: self.parent.devnull.fileno(), 1: 1, 2: 2},
        )
        self.parent.log.info(
            "worker {name} started (pid {pid}){again}", name=self.name, pid=self.pid,
            again=f", start {self.starts}" if self.starts > 1 else "",
            event="worker_started", worker=self.name, index=self.index, starts=self.starts,
        )

    def signal(self, signum: int) -> None:
        if self.transport is not None and self.pid is not None:
            try:
                self.transport.signalProcess(signum)
            except Exception:  # it has just exited
                pass

    def ended(self, reason: Failure) -> None:
        ran = time.monotonic() - self.started_at
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        self.transport = None
        how = f"signal {sig}" if sig else f"status {code}"
        if self.parent.stopping:
            self.parent.log.info(
                "worker {name} stopped ({how})", name=self.name, how=how, event="worker_stopped",
                worker=self.name, status=code, signal=sig,
            )
            if self.stopped is not None:
                stopped, self.stopped = self.stopped, None
                stopped.callback(None)
            return
        if self.starts == 1 and ran < START_GRACE and code not in (0, None):
            self.parent.log.critical(
                "worker {name} could not start ({how}; its log above says why); stopping every worker",
                name=self.name, how=how, event="worker_start_failed", worker=self.name, status=code,
            )
            self.parent.fail(f"worker {self.name} could not start ({how})")
            return
        if ran >= STEADY_AFTER:
            self.backoff = FIRST_BACKOFF
        delay, self.backoff = self.backoff, min(self.backoff * 2, MAX_BACKOFF)
        self.parent.log.warn(
            "worker {name} exited ({how}) after {ran:.1f} s; restarting it in {delay:.1f} s",
            name=self.name, how=how, ran=ran, delay=delay, event="worker_exited", worker=self.name,
            status=code, signal=sig, restart_in=delay,
        )
        self.restart_call = self.parent.reactor.callLater(delay, self.start)

    def stop(self) -> defer.Deferred[None]:
        if self.restart_call is not None and self.restart_call.active():
            self.restart_call.cancel()
        self.restart_call = None
        if self.transport is None:
            return defer.succeed(None)
        self.stopped = defer.Deferred()
        self.signal(signal.SIGTERM)
        kill = self.parent.reactor.callLater(STOP_TIMEOUT, self.signal, signal.SIGKILL)
        return self.stopped.addBoth(lambda result: (kill.cancel() if kill.active() else None, result)[1])


class Workers(service.Service):
    """The parent of `--workers N`: starts, supervises and stops the workers."""

    log = Logger()

    def __init__(
        self, config: Any, plugin_args: list[str], twistd_args: list[str], reactor: Any = None,
        exit_process: Callable[[Any, int], None] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.plugin_args = plugin_args
        self.twistd_args = twistd_args  # e.g. --logger=…: the workers log as the parent does
        self.workers = [Worker(self, index) for index in range(1, config.workers + 1)]
        self.stopping = False
        self.devnull: Any = None
        self._exit_process = exit_process
        self._previous_signals: dict[int, Any] = {}

    def worker_argv(self, worker: Worker) -> list[str]:
        """The worker's command line: this one, with its own member name,
        member link and (if set) metrics and admin ports (PORT+k-1)."""
        config, offset = self.config, worker.index - 1
        link = (
            offset_endpoint(config.fleet_listen, offset) if config.fleet_listen
            else f"tcp:{free_loopback_port()}:interface=127.0.0.1"
        )
        more = ["--workers", "1", "--fleet-member", worker.name, "--fleet-listen", link]
        if config.metrics:
            more += ["--metrics", offset_endpoint(config.metrics, offset)]
        if config.admin:
            more += ["--admin", offset_endpoint(config.admin, offset)]
        code = "import sys; sys.argv[0] = 'rtunnel_server'; from twisted.scripts.twistd import run; run()"
        return [
            sys.executable, "-c", code, "--nodaemon", "--pidfile=", *self.twistd_args, "rtunnel-server",
            *self.plugin_args, *more,
        ]

    def prepare(self) -> None:
        """Before any worker starts: the state directory's key, certificate
        and token exist (made once here, not raced for by N workers)."""
        from rtunnel.tls import load_or_create_token, load_server_identity

        config = self.config
        load_server_identity(config.state_dir, config.cert, config.key)
        if not config.token and config.clients_file is None:
            load_or_create_token(config.state_dir)
        self.prepare_member_certificates()

    def prepare_member_certificates(self) -> None:
        """Each worker is a member with a certificate of its own (member
        links, rtunnel.fleet.ca): the missing NAME-k.crt/.key are issued here
        by the fleet CA of the state directory, which is made first if the
        directory has none (one machine needs nothing more; for several, run
        fleet-init once and copy the CA with its key to each machine's state
        directory before starting its workers: docs/fleet.md "Every core")."""
        from rtunnel.fleet import ca

        state_dir = self.config.state_dir
        _, created = ca.init_ca(state_dir)
        if created:
            self.log.info(
                "made a fleet CA in {dir} for the workers' member certificates (several machines: "
                "copy fleet-ca.crt and fleet-ca.key to the others' state directories)",
                dir=str(state_dir), event="fleet_ca_created",
            )
        for worker in self.workers:
            if not (state_dir / f"{worker.name}.crt").exists():
                ca.issue_member(state_dir, worker.name)
                self.log.info(
                    "issued the member certificate of worker {name} in {dir}", name=worker.name,
                    dir=str(state_dir), event="worker_certificate_issued",
                )

    def startService(self) -> None:
        super().startService()
        self.devnull = open(os.devnull, "rb")  # noqa: SIM115 (kept open for every (re)start)
        for signum in (signal.SIGHUP, signal.SIGUSR2):
            self._previous_signals[signum] = signal.signal(signum, self._pass_on)
        self.log.info(
            "starting {n} workers ({names}) sharing the control port", n=len(self.workers),
            names=", ".join(w.name for w in self.workers), event="workers_starting",
        )
        try:
            self.prepare()
        except Exception as e:
            self.log.critical("cannot start: {why}", why=str(e), event="start_failed", reason=str(e))
            self.fail(str(e))
            return
        for worker in self.workers:
            worker.start()

    def _pass_on(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.signal_all, signum)

    def signal_all(self, signum: int) -> None:
        """Pass a signal on to every worker: SIGHUP (reload) as it is, SIGUSR2
        as MACHINE_DRAIN_SIGNAL (drain to members of other machines only)."""
        if signum == signal.SIGUSR2:
            signum = MACHINE_DRAIN_SIGNAL
        self.log.info(
            "passing signal {signal} on to {n} workers", signal=signum, n=len(self.workers),
            event="workers_signalled",
        )
        for worker in self.workers:
            worker.signal(signum)

    def fail(self, why: str) -> None:
        from rtunnel.tap import exit_process

        (self._exit_process or exit_process)(self.reactor, 1)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self.stopping = True
        for signum, previous in self._previous_signals.items():
            signal.signal(signum, previous or signal.SIG_DFL)
        self._previous_signals.clear()
        done = defer.gatherResults([worker.stop() for worker in self.workers])

        def closed(result: Any) -> Any:
            if self.devnull is not None:
                self.devnull.close()
            return result

        return done.addBoth(closed)
