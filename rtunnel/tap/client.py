"""`twistd rtunnel-client`: options and the client service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from rtunnel import DEFAULT_CONTROL_PORT
from rtunnel.client import TunnelClient, retry_policy
from rtunnel.config import ClientConfig, TunnelSpec, check_ip, parse_host_port
from rtunnel.errors import ConfigError, RtunnelError
from rtunnel.tap import exit_process, keepalive_from
from rtunnel.tls import (
    DEFAULT_KNOWN_SERVERS,
    ClientIdentity,
    PinnedCertificateCreator,
    TrustOnFirstUseCreator,
    ca_creator,
    load_client_identity,
    load_known_servers,
    parse_fingerprint,
)


class Options(usage.Options):
    synopsis = (
        "-c HOST[:PORT] -f [BIND:]PORT -t [HOST:]PORT [-f ... -t ...] "
        "(--fingerprint FP | --ca FILE | --trust-on-first-use)"
    )
    longdesc = (
        "Make ports on the rtunnel server reach services on this machine. Each -f "
        "(port opened on the server; 0 lets the server pick) pairs with the -t that "
        "follows it (local target, default host localhost)."
    )
    optParameters = [
        ["connect", "c", None, "Server control address HOST[:PORT] (default port 19050)."],
        ["token", None, None, "Token from the server (default: $RTUNNEL_TOKEN; optional with --client-cert)."],
        [
            "client-cert", None, None,
            "PEM TLS client certificate to present (with --client-key); the server's clients file "
            "lists its SHA-256 as cert_sha256.",
        ],
        ["client-key", None, None, "PEM private key of --client-cert (unencrypted)."],
        ["fingerprint", None, None, "SHA-256 fingerprint of the server's certificate (printed by the server)."],
        ["ca", None, None, "PEM CA file: verify the server's certificate and host name against it instead of a fingerprint."],
        ["max-retry-delay", None, 30.0, "Longest wait between reconnection attempts, in seconds.", float],
        ["ping-interval", None, 10.0, "Seconds between keepalive pings.", float],
        ["dead-after", None, 30.0, "Seconds of silence after which the link is declared dead.", float],
        ["connect-timeout", None, 10.0, "Seconds to wait for a local target to accept.", float],
        ["max-retries", None, None, "Give up and exit with status 3 after this many failed connection attempts in a row (default: never give up; for supervisors that restart the client).", int],
        [
            "known-servers", None, None,
            f"With --trust-on-first-use: the file of known servers' fingerprints (default {DEFAULT_KNOWN_SERVERS}).",
        ],
    ]
    optFlags = [
        [
            "trust-on-first-use", None,
            "Instead of --fingerprint/--ca: trust the server's certificate on the first connection, "
            "store its fingerprint in --known-servers and pin it from then on (like ssh's known_hosts).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.forwards: list[str] = []
        self.targets: list[str] = []

    def opt_forward(self, value: str) -> None:
        """[BIND:]PORT to open on the server (repeatable; 0 = server picks)."""
        self.forwards.append(value)

    def opt_to(self, value: str) -> None:
        """[HOST:]PORT of the local target for the preceding -f (repeatable)."""
        self.targets.append(value)

    opt_f = opt_forward
    opt_t = opt_to

    def postOptions(self) -> None:
        if not self["connect"]:
            raise usage.UsageError("-c/--connect HOST[:PORT] is required: the rtunnel server to use")
        if not self.forwards or len(self.forwards) != len(self.targets):
            raise usage.UsageError(
                "give -f/--forward and -t/--to in pairs, e.g. -f 4000 -t 3000 "
                f"(got {len(self.forwards)} -f and {len(self.targets)} -t)"
            )
        if bool(self["client-cert"]) != bool(self["client-key"]):
            raise usage.UsageError("--client-cert and --client-key go together: give both or neither")
        self.client_identity: ClientIdentity | None = None
        if self["client-cert"]:
            try:
                self.client_identity = load_client_identity(
                    Path(self["client-cert"]), Path(self["client-key"])
                )
            except RtunnelError as e:
                raise usage.UsageError(str(e)) from None
        token = self["token"] or os.environ.get("RTUNNEL_TOKEN") or ""
        if not token and self.client_identity is None:
            raise usage.UsageError(
                "no token: pass --token or set RTUNNEL_TOKEN (the server printed it on its "
                "first start; it is in the server's state dir, file 'token'), or present a "
                "client certificate with --client-cert and --client-key"
            )
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
        self.known_servers: Path | None = None
        if self["trust-on-first-use"]:
            self.known_servers = Path(os.path.expanduser(self["known-servers"] or DEFAULT_KNOWN_SERVERS)).absolute()
            try:
                load_known_servers(self.known_servers)  # a malformed file is an error now, not later
            except RtunnelError as e:
                raise usage.UsageError(str(e)) from None
        try:
            host, port = parse_host_port(self["connect"], "-c/--connect", None, DEFAULT_CONTROL_PORT)
            tunnels = []
            for i, (forward, target) in enumerate(zip(self.forwards, self.targets, strict=True), start=1):
                bind_host, bind_port = parse_host_port(forward, "-f/--forward", "0.0.0.0", allow_zero=True)
                check_ip(bind_host, "-f/--forward")
                if bind_port and any((t.bind_host, t.bind_port) == (bind_host, bind_port) for t in tunnels):
                    raise ConfigError(f"-f/--forward {forward} is given twice")
                target_host, target_port = parse_host_port(target, "-t/--to", "localhost")
                tunnels.append(TunnelSpec(i, bind_host, bind_port, target_host, target_port))
            fingerprint = parse_fingerprint(self["fingerprint"]) if self["fingerprint"] else None
            if self["ca"]:
                ca_creator(host, Path(self["ca"]), self.client_identity)  # fail here, as a usage error
        except RtunnelError as e:
            raise usage.UsageError(str(e)) from None
        if self["max-retry-delay"] < 0.5:
            raise usage.UsageError("--max-retry-delay must be at least 0.5 seconds")
        if self["max-retries"] is not None and self["max-retries"] < 1:
            raise usage.UsageError("--max-retries must be at least 1 (leave it out to retry for ever)")
        self.config = ClientConfig(
            server_host=host,
            server_port=port,
            tunnels=tuple(tunnels),
            token=token,
            fingerprint=fingerprint,
            ca_file=Path(self["ca"]) if self["ca"] else None,
            keepalive=keepalive_from(self),
            max_retry_delay=self["max-retry-delay"],
            connect_timeout=self["connect-timeout"],
            max_retries=self["max-retries"],
        )


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
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.exit_on_fatal = exit_on_fatal
        self.fatal_error: str | None = None
        self._fatal_waiters: list[defer.Deferred[str]] = []
        if known_servers is not None and (config.fingerprint is not None or config.ca_file is not None):
            raise ConfigError("give one of --fingerprint, --ca and --trust-on-first-use")
        if config.fingerprint is not None:
            creator: Any = PinnedCertificateCreator(config.fingerprint, client_identity)
        elif known_servers is not None:
            creator = TrustOnFirstUseCreator(
                config.server_host, config.server_port, known_servers, client_identity
            )
        else:
            assert config.ca_file is not None
            creator = ca_creator(config.server_host, config.ca_file, client_identity)
        self.client = TunnelClient(reactor, config, self._fatal, creator)
        self.client.on_attempt_failed = self._attempt_failed
        self.exit_code = 2  # for fatal errors; 3 when --max-retries gives up
        endpoint = wrapClientTLS(
            creator,
            HostnameEndpoint(reactor, config.server_host, config.server_port, timeout=10),
        )
        self._giving_up = False
        self._retry_policy = retry_policy(config.initial_retry_delay, config.max_retry_delay)
        self._endpoint = _ReportingEndpoint(endpoint, f"{config.server_host}:{config.server_port}", self._attempt_failed)
        self.connector = ClientService(
            self._endpoint,
            self.client.link_factory(),
            retryPolicy=self._next_attempt_in,
            clock=reactor,
        )
        self.connector.setServiceParent(self)

    def _fatal(self, message: str) -> None:
        self.fatal_error = message
        d = defer.maybeDeferred(self.connector.stopService)
        waiters, self._fatal_waiters = self._fatal_waiters, []
        for waiter in waiters:
            waiter.callback(message)
        if self.exit_on_fatal:
            d.addBoth(lambda _: exit_process(self.reactor, self.exit_code))

    def _next_attempt_in(self, attempt: int) -> float:
        """ClientService's retry policy: the wait before the next attempt,
        logged in one line with why the last one failed."""
        delay = self._retry_policy(attempt)
        why, self._endpoint.last_failure = self._endpoint.last_failure, None
        where = f"{self.config.server_host}:{self.config.server_port}"
        if why is not None:
            self.log.warn(
                "cannot reach the rtunnel server at {where}: {why}{then}",
                where=where, why=why, then="" if self._giving_up else f"; retrying in {delay:.1f} s",
                event="connect_failed", server=where, reason=why, attempt=attempt, delay=delay,
            )
        elif not self._giving_up:
            self.log.info(
                "reconnecting to the rtunnel server at {where} in {delay:.1f} s",
                where=where, delay=delay, event="reconnecting", server=where, attempt=attempt,
            )
        return delay

    def _attempt_failed(self, why: str) -> bool:
        """One more attempt in a row without a session. At --max-retries,
        give up (soon: not inside ClientService's callback); True if so."""
        limit, failures = self.config.max_retries, self.client.failed_attempts + 1
        self.client.failed_attempts = failures
        if limit is None or failures < limit or self.fatal_error is not None or not self.running:
            return False
        self.exit_code, self._giving_up = 3, True
        message = (
            f"giving up after {failures} failed attempts in a row to connect to the rtunnel "
            f"server at {self.config.server_host}:{self.config.server_port} (--max-retries "
            f"{limit}); the last one: {why.rstrip('.')}. Check that the server runs and is "
            "reachable, or raise --max-retries."
        )
        self.reactor.callLater(0, self.client.fatal, message, "gave_up")
        return True

    def when_fatal(self) -> defer.Deferred[str]:
        """Fires with the message of the first fatal error."""
        d: defer.Deferred[str] = defer.Deferred()
        if self.fatal_error is not None:
            d.callback(self.fatal_error)
        else:
            self._fatal_waiters.append(d)
        return d

    def stopService(self) -> defer.Deferred[None]:
        """Disconnect, then close every tunnelled connection still open."""
        self.client.say_goodbye()
        for link in list(self.client.links):
            if not link.handshake_done:
                link.abort()  # TLS cannot close cleanly mid-handshake
            elif link.session is not None:
                link.session.detach()  # TLS cannot close while the session produces
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: self.client.shutdown())
        return d


def makeService(options: Options) -> service.IService:
    try:
        return ClientMainService(
            options.config,
            known_servers=getattr(options, "known_servers", None),
            client_identity=getattr(options, "client_identity", None),
        )
    except RtunnelError as e:
        raise usage.UsageError(str(e)) from None
