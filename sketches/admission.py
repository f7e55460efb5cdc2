"""Fair admission of heavy recomputes: a process's few slots shared between orgs, with a short
bounded wait.

A recompute that reads more than ``HEAVY_READS`` sketches (the first answer after a backfill or a
rebuild, a long direct computation) costs tens of milliseconds of Redis and CPU; a process runs
at most ``slots`` (``API_MAX_EXPENSIVE_QUERIES``) of them at once. Until issue 16 the next one was
refused at once, which let one tenant take every slot with 730-day requests for workspaces that
hold no data, and made a dashboard that opens 16 workspaces after a backfill get 11 immediate
503s. Now:

- **A share per org.** One org holds at most ``per_org`` slots (``API_MAX_EXPENSIVE_PER_ORG``,
  half of them by default), so another org always finds the rest: a flood from one org cannot
  make another wait.
- **A short bounded wait.** A heavy recompute that finds no slot waits up to ``wait_s``
  (``API_EXPENSIVE_WAIT_S``) for one, then gets ``QueryBusy`` (503 with ``Retry-After``). At most
  ``queue_per_org`` (``API_EXPENSIVE_QUEUE_PER_ORG``) of one org wait at once; the next is
  refused at once, so a flood holds neither memory nor connections for long.
- **Fewest first, then in turn.** A freed slot goes to the waiting org that holds the fewest
  slots; between orgs holding as many, in turn (an org that was just served goes behind the
  others that wait), so a long queue of one org never starves another's single request; within
  an org, to the request that has waited longest. A newcomer never overtakes a waiter.

Everything runs on the event loop and changes state synchronously between awaits (a waiter is
granted or expired in one callback, never both), so no lock is needed. The class only counts:
it never reads a clock but the loop's own timer for the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sketches.config import Settings
from sketches.errors import QueryBusy

HEAVY_READS = 200
"""A request that must read more sketches than this is heavy and needs a slot. A live request
reads about 35."""


@dataclass(eq=False)
class _Waiter:
    org: str
    future: asyncio.Future[None]
    granted: bool = field(default=False)


class Admission:
    """``async with admission.slot(org_id, reads):`` around a computation reading ``reads``
    sketches. Light ones pass at once; heavy ones take a slot, waiting for it within the bounds
    of the module docstring, or raise ``QueryBusy``."""

    def __init__(
        self,
        slots: int,
        *,
        per_org: int | None = None,
        wait_s: float = 0.0,
        queue_per_org: int = 16,
        heavy_reads: int = HEAVY_READS,
    ) -> None:
        self.slots = max(0, slots)  # 0: unbounded
        self.per_org = max(1, min(self.slots, per_org if per_org else -(-self.slots // 2)))
        self.wait_s = max(0.0, wait_s)
        self.queue_per_org = max(0, queue_per_org)
        self.heavy_reads = heavy_reads
        self._held: Counter[str] = Counter()
        # The waiters of each org, oldest first; the orgs in turn, the next to serve first.
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()
        self.in_use = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Admission:
        return cls(
            settings.api_max_expensive_queries,
            per_org=settings.api_max_expensive_per_org,
            wait_s=settings.api_expensive_wait_s,
            queue_per_org=settings.api_expensive_queue_per_org,
        )

    def held(self, org_id: str) -> int:
        return self._held[org_id]

    @property
    def orgs(self) -> int:
        """Orgs this admission keeps state for: those holding or awaiting a slot, no others, so
        that its memory follows the load, not every org ever seen."""
        return len(self._held.keys() | self._queues.keys())

    def waiting(self, org_id: str | None = None) -> int:
        if org_id is None:
            return sum(len(q) for q in self._queues.values())
        return len(self._queues.get(org_id, ()))

    @contextlib.asynccontextmanager
    async def slot(self, org_id: str, reads: int) -> AsyncIterator[None]:
        if reads <= self.heavy_reads or self.slots <= 0:
            yield
            return
        await self._acquire(org_id)
        try:
            yield
        finally:
            self._release(org_id)

    # ------------------------------------------------------------ the bookkeeping

    def _free_for(self, org_id: str) -> bool:
        return self.in_use < self.slots and self._held[org_id] < self.per_org

    def _take(self, org_id: str) -> None:
        self._held[org_id] += 1
        self.in_use += 1

    def _release(self, org_id: str) -> None:
        self._held[org_id] -= 1
        if self._held[org_id] <= 0:
            del self._held[org_id]
        self.in_use -= 1
        self._dispatch()

    def _forget(self, waiter: _Waiter) -> None:
        """Take a waiter out of its queue (idempotent)."""
        queue = self._queues.get(waiter.org)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._queues[waiter.org]

    def _dispatch(self) -> None:
        """Hand free slots to waiters: to the org holding the fewest, orgs holding as many in
        turn, and within an org to its oldest waiter."""
        while self.in_use < self.slots:
            for queue in self._queues.values():
                while queue and queue[0].future.done():
                    queue.popleft()  # cancelled meanwhile; its task forgets it too
            for org in [o for o, q in self._queues.items() if not q]:
                del self._queues[org]
            ready = [org for org in self._queues if self._free_for(org)]
            if not ready:
                return
            org = min(ready, key=self._held.__getitem__)  # the first of the fewest: in turn
            queue = self._queues[org]
            waiter = queue.popleft()
            if queue:
                self._queues.move_to_end(org)
            else:
                del self._queues[org]
            self._take(org)
            waiter.granted = True
            waiter.future.set_result(None)

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.granted or waiter.future.done():
            return
        self._forget(waiter)
        waiter.future.set_exception(QueryBusy(
            f"heavy recomputes: no slot free within {self.wait_s:g} s ({self.slots} at once per "
            f"process, {self.per_org} per org)"
        ))

    async def _acquire(self, org_id: str) -> None:
        if not self._queues and self._free_for(org_id):
            self._take(org_id)
            return
        if self.wait_s <= 0:
            raise QueryBusy(
                f"heavy recomputes: no slot free ({self.slots} at once per process, "
                f"{self.per_org} per org)"
            )
        if self.waiting(org_id) >= self.queue_per_org:
            raise QueryBusy(
                f"heavy recomputes: {self.waiting(org_id)} of this org already wait for a slot"
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(org_id, loop.create_future())
        self._queues.setdefault(org_id, deque()).append(waiter)
        timer = loop.call_later(self.wait_s, self._expire, waiter)
        self._dispatch()  # a newcomer competes with the waiters, never overtakes them
        try:
            await waiter.future
        except BaseException:
            if waiter.granted:  # granted, then cancelled before it could run: give it back
                self._release(org_id)
            else:
                self._forget(waiter)
            raise
        finally:
            timer.cancel()
