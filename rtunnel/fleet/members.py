"""A fleet member's registration in etcd: `members/<name>` under a lease,
kept alive, and fencing.

The lease is what binds a member's claims to its life: every key the
member writes (its member key, its claims, its sessions) is under it, so
when the member dies etcd deletes them all once the TTL runs out.

Fencing is the other half of that promise. etcd expires the lease at the
earliest TTL seconds after the last keepalive it *received*, which is after
the member *sent* it. So a member that has not had a keepalive answered for
`TTL - margin` seconds after sending it can no longer prove its lease is
alive, and it calls itself fenced *before* etcd can expire the lease: it
stops accepting new visitors for its claims (rtunnel.fleet wires that), so
no other member can act as owner of one of its claims while it still does.
When etcd answers again: the lease still alive, the member is unfenced;
the lease gone, the member registers again under a new lease and its
claims are made again (rtunnel.fleet.claims.FleetClaims.reclaim).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from rtunnel.fleet.etcd import EtcdClient, EtcdError, compare_create, op_put, op_range, range_kvs

DEFAULT_TTL = 5


class FleetMember:
    """This process as a member of the fleet: its lease, its member key, fencing."""

    log = Logger()

    def __init__(
        self, reactor: Any, etcd: EtcdClient, prefix: str, name: str, info: dict[str, Any],
        ttl: int = DEFAULT_TTL, margin: float | None = None,
    ) -> None:
        self.reactor = reactor
        self.etcd = etcd
        self.prefix = prefix
        self.name = name
        self.info = info  # the member key's value: link, control, ...
        self.ttl = ttl
        self.margin = margin if margin is not None else ttl / 3
        self.lease = 0
        self.fenced = False
        self.fenced_at: float | None = None  # wall clock, for the tests' ordering checks
        self.proven_until = 0.0  # reactor time until which the lease is surely alive at etcd
        self.registrations = 0
        self.keepalive_failures = 0
        self.on_fence: list[Callable[[bool], None]] = []  # called with the new fenced value
        self.on_new_lease: list[Callable[[int], None]] = []  # after a re-registration under a new lease
        self._loop: task.LoopingCall | None = None
        self._fence_call: IDelayedCall | None = None
        self._registering: defer.Deferred[Any] | None = None
        self.stopped = False

    @property
    def key(self) -> str:
        return f"{self.prefix}members/{self.name}"

    @property
    def interval(self) -> float:
        return self.ttl / 3

    # ------------------------------------------------------------ life

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Register (a lease, the member key); then keep it alive."""
        yield self._register()
        self._loop = task.LoopingCall(self._keepalive)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    @defer.inlineCallbacks
    def _register(self) -> Any:
        sent = self.reactor.seconds()
        lease = yield self.etcd.grant(self.ttl)
        value = json.dumps({**self.info, "pid": os.getpid(), "started": time.time()}).encode()
        ok, responses, _ = yield self.etcd.txn(
            [compare_create(self.key)], [op_put(self.key, value, lease)], [op_range(self.key)],
        )
        if not ok:
            kvs = range_kvs(responses)
            old = (kvs[0].json() if kvs else None) or {}
            self.log.warn(
                "member name {name} is registered already (pid {pid}, started {started}): an earlier run "
                "of this member whose lease has not expired yet, or another process with the same "
                "--fleet-member (give each member its own name); taking the name over",
                name=self.name, pid=old.get("pid"), started=old.get("started"), event="fleet_member_name_taken",
            )
            yield self.etcd.put(self.key, value, lease)
        self.lease = lease
        self.registrations += 1
        if self.registrations > 1:  # again, after the lease was lost: the claims are made again first,
            for callback in list(self.on_new_lease):  # so that unfencing finds them unconfirmed
                callback(lease)
        self._proven(sent, self.ttl)
        self.log.info(
            "fleet member {name} registered in etcd ({urls}) under lease {lease:x} (TTL {ttl} s)",
            name=self.name, urls=self.etcd.describe(), lease=lease, ttl=self.ttl, event="fleet_registered",
        )
        return lease

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Leave: revoke the lease, so that every claim of this member goes at once."""
        self.stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        if self.lease:
            lease, self.lease = self.lease, 0
            try:
                yield self.etcd.revoke(lease)
            except EtcdError as e:
                self.log.warn(
                    "could not revoke lease {lease:x} when stopping ({why}); its claims go when it "
                    "expires ({ttl} s)", lease=lease, why=str(e), ttl=self.ttl, event="fleet_revoke_failed",
                )

    # ------------------------------------------------------------ keepalive and fencing

    def _keepalive(self) -> None:
        """Every TTL/3, not waiting for the last one: a slow answer must not
        delay the next attempt."""
        if self.stopped:
            return
        if self._registering is not None:
            return
        sent = self.reactor.seconds()
        lease = self.lease
        d = self.etcd.keepalive(lease)
        d.addCallbacks(lambda ttl: self._kept(lease, sent, ttl), self._keepalive_failed)

    def _kept(self, lease: int, sent: float, ttl: int) -> None:
        if self.stopped or lease != self.lease:
            return
        if ttl > 0:
            self._proven(sent, ttl)
            return
        # etcd answers, but the lease is gone (it expired while we were cut off)
        self.log.warn(
            "lease {lease:x} of fleet member {name} expired at etcd; registering again under a new "
            "lease and claiming what this member's sessions hold again",
            lease=lease, name=self.name, event="fleet_lease_lost",
        )
        self.lease = 0
        self._registering = self._register()

        def registered(new_lease: int) -> None:
            self._registering = None

        def failed(failure: Any) -> None:
            self._registering = None
            self.lease = lease  # the next keepalive finds it gone again and retries
            self.log.warn("registering again failed: {why}", why=failure.getErrorMessage(), event="fleet_register_failed")

        self._registering.addCallbacks(registered, failed)

    def _keepalive_failed(self, failure: Any) -> None:
        self.keepalive_failures += 1
        self.log.warn(
            "keepalive of fleet member {name}'s lease failed: {why}", name=self.name,
            why=failure.getErrorMessage(), event="fleet_keepalive_failed",
        )

    def _proven(self, sent: float, ttl: int) -> None:
        """etcd renewed the lease for `ttl` s at some time after `sent`:
        it is alive until sent + ttl at least; fence at sent + ttl - margin."""
        self.proven_until = max(self.proven_until, sent + ttl)
        fence_at = self.proven_until - self.margin
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        self._fence_call = self.reactor.callLater(max(0.0, fence_at - self.reactor.seconds()), self._fence)
        if self.fenced:
            self._set_fenced(False)

    def _fence(self) -> None:
        if not self.stopped:
            self._set_fenced(True)

    def _set_fenced(self, fenced: bool) -> None:
        self.fenced = fenced
        if fenced:
            self.fenced_at = time.time()
            self.log.warn(
                "fleet member {name} is fenced: etcd has not renewed its lease for {t:.1f} s, so the "
                "lease may expire within {margin:.1f} s; it accepts no new visitors for its ports and "
                "no new claims until etcd answers again (check etcd at {urls})",
                name=self.name, t=self.ttl - self.margin, margin=self.margin, urls=self.etcd.describe(),
                event="fleet_fenced", fenced_at=self.fenced_at,
            )
        else:
            self.log.info(
                "fleet member {name} is no longer fenced: etcd renewed its lease", name=self.name,
                event="fleet_unfenced",
            )
        for callback in list(self.on_fence):
            callback(fenced)
