"""The server end: accepts client links, owns public listeners and sessions.

One module per concern, wired here by TunnelServer:

* claims      — the claims registry: which session holds each public name
* ports       — public TCP listeners, their visitors, BIND's checks
* credentials — tokens, the clients file's policies, limiters, reload
* session     — ServerSession: attachment (a state machine), resume, expiry, tunnels
* handshake   — ServerLink: HELLO -> credential -> session, refusals

Ports belong to credentials, so the rightful owner always gets its port
back at once and nobody else can take it meanwhile; among the sessions of
one credential the newest holds a port (docs/security.md).
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from rtunnel import wire
from rtunnel.addresses import IPV4_ANY
from rtunnel.auth import ClientPolicy
from rtunnel.config import ServerConfig
from rtunnel.counters import ServerEvents, Traffic
from rtunnel.descriptors import DescriptorGate
from rtunnel.guard import MOST_HELD, PER_ADDRESS, AdmissionGuard, address_key
from rtunnel.limits import ClientLimiter, Limits, RefusalLog
from rtunnel.mux import SessionSettings
from rtunnel.server.certificates import CertificateSource
from rtunnel.server.claims import ClaimRegistry, LocalClaims
from rtunnel.server.credentials import DEFAULT_CREDENTIAL, Credentials
from rtunnel.server.handshake import AdmittingFactory, ServerLink
from rtunnel.server.hostnames import HostRoutes
from rtunnel.server.ports import BindRefused, PublicPorts, dual_stack
from rtunnel.server.session import Attachment, ServerSession, SessionState
from rtunnel.server.udp import UdpPorts
from rtunnel.server.visitors import PublicListener
from rtunnel.wire import ErrorCode, FrameType

__all__ = [
    "DEFAULT_CREDENTIAL", "Attachment", "BindRefused", "PublicListener", "ServerLink", "ServerSession",
    "SessionState", "TunnelServer",
]


class TunnelServer:
    """Every session and public listener of one server process."""

    log = Logger()

    def __init__(
        self, reactor: Any, config: ServerConfig, token: str | None,
        clients: dict[str, ClientPolicy] | None = None, claims: ClaimRegistry[ServerSession] | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.credentials = Credentials(reactor, config, token, clients)
        self.claims: ClaimRegistry[ServerSession] = claims if claims is not None else LocalClaims()
        # visitors never hold the descriptors kept for control connections (rtunnel.descriptors)
        self.visitor_gate = DescriptorGate(reactor, "visitor")
        self.ports = PublicPorts(reactor, config, self.claims, self.credentials.policy_for, self.visitor_gate)
        #: the tunnel kinds this server serves (WELCOME "features"; others get BIND_FAILED unsupported)
        self.tunnel_kinds: tuple[str, ...] = ("tcp", "udp", "http", "tls") if config.http.enabled else ("tcp", "udp")
        #: claimed hostnames and their routes (#15); the certificates of the HTTPS port
        self.hostnames = HostRoutes(config.http, self.claims)
        self.udp = UdpPorts(self, self.claims)  # public UDP ports (#16)
        self.sessions: dict[str, ServerSession] = {}
        self.session_serials: Iterator[int] = itertools.count(1)
        # in a fleet (rtunnel.fleet.redirect): (session id, credential) -> the control address
        # (host, port) and name of the member holding that session, if another member does
        self.session_elsewhere: Callable[[str, str], tuple[str, int, str] | None] | None = None
        # set while this member is drained (rtunnel.fleet.drain): (host, port, member) new sessions go to
        self.moved_to: tuple[str, int, str] | None = None
        self.links: set[ServerLink] = set()
        self._drained: defer.Deferred[None] | None = None
        self.guard: AdmissionGuard[ServerLink] = AdmissionGuard(
            reactor,
            max_unauthenticated=config.max_unauthenticated,
            max_per_address=config.max_unauthenticated_per_address,
            failure_burst=config.auth_failure_burst,
            failure_refill=config.auth_failure_refill,
        )
        # every refusal a peer can provoke is logged through these (a flood of
        # refusals must not flood the log); the control port's: a line in 10 s
        self.refusals = RefusalLog(reactor, log=self.log)
        self._cap_refusals = RefusalLog(reactor, interval=10.0, log=self.log)
        self.events = ServerEvents()  # event counts and closed streams' totals (rtunnel.metrics)
        self.traffic = Traffic(visitor_side=True)
        self.fleet_links: Any = None  # rtunnel.fleet.links.FleetLinks, in a fleet (its metrics)
        self.fleet: Any = None  # rtunnel.fleet.service.Fleet, in a fleet (the admin API's "fleet")

    # ------------------------------------------------------------ what others read

    @property
    def certificates(self) -> CertificateSource | None:
        """The HTTPS port's certificate source (StaticCertificates, or ACME)."""
        return self.hostnames.certificates

    @certificates.setter
    def certificates(self, source: CertificateSource | None) -> None:
        self.hostnames.certificates = source

    @property
    def listeners(self) -> dict[tuple[str, int], PublicListener]:
        """Every public listener, by (host, port)."""
        return self.ports.listeners

    @property
    def shutting_down(self) -> bool:
        return self.ports.shutting_down

    @property
    def clients(self) -> dict[str, ClientPolicy]:
        return self.credentials.clients

    @property
    def limiters(self) -> dict[str, ClientLimiter]:
        return self.credentials.limiters

    def authenticate(self, token: str | None, peer_cert_der: bytes | None = None) -> str | None:
        return self.credentials.authenticate(token, peer_cert_der)

    def policy_for(self, credential: str) -> ClientPolicy | None:
        return self.credentials.policy_for(credential)

    def settings_for(self, credential: str) -> SessionSettings:
        return self.credentials.settings_for(credential)

    def limits_for(self, credential: str) -> Limits:
        return self.credentials.limits_for(credential)

    def limiter_for(self, credential: str) -> ClientLimiter:
        return self.credentials.limiter_for(credential)

    def link_factory(self) -> Factory:
        factory: Factory = Factory.forProtocol(lambda: ServerLink(self))
        factory.noisy = False
        return factory

    def admitting(self, factory: IProtocolFactory) -> IProtocolFactory:
        """`factory` (the control port's, TLS included) behind the guard: a
        connection the guard refuses is closed as it is accepted, before any
        TLS state is made for it, so a flood costs little per connection."""
        return AdmittingFactory(self, factory)

    # ------------------------------------------------------------ reload

    def set_clients(self, clients: dict[str, ClientPolicy]) -> dict[str, list[str]]:
        """Replace the clients-file policies (SIGHUP). Sessions of removed
        clients (or of clients whose token changed) end and free their
        ports; other sessions stay, and their new binds follow the new
        policy. Raises ConfigError (changing nothing) if the set clashes."""
        change = self.credentials.set_clients(clients)
        for session in list(self.sessions.values()):
            if session.credential in change.removed:
                session.expire("client removed from the clients file")
            elif session.credential in change.rekeyed:
                session.expire("client's token or certificate changed in the clients file")
            elif session.credential in change.changed:
                self._apply_policy(session, clients[session.credential])
        for credential, limiter in self.credentials.refresh_limiters().items():
            for session in list(self.sessions.values()):
                if session.credential == credential:
                    session.mux_session.replace_pacers(limiter.to_client, limiter.from_client)
        return change.summary()

    def _apply_policy(self, session: ServerSession, policy: ClientPolicy) -> None:
        """A running session of a client whose policy changed: its new
        max_streams applies now; open ports stay (and are named in a warning
        if the policy no longer covers them)."""
        session.set_max_streams(policy.max_streams)
        outside = [
            f"{listener.host}:{listener.key[1]}"
            for listener in session.tunnels.values()
            if listener.port is not None
            and (
                not (policy.permits_port(listener.key[1]) and policy.permits_address(listener.host))
                or (dual_stack(listener) and not policy.permits_address(IPV4_ANY))
            )
        ]
        outside += self.hostnames.not_permitted(session, policy)
        if outside:
            self.log.warn(
                "client {name}'s new policy does not cover its open port(s) or hostname(s) {ports}; they "
                "stay open until its session ends (remove the client to close them now)",
                name=session.credential, ports=", ".join(outside),
                event="policy_mismatch", session=session.id[:8], credential=session.credential,
            )

    # ------------------------------------------------------------ admission

    def connection_refused_over_cap(self, host: str = "?", reason: str = MOST_HELD) -> None:
        """Log a control connection from `host` refused by the guard: the
        first at once, then at most one summary line every 10 s per reason,
        the last one 10 s after the previous line (a flood must not flood
        the log too)."""
        guard = self.guard
        if reason == PER_ADDRESS:
            self._cap_refusals.refused(
                ("connections_capped", PER_ADDRESS, address_key(host)),
                "refusing new control connections from {host}: {n} of its connections are not "
                "authenticated yet, the most one address may have (--max-unauthenticated-per-address); "
                "{refused} refused since the last report",
                count_field="refused", event="connections_capped", reason="per_address",
                host=host, n=guard.waiting_from(host), refused_total=guard.refused_per_address,
            )
        else:
            self._cap_refusals.refused(
                ("connections_capped", MOST_HELD),
                "refusing new control connections: {n} are not authenticated yet, the maximum "
                "(--max-unauthenticated), and the newcomer's address {host} holds the most of them; "
                "{refused} refused since the last report",
                count_field="refused", event="connections_capped", reason="max_unauthenticated",
                n=guard.unauthenticated, host=host, refused_total=guard.refused_connections,
            )

    def connection_evicted(self, link: ServerLink) -> None:
        """Drop `link`, a connection still waiting to authenticate, to make
        room for a newcomer (the guard chose it and already forgot it)."""
        host = link.peer_host()
        self._cap_refusals.refused(
            ("connections_evicted",),
            "{n} control connections are not authenticated yet (--max-unauthenticated): dropped "
            "the oldest of the address holding the most ({host}, {held}) to make room for a new "
            "one; {dropped} dropped since the last report",
            count_field="dropped", event="connections_evicted",
            n=self.guard.unauthenticated, host=host, held=self.guard.waiting_from(host) + 1,
            dropped_total=self.guard.evicted,
        )
        link.abort()

    # ------------------------------------------------------------ sessions

    def resumable(self, credential: str, resume: wire.ResumeRequest | None) -> ServerSession | None:
        """The existing session `resume` proves it may take over, if any."""
        if resume is None:
            return None
        existing = self.sessions.get(resume.session)
        if (
            existing is not None
            and existing.credential == credential
            and hmac.compare_digest(resume.secret.encode(), existing.secret.encode())
        ):
            return existing
        return None

    def make_room_for_session(self, credential: str) -> bool:
        """Before a new session of `credential`: True if it stays within
        --max-sessions-per-client. At the limit, the oldest *detached*
        session of the credential (its client restarted rather than
        resumed) is expired to make room; only connected ones block."""
        mine = [s for s in self.sessions.values() if s.credential == credential]
        if len(mine) < self.config.max_sessions_per_client:
            return True
        detached = [s for s in mine if s.detached]
        if not detached:
            return False
        detached[0].expire("its client opened a new session (at --max-sessions-per-client)")
        return True

    def session_for(self, credential: str, resume: wire.ResumeRequest | None) -> tuple[ServerSession, bool]:
        """The session to resume, if the request proves it; else a new one."""
        existing = self.resumable(credential, resume)
        self.events.reconnects[credential] += resume is not None
        if existing is not None:
            self.events.resumes[credential] += 1
            return existing, True
        if resume is not None:
            self.log.info(
                "resume of an unknown or expired session refused; starting a new one",
                event="resume_refused", credential=credential,
            )
        session = ServerSession(self, credential)
        self.sessions[session.id] = session
        self.events.sessions_started[credential] += 1
        return session, False

    # ------------------------------------------------------------ shutdown

    def _streams_to_drain(self) -> bool:
        return any(s.mux_session.streams for s in self.sessions.values() if s.attached)

    def stream_closed(self) -> None:
        if self._drained is not None and not self._streams_to_drain():
            d, self._drained = self._drained, None
            d.callback(None)

    def shutdown(self, drain_timeout: float = 5.0) -> defer.Deferred[None]:
        """GOAWAY to every client, close listeners, let streams drain, close."""
        self.ports.shutting_down = True
        for link in list(self.links):
            if link.session is not None and link.session.can_send:  # not between RESUMEs
                link.send(wire.encode_coded(FrameType.GOAWAY, 0, ErrorCode.SHUTDOWN, "server shutting down"))
        stops = self.ports.close_all() + self.udp.close_all()
        self.hostnames.close_all()
        drained: defer.Deferred[None] = defer.Deferred()
        if self._streams_to_drain():
            self._drained = drained
            def drain_ended() -> None:
                if not drained.called:
                    drained.callback(None)

            timeout = self.reactor.callLater(drain_timeout, drain_ended)
            drained.addBoth(lambda r: timeout.active() and timeout.cancel() or r)
        else:
            drained.callback(None)

        def close_all(_: object) -> defer.Deferred[Any]:
            self._drained = None
            closing = [link.closed for link in list(self.links)]
            for session in list(self.sessions.values()):
                session.expire("server shutting down", abort_link=False)
            for link in list(self.links):
                link.lose()
            self.credentials.stop()
            for refusals in (self._cap_refusals, self.refusals, self.visitor_gate):
                refusals.stop()
            return defer.gatherResults(closing + stops)

        return drained.addCallback(close_all).addCallback(lambda _: None)

