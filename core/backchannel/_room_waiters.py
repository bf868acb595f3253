"""The streams waiting for room in a tunnel's output queue, and the order they get it in.

Least served first: a stream that has sent less gets room before one that has sent more, up to
:data:`SERVED_LIMIT` bytes; beyond it streams count as equal and take turns in the order they
started waiting. Without it, the streams that started first (or whose backend answered first)
go through their whole answer in the short turns of a lightly loaded tunnel while requests for
the others are still on their way, and a new stream's first bytes wait a whole round behind
every bulk transfer (1,000 streams: 1,000 send steps). docs/performance.md, "Least served
first", has the measurements.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

#: Below this many bytes sent, streams get room least served first; at or above it, in turn.
#: 256 KiB (four 64 KiB first steps; a stream's steps grow to 256 KiB after it, _tunnel.py):
#: the answer to most requests, and the first read of a bulk transfer. A bulk transfer gives
#: way to newer streams only until they have sent this much.
SERVED_LIMIT = 256 * 1024

#: Stale heap entries tolerated beyond the live ones before :meth:`RoomWaiters.discard`
#: rebuilds the heap.
STALE_MARGIN = 64

Waiter = TypeVar("Waiter", bound=Hashable)


class _ServedHeap(Generic[Waiter]):
    """Waiters by bytes served (capped), first come first served among equals; each at most
    once. Entries of waiters removed since are skipped lazily, and the heap is rebuilt when
    they outnumber the live ones (plus a margin), so it stays within about twice its members
    however many were removed."""

    __slots__ = ("_heap", "_members", "_sequence")

    def __init__(self) -> None:
        #: (served, sequence, waiter); entries of waiters removed since are skipped lazily.
        self._heap: list[tuple[int, int, Waiter]] = []
        self._members: dict[Waiter, int] = {}
        self._sequence = 0

    def add(self, waiter: Waiter, served: int) -> None:
        if waiter in self._members:
            return
        self._sequence += 1
        self._members[waiter] = self._sequence
        heapq.heappush(self._heap, (min(served, SERVED_LIMIT), self._sequence, waiter))

    def remove(self, waiter: Waiter) -> None:
        if self._members.pop(waiter, None) is None:
            return
        if len(self._heap) > 2 * len(self._members) + STALE_MARGIN:
            members = self._members
            self._heap = [entry for entry in self._heap if members.get(entry[2]) == entry[1]]
            heapq.heapify(self._heap)

    def least_served(self) -> int | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop(self) -> Waiter | None:
        self._drop_stale()
        if not self._heap:
            return None
        _, _, waiter = heapq.heappop(self._heap)
        del self._members[waiter]
        return waiter

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._members.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)


class RoomWaiters(Generic[Waiter]):
    """Who waits for room: a priority queue by bytes served (capped at :data:`SERVED_LIMIT`),
    first come first served among equals, each waiter in it at most once; and who was woken
    from it and has not run yet.

    A waiter popped and marked :meth:`woken` still counts for :meth:`any_served_less_than`
    until it runs (:meth:`ran`) or is discarded: otherwise a stream woken with it that runs
    first would find nobody served less waiting and take the room ahead of it."""

    __slots__ = ("_waiting", "_woken")

    def __init__(self) -> None:
        self._waiting: _ServedHeap[Waiter] = _ServedHeap()
        #: Woken since they were popped, not run yet.
        self._woken: _ServedHeap[Waiter] = _ServedHeap()

    # The tunnel asks these on every send step, mostly with nobody waiting: they read the
    # member dicts directly instead of through _ServedHeap's methods.

    def __len__(self) -> int:
        """How many wait to be woken (those woken and not run yet not counted)."""
        return len(self._waiting._members)

    def __contains__(self, waiter: Waiter) -> bool:
        """True if ``waiter`` waits to be woken."""
        return waiter in self._waiting._members

    def add(self, waiter: Waiter, served: int) -> None:
        """Queue ``waiter``, which has been served ``served`` bytes; no-op if it is queued."""
        self._waiting.add(waiter, served)

    def discard(self, waiter: Waiter) -> None:
        """Forget ``waiter``, waiting or woken (no-op if it is neither)."""
        if waiter in self._waiting._members:
            self._waiting.remove(waiter)
        if waiter in self._woken._members:
            self._woken.remove(waiter)

    def pop(self) -> Waiter | None:
        """Remove and return the waiter to wake next; None if there is none."""
        return self._waiting.pop()

    def woken(self, waiter: Waiter, served: int) -> None:
        """``waiter`` (just popped, served ``served`` bytes) was woken: it counts for
        :meth:`any_served_less_than` until :meth:`ran` or :meth:`discard`."""
        self._woken.add(waiter, served)

    def ran(self, waiter: Waiter) -> None:
        """``waiter`` runs again (it queues itself anew if it must wait)."""
        self._woken.remove(waiter)

    def others_waiting(self) -> bool:
        """True if anyone waits to be woken, or was woken and has not run yet."""
        return bool(self._waiting._members or self._woken._members)

    def least_served(self) -> int | None:
        """The (capped) bytes served of the waiter that would be woken next; None if empty."""
        return self._waiting.least_served()

    def any_served_less_than(self, served: int) -> bool:
        """True if a waiter, or one woken that has not run yet, has been served less than
        ``served`` bytes (capped): a stream that has sent that much gives way to it."""
        limit = min(served, SERVED_LIMIT)
        for heap in (self._waiting, self._woken):
            least = heap.least_served()
            if least is not None and least < limit:
                return True
        return False
