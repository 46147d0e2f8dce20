"""`twistd rtunnel-server`: options and the server service."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import usage

from rtunnel import DEFAULT_CONTROL_PORT, auth
from rtunnel.addresses import DUAL_STACK, IPV4_ANY, bracket, format_host_port, ipv6_unavailable
from rtunnel.admin import AdminServer
from rtunnel.config import ServerConfig, check_ip, parse_port_ranges
from rtunnel.configfile import FileOptions
from rtunnel.descriptors import DescriptorGate, GatedListening, raise_limit, reserve_for
from rtunnel.errors import ConfigError, RtunnelError
from rtunnel.fleet.workers import WORKER_ENV, Workers, check_workers, plugin_arguments, watch_parent
from rtunnel.logs import create_private_log_file, twistd_log_file
from rtunnel.metrics import ServerCollector, listen_metrics, registry_for
from rtunnel.server import TunnelServer
from rtunnel.systemd import check_inherited_socket
from rtunnel.tap import (
    CommandOptions,
    SighupReload,
    exit_process,
    fail_start,
    stop_once_on_signals,
    usage_errors,
)
from rtunnel.tap.options import TableOptions
from rtunnel.tap.server_options import (
    DEFAULT_STATE_DIR,
    MAX_MAX_FRAME,  # noqa: F401 (the --max-frame range, read here by tests and tools)
    MIN_MAX_FRAME,  # noqa: F401
    SERVER_OPTIONS,
)
from rtunnel.tls import format_fingerprint, load_or_create_token, load_server_identity, server_context
from rtunnel.tlslink import LinkTLSFactory


class Options(CommandOptions, FileOptions, TableOptions, usage.Options):
    """`rtunnel_server` / `twistd rtunnel-server`: the options are SERVER_OPTIONS."""

    option_table = SERVER_OPTIONS
    synopsis = "[options]  or  --config server.toml [options]"
    longdesc = (
        "Accept rtunnel clients on the control port and open the public ports they "
        "ask for. On first start it creates a key, a self-signed certificate and a "
        "token in the state directory and prints the client command to run."
    )

    def __init__(self) -> None:
        super().__init__()
        self.extra_clients: list[tuple[str, str]] = []

    def opt_client(self, value: str) -> None:
        name, sep, token = value.partition("=")
        if not sep or not name or not token or name == "default":
            # the value is not shown: it may well be a token
            raise usage.UsageError("--client: expected NAME=TOKEN, with a NAME other than 'default'")
        self.extra_clients.append((name, token))

    def postOptions(self) -> None:
        self.check_options()
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key go together: give both or neither")
        if len({self[name] is None for name in ("fleet-cert", "fleet-key", "fleet-ca")}) > 1:
            raise usage.UsageError(
                "--fleet-cert, --fleet-key and --fleet-ca go together: give all three (the files "
                "'rtunnel_server fleet-add-member' wrote) or none (they are then read from the state directory)"
            )
        if bool(self["https-cert"]) != bool(self["https-key"]):
            raise usage.UsageError("--https-cert and --https-key go together: give both or neither")
        needing = [f"--{name}" for name in ("domain", "https-cert", "access-log") if self[name]]
        if needing and not (self["http"] or self["https"]):
            raise usage.UsageError(
                f"{' and '.join(needing)} {'needs' if len(needing) == 1 else 'need'} the shared HTTP/HTTPS "
                "ports, which are off: add "
                "--http ENDPOINT and/or --https ENDPOINT (e.g. --http tcp:80 --https tcp:443)"
            )
        listen = self["listen"]
        listen_fallback = None
        if listen is None:
            # a long accept queue: a burst of connections must reach the
            # server (and its handshake deadline), not sit in SYN cookies
            listen = f"tcp:{self['port']}:backlog=1024:interface="
            if self["interface"]:
                listen += self["interface"].replace(":", r"\:")
            else:  # dual stack, or IPv4 alone where the host has no IPv6
                listen += DUAL_STACK.replace(":", r"\:")
                listen_fallback = f"tcp:{self['port']}:backlog=1024:interface={IPV4_ANY}"
        if listen.startswith("systemd:"):
            with usage_errors():
                check_inherited_socket(listen)
        self.config = ServerConfig(**self.config_values(
            listen=listen, listen_fallback=listen_fallback, extra_clients=tuple(self.extra_clients),
            reuse_port=WORKER_ENV in os.environ,  # a worker of --workers N: the control port is shared
        ))
        check_workers(self)


class ServerService(service.Service):
    """Loads key material, listens on the control port, runs TunnelServer."""

    log = Logger()

    def __init__(self, config: ServerConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.server: TunnelServer | None = None
        self.fleet: Any = None  # rtunnel.fleet.service.Fleet with --fleet-etcd
        self.drain: Any = None  # rtunnel.fleet.drain.Drain of a fleet member (SIGUSR2)
        self.port: IListeningPort | None = None
        self.metrics_port: IListeningPort | None = None
        self.shared_ports: dict[str, IListeningPort] = {}  # "http"/"https" -> its listening port (#15)
        self.ready: defer.Deferred[IListeningPort] = defer.Deferred()
        self._sighup = SighupReload(reactor, self.reload, "the clients file")
        self.admin: AdminServer | None = None
        self.edge: Any = None  # rtunnel.server.httpedge.HttpEdge, with --http/--https
        self.acme: Any = None  # rtunnel.server.acme.AcmeCertificates: --https without --https-cert
        self.control_gate = DescriptorGate(reactor, "control")
        self._started_privileged: defer.Deferred[IListeningPort] | None = None
        self.start_error: str | None = None  # why the start failed
        self.under_twistd = False  # made by makeService: twistd reports a failed start

    def privilegedStartService(self) -> None:
        """twistd calls this before --uid/--gid drop root: read the key
        material and bind the control port now (a port below 1024 works)."""
        super().privilegedStartService()
        self._started_privileged = defer.maybeDeferred(self._start)

    def startService(self) -> None:
        super().startService()
        self._sighup.install()  # always: SIGHUP's default action would kill the server
        watch_parent(self.reactor)  # a worker of --workers N stops when its parent is gone
        stop_once_on_signals(self.reactor)
        d, self._started_privileged = self._started_privileged or defer.maybeDeferred(self._start), None
        d.addCallbacks(self.ready.callback, self._failed)
        if self.start_error is not None and self.under_twistd:
            fail_start(self.reactor, self.start_error, 1, True)

    # ------------------------------------------------------------ clients file

    def load_clients(self) -> dict[str, auth.ClientPolicy]:
        assert self.config.clients_file is not None
        return auth.load_clients(
            self.config.clients_file,
            default_bind=self.config.bind_default,
            default_max_streams=self.config.session.max_streams,
        )

    def reload(self) -> None:
        """Re-read the clients file (SIGHUP). A file that fails validation
        changes nothing: the previous clients stay, the error is logged."""
        if self.config.clients_file is None:
            self.log.info("SIGHUP: nothing to reload (no --clients)", event="reload_skipped", reason="no --clients")
            return
        if self.server is None:
            return
        try:
            clients = self.load_clients()
            changes = self.server.set_clients(clients)
        except ConfigError as e:
            self.log.error(
                "reloading the clients file failed; keeping the previous clients: {why}", why=str(e),
                event="clients_reload_failed", file=str(self.config.clients_file), reason=str(e),
            )
            return
        except Exception:
            self.log.failure("reloading the clients file failed; keeping the previous clients", event="clients_reload_failed", file=str(self.config.clients_file))
            return
        self.log.info(
            "reloaded {file}: {n} clients (added: {added}; removed: {removed}; changed: {changed})",
            file=str(self.config.clients_file),
            n=len(clients),
            added=", ".join(changes["added"]) or "none",
            removed=", ".join(changes["removed"]) or "none",
            changed=", ".join(changes["changed"]) or "none",
            event="clients_reloaded", clients=sorted(clients),
        )

    def _fleet_clients(self) -> None:
        """A member sends resumes of sessions another member holds there
        (MOVED), and drains on SIGUSR2 (rtunnel.fleet.redirect, .drain);
        installed in the turn the control port opened, before any HELLO."""
        from rtunnel.fleet.drain import Drain
        from rtunnel.fleet.redirect import redirect_resumes

        assert self.server is not None and self.fleet is not None
        links = self.fleet.links
        locator = redirect_resumes(
            self.server, self.fleet.directory, links.lost_touch if links is not None else None,
        )
        self.drain = Drain(
            self.reactor, self.server, locator, self.reactor.stop, timeout=self.config.fleet_drain_timeout,
        )
        self.drain.install_signal()
        self.fleet.drain = self.drain  # POST /api/fleet/drain (rtunnel.admin)

    def _raise_fd_limit(self) -> None:
        """Open files: soft limit up to the hard one (the default --max-streams
        alone is more than the usual 1,024), and say what the server got."""
        got = raise_limit()
        reserve = reserve_for(got.soft)
        self.log.info(
            "open files: limit {soft} (hard limit {hard}, was {before}); {reserve} of them kept "
            "for control connections: visitors beyond {visitors} descriptors are refused{why}",
            soft=got.soft, hard=got.hard, before=got.before, reserve=reserve, visitors=got.soft - reserve,
            why=f" (raising the limit failed: {got.error})" if got.error else "",
            event="fd_limit", error=got.error,
        )
        streams = self.config.session.max_streams
        if streams > got.soft - reserve:
            self.log.warn(
                "--max-streams {streams} is more than the {visitors} descriptors visitors may use "
                "(open files limit {soft}); visitors beyond them are refused. Raise the hard limit "
                "(LimitNOFILE= in systemd, ulimit -Hn) to hold that many",
                streams=streams, visitors=got.soft - reserve, soft=got.soft, event="fd_limit_low",
            )

    def _failed(self, failure: Any) -> None:
        self._sighup.restore()
        why = failure.getErrorMessage()
        if failure.check(RtunnelError):
            self.log.critical("cannot start: {why}", why=why, event="start_failed", reason=why)
        elif failure.check(CannotListenError):
            why = why.rstrip(".")
            self.log.critical(
                "cannot listen on {listen}: {why}. Choose another --port/--listen or stop the "
                "program using it.",
                listen=self.config.listen, why=why, event="start_failed", reason=why,
            )
        else:
            self.log.failure("cannot start: {why} (a bug)", failure, why=why, event="start_failed", reason=why)
        self.start_error = why
        self.ready.errback(failure)
        if not self.under_twistd or self.reactor.running:  # else startService reports it to twistd
            exit_process(self.reactor, 1)

    @defer.inlineCallbacks
    def _start(self) -> Any:
        config = self.config
        identity = load_server_identity(config.state_dir, config.cert, config.key)
        clients = self.load_clients() if config.clients_file is not None else None
        token: str | None
        if config.token:
            token, token_created = config.token, False
        elif clients is not None:
            token, token_created = None, False  # credentials come from the clients file
        else:
            token, token_created = load_or_create_token(config.state_dir)
        if config.fleet_etcd:  # a fleet member: registered (and the fleet read) before any client comes
            from rtunnel.fleet.service import Fleet

            self.fleet = Fleet(self.reactor, config, control=config.listen)
            yield self.fleet.start()
        self.server = TunnelServer(
            self.reactor, config, token, clients, claims=self.fleet.claims if self.fleet is not None else None,
        )
        if self.fleet is not None:
            self.fleet.attach(self.server)
            yield self.fleet.start_links()
        self._raise_fd_limit()
        # control connections may use descriptors visitors may not (rtunnel.descriptors)
        listening = GatedListening(self.reactor, self.control_gate, config.reuse_port)
        endpoint = serverFromString(listening, config.listen)
        factory = self.server.admitting(
            LinkTLSFactory(server_context(identity, config.tls_groups), False, self.server.link_factory(), self.reactor)
        )
        listen = config.listen
        try:
            self.port = yield endpoint.listen(factory)
        except CannotListenError as e:
            if config.listen_fallback is None or not ipv6_unavailable(e):
                raise
            self.log.warn(
                "cannot listen on {listen} ({why}): this host has no IPv6; listening on "
                "{fallback} instead (IPv4 only)",
                listen=listen, why=str(e.socketError), fallback=config.listen_fallback,
                event="ipv6_unavailable", listener="control",
            )
            listen = config.listen_fallback
            self.port = yield serverFromString(listening, listen).listen(factory)
        if self.fleet is not None:  # resumes of sessions held elsewhere, and drains (docs/fleet.md)
            self._fleet_clients()
        if config.http.enabled:
            yield self._listen_shared()
        if config.metrics:
            registry = registry_for(ServerCollector(lambda: self.server))
            if self.fleet is not None:
                from rtunnel.fleet.metrics import FleetCollector

                registry.register(FleetCollector(lambda: self.fleet))
            if self.acme is not None:
                registry.register(self.acme)
            self.metrics_port = yield listen_metrics(self.reactor, config.metrics, registry)
        address = self.port.getHost()
        port = getattr(address, "port", DEFAULT_CONTROL_PORT)
        host, host_note = client_host(getattr(address, "host", ""), socket.getfqdn())
        token_arg, token_note = self._token_instructions(token, token_created, clients is not None)
        self.log.info(
            "rtunnel server listening on {listen} (port {port}); certificate fingerprint "
            "{fp}{created}\n  {token_note}\n  Run on the client machine:\n"
            "    rtunnel_client -c {host}:{port} -f 4000 -t 3000 {token} --fingerprint {fp}{host_note}",
            listen=listen,
            port=port,
            fp=format_fingerprint(identity.fingerprint),
            created=f" (new key and certificate in {config.state_dir})" if identity.created else "",
            host=bracket(host),
            token=token_arg,
            token_note=token_note,
            host_note=f"\n  {host_note}" if host_note else "",
            event="server_listening",
        )
        if clients is not None:
            self.log.info(
                "{n} client(s) from {file} ({names}); add one with 'rtunnel_server add-client NAME "
                "--ports 4000-4099 --clients {file}' (it prints the client's token), then "
                "'kill -HUP {pid}' to reload",
                n=len(clients),
                file=str(config.clients_file),
                names=", ".join(sorted(clients)) or "none yet",
                pid=os.getpid(),
                event="clients_loaded", clients=sorted(clients),
            )
        if config.admin is not None:
            self.admin = AdminServer(self.reactor, self.server, config.admin, config.state_dir)
            yield self.admin.listen()
        return self.port

    @defer.inlineCallbacks
    def _listen_shared(self) -> Any:
        """The shared HTTP/HTTPS ports (--http, --https) and their certificates (#15)."""
        from rtunnel.server.certificates import StaticCertificates
        from rtunnel.server.httpedge import HttpEdge, edge_factories

        assert self.server is not None
        settings = self.config.http
        if settings.https_cert and settings.https_key and self.server.certificates is None:
            self.server.certificates = StaticCertificates(settings.https_cert, settings.https_key)
        if settings.https and self.server.certificates is None:
            # no --https-cert: certificates from ACME, ordered for the names clients claim
            from rtunnel.server.acme import AcmeCertificates

            config = self.config
            self.acme = AcmeCertificates(
                self.reactor, config.state_dir, config.acme_directory, config.acme_email, config.acme_ca,
            )
            self.acme.startService()
            self.server.certificates = self.acme
        self.edge = HttpEdge(self.reactor, self.server, settings, self.server.hostnames, self.server.certificates)
        if self.fleet is not None:  # hostnames held at other members too (docs/fleet.md)
            self.fleet.serve_hostnames(self.edge)
        factories = edge_factories(self.edge)
        for scheme in ("http", "https"):
            endpoint = getattr(settings, scheme)
            if not endpoint:
                continue
            port = yield serverFromString(self.reactor, endpoint).listen(factories[scheme]())
            self.shared_ports[scheme] = port
            number = getattr(port.getHost(), "port", 0)
            setattr(self.server.hostnames, f"{scheme}_port", number)
            self.log.info(
                "serving {label} for clients' hostnames on {endpoint} (port {port}){note}",
                label=scheme.upper(), endpoint=endpoint, port=number,
                note=f"; token clients may take NAME.{settings.domain}" if settings.domain else "",
                event="shared_port_listening", scheme=scheme, domain=settings.domain,
            )

    def _token_instructions(self, token: str | None, created: bool, has_clients: bool) -> tuple[str, str]:
        """The --token argument of the printed client command, and the line
        saying where that token is: never the token itself (a log file may
        be read by others, and is kept)."""
        config = self.config
        if config.token:
            if os.environ.get("RTUNNEL_TOKEN") == config.token:
                return '--token "$RTUNNEL_TOKEN"', "The token clients must present is this server's $RTUNNEL_TOKEN."
            return "--token TOKEN", "TOKEN: the token given to this server with --token (it is never logged)."
        if token is None and has_clients:
            return "--token TOKEN", (
                "TOKEN: the client's own token, which 'rtunnel_server add-client NAME' printed once."
            )
        path = config.state_dir / "token"
        return f"--token-file {path}", (
            f"The token clients must present is in {path} ({'new, ' if created else ''}mode 600); it is "
            "never logged. Copy that file to the client machine (keep it mode 600) for --token-file "
            "below, or pass what it holds with --token or $RTUNNEL_TOKEN."
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._sighup.restore()
        waits: list[defer.Deferred[Any]] = []
        if self.port is not None:
            waits.append(defer.maybeDeferred(self.port.stopListening))
        if self.admin is not None:
            waits.append(self.admin.stop())
        if self.metrics_port is not None:
            waits.append(defer.maybeDeferred(self.metrics_port.stopListening))
        for port in self.shared_ports.values():
            waits.append(defer.maybeDeferred(port.stopListening))
        if self.edge is not None:
            self.edge.close()
        if self.acme is not None:
            waits.append(defer.maybeDeferred(self.acme.stopService))
        if self.server is not None:
            if self.fleet is not None:  # member links and edge listeners first, then the sessions
                stopping = self.fleet.stop_links().addCallback(lambda _: self.server.shutdown())
            else:
                stopping = self.server.shutdown()
            if self.fleet is not None:  # then leave the fleet: revoking the lease frees our claims at once
                stopping.addCallback(lambda _: self.fleet.stop() if self.fleet is not None else None)
            waits.append(stopping)
        elif self.fleet is not None:
            waits.append(self.fleet.stop())
        self.control_gate.stop()
        return defer.gatherResults(waits).addCallback(lambda _: None)


_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def client_host(listening: str, fqdn: str) -> tuple[str, str]:
    """The host for the printed `rtunnel_client -c HOST:PORT`, and a note
    saying what to replace it with ("" if nothing). A control port bound to
    one address is reached at that address; on all addresses (:: or
    0.0.0.0) the server knows only its own name, which may not be the one
    clients use, or (a host named "localhost") be no use at all."""
    if listening and listening not in (DUAL_STACK, IPV4_ANY):
        return listening, ""
    if fqdn.lower() in _LOCAL_NAMES or not fqdn:
        return "SERVER", (
            "SERVER: this server's name or address as the client machine reaches it (this host's "
            f"own name for itself is {fqdn or 'empty'!r}, which on the client machine means that machine)."
        )
    return fqdn, (
        f"{fqdn} is this host's own name for itself: if the client machine reaches this server "
        "by another name or address, use that."
    )


def add_client_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="rtunnel_server add-client",
        description=(
            "Add a client (or replace its token and policy) in the clients file and print its "
            "new token once; only the token's SHA-256 is stored. Start the server with "
            "--clients FILE; a running server reloads the file on SIGHUP."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="the client's name (letters, digits, '_', '-')")
    parser.add_argument("--ports", required=True, help="ports the client may open, e.g. 4000-4099,5432")
    parser.add_argument(
        "--bind", action="append", default=[], metavar="ADDR",
        help="an address the client may bind (repeatable; default: the server's --bind-default)",
    )
    parser.add_argument("--clients", metavar="FILE", help="the clients file (default: STATE_DIR/clients.toml)")
    parser.add_argument("-s", "--state-dir", default=DEFAULT_STATE_DIR, help="the server's state directory")
    parser.add_argument("--max-tunnels", type=int, metavar="N", help="most tunnels per session (default 16)")
    parser.add_argument(
        "--max-streams", type=int, metavar="N",
        help="most open tunnelled connections per session (default: the server's --max-streams)",
    )
    parser.add_argument(
        "--bandwidth", type=int, metavar="BYTES",
        help="bandwidth limit, bytes per second each way (default: none; see docs/security.md)",
    )
    parser.add_argument(
        "--max-connections-per-tunnel", type=int, metavar="N",
        help="visitors connected at once per tunnel (default: no limit)",
    )
    parser.add_argument(
        "--server", metavar="HOST[:PORT]",
        help="where clients reach this server, for the printed command (default: a guess, this host's name and port 19050)",
    )
    return parser


def add_client_main(argv: list[str], out: Any = None) -> int:
    """`rtunnel_server add-client NAME --ports 4000-4099 …` (argv: the words
    after add-client). Prints the new token once; returns the exit status."""
    import sys

    out = out or sys.stdout
    parser = add_client_parser()
    args = parser.parse_args(argv)
    try:
        ports = parse_port_ranges(args.ports)
    except RtunnelError as e:
        parser.error(str(e).replace("--allow-ports", "--ports"))
    bind = []
    for value in args.bind:
        for address in value.split(","):
            if address.strip():
                try:
                    check_ip(address.strip(), "--bind")
                except RtunnelError as e:
                    parser.error(str(e))
                bind.append(address.strip())
    for key in ("max_tunnels", "max_streams", "bandwidth", "max_connections_per_tunnel"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    state_dir = Path(os.path.expanduser(args.state_dir))
    clients_file = Path(os.path.expanduser(args.clients)) if args.clients else state_dir / "clients.toml"
    try:
        token = auth.add_client(
            clients_file, args.name, ports, bind=bind or None,
            max_tunnels=args.max_tunnels, max_streams=args.max_streams,
            bandwidth=args.bandwidth, max_connections_per_tunnel=args.max_connections_per_tunnel,
        )
    except RtunnelError as e:
        print(f"rtunnel_server add-client: {e}", file=sys.stderr)
        return 1
    notes = []
    if args.server:
        server = args.server
    else:
        host, _ = client_host("", socket.getfqdn())
        server = format_host_port(host, DEFAULT_CONTROL_PORT)
        name = "SERVER stands for the server's name or address" if host == "SERVER" else f"{host} is this host's own name"
        notes.append(
            f"-c {server}: {name}, {DEFAULT_CONTROL_PORT} the default control port; add-client "
            "knows neither the server's --port nor the name clients reach it by: correct them, or "
            "pass --server HOST:PORT to add-client."
        )
    forward = str(ports[0][0])
    if bind and not {IPV4_ANY, DUAL_STACK} & set(bind):  # it may not bind the default address
        forward = format_host_port(bind[0], ports[0][0])
    cert = state_dir / "server.crt"
    try:
        from rtunnel.tls import fingerprint_of_pem

        fingerprint = format_fingerprint(fingerprint_of_pem(cert.read_bytes()))
    except FileNotFoundError:
        fingerprint = "FINGERPRINT"
        notes.append(
            f"FINGERPRINT: there is no server certificate in {state_dir} yet; the server makes one "
            "on its first start and prints its fingerprint (a server with --cert: "
            "'openssl x509 -in CERT -outform DER | sha256sum')."
        )
    except Exception as e:  # unreadable, or not a certificate
        fingerprint = "FINGERPRINT"
        notes.append(f"FINGERPRINT: the server's, as it prints it at start ({cert} cannot be read: {e}).")
    print(
        f"Client {args.name!r} written to {clients_file} (ports {auth.format_ranges(ports)}).\n"
        "Its token, shown only this once (the file keeps only its SHA-256):\n\n"
        f"    {token}\n\n"
        "Run on the client machine:\n"
        f"    rtunnel_client -c {server} -f {forward} -t 3000 --token {token} --fingerprint {fingerprint}\n"
        + "".join(f"  {note}\n" for note in notes)
        + f"\nThe server must run with --clients {clients_file}; a running one picks the change up "
        "on SIGHUP (kill -HUP <server pid>).",
        file=out,
    )
    return 0


def makeService(options: Options) -> service.IService:
    # twistd calls this before it opens its log file: make that file 0600
    create_private_log_file(twistd_log_file(options.parent))
    if options.config.workers > 1:
        return workers_service(options)
    server = ServerService(options.config)
    server.under_twistd = True
    return server


def workers_service(options: Options) -> service.IService:
    """The parent of `--workers N` (rtunnel.fleet.workers.Workers). It runs
    in the foreground (rtunnel_server, or twistd --nodaemon): its workers
    log to its standard output and error, which a daemon has closed."""
    import sys

    parent = options.parent
    twistd: list[str] = []
    if parent is not None:
        if not parent["nodaemon"]:
            sys.stderr.write(
                "twistd rtunnel-server --workers: run it in the foreground (twistd --nodaemon, e.g. under "
                "systemd Type=simple, or rtunnel_server): its workers log to its standard output\n"
            )
            sys.exit(1)
        logger = parent["logger"]  # twistd has imported it: pass its dotted name on
        if logger:
            name = logger if isinstance(logger, str) else f"{logger.__module__}.{logger.__qualname__}"
            twistd.append(f"--logger={name}")
    return Workers(options.config, plugin_arguments(sys.argv), twistd)
