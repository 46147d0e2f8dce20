"""rtunnel.fleet against a real etcd (Debian's etcd-server on loopback): the
JSON-gateway client, members' leases and fencing, and FleetClaims' races
(docs/fleet.md). Holders are plain values as in tests/test_server_claims.py;
etcd, its leases and its watch are real."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from rtunnel.fleet.claims import FleetClaims
from rtunnel.fleet.directory import FleetDirectory
from rtunnel.fleet.etcd import EtcdClient, EtcdUnavailable, compare_create, op_put
from rtunnel.fleet.keys import ClaimRecord
from rtunnel.fleet.members import FleetMember
from rtunnel.server.claims import ClaimRefused, TcpPort
from tests.etcd import SKIP_NO_ETCD, start_cluster, start_etcd
from tests.faultproxy import FaultProxy
from tests.harness import Echo, LogCapture, Tunnel, free_port, listen_target, sleep, wait_until

PORT = TcpPort("127.0.0.1", 4000)
DEFAULT = TcpPort("::", 4000)


@dataclass(eq=False)
class Holder:
    """A session as the registry sees it."""

    credential: str
    serial: int
    id: str = "s"
    busy: set[int] = field(default_factory=set)

    def still_wants(self, tag: int) -> bool:
        return tag not in self.busy


class Member:
    """One fleet member's registry, without a TunnelServer: etcd client,
    lease, directory, claims."""

    def __init__(self, test: TestCase, urls: list[str], name: str, ttl: int = 5, public_host: str = "::") -> None:
        self.etcd = EtcdClient(reactor, urls, timeout=min(2.0, ttl / 3))
        self.member = FleetMember(reactor, self.etcd, "/t/", name, {"link": ""}, ttl=ttl)
        self.directory = FleetDirectory(self.etcd, "/t/", name, public_host)
        self.directory.is_fenced = lambda: self.member.fenced
        self.claims: FleetClaims[Holder] = FleetClaims(
            reactor, self.etcd, "/t/", self.member, self.directory, frozenset({public_host}),
        )
        self.lost: list[tuple[Any, str]] = []
        self.claims.on_lost = lambda claim, code: self.lost.append((claim, code))
        test.addCleanup(self.stop)

    @defer.inlineCallbacks
    def start(self) -> Any:
        yield self.member.start()
        self.directory.start()
        yield wait_until(lambda: self.directory.synced)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        self.claims.stop()
        self.directory.stop()
        yield self.member.stop()  # again is harmless
        yield self.etcd.close()

    @defer.inlineCallbacks
    def take(self, name: Any, holder: Holder, tag: int) -> Any:
        """acquire + claim, as ServerSession._bind does."""
        yield self.claims.acquire(name, holder, tag)
        return self.claims.claim(name, holder, tag)


class EtcdClientTests(TestCase):
    timeout = 60
    skip = SKIP_NO_ETCD

    def setUp(self) -> None:
        self.node = start_etcd(self, Path(self.mktemp()).absolute())

    @defer.inlineCallbacks
    def test_put_range_txn_delete_and_a_create_only_txn_that_loses(self) -> Any:
        etcd = EtcdClient(reactor, [self.node.url])
        self.addCleanup(etcd.close)
        yield etcd.put("/a/1", b"one")
        kvs, revision = yield etcd.range("/a/", prefix=True)
        self.assertEqual([(kv.key, kv.value) for kv in kvs], [("/a/1", b"one")])
        self.assertGreater(revision, 0)
        ok, _, _ = yield etcd.txn([compare_create("/a/1")], [op_put("/a/1", b"two")])
        self.assertFalse(ok)  # it exists: the create-only put does nothing
        self.assertEqual((yield etcd.get("/a/1")).value, b"one")
        self.assertEqual((yield etcd.delete("/a/", prefix=True)), 1)
        self.assertIsNone((yield etcd.get("/a/1")))
        self.assertEqual(etcd.stats.errors["put"], 0)
        self.assertEqual(etcd.stats.calls["range"], 3)

    @defer.inlineCallbacks
    def test_a_dead_url_is_skipped_for_the_next_and_the_error_names_every_url(self) -> Any:
        dead = "http://127.0.0.1:9"  # discard: nothing listens
        etcd = EtcdClient(reactor, [dead, self.node.url], timeout=1.0)
        self.addCleanup(etcd.close)
        yield etcd.put("/b", b"x")
        self.assertEqual(etcd.stats.errors["put"], 1)  # the dead one, timed and counted
        alone = EtcdClient(reactor, [dead], timeout=1.0)
        self.addCleanup(alone.close)
        with self.assertRaises(EtcdUnavailable) as caught:
            yield alone.get("/b")
        self.assertIn("127.0.0.1:9", str(caught.exception))
        self.assertIn("--fleet-etcd", str(caught.exception))

    @defer.inlineCallbacks
    def test_a_watch_resumes_from_its_last_revision_after_etcd_restarts(self) -> Any:
        etcd = EtcdClient(reactor, [self.node.url], timeout=1.0)
        self.addCleanup(etcd.close)
        seen: list[tuple[str, bytes, bool]] = []
        snapshots: list[int] = []
        watch = etcd.watch(
            "/w/", lambda kvs, rev: snapshots.append(len(kvs)),
            lambda events, rev: seen.extend((e.kv.key, e.kv.value, e.deleted) for e in events),
        )
        yield wait_until(lambda: watch.connected)
        yield etcd.put("/w/1", b"a")
        yield wait_until(lambda: len(seen) == 1)
        self.node.stop()
        writer_node = self.node
        yield sleep(0.3)
        writer_node.start()
        yield threads.deferToThread(writer_node.wait_healthy)
        yield etcd.put("/w/2", b"b")  # may land before the watch is back: it must not be missed
        yield etcd.delete("/w/1")
        yield wait_until(lambda: len(seen) == 3, 15)
        self.assertEqual(seen, [("/w/1", b"a", False), ("/w/2", b"b", False), ("/w/1", b"", True)])
        self.assertEqual(snapshots, [0])  # resumed by revision: no second snapshot
        self.assertGreaterEqual(watch.reconnects, 1)


class WatchCompactionTests(TestCase):
    timeout = 60
    skip = SKIP_NO_ETCD

    @defer.inlineCallbacks
    def test_a_watch_that_missed_compacted_revisions_reads_everything_again(self) -> Any:
        node = start_etcd(self, Path(self.mktemp()).absolute())
        proxy = FaultProxy(reactor, "127.0.0.1", node.client_port)
        port = proxy.listen()
        self.addCleanup(proxy.stop)
        watcher = EtcdClient(reactor, [f"http://127.0.0.1:{port}"], timeout=1.0)
        writer = EtcdClient(reactor, [node.url])
        self.addCleanup(watcher.close)
        self.addCleanup(writer.close)
        yield writer.put("/c/gone", b"1")
        state: dict[str, bytes] = {}
        snapshots: list[int] = []

        def snapshot(kvs: Any, revision: int) -> None:
            snapshots.append(len(kvs))
            state.clear()
            state.update({kv.key: kv.value for kv in kvs})

        def events(evs: Any, revision: int) -> None:
            for e in evs:
                if e.deleted:
                    state.pop(e.kv.key, None)
                else:
                    state[e.kv.key] = e.kv.value

        watch = watcher.watch("/c/", snapshot, events)
        yield wait_until(lambda: watch.connected)
        proxy.blackhole()  # the watch hears nothing from now on
        yield writer.delete("/c/gone")
        yield writer.put("/c/new", b"2")
        _, revision = yield writer.range("/c/", prefix=True)
        yield writer.call("compaction", "/v3/kv/compaction", {"revision": str(revision), "physical": True})
        proxy.heal()
        watch.restart()  # as a member does when etcd answers again
        yield wait_until(lambda: len(snapshots) == 2, 15)
        self.assertEqual(state, {"/c/new": b"2"})


class FleetClaimsTests(TestCase):
    timeout = 60
    skip = SKIP_NO_ETCD

    def setUp(self) -> Any:
        self.node = start_etcd(self, Path(self.mktemp()).absolute())
        self.one = Member(self, [self.node.url], "m1")
        self.two = Member(self, [self.node.url], "m2")
        return defer.gatherResults([self.one.start(), self.two.start()])

    @defer.inlineCallbacks
    def test_two_credentials_racing_for_one_port_on_two_members_get_exactly_one_owner(self) -> Any:
        for round_ in range(10):
            name = TcpPort("::", 5000 + round_)
            alice, bob = Holder("alice", 1), Holder("bob", 2)
            results = yield defer.DeferredList(
                [self.one.take(name, alice, 1), self.two.take(name, bob, 1)], consumeErrors=True,
            )
            won = [ok for ok, _ in results]
            self.assertEqual(sorted(won), [False, True], f"round {round_}: {results}")
            loser = results[won.index(False)][1]
            self.assertEqual(loser.value.code, ClaimRefused.IN_USE)
            kv = yield self.one.etcd.get(f"/t/claims/tcp/default/{5000 + round_}")
            record = ClaimRecord.decode(kv.value)
            self.assertEqual(record.credential, "alice" if won[0] else "bob")

    @defer.inlineCallbacks
    def test_a_newer_session_of_the_same_credential_on_another_member_takes_the_port_over(self) -> Any:
        old, new = Holder("alice", 1, "old"), Holder("alice", 2, "new")
        yield self.one.take(DEFAULT, old, 1)
        yield self.two.take(DEFAULT, new, 3)
        yield wait_until(lambda: self.one.lost)
        claim, code = self.one.lost[0]
        self.assertEqual((claim.holder, code), (old, ClaimRefused.TAKEN_OVER))
        self.assertIsNone(self.one.claims.holder(DEFAULT))
        # the old one asking again waits (taken_over, repeated), and bob never gets it
        with self.assertRaises(ClaimRefused) as caught:
            yield self.one.take(DEFAULT, old, 1)
        self.assertEqual(caught.exception.code, ClaimRefused.TAKEN_OVER)
        with self.assertRaises(ClaimRefused) as caught:
            yield self.one.take(DEFAULT, Holder("bob", 9), 1)
        self.assertEqual(caught.exception.code, ClaimRefused.IN_USE)

    @defer.inlineCallbacks
    def test_a_released_claim_is_free_fleet_wide_and_a_stopped_member_frees_its_claims_at_once(self) -> Any:
        alice = Holder("alice", 1)
        claimed = yield self.one.take(PORT, alice, 1)
        # seen at two first: "not in two's directory" also holds before two's watch saw it made
        yield wait_until(lambda: "claims/tcp/127.0.0.1/4000" in self.two.directory.claims)
        self.one.claims.release(claimed.claim)
        yield wait_until(lambda: "claims/tcp/127.0.0.1/4000" not in self.two.directory.claims)
        yield self.two.take(PORT, Holder("bob", 2), 1)
        yield self.one.take(DEFAULT, alice, 2)
        yield wait_until(lambda: "claims/tcp/default/4000" in self.two.directory.claims)
        started = time.monotonic()
        yield self.one.member.stop()  # revokes the lease
        yield wait_until(lambda: "claims/tcp/default/4000" not in self.two.directory.claims)
        self.assertLess(time.monotonic() - started, 2.0)


class FencingTests(TestCase):
    timeout = 60
    skip = SKIP_NO_ETCD

    @defer.inlineCallbacks
    def test_a_member_cut_off_from_etcd_is_fenced_before_its_lease_expires_and_reclaims_after(self) -> Any:
        node = start_etcd(self, Path(self.mktemp()).absolute())
        proxy = FaultProxy(reactor, "127.0.0.1", node.client_port)
        port = proxy.listen()
        self.addCleanup(proxy.stop)
        cut = Member(self, [f"http://127.0.0.1:{port}"], "m1", ttl=3)
        observer = Member(self, [node.url], "m2", ttl=3)
        yield cut.start()
        yield observer.start()
        alice = Holder("alice", 1)
        yield cut.take(DEFAULT, alice, 1)
        yield wait_until(lambda: "claims/tcp/default/4000" in observer.directory.claims)
        deleted_at: list[float] = []
        observer.directory.claim_listeners.append(
            lambda key, record, kv: deleted_at.append(time.time()) if record is None else None
        )
        proxy.blackhole()  # open and new connections: bytes go nowhere, nothing closes
        yield wait_until(lambda: deleted_at, 10)
        self.assertIsNotNone(cut.member.fenced_at)
        self.assertLess(cut.member.fenced_at, deleted_at[0])  # fenced before etcd let the lease go
        with self.assertRaises(ClaimRefused) as caught:
            yield cut.take(TcpPort("::", 4001), alice, 2)
        self.assertEqual(caught.exception.code, ClaimRefused.UNAVAILABLE)
        proxy.heal()
        yield wait_until(lambda: not cut.member.fenced, 15)
        # the lease was gone: registered again, and the claim made again
        yield wait_until(lambda: "claims/tcp/default/4000" in observer.directory.claims, 10)
        self.assertEqual(cut.member.registrations, 2)
        self.assertIs(cut.claims.holder(DEFAULT), alice)


class ClusterTests(TestCase):
    timeout = 90
    skip = SKIP_NO_ETCD

    @defer.inlineCallbacks
    def test_one_of_three_etcd_nodes_killed_loses_no_claim_and_no_lease(self) -> Any:
        nodes = start_cluster(self, Path(self.mktemp()).absolute())
        member = Member(self, [n.url for n in nodes], "m1", ttl=3)
        yield member.start()
        yield member.take(DEFAULT, Holder("alice", 1), 1)
        nodes[0].kill()
        yield sleep(4)  # longer than the TTL: the keepalive must have gone to another node
        self.assertFalse(member.member.fenced)
        self.assertEqual(member.member.registrations, 1)
        kv = yield member.etcd.get("/t/claims/tcp/default/4000")
        self.assertIsNotNone(kv)


class InProcessMemberTests(TestCase):
    """Two members (ServerService with --fleet-etcd) in this process, real
    clients: what a BIND sees."""

    timeout = 90
    skip = SKIP_NO_ETCD

    @defer.inlineCallbacks
    def test_racing_binds_of_two_credentials_on_two_members_bind_one_socket_and_never_bound_the_loser(self) -> Any:
        node = start_etcd(self, Path(self.mktemp()).absolute())
        logs = LogCapture(self)
        tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
        members = []
        for index in (1, 2):
            host = f"127.0.0.{index}"
            tunnel = Tunnel(self)
            yield tunnel.start_server(
                listen=f"tcp:0:interface={host}", public_host=host, extra_clients=tuple(tokens.items()),
                fleet_etcd=(node.url,), fleet_member=f"m{index}", fleet_lease_ttl=5,
            )
            members.append((tunnel, host))
        target = listen_target(self, Echo)[1]
        for round_ in range(5):
            port = free_port()
            for (tunnel, host), credential in zip(members, tokens, strict=True):
                config = tunnel.client_config([(port, target)], token=tokens[credential], server_host=host)
                config = replace(config, tunnels=(replace(config.tunnels[0], bind_host=""),))
                tunnel.start_client(config)
            yield wait_until(
                lambda port=port: len(logs.named("tunnel_bound", port=port)) + len(logs.named("bind_refused", port=port)) >= 2,
                20,
            )
            bound = logs.named("tunnel_bound", port=port)
            refused = logs.named("bind_refused", port=port)
            self.assertEqual(len(bound), 1, f"round {round_}: {[e['credential'] for e in bound]} bound {port}")
            self.assertEqual([e["code"] for e in refused], ["in_use"])
            self.assertNotEqual(bound[0]["credential"], refused[0]["credential"])
            for tunnel, _ in members:
                yield tunnel.client_service.stopService()
        self.assertEqual(logs.named("fleet_claim_lost"), [])
        self.assertEqual(logs.failures(), [])


class RestartedMemberTests(TestCase):
    timeout = 60
    skip = SKIP_NO_ETCD

    @defer.inlineCallbacks
    def test_a_member_restarted_under_the_same_name_keeps_the_rules_for_its_earlier_run_s_claims(self) -> Any:
        node = start_etcd(self, Path(self.mktemp()).absolute())
        first = Member(self, [node.url], "m1")
        yield first.start()
        yield first.take(DEFAULT, Holder("alice", 1), 1)
        first.member.stopped = True  # dies without revoking: its lease lives on for the TTL
        first.member._loop.stop()
        again = Member(self, [node.url], "m1")  # the same name, a new lease
        yield again.start()
        with self.assertRaises(ClaimRefused) as caught:
            yield again.take(DEFAULT, Holder("bob", 2), 1)
        self.assertEqual(caught.exception.code, ClaimRefused.IN_USE)
        yield again.take(DEFAULT, Holder("alice", 3), 1)  # the credential's own port: at once
        kv = yield again.etcd.get("/t/claims/tcp/default/4000")
        self.assertEqual(kv.lease, again.member.lease)


class NamesTests(TestCase):
    """Pure: keys, names and the member's advertised link endpoint."""

    def test_a_default_address_port_is_one_key_fleet_wide_and_stands_for_each_member_s_own_address(self) -> None:
        from rtunnel.fleet.keys import claim_key, claim_name
        from rtunnel.server.claims import Hostname, UdpPort

        defaults = frozenset({"127.0.0.2"})
        self.assertEqual(claim_key(TcpPort("127.0.0.2", 4000), defaults), "claims/tcp/default/4000")
        self.assertEqual(claim_key(TcpPort("10.0.0.1", 4000), defaults), "claims/tcp/10.0.0.1/4000")
        self.assertEqual(claim_key(UdpPort("127.0.0.2", 53), defaults), "claims/udp/default/53")
        self.assertEqual(claim_key(Hostname("a.example.com"), defaults), "claims/host/a.example.com")
        self.assertEqual(claim_name("claims/tcp/default/4000", "127.0.0.3"), TcpPort("127.0.0.3", 4000))
        self.assertEqual(claim_name("claims/host/a.example.com", "::"), Hostname("a.example.com"))
        self.assertIsNone(claim_name("members/m1", "::"))

    def test_the_member_key_advertises_a_client_endpoint_for_its_link(self) -> None:
        from rtunnel.fleet.service import link_client_endpoint

        self.assertEqual(link_client_endpoint("tcp:19060:interface=127.0.0.2", "x"), "tcp:host=127.0.0.2:port=19060")
        self.assertEqual(link_client_endpoint("tcp:19060", "10.1.1.1"), "tcp:host=10.1.1.1:port=19060")
        self.assertEqual(link_client_endpoint(None, "x"), "")

    def test_a_member_name_must_be_a_dns_label(self) -> None:
        from rtunnel.errors import ConfigError
        from rtunnel.tap.server_options import _member_name

        self.assertEqual(_member_name("edge-fra-2"), "edge-fra-2")
        for bad in ("M1", "-m", "a/b", "x" * 64):
            with self.assertRaises(ConfigError):
                _member_name(bad)
