"""Admission control for the control port, before a client is trusted.

`AdmissionGuard` is pure bookkeeping around an injected clock (an
IReactorTime; tests use task.Clock):

* at most `max_per_address` connections from one source address may be
  between TCP accept and an accepted HELLO at once; the server aborts the
  next ones from that address at once (one address cannot fill the server);
* at most `max_unauthenticated` such connections in all. When that many are
  waiting, a newcomer is not simply refused (a flood would lock every honest
  client out): the oldest waiting connection of the address holding the
  most is dropped to make room, unless the newcomer's own address holds
  that many, in which case the newcomer is refused. Among addresses holding
  equally many, the one that reached that number first gives up its oldest.
  A flood from one address therefore never holds more than its share, and
  an honest newcomer always gets a slot;
* failed authentications are rate limited per source address with a token
  bucket: `failure_burst` failures at once, then one more every
  `failure_refill` seconds. While an address's bucket is empty the server
  answers its HELLOs with `auth_failed` without looking at the token, so a
  token can be guessed at most `60 / failure_refill` times a minute per
  address. The table holds at most `max_addresses` entries: beyond that the
  entry that failed least recently (the one closest to full) is forgotten.

IPv6 addresses are grouped by /64 (one host usually has a whole /64 to pick
from); IPv4-mapped IPv6 addresses count as their IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rtunnel.addresses import unmap

DEFAULT_MAX_UNAUTHENTICATED = 256
DEFAULT_MAX_PER_ADDRESS = 32
DEFAULT_FAILURE_BURST = 10
DEFAULT_FAILURE_REFILL = 6.0  # seconds per failure: 10 a minute
DEFAULT_MAX_ADDRESSES = 10_000


def address_key(host: str) -> str:
    """The rate-limit key of a peer address: IPv4 as is, IPv6 by /64."""
    try:
        ip = ipaddress.ip_address(unmap(host.split("%", 1)[0]))
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


C = TypeVar("C", bound=Hashable)

# why a connection was refused (Admission.refused)
PER_ADDRESS = "per_address"  # its address already has max_per_address waiting
MOST_HELD = "max_unauthenticated"  # the cap is reached and its address holds the most


@dataclass(frozen=True)
class Admission(Generic[C]):
    """The guard's answer to a new connection: `refused` is None when it is
    admitted (else PER_ADDRESS or MOST_HELD); `evicted` is a waiting
    connection the caller must drop to make room for it (the guard has
    already forgotten it)."""

    refused: str | None = None
    evicted: C | None = None

    @property
    def admitted(self) -> bool:
        return self.refused is None


class AdmissionGuard(Generic[C]):
    def __init__(
        self,
        clock: Any,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        failure_burst: int = DEFAULT_FAILURE_BURST,
        failure_refill: float = DEFAULT_FAILURE_REFILL,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
    ) -> None:
        if (
            max_unauthenticated < 1 or max_per_address < 1 or failure_burst < 1
            or failure_refill <= 0 or max_addresses < 1
        ):
            raise ValueError("AdmissionGuard limits must be positive")
        self.clock = clock
        self.max_unauthenticated = max_unauthenticated
        self.max_per_address = max_per_address
        self.failure_burst = failure_burst
        self.failure_refill = failure_refill
        self.max_addresses = max_addresses
        self.unauthenticated = 0
        self.refused_connections = 0  # at the cap, from the address holding the most, ever
        self.refused_per_address = 0  # over max_per_address, ever
        self.evicted = 0  # waiting connections dropped to make room, ever
        self.refused_attempts = 0  # HELLOs refused because their address was over its limit
        self.failures = 0  # failed authentications recorded, ever
        # address key -> its waiting connections, oldest first
        self._waiting: dict[str, OrderedDict[C, None]] = {}
        self._key_of: dict[C, str] = {}
        # n -> the keys holding exactly n waiting connections, in the order they reached n;
        # _most is the largest such n (0: none waiting)
        self._holding: dict[int, OrderedDict[str, None]] = {}
        self._most = 0
        # key -> [tokens left, time of last update]; least recently failed first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    # ------------------------------------------------------------ connections

    def refuses(self, host: str) -> str | None:
        """Why a new connection from `host` is refused now (PER_ADDRESS,
        MOST_HELD; counted), or None if admit() would take it. Lets a server
        close a refused connection before spending anything on it."""
        held = len(self._waiting.get(address_key(host), ()))
        if held >= self.max_per_address:
            self.refused_per_address += 1
            return PER_ADDRESS
        if self.unauthenticated >= self.max_unauthenticated and held >= self._most:
            self.refused_connections += 1
            return MOST_HELD
        return None

    def admit(self, host: str, connection: C) -> Admission[C]:
        """A new connection from `host`: admitted (and counted) or refused,
        and perhaps a waiting connection to drop for it (see the module)."""
        refused = self.refuses(host)
        if refused is not None:
            return Admission(refused)
        key = address_key(host)
        held = len(self._waiting.get(key, ()))
        evicted = None
        if self.unauthenticated >= self.max_unauthenticated:
            victim_key = next(iter(self._holding[self._most]))
            evicted = next(iter(self._waiting[victim_key]))
            self._forget(evicted)
            self.evicted += 1
        self._count(key, held, +1)
        self._waiting.setdefault(key, OrderedDict())[connection] = None
        self._key_of[connection] = key
        self.unauthenticated += 1
        return Admission(None, evicted)

    def release(self, connection: C) -> None:
        """An admitted connection authenticated or closed (nothing if the
        guard no longer counts it: released before, or evicted)."""
        self._forget(connection)

    def waiting_from(self, host: str) -> int:
        """Connections from `host`'s address waiting to authenticate now."""
        return len(self._waiting.get(address_key(host), ()))

    @property
    def most_held(self) -> int:
        """The most waiting connections any one address holds now."""
        return self._most

    def _forget(self, connection: C) -> None:
        key = self._key_of.pop(connection, None)
        if key is None:
            return
        waiting = self._waiting[key]
        self._count(key, len(waiting), -1)
        del waiting[connection]
        if not waiting:
            del self._waiting[key]
        self.unauthenticated -= 1

    def _count(self, key: str, held: int, step: int) -> None:
        """Move `key` from holding `held` to `held + step` waiting connections."""
        if held:
            keys = self._holding[held]
            del keys[key]
            if not keys:
                del self._holding[held]
                if step < 0 and self._most == held:
                    self._most = held - 1  # held - 1 > 0: key is there now; 0: none waiting
        if held + step:
            self._holding.setdefault(held + step, OrderedDict())[key] = None
            self._most = max(self._most, held + step)

    # ------------------------------------------------------------ failures

    def _tokens(self, key: str) -> float | None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        now = self.clock.seconds()
        tokens = min(self.failure_burst, bucket[0] + (now - bucket[1]) / self.failure_refill)
        bucket[0], bucket[1] = tokens, now
        if tokens >= self.failure_burst:
            del self._buckets[key]  # full again: nothing to remember
            return None
        return tokens

    def retry_after(self, host: str) -> float | None:
        """Seconds until `host` may try a token again, or None if it may now.
        A refused attempt is counted (and does not use up anything)."""
        tokens = self._tokens(address_key(host))
        if tokens is None or tokens >= 1:
            return None
        self.refused_attempts += 1
        return (1 - tokens) * self.failure_refill

    def record_failure(self, host: str) -> None:
        """`host` presented a wrong token."""
        self.failures += 1
        key = address_key(host)
        tokens = self._tokens(key)
        if tokens is None:
            tokens = float(self.failure_burst)
        self._buckets[key] = [max(0.0, tokens - 1), self.clock.seconds()]
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    @property
    def tracked_addresses(self) -> int:
        return len(self._buckets)
