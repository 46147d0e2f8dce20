"""Prometheus metrics of a server or a client, served by twisted.web.

Cost design: nothing here runs per frame. The ends keep plain ints (see
rtunnel.counters); at scrape time a collector walks the live server or
client (its sessions and open streams, plus the totals folded in when
streams closed) and builds the metric families. A scrape costs one walk over
the open streams.

Each process has a CollectorRegistry of its own (never the global one), so
several servers and clients can run in one process (tests do).

To add metrics, add a method yielding families to a collector and list it
in its `sections`; see docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from rtunnel.client import TunnelClient
from rtunnel.counters import StreamTotals, Traffic
from rtunnel.errors import ConfigError
from rtunnel.mux import Session
from rtunnel.server import ServerSession, SessionState, TunnelServer
from rtunnel.web import QuietSite

PATH = b"metrics"


# ---------------------------------------------------------------- collectors


class _StreamFamilies:
    """The per-(client, tunnel) stream families, filled from live streams
    and from the folded totals of closed ones."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.open = GaugeMetricFamily(
            "rtunnel_streams_open", "Tunnelled connections open now.", labels=labels
        )
        self.opened = CounterMetricFamily(
            "rtunnel_streams_opened", "Tunnelled connections opened.", labels=labels
        )
        self.bytes = CounterMetricFamily(
            "rtunnel_stream_bytes",
            "Bytes carried by tunnelled connections; direction in: from visitors towards the "
            "service, out: from the service back to visitors.",
            labels=[*labels, "direction"],
            unit="bytes",
        )
        self.blocked = CounterMetricFamily(
            "rtunnel_stream_flow_control_blocked",
            "Seconds tunnelled connections spent with bytes to send and no flow-control "
            "credit from the peer (summed over connections).",
            labels=labels,
            unit="seconds",
        )

    def add(self, key: tuple[str, ...], live: StreamTotals, closed: StreamTotals | None) -> None:
        total = StreamTotals(live.streams, live.bytes_in, live.bytes_out, live.blocked_seconds)
        if closed is not None:
            total.streams += closed.streams
            total.bytes_in += closed.bytes_in
            total.bytes_out += closed.bytes_out
            total.blocked_seconds += closed.blocked_seconds
        values = list(key)
        self.open.add_metric(values, live.streams)
        self.opened.add_metric(values, total.streams)
        self.bytes.add_metric([*values, "in"], total.bytes_in)
        self.bytes.add_metric([*values, "out"], total.bytes_out)
        self.blocked.add_metric(values, total.blocked_seconds)

    def families(self) -> list[Metric]:
        return [self.open, self.opened, self.bytes, self.blocked]


def _tunnel_label(owner: ServerSession, tunnel_id: int) -> str:
    return owner.tunnel_names.get(tunnel_id, "?")


def _live_totals(
    traffic: Traffic, sessions: Iterable[tuple[str, Session, Callable[[int], str]]], now: float
) -> dict[tuple[str, str], StreamTotals]:
    """Sum the open streams of `sessions` (client, session, tunnel id ->
    name) per (client, tunnel)."""
    live: dict[tuple[str, str], StreamTotals] = {}
    for client, session, name_of in sessions:
        for stream in list(session.streams.values()):
            key = (client, name_of(stream.tunnel_id))
            totals = live.get(key)
            if totals is None:
                totals = live[key] = StreamTotals()
            bytes_in, bytes_out = traffic.directions(stream)
            totals.streams += 1
            totals.bytes_in += bytes_in
            totals.bytes_out += bytes_out
            totals.blocked_seconds += stream.blocked_seconds_at(now)
    return live


class ServerCollector:
    """The metrics of one TunnelServer (`source()` returns it, or None
    before it exists)."""

    def __init__(self, source: Callable[[], TunnelServer | None]) -> None:
        self.source = source
        self.sections: list[Callable[[TunnelServer], Iterable[Metric]]] = [
            self.sessions,
            self.streams,
            self.admission,
            self.limits,
            self.fleet,
            self.hostnames,
            self.udp,
        ]

    def collect(self) -> Iterator[Metric]:
        server = self.source()
        if server is None:
            return
        for section in self.sections:
            yield from section(server)

    def sessions(self, server: TunnelServer) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "rtunnel_sessions", "Client sessions by state (detached: link down, within the "
            "resume grace).", labels=["state"],
        )
        counts = {SessionState.CONNECTED: 0, SessionState.DETACHED: 0}
        for owner in list(server.sessions.values()):
            if owner.state in counts:
                counts[owner.state] += 1
        for state, n in counts.items():
            states.add_metric([state.value], n)
        yield states
        events = server.events
        started = CounterMetricFamily(
            "rtunnel_sessions_started", "New sessions (not resumes).", labels=["client"]
        )
        reconnects = CounterMetricFamily(
            "rtunnel_reconnects",
            "Authenticated handshakes that asked to resume a session (granted or not).",
            labels=["client"],
        )
        resumes = CounterMetricFamily(
            "rtunnel_resumes", "Sessions resumed over a new link.", labels=["client"]
        )
        clients = sorted(set(events.sessions_started) | set(events.reconnects) | set(events.resumes))
        for family, counter in (
            (started, events.sessions_started), (reconnects, events.reconnects), (resumes, events.resumes),
        ):
            for client in clients:
                family.add_metric([client], counter[client])
            yield family
        yield GaugeMetricFamily(
            "rtunnel_tunnels", "Public TCP ports bound for clients now.", value=len(server.listeners)
        )
        yield GaugeMetricFamily(
            "rtunnel_udp_tunnels", "Public UDP ports bound for clients now.", value=len(server.udp.tunnels)
        )

    def hostnames(self, server: TunnelServer) -> Iterator[Metric]:
        """The shared HTTP/HTTPS ports (#15), by hostname."""
        routes = server.hostnames
        if "http" not in server.tunnel_kinds:
            return
        yield GaugeMetricFamily("rtunnel_hostnames", "Hostnames claimed by clients now.", value=len(routes.tunnels))
        requests = CounterMetricFamily(
            "rtunnel_http_requests", "Requests routed to a hostname's tunnel.", labels=["hostname"])
        responses = CounterMetricFamily(
            "rtunnel_http_responses", "Responses by hostname and status class.", labels=["hostname", "class"])
        traffic = CounterMetricFamily(
            "rtunnel_http_bytes", "Bytes of requests (in) and responses (out) by hostname.",
            labels=["hostname", "direction"])
        passthrough = CounterMetricFamily(
            "rtunnel_tls_passthrough_connections", "TLS connections passed through by SNI.", labels=["hostname"])
        for name, stats in sorted(routes.stats.items()):
            requests.add_metric([name], stats.requests)
            for status_class, n in sorted(stats.statuses.items()):
                responses.add_metric([name, status_class], n)
            traffic.add_metric([name, "in"], stats.bytes_in)
            traffic.add_metric([name, "out"], stats.bytes_out)
            passthrough.add_metric([name], stats.tls_passthrough)
        yield from (requests, responses, traffic, passthrough)
        answers = CounterMetricFamily(
            "rtunnel_http_edge_answers", "Answers the edge gave itself (404 unknown host, 400 malformed, "
            "408, 431, 502 offline, 308 redirect...), by status.", labels=["status"])
        for status, n in sorted(routes.edge_answers.items()):
            answers.add_metric([str(status)], n)
        yield answers
        expiry = getattr(routes.certificates, "expiry", None)
        if expiry is not None:
            family = GaugeMetricFamily(
                "rtunnel_certificate_expiry_timestamp_seconds", "When the HTTPS certificate for a name expires.",
                labels=["hostname"])
            for name, when in sorted(expiry().items()):
                family.add_metric([name], when)
            yield family

    def streams(self, server: TunnelServer) -> Iterator[Metric]:
        live = _live_totals(
            server.traffic,
            (
                (owner.credential, owner.mux_session, partial(_tunnel_label, owner))
                for owner in list(server.sessions.values())
            ),
            server.reactor.seconds(),
        )
        families = _StreamFamilies(["client", "tunnel"])
        closed = server.traffic.closed
        for key in sorted(set(live) | set(closed)):
            families.add(key, live.get(key, StreamTotals()), closed.get(key))
        yield from families.families()

    def admission(self, server: TunnelServer) -> Iterator[Metric]:
        guard, events = server.guard, server.events
        yield GaugeMetricFamily(
            "rtunnel_control_links", "Control connections open now (authenticated or not).",
            value=len(server.links),
        )
        yield GaugeMetricFamily(
            "rtunnel_unauthenticated_links", "Control connections not authenticated yet.",
            value=guard.unauthenticated,
        )
        yield CounterMetricFamily(
            "rtunnel_links_accepted", "Control connections accepted.", value=events.links_accepted
        )
        yield CounterMetricFamily(
            "rtunnel_auth_failures", "Handshakes with a wrong token (or unknown certificate).",
            value=guard.failures,
        )
        dropped = CounterMetricFamily(
            "rtunnel_handshakes_dropped",
            "Control connections dropped before authenticating; reason deadline: no handshake "
            "in time, unauthenticated_cap: at --max-unauthenticated from the address holding the "
            "most, per_address_cap: over --max-unauthenticated-per-address, evicted: the oldest "
            "of the address holding the most, dropped at --max-unauthenticated for a newcomer, "
            "rate_limited: too many failures from the address.",
            labels=["reason"],
        )
        dropped.add_metric(["deadline"], events.handshakes_expired)
        dropped.add_metric(["unauthenticated_cap"], guard.refused_connections)
        dropped.add_metric(["per_address_cap"], guard.refused_per_address)
        dropped.add_metric(["evicted"], guard.evicted)
        dropped.add_metric(["rate_limited"], guard.refused_attempts)
        yield dropped

    def limits(self, server: TunnelServer) -> Iterator[Metric]:
        """Per-client limits (rtunnel.limits): the configured rates, the bytes
        and seconds of each paced direction, the configured
        max_connections_per_tunnel and visitors refused by it (clients
        without limits have none of these series), and the visitors
        connected to each tunnel now (what that limit counts)."""
        rate = GaugeMetricFamily(
            "rtunnel_bandwidth_limit_bytes_per_second",
            "Configured bandwidth limit of a client; direction to_client: what visitors send "
            "towards the client's service, from_client: the service's replies.",
            labels=["client", "direction"],
        )
        paced = CounterMetricFamily(
            "rtunnel_bandwidth_paced_bytes",
            "Bytes counted against a client's bandwidth limit.", labels=["client", "direction"],
        )
        held = CounterMetricFamily(
            "rtunnel_bandwidth_held_seconds",
            "Seconds streams of a client waited for bandwidth tokens (from_client: only the "
            "time a window grant waited).", labels=["client", "direction"],
        )
        refused = CounterMetricFamily(
            "rtunnel_visitors_refused_connection_limit",
            "Visitors closed at once because a tunnel had max_connections_per_tunnel open.",
            labels=["client", "tunnel"],
        )
        connection_limit = GaugeMetricFamily(
            "rtunnel_connection_limit",
            "Configured max_connections_per_tunnel of a client (visitors connected at once to "
            "each of its tunnels).", labels=["client"],
        )
        connections_open = GaugeMetricFamily(
            "rtunnel_tunnel_connections_open",
            "Visitors connected to a tunnel's public port now, as max_connections_per_tunnel "
            "counts them.", labels=["client", "tunnel"],
        )
        for listener in list(server.listeners.values()):
            owner = listener.owner
            if owner is not None:
                name = owner.tunnel_names.get(listener.tunnel_id, "?")
                connections_open.add_metric([owner.credential, name], listener.open_connections)
        now = server.reactor.seconds()
        for client, limiter in sorted(server.limiters.items()):
            if limiter.limits.max_connections_per_tunnel is not None:
                connection_limit.add_metric([client], limiter.limits.max_connections_per_tunnel)
            for direction, pacer in (("to_client", limiter.to_client), ("from_client", limiter.from_client)):
                if pacer is None:
                    continue
                rate.add_metric([client, direction], pacer.rate)
                paced.add_metric([client, direction], pacer.bytes)
                held.add_metric([client, direction], pacer.held_seconds_at(now))
            for tunnel, n in sorted(limiter.refused_by_tunnel.items()):
                refused.add_metric([client, tunnel], n)
        yield from (rate, paced, held, connection_limit, connections_open, refused)


    def fleet(self, server: TunnelServer) -> Iterator[Metric]:
        """Member links (rtunnel.fleet.links), in a fleet only."""
        links = server.fleet_links
        if links is None:
            return
        forwarded = CounterMetricFamily(
            "rtunnel_fleet_visitors_forwarded",
            "Visitors this member (their edge) carried to the member holding their tunnel.", labels=["home"],
        )
        for home, n in sorted(links.visitors_forwarded.items()):
            forwarded.add_metric([home], n)
        yield forwarded
        received = CounterMetricFamily(
            "rtunnel_fleet_visitors_received",
            "Visitors other members (their edge) carried to this member's tunnels.", labels=["edge"],
        )
        for edge, n in sorted(links.visitors_received.items()):
            received.add_metric([edge], n)
        yield received
        waiting = GaugeMetricFamily(
            "rtunnel_fleet_visitors_waiting",
            "Visitors at this member waiting for the member link to their tunnel's home.", labels=["home"],
        )
        for home, peer in sorted(links.peers.items()):
            waiting.add_metric([home], len(peer.waiting))
        yield waiting
        up = GaugeMetricFamily(
            "rtunnel_fleet_member_links", "Member links up now (out: dialled by this member).",
            labels=["member", "direction"],
        )
        for member, direction, _ in sorted(links.live_links(), key=lambda live: live[:2]):
            up.add_metric([member, direction], 1)
        yield up
        link_bytes = CounterMetricFamily(
            "rtunnel_fleet_member_link_bytes", "Bytes of member-link frames (TLS not counted).",
            labels=["member", "direction"],
        )
        for (member, direction), n in sorted(links.link_bytes().items()):
            link_bytes.add_metric([member, direction], n)
        yield link_bytes
    def udp(self, server: TunnelServer) -> Iterator[Metric]:
        """UDP tunnels (docs/udp.md): flows, datagrams and bytes each way,
        drops by reason, per bound UDP port (counted while it is bound)."""
        families = _UdpFamilies(["client", "tunnel"], "to_client", "from_client")
        for tunnel in list(server.udp.tunnels.values()):
            owner = tunnel.owner
            if owner is None:
                continue
            families.add(
                [owner.credential, owner.tunnel_names.get(tunnel.tunnel_id, "?")], len(tunnel.flows),
                tunnel.flows_opened, (tunnel.datagrams_in, tunnel.bytes_in),
                (tunnel.datagrams_out, tunnel.bytes_out), tunnel.drops,
            )
        yield from families.families()


class _UdpFamilies:
    """rtunnel_udp_*: one set of series per UDP tunnel."""

    def __init__(self, labels: list[str], inward: str, outward: str) -> None:
        self.inward, self.outward = inward, outward
        self.flows = GaugeMetricFamily("rtunnel_udp_flows", "UDP flows (visitor addresses) now.", labels=labels)
        self.opened = CounterMetricFamily("rtunnel_udp_flows_opened", "UDP flows opened.", labels=labels)
        self.datagrams = CounterMetricFamily(
            "rtunnel_udp_datagrams", "Datagrams of UDP tunnels; direction to_client: from visitors "
            "towards the client's service, from_client: its replies.", labels=[*labels, "direction"],
        )
        self.bytes = CounterMetricFamily(
            "rtunnel_udp_bytes", "Payload bytes of those datagrams.", labels=[*labels, "direction"],
        )
        self.dropped = CounterMetricFamily(
            "rtunnel_udp_dropped", "Datagrams dropped, by reason (docs/udp.md).", labels=[*labels, "reason"],
        )

    def add(
        self, key: list[str], flows: int, opened: int, inward: tuple[int, int], outward: tuple[int, int],
        drops: Any,
    ) -> None:
        self.flows.add_metric(key, flows)
        self.opened.add_metric(key, opened)
        for direction, (datagrams, size) in ((self.inward, inward), (self.outward, outward)):
            self.datagrams.add_metric([*key, direction], datagrams)
            self.bytes.add_metric([*key, direction], size)
        for reason, n in sorted(drops.items()):
            self.dropped.add_metric([*key, reason], n)

    def families(self) -> list[Metric]:
        return [self.flows, self.opened, self.datagrams, self.bytes, self.dropped]


class ClientCollector:
    """The metrics of one TunnelClient."""

    def __init__(self, client: TunnelClient) -> None:
        self.client = client
        self.sections: list[Callable[[TunnelClient], Iterable[Metric]]] = [
            self.link,
            self.streams,
            self.udp,
            # `limits` adds its section here, if the client gets limits
        ]

    def collect(self) -> Iterator[Metric]:
        for section in self.sections:
            yield from section(self.client)

    def link(self, client: TunnelClient) -> Iterator[Metric]:
        events = client.events
        session = client.session
        up = session is not None and session.link is not None and client.link is not None
        yield GaugeMetricFamily(
            "rtunnel_client_link_up", "1 while a link to the server carries the session.",
            value=int(up),
        )
        for name, doc, value in (
            ("rtunnel_client_connect_attempts", "Attempts to connect to the server (the first "
             "included).", events.connect_attempts),
            ("rtunnel_client_links_lost", "Links that carried the session and went down.",
             events.links_lost),
            ("rtunnel_client_sessions_started", "New sessions the server gave us.",
             events.sessions_started),
            ("rtunnel_client_resumes", "Times the session was resumed over a new link.",
             events.resumes),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "rtunnel_client_tunnels_bound", "Tunnels the server has bound for us now.",
            value=len(client.bound),
        )

    def streams(self, client: TunnelClient) -> Iterator[Metric]:
        sessions = []
        if client.session is not None:
            sessions.append(("", client.session, client.tunnel_name))
        live = _live_totals(client.traffic, sessions, client.reactor.seconds())
        families = _StreamFamilies(["tunnel"])
        closed = client.traffic.closed
        for key in sorted(set(live) | set(closed)):
            families.add(key[1:], live.get(key, StreamTotals()), closed.get(key))
        yield from families.families()

    def udp(self, client: TunnelClient) -> Iterator[Metric]:
        """The client's UDP tunnels: its flows (local sockets) and what went
        through them (`to_client`: from the server to the target)."""
        families = _UdpFamilies(["tunnel"], "to_client", "from_client")
        udp = client.udp
        for tunnel_id, counters in sorted(udp.tunnels.items()):
            families.add(
                [client.tunnel_name(tunnel_id)], udp.per_tunnel[tunnel_id], counters.flows_opened,
                (counters.datagrams_in, counters.bytes_in), (counters.datagrams_out, counters.bytes_out),
                counters.drops,
            )
        yield from families.families()


def registry_for(collector: Any) -> CollectorRegistry:
    """A registry of our own with `collector` and the process's figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


# ---------------------------------------------------------------- web


class MetricsPage(Resource):
    """GET /metrics: the registry in Prometheus text (or OpenMetrics, if the
    scraper asks for it). Rendered in the reactor thread, so collectors
    walk the live objects safely."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode())
        return body


def metrics_site(registry: CollectorRegistry) -> Site:
    root = Resource()
    root.putChild(PATH, MetricsPage(registry))
    return QuietSite(root)


class MetricsError(ConfigError):
    """The metrics endpoint could not listen."""


log = Logger()


@defer.inlineCallbacks
def listen_metrics(reactor: Any, endpoint: str, registry: CollectorRegistry) -> Any:
    """Serve `registry` at /metrics on `endpoint`; fires with the port.
    Fails with MetricsError saying what to change."""
    try:
        port = yield serverFromString(reactor, endpoint).listen(metrics_site(registry))
    except Exception as e:
        raise MetricsError(
            f"cannot serve metrics on {endpoint}: {e}; choose another --metrics port or "
            "stop the program using it"
        ) from None
    address = port.getHost()
    log.info(
        "metrics at http://{host}:{port}/metrics",
        host=getattr(address, "host", "?"), port=getattr(address, "port", 0), endpoint=endpoint,
    )
    return port


class MetricsService(service.Service):
    """Serves a registry while running; calls `on_failure(message)` if the
    endpoint cannot listen."""

    def __init__(
        self, reactor: Any, endpoint: str, registry: CollectorRegistry,
        on_failure: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.registry = registry
        self.on_failure = on_failure
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred[IListeningPort | None] = defer.Deferred()  # None: failed

    def startService(self) -> None:
        super().startService()
        d = listen_metrics(self.reactor, self.endpoint, self.registry)

        def listening(port: IListeningPort) -> None:
            self.port = port
            self.ready.callback(port)

        def failed(failure: Failure) -> None:
            self.ready.callback(None)
            self.on_failure(failure.getErrorMessage())

        d.addCallbacks(listening, failed)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        stopping = port.stopListening() if port is not None else None
        return stopping if stopping is not None else defer.succeed(None)
