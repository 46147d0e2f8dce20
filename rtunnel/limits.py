"""Per-client limits: bandwidth token buckets and connections per tunnel.

Bandwidth is enforced through the flow-control windows of rtunnel.mux, never
by sleeping on the data path:

* to the client (visitor -> client's service, bytes the server sends): the
  bucket is one more credit. A stream sends min(peer credit, tokens); with no
  tokens left it waits in the pacer's queue (holding at most the one read it
  already made, its socket paused) and one refill timer wakes the queue.
* from the client (client's service -> visitor, bytes the server receives):
  the server's WINDOW grants are paid from the bucket, so the client cannot
  send faster than the rate. Bytes of a stream's initial window (granted by
  the protocol, without a WINDOW) are paid when they arrive.

Fairness: while streams wait, a stream that is not being served joins the
back of the queue; a woken stream gets at most one quantum before the next
one's turn, and a turn cut short by the bucket goes on first at the next
wake-up (deficit round robin over the client's streams).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

if TYPE_CHECKING:
    from rtunnel.mux import Stream

BURST_SECONDS = 0.1  # a bucket holds this many seconds of its rate...
MIN_BURST = 16384  # ...but at least one minimum-size frame (wire.MIN_MAX_FRAME)
MAX_QUEUE_ROUNDS = 100_000  # bound on turns handed out by one wake-up


def burst_for(rate: int) -> int:
    """The burst (bucket size) of a rate in bytes per second."""
    return max(int(rate * BURST_SECONDS), MIN_BURST)


class TokenBucket:
    """`rate` tokens (bytes) a second, at most `burst` saved up. Tokens may go
    negative (a debt) when bytes must be charged that were not asked for."""

    def __init__(self, clock: IReactorTime, rate: int, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"a bandwidth limit must be more than 0 bytes/s, not {rate}")
        self.clock = clock
        self.rate = rate
        self.burst = burst if burst is not None else burst_for(rate)
        self.tokens = float(self.burst)
        self._stamp = clock.seconds()

    def available(self) -> int:
        """Whole tokens now (negative: a debt still to pay off)."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        """Spend `n` tokens (after available(); may leave a debt)."""
        self.tokens -= n

    def give_back(self, n: int) -> None:
        """Return `n` unused tokens (never beyond the burst)."""
        self.tokens = min(self.burst, self.tokens + n)

    def seconds_until(self, n: int) -> float:
        """Seconds until `n` tokens are available (0 if they are)."""
        missing = n - self.available()
        return max(0.0, missing / self.rate)


class Pacer:
    """A token bucket and the queue of streams waiting on it.

    `wake` is the stream method a wake-up calls (flush for the send side,
    a forced credit grant for the receive side). Plain attributes for the
    metrics: `bytes` (paced through this bucket), `held_seconds` (seconds
    at least one stream of the client waited for tokens), `waiting`."""

    def __init__(self, clock: IReactorTime, rate: int, wake: str) -> None:
        self.clock = clock
        self.bucket = TokenBucket(clock, rate)
        self.rate = rate
        # a wake-up waits for at least this many tokens (no tiny frames);
        # each woken stream gets at most one quantum before the next one
        self.quantum = min(self.bucket.burst, max(MIN_BURST, self.bucket.burst // 4))
        self._wake_method = wake
        self._queue: collections.OrderedDict[Stream, None] = collections.OrderedDict()
        self._timer: IDelayedCall | None = None
        self._serving: Stream | None = None
        self._turn_left = 0
        self._carry: dict[Stream, int] = {}  # what is left of a turn cut short
        self.bytes = 0
        self.held_seconds = 0.0
        self._held_since: float | None = None

    @property
    def waiting(self) -> int:
        """Streams waiting for tokens now."""
        return len(self._queue)

    def held_seconds_at(self, now: float) -> float:
        """held_seconds, including the spell going on at `now`."""
        since = self._held_since
        return self.held_seconds + (now - since if since is not None else 0.0)

    def allowance(self, stream: Stream, want: int) -> int:
        """How many of `want` bytes `stream` may use now; 0 means it is
        queued and will be woken (call spend() for what it does use)."""
        serving = self._serving is stream
        if self._queue and not serving:
            self._enqueue(stream)
            return 0
        tokens = self.bucket.available()
        if serving:
            if tokens <= 0 < self._turn_left:
                # cut short by the bucket, not by its quantum: it goes on
                # first at the next wake-up, with what is left of its turn
                self._carry[stream] = self._turn_left
                self._enqueue(stream)
                self._queue.move_to_end(stream, last=False)
                return 0
            tokens = min(tokens, self._turn_left)
            if tokens <= 0:
                self._enqueue(stream)
                return 0
            return min(want, tokens)
        want = min(want, self.quantum)  # one call never takes the whole bucket
        if tokens < want:
            self._enqueue(stream)  # wait for a whole turn rather than send crumbs
            return 0
        return want

    def spend(self, n: int) -> None:
        """Charge `n` bytes (may leave the bucket in debt)."""
        self.bucket.take(n)
        self.bytes += n
        if self._serving is not None:
            self._turn_left -= n

    def give_back(self, n: int) -> None:
        """Return tokens paid for bytes that will never come. Only the
        bucket gets them back: `bytes` is a counter and never goes down."""
        if n > 0:
            self.bucket.give_back(n)

    def forget(self, stream: Stream) -> None:
        """A stream closed: it no longer waits."""
        self._carry.pop(stream, None)
        if self._queue.pop(stream, 0) is None and not self._queue:
            self._end_held()
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _enqueue(self, stream: Stream) -> None:
        self._queue[stream] = None
        if self._held_since is None:
            self._held_since = self.clock.seconds()
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and self._queue:
            delay = self.bucket.seconds_until(self.quantum)
            self._timer = self.clock.callLater(delay, self._wake)

    def _end_held(self) -> None:
        since, self._held_since = self._held_since, None
        if since is not None:
            self.held_seconds += self.clock.seconds() - since

    def _wake(self) -> None:
        """The refill timer: give waiting streams their turns, oldest first,
        one quantum each, while tokens last."""
        self._timer = None
        queue = self._queue
        for _ in range(MAX_QUEUE_ROUNDS):
            # a turn starts only with a whole quantum in the bucket
            if not queue or self.bucket.available() < self.quantum:
                break
            stream, _ = queue.popitem(last=False)
            if stream.closed:
                continue
            self._serving, self._turn_left = stream, self._carry.pop(stream, self.quantum)
            try:
                getattr(stream, self._wake_method)()
            finally:
                self._serving = None
        if not queue:
            self._end_held()
        self._schedule()

    def stop(self) -> None:
        """Cancel the refill timer and forget every waiting stream."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue.clear()
        self._carry.clear()
        self._end_held()


@dataclass(frozen=True)
class Limits:
    """What an operator limits for one credential (None: no limit).

    to_client: bytes/s the server sends the client (what visitors send,
    towards the client's service); from_client: bytes/s the client sends
    the server (its service's replies, towards the visitors)."""

    to_client: int | None = None
    from_client: int | None = None
    max_connections_per_tunnel: int | None = None


@dataclass
class ClientLimiter:
    """The live limits of one credential, shared by all its sessions.

    Metrics (plain attributes): `to_client` / `from_client` pacers (their
    `bytes`, `held_seconds`, `waiting`), `visitors_refused` (all tunnels)
    and `refused_by_tunnel` (tunnel name "host:port" -> count)."""

    limits: Limits
    to_client: Pacer | None = None
    from_client: Pacer | None = None
    visitors_refused: int = 0
    refused_by_tunnel: collections.Counter[str] = field(default_factory=collections.Counter)

    @classmethod
    def create(cls, clock: IReactorTime, limits: Limits) -> ClientLimiter:
        return cls(
            limits,
            Pacer(clock, limits.to_client, "paced_flush") if limits.to_client else None,
            Pacer(clock, limits.from_client, "paced_grant") if limits.from_client else None,
        )

    def carry_counts(self, old: ClientLimiter) -> None:
        """Keep `old`'s counts (a reload replaced the buckets): refusals,
        and each direction's bytes and held seconds while it stays limited."""
        self.visitors_refused, self.refused_by_tunnel = old.visitors_refused, old.refused_by_tunnel
        for new_pacer, old_pacer in ((self.to_client, old.to_client), (self.from_client, old.from_client)):
            if new_pacer is not None and old_pacer is not None:
                new_pacer.bytes = old_pacer.bytes
                new_pacer.held_seconds = old_pacer.held_seconds

    def stop(self) -> None:
        for pacer in (self.to_client, self.from_client):
            if pacer is not None:
                pacer.stop()


VISITORS_OVER_LIMIT = (
    "refusing visitors of tunnel {tunnel}: {limit} connections open, the most "
    "its client may have per tunnel (max_connections_per_tunnel); {count} "
    "refused since the last report"
)
# appended to a line that stands for more than one refusal (unless its
# message has the count in it already)
REPEATED = "; {count} refused like this since the previous line"
MAX_KINDS = 10_000  # kinds of refusal tracked at once; more share one line


@dataclass
class _Tally:
    """The refusals of one kind not logged yet, and when the last line was."""

    message: str
    count_field: str
    fields: dict[str, Any] = field(default_factory=dict)
    unlogged: int = 0
    logged_at: float | None = None
    timer: IDelayedCall | None = None


class RefusalLog:
    """Log lines for refusals a peer can provoke at will (visitors over a
    limit, forbidden BINDs, wrong tokens, connections over a cap), so that a
    flood of refusals cannot flood the log.

    Refusals are counted per kind: `key` of refused(), e.g. (reason, session)
    or (event, source address). The first refusal of a kind is logged at
    once; after a line, the next one of that kind comes at most `interval`
    seconds later, with the number refused since the previous line (the
    field `count_field`, default "count"), by a one-shot timer, so the end of
    a burst is reported too. A line has the fields of the latest refusal.

    A kind that has nothing left to report and whose last line is older than
    `interval` is forgotten (it would be logged at once again anyway), so the
    table holds only kinds refused within about the last `interval` seconds,
    and at most MAX_KINDS: beyond that new kinds share one tally per message.
    Call stop() when done: it reports what is left and cancels the timers."""

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = 1.0, log: Logger | None = None) -> None:
        if log is not None:
            self.log = log
        self.clock = clock
        self.interval = interval
        self._tallies: dict[Hashable, _Tally] = {}
        self._sweep_at = 64
        self._swept_at = float("-inf")

    def refused(self, key: Hashable, message: str, count_field: str = "count", **fields: Any) -> None:
        """One more refusal of kind `key`: logged now with `message` (a log
        format) and `fields`, or counted for the next line of its kind."""
        tally = self._tally(key, message, count_field)
        tally.unlogged += 1
        tally.message, tally.fields = message, fields
        if tally.timer is not None:
            return  # the timer reports it
        now = self.clock.seconds()
        if tally.logged_at is None or now - tally.logged_at >= self.interval:
            self._report(tally)
        else:
            tally.timer = self.clock.callLater(tally.logged_at + self.interval - now, self._flush, tally)

    def flush(self, key: Hashable) -> None:
        """Report what is left of kind `key` now and forget it (e.g. its
        tunnel closed)."""
        tally = self._tallies.pop(key, None)
        if tally is not None:
            self._stop(tally)

    def stop(self) -> None:
        """Report what is left of every kind now and cancel the timers."""
        tallies, self._tallies = self._tallies, {}
        for tally in tallies.values():
            self._stop(tally)

    def _tally(self, key: Hashable, message: str, count_field: str) -> _Tally:
        tally = self._tallies.get(key)
        if tally is not None:
            return tally
        now = self.clock.seconds()
        full = len(self._tallies) >= MAX_KINDS
        if len(self._tallies) >= self._sweep_at and (not full or now - self._swept_at >= self.interval):
            self._sweep(now)
        if len(self._tallies) >= MAX_KINDS:
            key = ("more kinds", message)
            tally = self._tallies.get(key)
            if tally is not None:
                return tally
        tally = self._tallies[key] = _Tally(message, count_field)
        return tally

    def _sweep(self, now: float) -> None:
        """Forget the kinds that are idle. The next sweep comes when the
        table has doubled (or, when it is full, an interval later): a
        refusal costs O(1) on average."""
        idle = [
            key for key, tally in self._tallies.items()
            if tally.timer is None and (tally.logged_at is None or now - tally.logged_at >= self.interval)
        ]
        for key in idle:
            del self._tallies[key]
        self._swept_at = now
        self._sweep_at = min(MAX_KINDS, max(64, 2 * len(self._tallies)))

    def _stop(self, tally: _Tally) -> None:
        if tally.timer is not None and tally.timer.active():
            tally.timer.cancel()
        tally.timer = None
        if tally.unlogged:
            self._report(tally)

    def _flush(self, tally: _Tally) -> None:
        tally.timer = None
        if tally.unlogged:
            self._report(tally)

    def _report(self, tally: _Tally) -> None:
        tally.logged_at = self.clock.seconds()
        count, tally.unlogged = tally.unlogged, 0
        message = tally.message
        placeholder = "{" + tally.count_field + "}"
        if count > 1 and placeholder not in message:
            message += REPEATED.replace("{count}", placeholder)
        self.log.warn(message, **{**tally.fields, tally.count_field: count})
