"""FleetDirectory: the fleet as this member sees it, from one watch of the
prefix (members, claims, sessions), kept current by etcd's watch stream.

This is what the member links (rtunnel.fleet links, the edge -> home
forwarding of visitors) ask: where a member's link listens, which member
is home to a name or a session, and whether this member is fenced.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from rtunnel.fleet.etcd import EtcdClient, KeyValue, Watch, WatchEvent
from rtunnel.fleet.keys import ClaimRecord, claim_key, claim_name
from rtunnel.server.claims import Hostname, Name


class FleetDirectoryInterface(Protocol):
    """What the member links use (docs/fleet.md, "Design")."""

    member: str

    def link_endpoint(self, member: str) -> str | None: ...
    def home_of(self, name: Name) -> str | None: ...
    def remote_names(self) -> Iterable[tuple[Name, str]]: ...
    def watch_names(self, callback: Callable[[Name, str | None], None]) -> None: ...
    def session_home(self, session_id: str) -> str | None: ...

    @property
    def fenced(self) -> bool: ...


class FleetDirectory:
    """The watched members/, claims/ and sessions/ keys (FleetDirectoryInterface)."""

    log = Logger()

    def __init__(self, etcd: EtcdClient, prefix: str, member: str, public_host: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.member = member
        self.public_host = public_host
        self.members: dict[str, dict[str, Any]] = {}
        self.claims: dict[str, tuple[ClaimRecord, KeyValue]] = {}  # key below the prefix -> record
        self.sessions: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, int] = {}  # "members/<name>" or "sessions/<id>" -> the lease it is under
        self._homes: dict[Name, str] = {}  # claims by the Name they stand for here
        self.revision = 0
        self.is_fenced: Callable[[], bool] = lambda: False
        self._name_watchers: list[Callable[[Name, str | None], None]] = []
        #: told of every claim change: (key below the prefix, record or None, kv)
        self.claim_listeners: list[Callable[[str, ClaimRecord | None, KeyValue], None]] = []
        self.watch: Watch | None = None
        self.synced = False
        self._first_snapshot: list[defer.Deferred[None]] = []

    def start(self) -> Watch:
        self.watch = self.etcd.watch(self.prefix, self._snapshot, self._events)
        return self.watch

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()

    def when_synced(self) -> defer.Deferred[None]:
        """Fires once the first snapshot of the prefix has been read."""
        if self.synced:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._first_snapshot.append(d)
        return d

    # ------------------------------------------------------------ FleetDirectory

    def link_endpoint(self, member: str) -> str | None:
        info = self.members.get(member)
        link = info.get("link") if info else None
        return link if isinstance(link, str) and link else None

    def home_of(self, name: Name) -> str | None:
        return self._homes.get(name)

    def claim_kind(self, name: Name) -> str:
        """A claimed hostname's tunnel kind ("http" or "tls"; "" if not known)."""
        key = claim_key(name, frozenset({self.public_host})) if isinstance(name, Hostname) else ""
        entry = self.claims.get(key)
        return entry[0].kind if entry is not None else ""

    def remote_names(self) -> Iterable[tuple[Name, str]]:
        for key, (record, _) in list(self.claims.items()):
            name = claim_name(key, self.public_host)
            if name is not None and record.member != self.member:
                yield name, record.member

    def watch_names(self, callback: Callable[[Name, str | None], None]) -> None:
        self._name_watchers.append(callback)

    def session_home(self, session_id: str) -> str | None:
        info = self.sessions.get(session_id)
        member = info.get("member") if info else None
        return member if isinstance(member, str) else None

    def same_run(self, member: str, session_id: str) -> bool:
        """Whether `sessions/<session_id>` was written by the run of `member`
        registered now: both keys are under the member's lease, so a session
        under another lease is from an earlier run (restarted after a crash:
        the session died with it). True when either lease is not known."""
        member_lease = self.leases.get("members/" + member, 0)
        session_lease = self.leases.get("sessions/" + session_id, 0)
        return not member_lease or not session_lease or member_lease == session_lease

    @property
    def fenced(self) -> bool:
        return self.is_fenced()

    # ------------------------------------------------------------ the watch

    def _snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        old_claims = dict(self.claims)
        self.members.clear()
        self.claims.clear()
        self.sessions.clear()
        self.leases.clear()
        self._homes.clear()
        for kv in kvs:
            self._apply(kv, False, notify=False)
        self.revision = revision
        self.synced = True
        waiting, self._first_snapshot = self._first_snapshot, []
        for d in waiting:
            d.callback(None)
        # tell what changed while we were not watching
        for key in set(old_claims) | set(self.claims):
            before, after = old_claims.get(key), self.claims.get(key)
            if (before and before[0]) != (after and after[0]):
                kv = after[1] if after else KeyValue(self.prefix + key, b"", 0, revision)
                self._claim_changed(key, after[0] if after else None, kv)

    def _events(self, events: list[WatchEvent], revision: int) -> None:
        for event in events:
            self._apply(event.kv, event.deleted, notify=True)
        self.revision = revision

    def _apply(self, kv: KeyValue, deleted: bool, notify: bool) -> None:
        if not kv.key.startswith(self.prefix):
            return
        key = kv.key[len(self.prefix):]
        kind, _, rest = key.partition("/")
        if kind in ("members", "sessions"):
            if deleted:
                self.leases.pop(key, None)
            else:
                self.leases[key] = kv.lease
        if kind == "members":
            if deleted:
                self.members.pop(rest, None)
            else:
                value = kv.json()
                self.members[rest] = value if isinstance(value, dict) else {}
        elif kind == "sessions":
            if deleted:
                self.sessions.pop(rest, None)
            else:
                value = kv.json()
                self.sessions[rest] = value if isinstance(value, dict) else {}
        elif kind == "claims":
            record = None if deleted else ClaimRecord.decode(kv.value)
            before = self.claims.get(key)
            name = claim_name(key, self.public_host)
            if record is None:
                self.claims.pop(key, None)
                if name is not None:
                    self._homes.pop(name, None)
            else:
                self.claims[key] = (record, kv)
                if name is not None:
                    self._homes[name] = record.member
            if notify and (before is None or before[0] != record or record is None):
                self._claim_changed(key, record, kv)

    def _claim_changed(self, key: str, record: ClaimRecord | None, kv: KeyValue) -> None:
        for listener in list(self.claim_listeners):
            try:
                listener(key, record, kv)
            except Exception:
                self.log.failure("a fleet claim listener failed", event="fleet_listener_error", key=key)
        name = claim_name(key, self.public_host)
        if name is None:
            return
        for callback in list(self._name_watchers):
            try:
                callback(name, record.member if record is not None else None)
            except Exception:
                self.log.failure("a fleet name watcher failed", event="fleet_listener_error", key=key)

    def describe(self) -> dict[str, Any]:
        """The fleet as the admin page and metrics show it."""
        return {
            "member": self.member,
            "members": {name: dict(info) for name, info in sorted(self.members.items())},
            "claims": {key: json.loads(record.encode()) for key, (record, _) in sorted(self.claims.items())},
            "sessions": len(self.sessions),
            "revision": self.revision,
        }
