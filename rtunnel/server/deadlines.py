"""Many connections' deadlines behind one reactor timer.

The shared ports give each connection a deadline (the ClientHello on
--https, each request head on both ports: --request-head-timeout). A
reactor `callLater` per connection, or per request, costs a DelayedCall in
Twisted's heap (compared in Python) and its cancellation; here the
deadlines sit in one `heapq` (compared in C) and one timer waits for the
earliest. A deadline that moves later (a keep-alive connection's next
request) costs nothing: its entry is checked when it comes due and pushed
again with the new deadline. An item's deadline is therefore never missed
and never fires early; an entry holds its item until the entry's time at
most.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Protocol


class HasDeadline(Protocol):
    """What a watched item has: its deadline (reactor seconds; None: none
    now), whether an entry for it is in the heap, and what to do at the deadline."""

    deadline: float | None
    deadline_watched: bool

    def deadline_passed(self) -> None: ...


class Deadlines:
    """Calls each watched item's `deadline_passed()` once its `deadline` has passed."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.heap: list[tuple[float, int, HasDeadline]] = []
        self.order = itertools.count()  # ties: first come, first checked (items are never compared)
        self.timer: Any = None
        self.timer_at = 0.0

    def watch(self, item: HasDeadline) -> None:
        """Check `item` when its `deadline` (set before the call) comes. An
        item already watched needs no call when its deadline moves later."""
        if item.deadline is None:
            return
        if item.deadline_watched:
            if self.heap and item.deadline >= self.heap[0][0]:
                return
            # earlier than every entry: rare (a shorter deadline after a longer one); a second entry
        item.deadline_watched = True
        heapq.heappush(self.heap, (item.deadline, next(self.order), item))
        self._schedule()

    def _schedule(self) -> None:
        if not self.heap:
            return
        when = self.heap[0][0]
        if self.timer is not None:
            if self.timer.active() and self.timer_at <= when:
                return
            if self.timer.active():
                self.timer.cancel()
        self.timer_at = when
        self.timer = self.reactor.callLater(max(0.0, when - self.reactor.seconds()), self._fire)

    def _fire(self) -> None:
        self.timer = None
        heap = self.heap
        now = self.reactor.seconds()
        while heap and heap[0][0] <= now:
            _, _, item = heapq.heappop(heap)
            deadline = item.deadline
            if deadline is None:
                item.deadline_watched = False
            elif deadline > now:  # moved later since: check again then
                heapq.heappush(heap, (deadline, next(self.order), item))
            else:
                item.deadline_watched = False
                item.deadline_passed()
        self._schedule()

    def stop(self) -> None:
        """Forget every deadline (the ports are closing)."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        for _, _, item in self.heap:
            item.deadline_watched = False
        self.heap.clear()
