"""How a batch reaches Redis, and the bookkeeping that keeps every answer honest.

Why many scopes per script call
-------------------------------
A consumer batch adds subjects to the day, week and month sketches of many scopes (workspaces,
and the orgs they belong to). At 100,000 workspaces a 100,000-record batch touches ~70,000
scopes with one or two logins each; one script call per scope cost a call and its bookkeeping
each (issue 17: 8x the cost of the same logins over 1,000 workspaces). So the batch goes out as
calls of up to ``MEMBERS_PER_CALL`` members, as many scopes to a call as fit (``calls``); on a
cluster only scopes of one slot share a call, since a script's keys must. A script runs
atomically, so a reader sees a call's writes whole or not at all.

The bookkeeping: one hash per scope (``KeySpace.meta``)
-------------------------------------------------------
For each scope of a call, in the call (``WRITE_SCRIPT``):

1. ``HINCRBY n``: a counter bumped by every call that writes the scope, every call of a batch
   that was split included, so a version a reader has seen changes with every write. The
   epoch ``e`` is set to the call's random token when the hash is created; a hash that went
   (expired long after the last write, deleted, lost) starts a new epoch, so a value handed out
   again is never taken for the old one. Past ``COUNTER_WRAP`` (Lua's numbers are doubles,
   exact below 2**53) the hash starts again under a new epoch, keeping only ``b``.
2. ``HSET <day ordinal> n`` for every local day the call touched: the day's stamp. A stored
   result (``sketches.results``) keeps, per entry, the stamps of the days it was computed from.
   Stamps are as wide as the counter and live in its key, so they can neither wrap nor outlive
   it. Every ``PRUNE_EVERY`` writes the stamps older than the stored span are dropped.
3. ``EXPIRE``: the hash outlives the last write by ``RETENTION_DAYS + META_SLACK_DAYS``, longer
   than any sketch that write touched.
4. ``PFADD`` (or ``SADD``) each day's members to the day, its week and its month (each member sent
   once; no ``PFMERGE``, which into a sparse week cost up to ~2 ms), then ``EXPIREAT ... NX``:
   a key gets its deadline whenever it has none, so a key deleted, lost or expired gets it back
   with the write that re-creates it. A key past its deadline is not written at all.
5. While a rebuild fills a generation (``b``), the same members also go to that generation's
   keys (``…:hll~<b>:…``), each registered in ``…:hll~<b>:keys`` for the switch.

A call made by a rebuild (its mode is the generation) writes only that generation, and only
while ``b`` still names it: a rebuild that was cancelled or taken over is refused
(``refusals``). ``SWITCH_SCRIPT`` ends a rebuild in one step: the live sketches go, the
generation's take their names, and the epoch changes with the day stamps cleared, so nothing
computed from the old state can be served again.

A key holding something else (``WRONGTYPE``, a corrupt sketch) fails alone: the script uses
``redis.pcall`` per key, keeps going, and returns the failed keys with Redis's error, so the
caller can log them and keep the rest of the batch.

Deadlines (``expire_at``) fall at the UTC midnight ``DEADLINE_SLACK_DAYS`` after retention has
passed a period: the horizon moves at local midnights, up to 12 hours after UTC's, so no zone's
horizon ever reaches a period whose key has gone (``needed_until``).
"""

from __future__ import annotations

import bisect
import functools
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sketches.keys import KeySpace, Scope, text_of
from sketches.periods import Granularity, Period, WeekStart, periods_holding

META_SLACK_DAYS = 62
"""A scope's ``meta`` outlives its last write by retention plus this: longer than any sketch
that write touched (the current month ends at most 31 days later, plus ``DEADLINE_SLACK_DAYS``)."""
DEADLINE_SLACK_DAYS = 2
"""A key lives until the UTC midnight this many days after retention has passed its period: the
horizon moves at local midnights, up to 12 hours after UTC's (UTC-12), so a key outlives the
last instant any zone's horizon still holds its period by at least 12 hours."""
MEMBERS_PER_CALL = 2000
"""Members per script call, all scopes together: ~1 ms of Redis time, so a large batch never
holds Redis for long."""
UNPACK_CHUNK = 4000
"""Members per ``PFADD`` inside the script: Lua's ``unpack`` is limited to ~8,000 values."""
COUNTER_WRAP = 2**53 - 2**20
"""Where the counter starts again under a new epoch: Lua's numbers are exact below 2**53."""
PRUNE_EVERY = 256
"""Every this many writes of a scope, the script drops its day stamps older than the stored
span (one ``HKEYS``): bookkeeping stays proportional to the days a scope can be asked about."""
PRUNE_MARGIN_DAYS = 45
"""Day stamps kept before the retention horizon: the 30-day lead of the first stored entry
(``sketches.results.LEAD``), plus slack for zones and clocks."""
LIVE = "L"
"""The mode of a consumer's write: bump the counter, stamp the days, write the live sketches and
those of a generation being rebuilt. Any other mode is the generation a rebuild fills."""

WRITE_SCRIPT = """
local cmd, token, ttl = ARGV[1], ARGV[2], ARGV[3]
local nscopes, prune, every = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local failed, refused = {}, {}
local broken, registered = {}, {}
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
local i, kb = 7, 1
for _ = 1, nscopes do
  local meta = KEYS[kb]
  local mode, headlen, ndays = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local nm, nt = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  i = i + 5
  local building = redis.call('HGET', meta, 'b')
  local gens = {}
  if mode == 'L' then
    local n = redis.call('HINCRBY', meta, 'n', 1)
    if n >= WRAP then
      -- Lua counts in doubles, exact up to 2^53: the counter starts again under a new epoch,
      -- without the old stamps, so no value is ever handed out twice in one epoch.
      local keep = redis.call('HGET', meta, 'b')
      redis.call('DEL', meta)
      if keep then redis.call('HSET', meta, 'b', keep) end
      n = redis.call('HINCRBY', meta, 'n', 1)
      redis.call('HSET', meta, 'e', token)
    end
    if ndays > 0 then
      local hs = {}
      for d = i, i + ndays - 1 do
        hs[#hs + 1] = ARGV[d]
        hs[#hs + 1] = n
      end
      for c = 1, #hs, 4000 do
        redis.call('HSET', meta, unpack(hs, c, math.min(c + 3999, #hs)))
      end
    end
    if n == 1 then redis.call('HSETNX', meta, 'e', token) end
    redis.call('EXPIRE', meta, ttl)
    if n % every == 0 then
      local old = {}
      for _, f in ipairs(redis.call('HKEYS', meta)) do
        local o = tonumber(f)
        if o and o < prune then old[#old + 1] = f end
      end
      for c = 1, #old, 4000 do
        redis.call('HDEL', meta, unpack(old, c, math.min(c + 3999, #old)))
      end
    end
    gens[1] = ''
    if building then gens[2] = building end
  elseif building == mode then
    gens[1] = mode
  else
    refused[#refused + 1] = meta
  end
  i = i + ndays
  local deadline = {}
  for t = 1, nt do deadline[nm + t] = ARGV[i + t - 1] end
  i = i + nt
  local sections = {}
  for k = 1, nm do
    local n = tonumber(ARGV[i + 1])
    local last = i + 1 + n
    local ntk = tonumber(ARGV[last + 1])
    sections[k] = {ARGV[i], i + 2, last, last + 1, ntk}
    i = last + 2 + ntk
  end
  for _, gen in ipairs(gens) do
    local head = string.sub(meta, 1, headlen)
    local registry = head .. '~' .. gen .. ':keys'
    local function name(k)
      local key = KEYS[kb + k]
      if gen == '' then return key end
      local alt = head .. '~' .. gen .. string.sub(key, headlen + 1)
      if not registered[alt] then
        registered[alt] = true
        redis.call('SADD', registry, alt)
        redis.call('EXPIRE', registry, ttl)
      end
      return alt
    end
    for k = 1, nm do
      local at, first, last, tp, ntk = unpack(sections[k])
      if at ~= '0' then
        local key = name(k)
        add(key, first, last)
        if not broken[key] then redis.call('EXPIREAT', key, at, 'NX') end
      end
      for t = 1, ntk do add(name(tonumber(ARGV[tp + t])), first, last) end
    end
    for t = nm + 1, nm + nt do
      local key = name(t)
      if not broken[key] then redis.call('EXPIREAT', key, deadline[t], 'NX') end
    end
  end
  kb = kb + 1 + nm + nt
end
return {failed, refused}
""".replace("CHUNK", str(UNPACK_CHUNK)).replace("WRAP", str(COUNTER_WRAP))


BEGIN_SCRIPT = """
local b = redis.call('HGET', KEYS[1], 'b')
if b and ARGV[3] ~= '1' then return b end
redis.call('HSET', KEYS[1], 'b', ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return false
"""
"""Marks the generation a rebuild fills (``b``); answers the generation already being filled
instead, unless told to take it over."""

SWITCH_SCRIPT = """
local meta, registry = KEYS[1], KEYS[2]
if redis.call('HGET', meta, 'b') ~= ARGV[1] then return -1 end
local headlen, skip = tonumber(ARGV[3]), 1 + #ARGV[1]
for k = 3, #KEYS do redis.call('UNLINK', KEYS[k]) end
local moved = 0
for _, bk in ipairs(redis.call('SMEMBERS', registry)) do
  if redis.call('EXISTS', bk) == 1 then
    redis.call('RENAME', bk, string.sub(bk, 1, headlen) .. string.sub(bk, headlen + skip + 1))
    moved = moved + 1
  end
end
redis.call('UNLINK', registry)
local drop = {'b'}
for _, f in ipairs(redis.call('HKEYS', meta)) do
  if tonumber(f) then drop[#drop + 1] = f end
end
for c = 1, #drop, 4000 do
  redis.call('HDEL', meta, unpack(drop, c, math.min(c + 3999, #drop)))
end
redis.call('HSET', meta, 'e', ARGV[2])
redis.call('HINCRBY', meta, 'n', 1)
return moved
"""
"""A rebuild's one step: the live sketches the caller listed (every one that existed once the
rebuild began) go, the generation's sketches take their names, and the scope gets a new epoch
with no day stamps, so every stored result and cached response of the old state is unanswerable.
Live sketches created after the caller's listing were written by the consumer to both
generations, so the renames replace them. ``-1`` when the generation is no longer the one being
filled."""

CANCEL_SCRIPT = """
if redis.call('HGET', KEYS[1], 'b') == ARGV[1] then redis.call('HDEL', KEYS[1], 'b') end
return redis.call('SMEMBERS', KEYS[2])
"""


@functools.lru_cache(maxsize=1 << 16)
def expire_at(period: Period, retention_days: int) -> int:
    """Epoch seconds at which a period's key may go: the UTC midnight ``DEADLINE_SLACK_DAYS``
    after retention has passed the period's last day. Cached: a backfill batch asks it for tens
    of thousands of keys of a few hundred periods."""
    last = period.end + timedelta(days=retention_days + DEADLINE_SLACK_DAYS)
    return int(datetime.combine(last, time(), UTC).timestamp())


def needed_until(period: Period, retention_days: int, offset: timedelta) -> datetime:
    """The last instant a scope whose zone is ``offset`` from UTC still holds ``period`` within
    its horizon (``today - retention``): the local midnight that ends the period's last day
    plus retention. ``expire_at`` must never fall before it, for any zone."""
    ends = datetime.combine(period.end + timedelta(days=retention_days + 1), time(), UTC)
    return ends - offset


class ScopeWrite:
    """Everything one batch writes to one scope: members per sketch, and for each sketch the
    sketches that also take its members (a day's week and month: see ``by_day``). A plain
    class with slots: a batch over 100,000 workspaces makes 70,000 of them."""

    __slots__ = ("days", "sketches", "targets")

    def __init__(
        self,
        sketches: dict[Period, Collection[str]] | None = None,
        days: set[date] | None = None,
        targets: dict[Period, tuple[Period, ...]] | None = None,
    ) -> None:
        self.sketches: dict[Period, Collection[str]] = sketches if sketches is not None else {}
        self.days: set[date] = days if days is not None else set()
        self.targets: dict[Period, tuple[Period, ...]] = targets if targets is not None else {}

    def size(self) -> int:
        return sum(len(m) for m in self.sketches.values())

    def parts(self, limit: int = MEMBERS_PER_CALL) -> Iterable[ScopeWrite]:
        """The write cut into pieces of at most ``limit`` members (a key's members too, when
        one key has more), each stamping every day of the whole write: each piece is a complete
        change, and adding members in several calls is the same as in one. A piece of a key's
        members goes to that key's targets too."""
        if self.size() <= limit:  # nearly every scope of a batch: itself, unchanged
            yield self
            return
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


@functools.lru_cache(maxsize=1 << 18)
def head_length(keys: KeySpace, scope: Scope) -> int:
    """Bytes of the scope's sketch head: where the scripts insert a generation."""
    return len(keys.sketch_head(scope).encode())


def scope_section(
    keys: KeySpace, scope: Scope, write: ScopeWrite, *, retention_days: int, now: float,
    mode: str,
) -> tuple[list[str], list[Any], int]:
    """One scope's share of a script call: its keys, its arguments and its member count.

    A key past its deadline is not written (it would be deleted as it is written); when it has
    targets, its members still go to them (its deadline is sent as 0)."""
    member_keys: list[str] = []
    target_index: dict[Period, int] = {}
    target_deadlines: list[int] = []
    pending: list[tuple[list[Any], tuple[Period, ...]]] = []
    members_total = 0
    for period, members in write.sketches.items():
        deadline = expire_at(period, retention_days)
        alive = [t for t in write.targets.get(period, ()) if expire_at(t, retention_days) > now]
        if deadline <= now and not alive:
            continue
        member_keys.append(keys.sketch(scope, period))
        members_total += len(members)
        for t in alive:
            if t not in target_index:
                target_index[t] = len(target_index)
                target_deadlines.append(expire_at(t, retention_days))
        pending.append(([deadline if deadline > now else 0, len(members), *members], tuple(alive)))
    nm = len(member_keys)
    argv: list[Any] = [mode, head_length(keys, scope), len(write.days), nm, len(target_index)]
    argv.extend(d.toordinal() for d in write.days)
    argv.extend(target_deadlines)
    for section, to in pending:
        argv.extend(section)
        argv.append(len(to))
        argv.extend(nm + 1 + target_index[t] for t in to)
    return [keys.meta(scope), *member_keys, *(keys.sketch(scope, t) for t in target_index)], \
        argv, members_total


@dataclass
class Call:
    """One ``EVALSHA`` of the write script and the scopes it carries, in order."""

    command: tuple[Any, ...]
    scopes: list[Scope]


def calls(
    sha: str,
    keys: KeySpace,
    grouped: Mapping[Scope, ScopeWrite],
    *,
    retention_days: int,
    now: float,
    token: str,
    command: str,
    building: Mapping[Scope, int] | None = None,
    slot_of: Callable[[Scope], int] | None = None,
    limit: int = MEMBERS_PER_CALL,
) -> list[Call]:
    """The batch as script calls: many scopes per call, up to ``limit`` members each; on a
    cluster (``slot_of``), only scopes of one slot share a call. With ``building``, each scope's
    members go only to the generation its rebuild fills (scopes not in it are skipped)."""
    meta_ttl = (retention_days + META_SLACK_DAYS) * 86400
    today = datetime.fromtimestamp(now, UTC).date()
    prune_before = (today - timedelta(days=retention_days + PRUNE_MARGIN_DAYS)).toordinal()
    open_calls: dict[int, tuple[list[str], list[Any], list[Scope], list[int]]] = {}
    out: list[Call] = []

    def flush(slot: int) -> None:
        call_keys, argv, scopes, _ = open_calls.pop(slot)
        out.append(Call(
            ("EVALSHA", sha, len(call_keys), *call_keys, command, token, meta_ttl, len(scopes),
             prune_before, PRUNE_EVERY, *argv),
            scopes,
        ))

    for scope, write in grouped.items():
        if building is not None:
            if scope not in building:
                continue
            mode = str(building[scope])
        else:
            mode = LIVE
        slot = slot_of(scope) if slot_of is not None else 0
        for part in write.parts(limit):
            section_keys, section_argv, size = scope_section(
                keys, scope, part, retention_days=retention_days, now=now, mode=mode
            )
            current = open_calls.get(slot)
            if current is not None and current[3][0] + size > limit:
                flush(slot)
                current = None
            if current is None:
                current = open_calls[slot] = ([], [], [], [0])
            current[0].extend(section_keys)
            current[1].extend(section_argv)
            current[2].append(scope)
            current[3][0] += size
    for slot in list(open_calls):
        flush(slot)
    return out


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


def refusals(reply: Any) -> list[str]:
    """The ``meta`` keys of scopes the script did not write: a rebuild's write to a generation
    that is no longer the one being filled (cancelled, or taken over)."""
    parts = list(reply or ())
    return [text_of(k) for k in parts[1]] if len(parts) > 1 else []


def failures(reply: Any) -> Iterable[tuple[str, str]]:
    """(key, Redis's error) pairs from the script's reply."""
    parts = list(reply or ())
    items = list(parts[0] or ()) if parts else []
    for i in range(0, len(items) - 1, 2):
        key, err = items[i], items[i + 1]
        yield text_of(key), text_of(err)
