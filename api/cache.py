"""A result cache that cannot serve a stale number.

Closed days do not change unless a late event touches them, so a dashboard asking the same
question again should cost almost nothing. Every batch the consumer writes replaces the version
token of each workspace it touched, on the same connection and after the sketches; the API reads
that token with the workspace's settings (one round trip) and serves a cached body only when it
was computed under the very same token. A late event therefore shows at once: its batch changes
the token before the consumer commits.

Workspaces that have never been written have no token and are never cached. The cache is per
API process, bounded (least recently used goes first), and keyed by everything that shapes the
answer, including the local "today".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class ResultCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[bytes, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, version: bytes | None) -> bytes | None:
        if version is None or self.max_entries <= 0:
            return None
        entry = self._entries.get(key)
        if entry is None or entry[0] != version:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, version: bytes | None, body: bytes) -> None:
        if version is None or self.max_entries <= 0:
            return
        self._entries[key] = (version, body)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
