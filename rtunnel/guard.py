"""Admission control for the control port, before a client is trusted.

`AdmissionGuard` is pure bookkeeping around an injected clock (an
IReactorTime; tests use task.Clock):

* at most `max_unauthenticated` connections may be between TCP accept and
  an accepted HELLO at once; the server aborts the rest at once and counts
  them (a flood of idle or slow connections then costs a bounded amount of
  memory and file descriptors, and the handshake deadline empties the slots);
* failed authentications are rate limited per source address with a token
  bucket: `failure_burst` failures at once, then one more every
  `failure_refill` seconds. While an address's bucket is empty the server
  answers its HELLOs with `auth_failed` without looking at the token, so a
  token can be guessed at most `60 / failure_refill` times a minute per
  address. IPv6 addresses are grouped by /64 (one host usually has a whole
  /64 to pick from); IPv4-mapped IPv6 addresses count as their IPv4 address.
  The table holds at most `max_addresses` entries: beyond that the entry
  that failed least recently (the one closest to full) is forgotten.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from rtunnel.addresses import unmap

DEFAULT_MAX_UNAUTHENTICATED = 256
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


class AdmissionGuard:
    def __init__(
        self,
        clock: Any,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        failure_burst: int = DEFAULT_FAILURE_BURST,
        failure_refill: float = DEFAULT_FAILURE_REFILL,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
    ) -> None:
        if max_unauthenticated < 1 or failure_burst < 1 or failure_refill <= 0 or max_addresses < 1:
            raise ValueError("AdmissionGuard limits must be positive")
        self.clock = clock
        self.max_unauthenticated = max_unauthenticated
        self.failure_burst = failure_burst
        self.failure_refill = failure_refill
        self.max_addresses = max_addresses
        self.unauthenticated = 0
        self.refused_connections = 0  # over the unauthenticated cap, ever
        self.refused_attempts = 0  # HELLOs refused because their address was over its limit
        self.failures = 0  # failed authentications recorded, ever
        # key -> [tokens left, time of last update]; least recently failed first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    # ------------------------------------------------------------ connections

    def admit(self) -> bool:
        """A new connection: True (and counted) if under the cap."""
        if self.unauthenticated >= self.max_unauthenticated:
            self.refused_connections += 1
            return False
        self.unauthenticated += 1
        return True

    def release(self) -> None:
        """An admitted connection authenticated or closed."""
        self.unauthenticated = max(0, self.unauthenticated - 1)

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
