"""The settings feed: which scopes' settings changed, so that a consumer serving 100,000
workspaces reads settings only when they change (issue 17), not once per new scope and again
every ``SETTINGS_CACHE_SECONDS``.

One sorted set (``KeySpace.settings_feed``) holds three kinds of members:

- ``!``, the counter: its score is the number of the latest change.
- one member per scope whose settings were ever written (``keys.feed_member``), scored by the
  number of its latest change. A write of a scope's settings is followed by ``announce``: one
  script increments the counter and moves the scope to the new number, atomically, so the
  numbers enter the feed in increasing order. A reader that has seen every member up to number
  ``m`` has seen every change up to ``m``, and reads ``[m, +inf]`` next time (``m`` itself
  again, so that the counter comes back; members at ``m`` are not news). The settings are
  written *before* the announcement, so a reader that reads a scope's settings after seeing its
  number reads that change or a later one.
- ``#<epoch>``, the completeness mark, scored ``+inf`` so that every range read returns it: the
  feed names every scope that has settings. ``fill`` sets it after announcing every settings key
  a ``SCAN`` finds (a deployment that predates the feed, or a Redis that lost the feed but not
  the settings). Without it a reader cannot take a scope absent from the feed to have defaults.

A Redis that lost the feed (flushed, a failover that lost the node) shows as a missing mark, a
different epoch, or a counter below the reader's cursor (the counter is returned by the same
range read, because ``[cursor, +inf]`` holds it while it is at least the cursor): the reader
starts over. The counter and mark share the feed's key so that one command returns all three.

Limits: a process that dies (or a Redis that fails) between a write and its announcement leaves
that change unseen until the scope's next announcement: the API answers 503 then, and the same
``PUT`` or ``PATCH`` sent again announces (a ``PATCH`` that finds nothing to change announces
stored settings anyway); deleting the feed key makes the consumers fill it again. A Redis
restored from a snapshot older than a reader's cursor is noticed by the counter going back,
unless more changes than it lost are written before the reader's next poll.

Memory: one member per scope with settings, not per workspace. Written settings are never
deleted (``sketches.store.KEPT_SUFFIXES``), and workspaces without data are bounded per org
(``scope_settings.MAX_SETTINGS_WITHOUT_DATA``), so the feed is bounded by what Redis already
holds.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sketches.keys import KeySpace, Scope, feed_member, parse_feed_member, text_of
from sketches.store import run_pipeline

log = logging.getLogger(__name__)

COUNTER = "!"
MARK = "#"
# Members announced per script call when filling the feed.
FILL_CHUNK = 500
# Members per command when the whole feed is read.
FEED_PAGE = 5000
# How long one process may fill the feed before another may start over (ms).
FILL_LOCK_MS = 600_000

# KEYS[1] the feed; ARGV the members whose settings were just written. Returns the number.
_ANNOUNCE = """
local v = redis.call('ZINCRBY', KEYS[1], 1, '!')
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], v, ARGV[i]) end
return v
"""

# KEYS[1] the feed; ARGV[1] the new mark. The counter is created at 0 if no change came yet, so
# that a complete feed always holds it.
_MARK = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '+inf', '+inf')
redis.call('ZINCRBY', KEYS[1], 0, '!')
redis.call('ZADD', KEYS[1], '+inf', ARGV[1])
return 1
"""


async def announce(client: Any, keys: KeySpace, scopes: Sequence[Scope]) -> None:
    """Tell consumers these scopes' settings changed. Call after the write has succeeded."""
    if scopes:
        await run_pipeline(client, [
            ("EVAL", _ANNOUNCE, 1, keys.settings_feed(), *(feed_member(s) for s in scopes))
        ])


@dataclass
class FeedRead:
    """One range read of the feed."""

    counter: float | None = None
    mark: str | None = None
    changes: dict[Scope, float] = field(default_factory=dict)


def _pairs(reply: Any) -> list[tuple[str, float]]:
    """A ``ZRANGEBYSCORE ... WITHSCORES`` reply (flat, or pairs under RESP3)."""
    items = list(reply or ())
    raw: list[tuple[Any, Any]]
    if items and isinstance(items[0], (list, tuple)):
        raw = [(p[0], p[1]) for p in items]
    else:
        raw = list(zip(items[0::2], items[1::2], strict=True))
    return [(text_of(m), float(text_of(s))) for m, s in raw]


def _add(out: FeedRead, pairs: Sequence[tuple[str, float]]) -> FeedRead:
    for member, score in pairs:
        if member == COUNTER:
            out.counter = max(score, out.counter or score)
        elif member.startswith(MARK):
            out.mark = member
        else:
            scope = parse_feed_member(member)
            out.changes[scope] = max(score, out.changes.get(scope, score))
    return out


def parse(reply: Any) -> FeedRead:
    return _add(FeedRead(), _pairs(reply))


def _bound(score: float) -> str:
    return str(int(score)) if score.is_integer() else repr(score)


async def read(client: Any, keys: KeySpace, cursor: float) -> FeedRead:
    """Every member scored at least ``cursor``: one command. The range includes the cursor
    itself so that an intact feed always returns its counter."""
    (reply,) = await run_pipeline(
        client, [("ZRANGEBYSCORE", keys.settings_feed(), _bound(cursor), "+inf", "WITHSCORES")]
    )
    return parse(reply)


async def read_all(client: Any, keys: KeySpace, page: int = FEED_PAGE) -> FeedRead:
    """The whole feed, ``page`` members per command: one command over 100,000 members holds
    Redis for ~45 ms (``bench/settings_memory.py``), a stall every other client would see.

    Paged by score, never by rank: a change moves its scope to a higher number than any read
    so far, so a page read upwards can meet a moved scope again (the higher number is kept) but
    never skip one, which a rank-paged read could when a scope below the page moves away. A page
    ends before its last number (a number can hold up to ``FILL_CHUNK`` scopes), which the next
    page reads again in full."""
    feed, out, low = keys.settings_feed(), FeedRead(), "-inf"
    while True:
        (reply,) = await run_pipeline(
            client, [("ZRANGEBYSCORE", feed, low, "+inf", "WITHSCORES", "LIMIT", 0, page)]
        )
        pairs = _pairs(reply)
        last = pairs[-1][1] if pairs else math.inf
        if len(pairs) < page or math.isinf(last):
            return _add(out, pairs)
        below = [p for p in pairs if p[1] < last]
        if below:
            _add(out, below)
            low = _bound(last)
        else:  # one number fills the page: read all of it
            (reply,) = await run_pipeline(
                client, [("ZRANGEBYSCORE", feed, _bound(last), _bound(last), "WITHSCORES")]
            )
            _add(out, _pairs(reply))
            low = "(" + _bound(last)


def settings_pattern(keys: KeySpace) -> str:
    prefix = keys.prefix
    for special in ("\\", "[", "]", "*", "?"):
        prefix = prefix.replace(special, "\\" + special)
    return prefix + ":{*}:settings"


async def fill(client: Any, keys: KeySpace, *, lock: bool = True) -> bool:
    """Announce every scope that has settings stored, then mark the feed complete. A ``SCAN``
    of the whole keyspace (of every master on a cluster): run once when a deployment first
    meets the feed, or after Redis lost it. With ``lock``, only one process fills at a time;
    False if another holds the lock."""
    lock_key = keys.settings_feed_lock()
    token = uuid.uuid4().hex
    if lock:
        (held,) = await run_pipeline(client, [("SET", lock_key, token, "NX", "PX", FILL_LOCK_MS)])
        if not held:
            return False
    try:
        count = await _fill(client, keys, token)
    finally:
        if lock:  # a failed fill frees the lock too, for the next try (if Redis answers)
            await run_pipeline(client, [("EVAL", _UNLOCK, 1, lock_key, token)])
    log.info("settings feed filled: %d scopes with settings", count)
    return True


# Frees the lock only if it is still ours (a fill slower than FILL_LOCK_MS lost it).
_UNLOCK = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
    "return 0"
)


async def _fill(client: Any, keys: KeySpace, token: str) -> int:
    found: list[Scope] = []
    count = 0
    async for key in client.scan_iter(match=settings_pattern(keys), count=1000):
        try:
            found.append(keys.parse_workspace(text_of(key)))
        except ValueError:
            continue
        if len(found) >= FILL_CHUNK:
            await announce(client, keys, found)
            count += len(found)
            found = []
    await announce(client, keys, found)
    count += len(found)
    await run_pipeline(client, [("EVAL", _MARK, 1, keys.settings_feed(), MARK + token)])
    return count


def went_back(read_: FeedRead, cursor: float) -> bool:
    """The counter is below the cursor (a range from the cursor holds it otherwise): Redis lost
    changes the reader has seen, so this is not the feed the cursor is in."""
    if read_.counter is None:
        return cursor > 0
    return read_.counter < cursor
