"""The consumer's view of workspace settings: read once, kept for a bounded time.

A batch asks for the workspaces it holds; those not cached (or cached longer ago than
``SETTINGS_CACHE_SECONDS``) are read in one pipeline. So a settings change reaches the counts
within that bound, and a steady stream costs one settings read per workspace per interval, not
one per event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from sketches import scope_settings as ws_settings
from sketches.keys import Scope
from sketches.scope_settings import Resolved
from sketches.store import SketchStore


class SettingsCache:
    def __init__(
        self,
        store: SketchStore,
        default_timezone: str,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.default_timezone = default_timezone
        self.ttl = ttl_seconds
        self.clock = clock
        self._cache: dict[Scope, tuple[float, Resolved]] = {}

    async def resolve(self, workspaces: Iterable[Scope]) -> dict[Scope, Resolved]:
        now = self.clock()
        out: dict[Scope, Resolved] = {}
        stale: list[Scope] = []
        for ws in workspaces:
            hit = self._cache.get(ws)
            if hit is not None and now - hit[0] < self.ttl:
                out[ws] = hit[1]
            else:
                stale.append(ws)
        if stale:
            loaded = await ws_settings.load_many(
                self.store.client, self.store.keys, stale, self.default_timezone
            )
            for ws, settings in zip(stale, loaded, strict=True):
                resolved = ws_settings.resolve(settings)
                self._cache[ws] = (now, resolved)
                out[ws] = resolved
        if len(self._cache) > 200_000:
            self._cache.clear()
        return out
