"""Prometheus metrics of a fleet member (docs/metrics.md, "Fleet"): etcd
calls (count, errors, latency histogram per operation), the member's
lease and fencing, members up and claims fleet-wide. Built at scrape
time from the plain counters of rtunnel.fleet.etcd.EtcdStats, like
rtunnel.metrics' collectors; every family is labelled with this member."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from rtunnel.fleet.etcd import LATENCY_BUCKETS

if TYPE_CHECKING:
    from rtunnel.fleet.service import Fleet


class FleetCollector:
    """The metrics of one Fleet (`source()` returns it, or None when the server is alone)."""

    def __init__(self, source: Callable[[], Fleet | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        fleet = self.source()
        if fleet is None:
            return
        me = fleet.name
        stats = fleet.etcd.stats
        calls = CounterMetricFamily(
            "rtunnel_fleet_etcd_calls", "etcd calls of this member, by operation (each URL tried counts).",
            labels=["member", "op"],
        )
        errors = CounterMetricFamily(
            "rtunnel_fleet_etcd_errors", "etcd calls that failed (unreachable, timed out, refused).",
            labels=["member", "op"],
        )
        latency = HistogramMetricFamily(
            "rtunnel_fleet_etcd_latency_seconds", "Time of each etcd call, by operation.",
            labels=["member", "op"],
        )
        for op in sorted(stats.calls):
            calls.add_metric([me, op], stats.calls[op])
            errors.add_metric([me, op], stats.errors[op])
            counts = stats.buckets.get(op, [0] * (len(LATENCY_BUCKETS) + 1))
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([me, op], buckets, stats.seconds[op])
        yield calls
        yield errors
        yield latency
        member = fleet.member
        fenced = GaugeMetricFamily(
            "rtunnel_fleet_fenced", "1 while this member cannot prove its etcd lease alive (it accepts "
            "no new visitors and no new claims).", labels=["member"],
        )
        fenced.add_metric([me], 1 if member.fenced else 0)
        yield fenced
        registrations = CounterMetricFamily(
            "rtunnel_fleet_registrations", "Times this member registered under a new lease (1: never lost it).",
            labels=["member"],
        )
        registrations.add_metric([me], member.registrations)
        yield registrations
        up = GaugeMetricFamily("rtunnel_fleet_members", "Members registered in the fleet now.", labels=["member"])
        up.add_metric([me], len(fleet.directory.members))
        yield up
        each = GaugeMetricFamily(
            "rtunnel_fleet_member_up", "1 for each member registered in the fleet now (under a live lease), as "
            "this member sees it.", labels=["member", "peer"],
        )
        for peer in sorted(fleet.directory.members):
            each.add_metric([me, peer], 1)
        yield each
        links = fleet.links
        edge = GaugeMetricFamily(
            "rtunnel_fleet_edge_names", "Names held at other members that this member serves now (its edge "
            "listeners), by their home.", labels=["member", "home"],
        )
        now = GaugeMetricFamily(
            "rtunnel_fleet_forwarded_visitors", "Visitors at this member (their edge) carried to, or waiting for, "
            "another member now.", labels=["member"],
        )
        if links is not None:
            homes: dict[str, int] = {}
            for forward in list(links.forwards.values()):
                homes[forward.home] = homes.get(forward.home, 0) + 1
            for home, count in sorted(homes.items()):
                edge.add_metric([me, home], count)
            now.add_metric([me], links.forwarded_visitors)
        yield edge
        yield now
        claims = GaugeMetricFamily(
            "rtunnel_fleet_claims", "Claims in the fleet now, by the member holding them.",
            labels=["member", "holder"],
        )
        held: dict[str, int] = {}
        for record, _ in fleet.directory.claims.values():
            held[record.member] = held.get(record.member, 0) + 1
        for holder, count in sorted(held.items()):
            claims.add_metric([me, holder], count)
        yield claims
        lost = CounterMetricFamily(
            "rtunnel_fleet_claims_lost", "Claims of this member taken at another member (a newer session "
            "of the credential there, or after this member's lease expired).", labels=["member"],
        )
        lost.add_metric([me], fleet.claims.lost)
        yield lost
        expiry = GaugeMetricFamily(
            "rtunnel_fleet_edge_certificate_expiry_timestamp_seconds", "When the ACME certificate this member "
            "fetched from a hostname's home, and serves, expires (notAfter, Unix time).",
            labels=["member", "hostname", "home"],
        )
        hosts = fleet.hosts  # rtunnel.fleet.hostedge.HostEdge, with --http/--https and member links
        if hosts is not None:
            for name, (home, certificate) in sorted(hosts.certs.held.items()):
                expiry.add_metric([me, name, home], certificate.not_after)
        yield expiry
