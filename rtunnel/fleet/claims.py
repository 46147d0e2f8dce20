"""FleetClaims: the claims registry of a fleet member, the same ownership
rules fleet-wide (docs/fleet.md, "Design").

Each claim is an etcd key (rtunnel.fleet.keys) under the holding member's
lease, written in a transaction: created if absent, or replaced if the
holder's credential is the same and the holder is not older than the one
recorded (compared on the mod_revision read in the same transaction). So
two credentials racing for a port on two members: exactly one wins; a
credential's port comes back to it at once, on any member; another
credential never gets it while the key exists, and the key exists while
the holding member keeps the session (detached too) and its lease lives.

Locally a LocalClaims keeps this member's holders, waiters and handovers,
exactly as on one server; etcd is made to agree with it:

* `acquire(name, holder, tag)` (asynchronous) is the strict path, taken by
  a BIND before the port is opened: the etcd transaction first, then the
  synchronous `claim()` in the same reactor turn. A refusal is IN_USE or
  TAKEN_OVER as on one server, or UNAVAILABLE (etcd unreachable, or this
  member fenced): the client retries later.
* `claim()` alone (the synchronous interface, e.g. a port the system
  picked) answers from the watched keys at once and writes the key
  afterwards; if etcd then says another holds it, the claim is lost
  (`on_lost`) as a takeover would be.
* the watch: a key of ours that another member now holds (a newer session
  of the credential there took it over) is lost here (`on_lost`: the
  session hears BIND_FAILED taken_over and waits, as on one server); a key
  of ours deleted (our lease expired while etcd was out of reach) is
  written again, as is every claim when the member registers under a new
  lease (`reclaim`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtunnel.fleet.directory import FleetDirectory
from rtunnel.fleet.etcd import (
    EtcdClient,
    EtcdError,
    KeyValue,
    compare_create,
    compare_mod,
    compare_value,
    op_delete,
    op_put,
    op_range,
    range_kvs,
)
from rtunnel.fleet.keys import ClaimRecord, claim_key, claim_name
from rtunnel.fleet.members import FleetMember
from rtunnel.server.claims import Claim, Claimed, ClaimRefused, H, Hostname, LocalClaims, Name

WRITE_ATTEMPTS = 5  # transactions per write before giving up on a contended key
RETRY_DELAY = 1.0  # seconds before etcd is asked again after a failed write


def fleet_serials() -> Iterator[int]:
    """Session serials comparable across members: microseconds of the wall
    clock, strictly increasing in this process. Among sessions of one
    credential the newest holds a name; across members "newest" is as good
    as the members' clocks agree (NTP: milliseconds)."""
    last = 0
    while True:
        last = max(last + 1, time.time_ns() // 1000)
        yield last


def hostname_kind(holder: Any, name: Name, tag: int) -> str:
    """The kind ("http" or "tls") of `holder`'s tunnel `tag` if `name` is a
    hostname it holds (ServerSession.hostnames), else ""."""
    if not isinstance(name, Hostname):
        return ""
    tunnel = getattr(holder, "hostnames", {}).get(tag)
    kind = getattr(tunnel, "kind", "")
    return kind if isinstance(kind, str) else ""


def unavailable(name: Name, why: str) -> ClaimRefused:
    refusal = ClaimRefused(ClaimRefused.UNAVAILABLE, name)
    refusal.args = (f"{name.describe()}: the fleet's etcd cannot be reached ({why}); try again shortly",)
    return refusal


class FleetClaims(Generic[H]):
    """ClaimRegistry of one fleet member: LocalClaims here, agreed with etcd."""

    log = Logger()

    def __init__(
        self, reactor: Any, etcd: EtcdClient, prefix: str, member: FleetMember, directory: FleetDirectory,
        default_hosts: frozenset[str],
    ) -> None:
        self.reactor = reactor
        self.etcd = etcd
        self.prefix = prefix
        self.member = member
        self.directory = directory
        self.default_hosts = default_hosts
        self.local: LocalClaims[H] = LocalClaims()
        #: what calls back when etcd says a claim of ours is held elsewhere: (claim, code)
        self.on_lost: Callable[[Claim[H], str], None] | None = None
        #: told the key of each claim etcd confirmed (written under the current lease)
        self.on_confirmed: list[Callable[[str], None]] = []
        self._published: dict[str, bytes] = {}  # key -> the value we wrote last (ours in etcd)
        self._written_at: dict[str, int] = {}  # key -> the revision of our last write
        self._reserved: dict[str, tuple[H, int]] = {}  # acquired in etcd, not claimed here yet
        self._remote_waiting: dict[Name, dict[H, int]] = {}  # waiting for a newer session elsewhere
        self._chains: dict[str, defer.Deferred[Any]] = {}  # one etcd operation per key at a time
        self._queued: dict[str, int] = {}  # operations on the key's chain not finished yet
        self._pending: set[str] = set()  # keys with a sync queued
        self._retries: dict[str, Any] = {}
        self.lost = 0  # claims lost to another member (metrics)
        self.stopped = False
        directory.claim_listeners.append(self._changed)
        member.on_new_lease.append(lambda _: self.reclaim())
        member.on_fence.append(lambda fenced: None if fenced else self._resync_all())

    def key(self, name: Name) -> str:
        return claim_key(name, self.default_hosts)

    @property
    def available(self) -> bool:
        return bool(self.member.lease) and not self.member.fenced and not self.stopped

    # ------------------------------------------------------------ asynchronous: the strict path

    def acquire(self, name: Name, holder: H, tag: int) -> defer.Deferred[None]:
        """Make `name` `holder`'s in etcd (fires None), or fail with
        ClaimRefused (IN_USE, TAKEN_OVER, UNAVAILABLE). Call claim() in the
        callback: an acquisition not claimed in the same turn is undone."""
        if self.local.holder(name) is not None:
            return defer.succeed(None)  # ours already: the local rules decide, the key follows
        key = self.key(name)

        def write() -> defer.Deferred[None]:
            return self._write_claim(key, name, holder, tag)

        def done(_: object) -> None:
            self._reserved[key] = (holder, tag)
            self.reactor.callLater(0, self._unreserve, key, name, holder, tag)

        def refused(failure: Failure) -> None:
            failure.trap(ClaimRefused, EtcdError)
            if failure.check(EtcdError):
                raise unavailable(name, failure.getErrorMessage())
            refusal = failure.value
            if refusal.code == ClaimRefused.TAKEN_OVER:
                waiters = self._remote_waiting.setdefault(name, {})
                repeated = waiters.get(holder) == tag
                waiters[holder] = tag
                raise ClaimRefused(ClaimRefused.TAKEN_OVER, name, repeated)
            raise refusal

        return self._serial(key, write).addCallbacks(done, refused)

    def _unreserve(self, key: str, name: Name, holder: H, tag: int) -> None:
        if self._reserved.get(key) == (holder, tag):  # acquired, never claimed (the bind failed before)
            del self._reserved[key]
            self._schedule_sync(key, name)

    @defer.inlineCallbacks
    def _write_claim(self, key: str, name: Name, holder: H, tag: int) -> Any:
        """Make the key say `holder` holds `name` as `tag`, by the rules."""
        full = self.prefix + key
        record = ClaimRecord(
            holder.credential, self.member.name, str(getattr(holder, "id", "")), tag, holder.serial,
            hostname_kind(holder, name, tag),
        )
        value = record.encode()
        for _ in range(WRITE_ATTEMPTS):
            if not self.available:
                raise unavailable(name, "this member is fenced" if self.member.fenced else "no lease")
            lease = self.member.lease
            previous = self._published.get(key)
            compare = [compare_value(full, previous) if previous is not None else compare_create(full)]
            ok, responses, revision = yield self.etcd.txn(compare, [op_put(full, value, lease)], [op_range(full)])
            if ok:
                self._wrote(key, value, revision)
                return None
            kvs = range_kvs(responses)
            if not kvs:
                self._published.pop(key, None)
                continue  # deleted meanwhile: create it
            kv = kvs[0]
            held = ClaimRecord.decode(kv.value)
            # ours: written by this member under its lease (the local registry decided); anything else
            # (another member, or an earlier run of this member under an older lease) by the rules
            ours = held is not None and held.member == self.member.name and kv.lease == lease
            if held is not None and not ours:
                if held.credential != holder.credential:
                    raise ClaimRefused(ClaimRefused.IN_USE, name)
                if held.serial > holder.serial:
                    raise ClaimRefused(ClaimRefused.TAKEN_OVER, name)
            # ours (an older write of this member), or the same credential's older session: replace it
            ok, _, revision = yield self.etcd.txn([compare_mod(full, kv.mod_revision)], [op_put(full, value, lease)])
            if ok:
                self._wrote(key, value, revision)
                return None
        raise unavailable(name, f"the key changed {WRITE_ATTEMPTS} times while claiming it")

    def _wrote(self, key: str, value: bytes, revision: int) -> None:
        self._published[key] = value
        self._written_at[key] = revision
        for callback in list(self.on_confirmed):
            callback(key)

    def confirmed(self, name: Name) -> bool:
        """True if etcd holds `name` for this member under its current lease, as far as we know."""
        return self.key(name) in self._published

    # ------------------------------------------------------------ ClaimRegistry (synchronous)

    def claim(self, name: Name, holder: H, tag: int) -> Claimed[H]:
        key = self.key(name)
        reserved = self._reserved.get(key)
        acquired = reserved is not None and reserved[0] is holder
        if acquired:
            del self._reserved[key]
        elif self.local.holder(name) is None:
            entry = self.directory.claims.get(key)
            if entry is not None and entry[0].member != self.member.name:
                held = entry[0]
                if held.credential != holder.credential:
                    raise ClaimRefused(ClaimRefused.IN_USE, name)
                if held.serial > holder.serial:
                    waiters = self._remote_waiting.setdefault(name, {})
                    repeated = waiters.get(holder) == tag
                    waiters[holder] = tag
                    raise ClaimRefused(ClaimRefused.TAKEN_OVER, name, repeated)
            if not self.available:
                raise unavailable(name, "this member is fenced" if self.member.fenced else "no lease")
        claimed = self.local.claim(name, holder, tag)
        self._stop_remote_waiting(holder, tag)
        if not (acquired and reserved is not None and reserved[1] == tag):
            self._schedule_sync(key, name)
        return claimed

    def release(self, claim: Claim[H], hand_on: bool = True) -> Claim[H] | None:
        heir = self.local.release(claim, hand_on)
        self._schedule_sync(self.key(claim.name), claim.name)
        return heir

    def transfer(self, claim: Claim[H], to: H, tag: int) -> Claim[H]:
        new = self.local.transfer(claim, to, tag)
        self._schedule_sync(self.key(claim.name), claim.name)
        return new

    def owner(self, name: Name) -> str | None:
        local = self.local.owner(name)
        if local is not None:
            return local
        entry = self.directory.claims.get(self.key(name))
        return entry[0].credential if entry is not None else None

    def holder(self, name: Name) -> H | None:
        return self.local.holder(name)

    def waiting(self, name: Name) -> Mapping[H, int]:
        return {**self._remote_waiting.get(name, {}), **self.local.waiting(name)}

    def stop_waiting(self, holder: H, tag: int | None = None) -> None:
        self.local.stop_waiting(holder, tag)
        self._stop_remote_waiting(holder, tag)
        for key, (reserved_holder, reserved_tag) in list(self._reserved.items()):
            if reserved_holder is holder and (tag is None or tag == reserved_tag):
                del self._reserved[key]
                name = claim_name(key, self.member_public_host)
                if name is not None:
                    self._schedule_sync(key, name)

    @property
    def member_public_host(self) -> str:
        return self.directory.public_host

    def _stop_remote_waiting(self, holder: H, tag: int | None) -> None:
        for name in [n for n, waiters in self._remote_waiting.items() if holder in waiters]:
            waiters = self._remote_waiting[name]
            if tag is None or waiters[holder] == tag:
                del waiters[holder]
            if not waiters:
                del self._remote_waiting[name]

    # ------------------------------------------------------------ making etcd agree

    def _serial(self, key: str, operation: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        """Run `operation` after every earlier one on `key` has finished; its result."""
        result: defer.Deferred[Any] = defer.Deferred()

        def run(_: object) -> defer.Deferred[Any]:
            d = defer.maybeDeferred(operation)
            d.chainDeferred(result)
            return d

        def done(_: object) -> None:
            self._queued[key] -= 1
            if not self._queued[key]:
                del self._queued[key]
                self._chains.pop(key, None)

        self._queued[key] = self._queued.get(key, 0) + 1
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = defer.succeed(None)
        chain.addCallback(run).addCallback(done)
        return result

    def _schedule_sync(self, key: str, name: Name) -> None:
        """Queue one write (or delete) that makes `key` say what this member holds.
        A hostname's is written in the next turn: its holder learns the tunnel's
        kind just after its claim (HostRoutes.bind), and the record carries it."""
        if key in self._pending or self.stopped:
            return
        self._pending.add(key)
        if isinstance(name, Hostname):
            self.reactor.callLater(0, self._queue_sync, key, name)
            return
        self._queue_sync(key, name)

    def _queue_sync(self, key: str, name: Name) -> None:
        if self.stopped:
            self._pending.discard(key)
            return
        self._serial(key, lambda: self._sync(key, name)).addErrback(self._sync_failed, key, name)

    @defer.inlineCallbacks
    def _sync(self, key: str, name: Name) -> Any:
        self._pending.discard(key)
        current = self.local.current(name)
        if current is not None:
            try:
                yield self._write_claim(key, name, current.holder, current.tag)
            except ClaimRefused as refusal:
                if refusal.code == ClaimRefused.UNAVAILABLE:
                    raise
                self._lose(current, refusal.code)
            return
        if key in self._reserved:
            return
        value = self._published.get(key)
        if value is None:
            return
        full = self.prefix + key
        yield self.etcd.txn([compare_value(full, value)], [op_delete(full)])
        self._published.pop(key, None)
        self._written_at.pop(key, None)

    def _sync_failed(self, failure: Failure, key: str, name: Name) -> None:
        failure.trap(ClaimRefused, EtcdError)
        if self.stopped:
            return
        self.log.warn(
            "could not update the fleet's claim on {name} in etcd: {why}; trying again in {delay:.0f} s",
            name=name.describe(), why=failure.getErrorMessage(), delay=RETRY_DELAY, event="fleet_claim_sync_failed",
        )
        retry = self._retries.get(key)
        if retry is None or not retry.active():
            self._retries[key] = self.reactor.callLater(RETRY_DELAY, self._schedule_sync, key, name)

    def _resync_all(self) -> None:
        """etcd answers again: make every key agree (what failed meanwhile too)."""
        for held in list(self.local._claims.values()):  # noqa: SLF001 (our own LocalClaims)
            self._schedule_sync(self.key(held.name), held.name)
        for key in list(self._published):
            name = claim_name(key, self.member_public_host)
            if name is not None:
                self._schedule_sync(key, name)

    def reclaim(self) -> None:
        """A new lease (the old one expired at etcd): claim again, under it,
        everything this member's sessions hold."""
        self._published.clear()
        self._written_at.clear()
        count = len(self.local._claims)  # noqa: SLF001
        self.log.info("claiming {n} names again under the new lease", n=count, event="fleet_reclaim", claims=count)
        self._resync_all()

    def _lose(self, claim: Claim[H], code: str) -> None:
        """etcd says another member holds `claim`'s name: it is no longer ours."""
        if self.local.current(claim.name) is not claim:
            return
        key = self.key(claim.name)
        self._published.pop(key, None)
        self._written_at.pop(key, None)
        self.lost += 1
        if code == ClaimRefused.TAKEN_OVER:  # a newer session of the credential elsewhere: wait for it
            self._remote_waiting.setdefault(claim.name, {})[claim.holder] = claim.tag
        self.log.info(
            "{name} is held at another member now ({code}): giving it up here", name=claim.name.describe(),
            code=code, event="fleet_claim_lost", credential=claim.credential,
        )
        if self.on_lost is not None:
            self.on_lost(claim, code)
        if self.local.current(claim.name) is claim:
            self.local.release(claim, hand_on=False)

    def _changed(self, key: str, record: ClaimRecord | None, kv: KeyValue) -> None:
        """The watch saw a claim change."""
        if kv.mod_revision and kv.mod_revision < self._written_at.get(key, 0):
            return  # older than our own last write: stale news
        name = claim_name(key, self.member_public_host)
        if name is None:
            return
        current = self.local.current(name)
        if record is None:
            if key in self._published and current is not None:
                # our key is gone (our lease expired; or an operator deleted it): write it again
                self._published.pop(key, None)
                self._written_at.pop(key, None)
                if self.available:
                    self._schedule_sync(key, name)
            return
        if record.member == self.member.name or current is None:
            return
        self._lose(current, ClaimRefused.TAKEN_OVER if record.credential == current.credential else ClaimRefused.IN_USE)

    def stop(self) -> None:
        self.stopped = True
        for retry in self._retries.values():
            if retry.active():
                retry.cancel()

