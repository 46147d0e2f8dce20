"""`twistd rtunnel-client`: options and the client service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from rtunnel import DEFAULT_CONTROL_PORT, proxyproto
from rtunnel.addresses import bracket, public_address
from rtunnel.client import LEAVING, ClientState, TunnelClient, retry_policy
from rtunnel.config import ClientConfig, TunnelSpec, hostname_spec, same_forward, tunnel_spec
from rtunnel.configfile import (
    ConfigFile,
    FileOptions,
    parse_tunnel_tables,
    plan_tunnel_changes,
    read_token_file,
)
from rtunnel.counters import CountingEndpoint
from rtunnel.errors import ConfigError
from rtunnel.logs import create_private_log_file, twistd_log_file
from rtunnel.metrics import ClientCollector, MetricsService, registry_for
from rtunnel.servers import ServerListEndpoint, parse_servers
from rtunnel.tap import (
    CommandOptions,
    SighupReload,
    exit_process,
    fail_start,
    stop_once_on_signals,
    usage_errors,
)
from rtunnel.tap.client_options import CLIENT_OPTIONS
from rtunnel.tap.options import TableOptions
from rtunnel.tls import (
    DEFAULT_KNOWN_SERVERS,
    ClientIdentity,
    PinnedCertificateCreator,
    TrustOnFirstUseCreator,
    ca_creator,
    load_client_identity,
    load_known_servers,
)


class Options(CommandOptions, FileOptions, TableOptions, usage.Options):
    """`rtunnel_client` / `twistd rtunnel-client`: the options are CLIENT_OPTIONS."""

    option_table = CLIENT_OPTIONS
    synopsis = (
        "-c HOST[:PORT] -f [BIND:]PORT -t [HOST:]PORT [-f ... -t ...] "
        "(--fingerprint FP | --ca FILE | --trust-on-first-use)  or  --config client.toml [options]"
    )
    longdesc = (
        "Make ports on the rtunnel server reach services on this machine. Each -f "
        "(port opened on the server; 0 lets the server pick) pairs with the -t that "
        "follows it (local target, default host localhost)."
    )

    def __init__(self) -> None:
        super().__init__()
        self.forwards: list[str] = []
        self.forward_kinds: list[str] = []  # "tcp" (-f), "http" (--http), "tls" (--tls), one per entry of forwards
        self.targets: list[str] = []
        self.file_tunnels: list[TunnelSpec] = []  # from --config's [[tunnel]] tables
        self.connects: list[str] = []  # -c values (each may list several servers: a,b)
        self._applying_file = False

    def apply_config_file(self, cf: ConfigFile) -> None:
        if "proxy_protocol" in cf.data:
            raise cf.error(
                "proxy_protocol is a setting of each tunnel: move it into the [[tunnel]] tables "
                '(proxy_protocol = "v2" under forward and to)', "proxy_protocol",
            )
        self._applying_file = True
        try:
            super().apply_config_file(cf)
        finally:
            self._applying_file = False

    def apply_config_table(self, cf: ConfigFile, key: str, value: object) -> None:
        with usage_errors():
            self.file_tunnels = parse_tunnel_tables(cf, value, self.config_keys())

    def _token(self) -> str:
        """--token, else --token-file, else the file's token or token_file, else $RTUNNEL_TOKEN."""
        names = {"token", "token-file"}
        from_cli = names & getattr(self, "given", set())
        if len(from_cli) == 2:
            raise usage.UsageError("give --token or --token-file, not both")
        if from_cli:  # the command line overrides the file's token and token_file
            for name in names - from_cli:
                self.opts[name] = None
        elif self["token"] and self["token-file"]:
            raise usage.UsageError(
                f"{self.config_file.path if self.config_file else 'the config file'}: give token or "
                "token_file, not both"
            )
        if self["token-file"]:
            origin = "--token-file" if "token-file" in from_cli else self.from_file.get("token-file", "--token-file")
            with usage_errors():
                return read_token_file(Path(os.path.expanduser(self["token-file"])), origin)
        return self["token"] or os.environ.get("RTUNNEL_TOKEN") or ""

    def opt_connect(self, value: str) -> None:
        if self._applying_file and "connect" in self.given:
            return  # -c on the command line replaces the file's server(s)
        self.connects.append(value)
        self.opts["connect"] = ",".join(self.connects)  # a reload compares it: a changed list needs a restart

    def opt_forward(self, value: str) -> None:
        self.forwards.append(value)
        self.forward_kinds.append("tcp")

    def opt_http(self, value: str) -> None:
        self.forwards.append(value)
        self.forward_kinds.append("http")

    def opt_tls(self, value: str) -> None:
        self.forwards.append(value)
        self.forward_kinds.append("tls")

    def opt_to(self, value: str) -> None:
        self.targets.append(value)

    def postOptions(self) -> None:
        if not self.connects:
            raise usage.UsageError(
                "-c/--connect HOST[:PORT] is required: the rtunnel server to use"
                + (f" (or server = \"HOST:PORT\" in {self.config_file.path})" if self.config_file else "")
            )
        if self.config_file and not self.forwards and not self.targets and not self.file_tunnels:
            raise usage.UsageError(
                f"{self.config_file.path} has no tunnels: add a [[tunnel]] table with forward = \"4000\" "
                "and to = \"localhost:3000\" (or give -f and -t)"
            )
        if (not self.forwards and not self.file_tunnels) or len(self.forwards) != len(self.targets):
            raise usage.UsageError(
                "give -f/--forward (or --http NAME, --tls NAME) and -t/--to in pairs, e.g. -f 4000 -t 3000 "
                f"or --http myapp -t 3000 (got {len(self.forwards)} -f/--http/--tls and {len(self.targets)} -t)"
            )
        self.check_options()
        if bool(self["client-cert"]) != bool(self["client-key"]):
            raise usage.UsageError("--client-cert and --client-key go together: give both or neither")
        self.client_identity: ClientIdentity | None = None
        if self["client-cert"]:
            with usage_errors():
                self.client_identity = load_client_identity(Path(self["client-cert"]), Path(self["client-key"]))
        token = self._token()
        if not token and self.client_identity is None:
            raise usage.UsageError(
                "no token: pass --token-file or --token or set RTUNNEL_TOKEN (the server made it on its "
                "first start: the file 'token' in its state dir), or present a "
                "client certificate with --client-cert and --client-key"
            )
        self.known_servers = self._trust()
        with usage_errors():
            servers = parse_servers(self.connects, DEFAULT_CONTROL_PORT)
            host, port = servers[0]
            tunnels = self._tunnels()
            values = self.config_values(server_host=host, server_port=port, tunnels=tunnels, token=token)
            if self["ca"]:
                ca_creator(host, Path(self["ca"]), self.client_identity)  # fail here, as a usage error
        self.config = ClientConfig(**values, servers=servers if len(servers) > 1 else ())

    def _tunnels(self) -> tuple[TunnelSpec, ...]:
        """The file's tunnels, then the command line's -f/-t pairs (with --proxy-protocol)."""
        proxy = self["proxy-protocol"]
        if proxy != proxyproto.OFF and not self.forwards:
            raise usage.UsageError(
                "--proxy-protocol applies to the -f/-t tunnels of the command line and there are none; "
                "set proxy_protocol in each [[tunnel]] of the config file instead"
            )
        tunnels = list(self.file_tunnels)
        pairs = zip(self.forwards, self.forward_kinds, self.targets, strict=True)
        for i, (forward, kind, target) in enumerate(pairs, start=len(tunnels) + 1):
            if kind == "tcp":
                spec = tunnel_spec(i, forward, target, proxy, "-f/--forward", "-t/--to")
            else:
                spec = hostname_spec(i, kind, forward, target, proxy, f"--{kind}")
            if same_forward(tunnels, spec) is not None:
                raise ConfigError(f"{'-f/--forward' if kind == 'tcp' else '--' + kind} {forward} is given twice")
            tunnels.append(spec)
        return tuple(tunnels)

    def _trust(self) -> Path | None:
        """One of --fingerprint, --ca and --trust-on-first-use; with the
        last, the known-servers file (read now: a malformed one is an error
        at start, not later)."""
        given = [o for o in ("fingerprint", "ca", "trust-on-first-use") if self[o]]
        if len(given) > 1:
            raise usage.UsageError(
                f"give one of --fingerprint, --ca and --trust-on-first-use, not {' and '.join('--' + o for o in given)}"
            )
        if not given:
            raise usage.UsageError(
                "the client needs to know the server's identity: pass --fingerprint "
                "sha256:... (the server prints it when it starts; or on the server run "
                "'openssl x509 -in ~/.local/state/rtunnel/server.crt -outform DER | "
                "sha256sum'), or --ca FILE if the server has a CA-signed certificate, or "
                "--trust-on-first-use to trust the certificate seen on the first connection "
                f"and pin it from then on (stored in --known-servers, default {DEFAULT_KNOWN_SERVERS})"
            )
        if self["known-servers"] and not self["trust-on-first-use"]:
            raise usage.UsageError("--known-servers is used only with --trust-on-first-use")
        if not self["trust-on-first-use"]:
            return None
        known = Path(os.path.expanduser(self["known-servers"] or DEFAULT_KNOWN_SERVERS)).absolute()
        with usage_errors():
            load_known_servers(known)
        return known


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Wraps the server endpoint to remember why the last attempt failed
    (ClientMainService logs it, with the wait before the next one)."""

    log = Logger()

    def __init__(self, endpoint: Any, where: str, on_failure: Any = None) -> None:
        self._endpoint = endpoint
        self._where = where
        self._on_failure = on_failure
        self.last_failure: str | None = None

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            if not failure.check(defer.CancelledError):
                self.last_failure = failure.getErrorMessage()
                if self._on_failure is not None:
                    self._on_failure(self.last_failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)

    def __repr__(self) -> str:
        return self._where


class ClientMainService(service.MultiService):
    """Keeps a link to the server up with ClientService; stops on fatal errors.

    With `known_servers` (and neither a fingerprint nor a CA in `config`) the
    server's certificate is trusted on first use and recorded in that file.
    With `client_identity` the client presents that TLS client certificate.
    """

    log = Logger()

    def __init__(
        self,
        config: ClientConfig,
        reactor: Any = None,
        exit_on_fatal: bool = True,
        known_servers: Path | None = None,
        client_identity: ClientIdentity | None = None,
        reload_argv: list[str] | None = None,
    ) -> None:
        super().__init__()
        # with --config: the arguments to parse again on SIGHUP (reload)
        self.reload_argv = reload_argv
        self._running_options: dict[str, Any] | None = None
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self._sighup = SighupReload(reactor, self.reload, "the config file")
        self.config = config
        self.exit_on_fatal = exit_on_fatal
        self.under_twistd = False  # made by makeService: twistd reports a failed start
        self.fatal_error: str | None = None
        self._fatal_waiters: list[defer.Deferred[str]] = []
        if known_servers is not None and (config.fingerprint is not None or config.ca_file is not None):
            raise ConfigError("give one of --fingerprint, --ca and --trust-on-first-use")
        if config.fingerprint is not None:
            pinned = PinnedCertificateCreator(config.fingerprint, client_identity)

        def creator_for(host: str, port: int) -> Any:
            """The TLS trust of one server: a pin is shared by every server
            (a fleet's members present one certificate); a CA checks each name."""
            if config.fingerprint is not None:
                return pinned
            if known_servers is not None:
                return TrustOnFirstUseCreator(host, port, known_servers, client_identity)
            assert config.ca_file is not None
            return ca_creator(host, config.ca_file, client_identity)

        self.client = TunnelClient(reactor, config, self._fatal, creator_for(config.server_host, config.server_port))
        self.servers = ServerListEndpoint(reactor, config.server_list, creator_for, self._attempting, timeout=10)
        self.client.servers = self.servers
        endpoint = CountingEndpoint(self.servers, self.client.events)
        self._retry_policy = retry_policy(config.initial_retry_delay, config.max_retry_delay)
        self._endpoint = _ReportingEndpoint(endpoint, repr(self.servers), self.client.connect_failed)
        self._retired: set[ClientService] = set()  # connectors of links we moved away from
        self._old_links: dict[Any, ClientService] = {}
        self.connector = self._new_connector()
        self.client.mover.on_move = self._moved
        self.client.mover.on_drained = self._drained
        self.metrics: MetricsService | None = None
        if config.metrics:
            registry = registry_for(ClientCollector(self.client))
            self.metrics = MetricsService(reactor, config.metrics, registry, self.client.fatal)
            self.metrics.setServiceParent(self)

    # ------------------------------------------------------------ config file

    def startService(self) -> None:
        super().startService()
        self._sighup.install()  # always: SIGHUP's default action would kill the client
        stop_once_on_signals(self.reactor)
        if self.fatal_error is not None and self.exit_on_fatal and self.under_twistd:
            fail_start(self.reactor, self.fatal_error, self.exit_code, True)  # e.g. the --metrics port is taken

    def reload(self) -> None:
        """Re-read the config file (SIGHUP) with the same command line and
        apply its tunnels: unchanged ones are not touched, removed ones close
        their port (open connections carry on), new ones are bound; other
        changed settings are logged as needing a restart. A file that fails
        validation changes nothing."""
        if self.reload_argv is None:
            self.log.info("SIGHUP: nothing to reload (no --config)", event="reload_skipped", reason="no --config")
            return
        fresh = Options()
        try:
            fresh.parseOptions(self.reload_argv)
        except usage.UsageError as e:
            self.log.error(
                "reloading the config file failed; keeping the current tunnels and settings: {why}",
                why=str(e), event="config_reload_failed", reason=str(e),
            )
            return
        except Exception:
            self.log.failure("reloading the config file failed; keeping the current tunnels and settings", event="config_reload_failed")
            return
        where = str(fresh.config_file.path) if fresh.config_file else "the config file"
        restart = self._settings_changed(fresh)
        if restart:
            self.log.warn(
                "{file}: changed {names}; these take effect only after a restart (the running "
                "client keeps its current values)",
                file=where, names=", ".join(restart), event="config_restart_needed", settings=restart,
            )
        client = self.client
        changes = plan_tunnel_changes(client.tunnels.values(), fresh.config.tunnels)
        server = bracket(self.config.server_host)
        for spec in changes.removed:
            open_streams = 0
            if client.session is not None:
                open_streams = sum(
                    1 for s in client.session.streams.values() if s.tunnel_id == spec.tunnel_id
                )
            host, port = client.bound.get(spec.tunnel_id, (spec.bind_host, spec.bind_port))
            client.remove_tunnel(spec.tunnel_id)
            self.log.info(
                "tunnel removed: {address} -> {target}; its port is closed, its {n} open "
                "connection(s) carry on until they close",
                address=_public(spec, host, port, self.config.server_host), server=server, port=port,
                target=spec.target, n=open_streams, event="tunnel_removed", tunnel=spec.tunnel_id, streams=open_streams,
            )
        for spec in changes.retargeted:
            client.retarget_tunnel(spec)
            self.log.info(
                "tunnel changed: {address} -> {target} (proxy_protocol {proxy}) for new visitors",
                address=_public(spec, spec.bind_host, spec.bind_port, self.config.server_host),
                server=server, port=spec.bind_port, target=spec.target,
                proxy=spec.proxy_protocol, event="tunnel_changed", tunnel=spec.tunnel_id, proxy_protocol=spec.proxy_protocol,
            )
        for spec in changes.added:
            spec = client.add_tunnel(spec)
            self.log.info(
                "tunnel added: {address} -> {target}",
                address=_public(spec, spec.bind_host, spec.bind_port, self.config.server_host),
                server=server, port=spec.bind_port, target=spec.target, event="tunnel_added", tunnel=spec.tunnel_id,
            )
        self.log.info(
            "reloaded {file}: {n} tunnels ({added} added, {removed} removed, {changed} changed)",
            file=where, n=len(client.tunnels), added=len(changes.added),
            removed=len(changes.removed), changed=len(changes.retargeted), event="config_reloaded",
        )

    def running_options(self, options: Options) -> None:
        """Remember the options the client runs with (to tell a reload what changed)."""
        self._running_options = dict(options.opts)

    def _settings_changed(self, fresh: Options) -> list[str]:
        """The changed options a reload does not apply (the option table says which)."""
        if self._running_options is None:
            return []
        return CLIENT_OPTIONS.restart_needed(self._running_options, fresh.opts, self.config, fresh.config)

    @property
    def exit_code(self) -> int:
        """The status of a fatal end: 3 when --max-retries gave up, else 2."""
        return 3 if self.client.state is ClientState.GAVE_UP else 2

    def _fatal(self, message: str) -> None:
        """Retrying cannot help, and the client has left the server as a
        stopping client does (GOAWAY, so it frees the session and its ports
        at once): stop connecting, close the tunnelled connections, then
        (exit_on_fatal) end the process with exit_code."""
        self.fatal_error = message
        d = defer.maybeDeferred(self.connector.stopService)
        d.addCallback(lambda _: self.client.shutdown())
        waiters, self._fatal_waiters = self._fatal_waiters, []
        for waiter in waiters:
            waiter.callback(message)
        if self.exit_on_fatal:
            d.addBoth(lambda _: exit_process(self.reactor, self.exit_code))

    def _new_connector(self) -> ClientService:
        connector: ClientService

        def retry(attempt: int) -> float:
            return 3600.0 if connector in self._retired else self._next_attempt_in(attempt)

        connector = ClientService(self._endpoint, self.client.link_factory(), retryPolicy=retry, clock=self.reactor)
        connector.setServiceParent(self)
        return connector

    def _moved(self, old_link: Any) -> None:
        """GOAWAY MOVED: the old link stays with its connector (never
        reconnecting) until its streams are done; a new connector makes the
        new session's links."""
        old = self.connector
        self._retired.add(old)
        self._old_links[old_link] = old
        self.connector = self._new_connector()

    def _drained(self, old_link: Any) -> None:
        old = self._old_links.pop(old_link, None)
        if old is not None:
            self.reactor.callLater(0, self._retire, old)

    def _retire(self, connector: ClientService) -> None:
        if not connector.running or connector.parent is not self:
            return  # stopped with the whole client meanwhile
        d = defer.maybeDeferred(connector.stopService)
        d.addBoth(lambda _: connector.disownServiceParent())
        d.addBoth(lambda _: self._retired.discard(connector))

    def _attempting(self, host: str, port: int, creator: Any) -> None:
        self.client.tls_creator = creator  # explains a failed TLS handshake with this server

    def _next_attempt_in(self, attempt: int) -> float:
        """ClientService's retry policy: the wait before the next attempt,
        logged in one line with why the last one failed.

        ClientService counts only failed connects: a link the server closed
        before a session started (it refused the handshake: session limit,
        too many unauthenticated connections, shutting down) would restart
        its count at 1. The backoff goes by the attempts in a row that made
        no session, whichever way they failed."""
        delay = self._retry_policy(max(attempt, self.client.failed_attempts))
        if self.servers.has_hint and self.client.failed_attempts <= 1 and self.client.state not in LEAVING:
            delay = 0.0  # a MOVED hint: go to the session's member now (once: a hint that keeps failing backs off)
        giving_up = self.client.state is ClientState.GAVE_UP
        why, self._endpoint.last_failure = self._endpoint.last_failure, None
        where = repr(self.servers)
        if why is not None:
            self.log.warn(
                "cannot reach the rtunnel server at {where}: {why}{then}",
                where=where, why=why, then="" if giving_up else f"; retrying in {delay:.1f} s",
                event="connect_failed", server=where, reason=why, attempt=attempt, delay=delay,
            )
        elif not giving_up:
            self.log.info(
                "reconnecting to the rtunnel server at {where} in {delay:.1f} s",
                where=where, delay=delay, event="reconnecting", server=where, attempt=attempt,
            )
        return delay

    def when_fatal(self) -> defer.Deferred[str]:
        """Fires with the message of the first fatal error."""
        d: defer.Deferred[str] = defer.Deferred()
        if self.fatal_error is not None:
            d.callback(self.fatal_error)
        else:
            self._fatal_waiters.append(d)
        return d

    def stopService(self) -> defer.Deferred[None]:
        """Leave the server (GOAWAY), disconnect, then close every tunnelled
        connection still open."""
        self.client.stop()
        self._sighup.restore()
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: self.client.shutdown())
        return d


def makeService(options: Options) -> service.IService:
    # twistd calls this before it opens its log file: make that file 0600 (as the server's)
    create_private_log_file(twistd_log_file(options.parent))
    with usage_errors():
        main = ClientMainService(
            options.config,
            known_servers=getattr(options, "known_servers", None),
            client_identity=getattr(options, "client_identity", None),
            reload_argv=options.argv if options.config_file is not None else None,
        )
    main.running_options(options)
    main.under_twistd = True
    return main


def _public(spec: TunnelSpec, host: str, port: int, server_host: str) -> str:
    """A tunnel's public side for the log: its hostname, or HOST:PORT."""
    return spec.hostname if spec.kind != "tcp" else public_address(host, port, server_host)
