"""How a batch reaches Redis: one script call per scope, which adds, expires and stamps at once.

Why one script per scope
------------------------
A consumer batch adds subjects to the day, week and month sketches of many scopes (workspaces,
and the orgs they belong to). Sent as plain commands, that was a ``PFADD`` plus an ``EXPIREAT``
per key and a version ``SET`` per workspace: tens of thousands of replies per batch, each parsed
and bookkept by redis-py. One ``EVALSHA`` per scope carries all of that scope's keys and members
and answers once, and because a script runs atomically, a reader sees a scope's batch either
whole or not at all.

What the script does, in order (``WRITE_SCRIPT``):

1. Increment the scope's ``seq`` (``KeySpace.seq``, a hash): a counter ``n`` that only ever
   grows, and an ``epoch`` set once, when the hash is created, to the batch's random token. The
   rebuild keeps it when it deletes a scope's sketches. Should the hash ever go (it expires long
   after the scope's last write, or someone deletes it), the counter starts again under a new
   epoch, so a value handed out twice is never mistaken for the same one.
2. Stamp every local day the batch touched with that value, in a ring of u32 slots
   (``KeySpace.stamps``, one ``BITFIELD``): slot ``date.toordinal() % STAMP_RING``. A stored
   result (``sketches.results``) keeps the stamps it was computed from and recomputes exactly
   the days whose stamp differs. Two days 1,024 days apart share a slot; a write to either then
   marks both changed, which costs a recompute and never an old number.
3. Replace the scope's version token (``KeySpace.version``) with a random one: an API process
   compares it before serving a response body it kept in memory.
4. ``PFADD`` (or ``SADD``) the members of each sketch key, then ``EXPIREAT ... NX``: the key's
   deadline is set whenever it has none, so a key that was deleted, lost with a Redis that
   restarted empty, or expired, gets its expiry back with the very write that re-creates it.
   (The previous design sent each key's ``EXPIREAT`` once per process and could leave such a key
   without one for good.) A key whose deadline has already passed is not written at all: it
   would be deleted on the spot.

A key holding something else (``WRONGTYPE``, a corrupt sketch) fails alone: the script uses
``redis.pcall`` per key, keeps going, and returns the failed keys with Redis's error, so the
caller can log them and keep the rest of the batch.

``seq``, ``stamps`` and ``version`` live ``RETENTION_DAYS`` + ``META_SLACK_DAYS`` after the last
write to the scope, longer than any sketch the batch wrote.
"""

from __future__ import annotations

import bisect
import functools
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sketches.keys import KeySpace, Scope
from sketches.periods import Granularity, Period, WeekStart, periods_holding

STAMP_RING = 1024
"""Slots of the change-stamp ring: more days than any stored result spans by default."""
META_SLACK_DAYS = 62
"""``seq``/``stamps``/``version`` outlive the scope's last write by retention plus this."""
MEMBERS_PER_CALL = 2000
"""A scope's share of a batch is split into script calls of at most this many members: ~1 ms
of Redis time each, so a large batch never holds Redis for long (a stamp per call is cheap)."""
UNPACK_CHUNK = 4000
"""Members per ``PFADD`` inside the script: Lua's ``unpack`` is limited to ~8,000 values."""

WRITE_SCRIPT = """
local cmd = ARGV[1]
local ttl = ARGV[3]
local seq = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[3], ARGV[2], 'EX', ttl)
local nslots = tonumber(ARGV[4])
local nmembers = tonumber(ARGV[5])
local ntargets = tonumber(ARGV[6])
local i = 7
if nslots > 0 then
  local ops = {}
  for j = 0, nslots - 1 do
    ops[#ops + 1] = 'SET'
    ops[#ops + 1] = 'u32'
    ops[#ops + 1] = '#' .. ARGV[i + j]
    ops[#ops + 1] = seq
    if #ops >= 4000 or j == nslots - 1 then
      redis.call('BITFIELD', KEYS[2], unpack(ops))
      ops = {}
    end
  end
  redis.call('EXPIRE', KEYS[2], ttl)
  i = i + nslots
end
local failed = {}
local broken = {}
local function add(key, first, last)
  if broken[key] then return end
  for s = first, last, CHUNK do
    local r = redis.pcall(cmd, key, unpack(ARGV, s, math.min(s + CHUNK - 1, last)))
    if type(r) == 'table' and r.err then
      failed[#failed + 1] = key
      failed[#failed + 1] = r.err
      broken[key] = true
      return
    end
  end
end
local deadline = {}
for k = 4 + nmembers, 3 + nmembers + ntargets do
  deadline[k] = ARGV[i]
  i = i + 1
end
for k = 4, 3 + nmembers do
  local key = KEYS[k]
  local at = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local first = i + 2
  local last = first + n - 1
  if at ~= '0' then
    add(key, first, last)
    if not broken[key] then redis.call('EXPIREAT', key, at, 'NX') end
  end
  local nt = tonumber(ARGV[last + 1])
  for t = 1, nt do
    add(KEYS[tonumber(ARGV[last + 1 + t])], first, last)
  end
  i = last + 2 + nt
end
for k = 4 + nmembers, 3 + nmembers + ntargets do
  if not broken[KEYS[k]] then redis.call('EXPIREAT', KEYS[k], deadline[k], 'NX') end
end
return failed
""".replace("CHUNK", str(UNPACK_CHUNK))


def stamp_slot(day: date) -> int:
    return day.toordinal() % STAMP_RING


@functools.lru_cache(maxsize=1 << 16)
def expire_at(period: Period, retention_days: int) -> int:
    """Epoch seconds at which a period's key may go: retention after the period's last day.
    Cached: a backfill batch asks it for tens of thousands of keys of a few hundred periods."""
    deadline = datetime.combine(period.end + timedelta(days=retention_days + 1), time(), UTC)
    return int(deadline.timestamp())


@dataclass
class ScopeWrite:
    """Everything one batch writes to one scope: members per sketch, and for each sketch the
    sketches that also take its members (a day's week and month: see ``by_day``)."""

    sketches: dict[Period, Collection[str]] = field(default_factory=dict)
    days: set[date] = field(default_factory=set)
    targets: dict[Period, tuple[Period, ...]] = field(default_factory=dict)

    def parts(self, limit: int = MEMBERS_PER_CALL) -> Iterable[ScopeWrite]:
        """The write cut into pieces of at most ``limit`` members (a key's members too, when
        one key has more), each stamping every day of the whole write: each piece is a complete
        change, and adding members in several calls is the same as in one. A piece of a key's
        members goes to that key's targets too."""
        part = ScopeWrite(days=self.days)
        size = 0
        for period, members in self.sketches.items():
            items = members if len(members) <= limit else list(members)
            for lo in range(0, len(items), limit):
                chunk = items if len(items) <= limit else items[lo : lo + limit]  # type: ignore[index]
                if size and size + len(chunk) > limit:
                    yield part
                    part, size = ScopeWrite(days=self.days), 0
                part.sketches[period] = chunk
                if period in self.targets:
                    part.targets[period] = self.targets[period]
                size += len(chunk)
        if part.sketches:
            yield part


def group_by_scope(
    batch: Mapping[tuple[Scope, Period], Collection[str]],
) -> dict[Scope, ScopeWrite]:
    """The batch per scope, with the days to stamp: every day written, and for a week or month
    written without any of its days (not something the consumer does) its first day, so that its
    calendar count is still recomputed."""
    out: dict[Scope, ScopeWrite] = {}
    day = Granularity.DAY
    for (scope, period), members in batch.items():
        if not members:
            continue
        write = out.get(scope)
        if write is None:
            write = out[scope] = ScopeWrite()
        write.sketches[period] = members
        if period.granularity is day:
            write.days.add(period.start)
    for write in out.values():
        days = sorted(write.days)
        for period in write.sketches:
            if period.granularity is day:
                continue
            at = bisect.bisect_left(days, period.start)
            if at == len(days) or days[at] > period.end:
                write.days.add(period.start)
    return out


def script_call(
    sha: str,
    keys: KeySpace,
    scope: Scope,
    write: ScopeWrite,
    *,
    retention_days: int,
    now: float,
    token: str,
    command: str,
) -> tuple[tuple[Any, ...], list[str]]:
    """The ``EVALSHA`` of one scope, and the sketch keys it writes (in order).

    A key past its deadline is not written (it would be deleted as it is written); when it has
    targets, its members still go to them (its deadline is sent as 0)."""
    meta_ttl = (retention_days + META_SLACK_DAYS) * 86400
    head = [keys.seq(scope), keys.stamps(scope), keys.version(scope)]
    member_keys: list[str] = []
    members_argv: list[Any] = []
    target_index: dict[Period, int] = {}
    target_deadlines: list[int] = []
    pending: list[tuple[list[Any], tuple[Period, ...]]] = []
    for period, members in write.sketches.items():
        deadline = expire_at(period, retention_days)
        alive = [t for t in write.targets.get(period, ()) if expire_at(t, retention_days) > now]
        if deadline <= now and not alive:
            continue
        member_keys.append(keys.sketch(scope, period))
        section = [deadline if deadline > now else 0, len(members), *members]
        for t in alive:
            if t not in target_index:
                target_index[t] = len(target_index)
                target_deadlines.append(expire_at(t, retention_days))
        pending.append((section, tuple(alive)))
    first_target = len(head) + len(member_keys) + 1  # KEYS index (1-based) of the first target
    for section, to in pending:
        members_argv.extend(section)
        members_argv.append(len(to))
        members_argv.extend(first_target + target_index[t] for t in to)
    target_keys = [keys.sketch(scope, t) for t in target_index]
    argv: list[Any] = [command, token, meta_ttl, len(write.days), len(member_keys),
                       len(target_keys)]
    argv.extend(stamp_slot(d) for d in write.days)
    argv.extend(target_deadlines)
    all_keys = [*head, *member_keys, *target_keys]
    return ("EVALSHA", sha, len(all_keys), *all_keys, *argv, *members_argv), [
        *member_keys, *target_keys
    ]


def by_day(
    days: Mapping[tuple[Scope, date], Collection[str]],
    week_starts: Mapping[Scope, WeekStart],
) -> dict[Scope, ScopeWrite]:
    """A batch given as members per (scope, local day), as the consumer buckets it: each day's
    members are sent once, for its day sketch, and the script adds the same arguments to the
    day's week and month too. So Python neither unions sets per week and month nor packs the
    members three times, and Redis does the adds it always did. (Merging day sketches into
    weeks with ``PFMERGE`` was measured and dropped: into a sparse week it costs up to ~2 ms.)"""
    out: dict[Scope, ScopeWrite] = {}
    for (scope, d), members in days.items():
        if not members:
            continue
        write = out.get(scope)
        if write is None:
            write = out[scope] = ScopeWrite()
        day_p, week, month = periods_holding(d, week_starts[scope])
        write.days.add(d)
        write.sketches[day_p] = members
        write.targets[day_p] = (week, month)
    return out


def new_token() -> str:
    return uuid.uuid4().hex


def failures(reply: Any) -> Iterable[tuple[str, str]]:
    """(key, Redis's error) pairs from the script's reply."""
    items = list(reply or ())
    for i in range(0, len(items) - 1, 2):
        key, err = items[i], items[i + 1]
        yield (
            key.decode() if isinstance(key, bytes) else str(key),
            err.decode() if isinstance(err, bytes) else str(err),
        )
