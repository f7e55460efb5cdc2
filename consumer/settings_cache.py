"""The consumer's view of scope settings: read when they change, not per scope or per interval.

Most of 100,000 workspaces never set anything; reading each new one (and every cached one again
every ``SETTINGS_CACHE_SECONDS``) was a read storm of its own (issue 17). The settings feed
(``sketches.settings_feed``) names every scope that has settings and every change since a
cursor, so:

- At first use, one read of the whole feed: the scopes it names (those with settings) are read
  when a batch first needs them; every other scope takes the defaults with no read at all.
- Then, at most every ``SETTINGS_CACHE_SECONDS`` (every batch at 0), one range read of the
  changes since the cursor: the scopes it names are dropped from the cache and read again when
  a batch needs them. A change reaches the counts within that bound, and costs one read per
  consumer that serves the scope.
- A feed that is not known to be complete (a deployment that predates it, or a Redis that lost
  it) cannot say a scope has no settings: until it is, each scope is read once, when a batch
  first needs it, and a background task fills the feed (``settings_feed.fill``, one process at a
  time). A feed that vanished, changed epoch or whose counter went backwards is read again from
  the start, and the cache is cleared.

Memory: the resolved settings of at most ``max_entries`` scopes (least recently used dropped,
read again on use), and the ids of the scopes the feed names (bounded by the scopes that have
settings in Redis). ``bench/settings_memory.py`` measures both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from sketches import scope_settings as ws_settings
from sketches import settings_feed
from sketches.keys import Scope
from sketches.scope_settings import Resolved
from sketches.store import SketchStore

log = logging.getLogger(__name__)

# Resolved settings kept per consumer (each also remembers up to MEMO_SUBJECTS verdicts).
MAX_CACHED = 100_000
# How often a consumer may try to fill an incomplete feed, if another process holds the lock or
# a try failed.
FILL_RETRY_SECONDS = 60.0


class SettingsCache:
    def __init__(
        self,
        store: SketchStore,
        default_timezone: str,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = MAX_CACHED,
        fill: bool = True,
    ) -> None:
        self.store = store
        self.default_timezone = default_timezone
        self.ttl = ttl_seconds
        self.clock = clock
        self.max_entries = max_entries
        self.fill = fill
        self._default = ws_settings.resolve(ws_settings.default_settings(default_timezone))
        self._cache: OrderedDict[Scope, Resolved] = OrderedDict()
        # The scopes the feed names, when it is complete (None: not known to be).
        self._named: set[Scope] | None = None
        self._mark: str | None = None
        self._cursor: float | None = None  # None: the feed was never read
        self._polled_at = -math.inf
        self._fill_at = -math.inf
        self._filling: asyncio.Task[bool] | None = None

    @property
    def complete(self) -> bool:
        """Whether scopes absent from the feed are taken to have defaults without a read."""
        return self._named is not None

    async def resolve(self, workspaces: Iterable[Scope]) -> dict[Scope, Resolved]:
        now = self.clock()
        if self._cursor is None or now - self._polled_at >= self.ttl:
            await self._poll(now)
            self._polled_at = now
        out: dict[Scope, Resolved] = {}
        missing: list[Scope] = []
        for ws in workspaces:
            hit = self._cache.get(ws)
            if hit is not None:
                self._cache.move_to_end(ws)
                out[ws] = hit
            elif self._named is not None and ws not in self._named:
                out[ws] = self._default
            elif ws not in out:
                out[ws] = self._default  # replaced below
                missing.append(ws)
        if missing:
            loaded = await ws_settings.load_many(
                self.store.client, self.store.keys, missing, self.default_timezone
            )
            for ws, settings in zip(missing, loaded, strict=True):
                resolved = ws_settings.resolve(settings)
                self._cache[ws] = resolved
                out[ws] = resolved
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return out

    async def _poll(self, now: float) -> None:
        client, keys = self.store.client, self.store.keys
        if self._cursor is None:
            await self._start_over(await settings_feed.read_all(client, keys), now)
            return
        read = await settings_feed.read(client, keys, self._cursor)
        if read.mark != self._mark or settings_feed.went_back(read, self._cursor):
            log.warning("the settings feed changed under the consumer (Redis lost it, or it was "
                        "filled again): reading it again and dropping every cached setting")
            await self._start_over(await settings_feed.read_all(client, keys), now)
            return
        for scope, number in read.changes.items():
            if number > self._cursor:
                self._cache.pop(scope, None)
                if self._named is not None:
                    self._named.add(scope)
        self._cursor = read.counter or 0.0
        if self._named is None:
            self._maybe_fill(now)

    async def _start_over(self, read: settings_feed.FeedRead, now: float) -> None:
        self._cache.clear()
        self._mark = read.mark
        self._cursor = read.counter or 0.0
        self._named = set(read.changes) if read.mark is not None else None
        if self._named is None:
            self._maybe_fill(now)

    def _maybe_fill(self, now: float) -> None:
        if not self.fill or (self._filling is not None and not self._filling.done()):
            return
        if now - self._fill_at < FILL_RETRY_SECONDS:
            return
        self._fill_at = now
        task = asyncio.create_task(settings_feed.fill(self.store.client, self.store.keys))
        task.add_done_callback(_report)
        self._filling = task


def _report(task: asyncio.Task[bool]) -> None:
    if task.cancelled():
        return
    err = task.exception()
    if err is not None:
        log.warning("filling the settings feed failed (retried later): %s", err)
