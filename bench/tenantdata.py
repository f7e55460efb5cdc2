"""Pure helpers of the ``tenants`` section (``bench.tenants``): the same logins spread over any
number of workspaces, what the store must hold afterwards, which workspaces to sample, how keys
are sorted into sketches and metadata, and where Kafka's default partitioner puts a key.

The same logins for every tenant count. One plan is drawn once, for the largest count: each
login belongs to a *fine* workspace (Zipf sizes, ``usage_metrics.synth.workspace_sizes``, as the
other sections draw them) and to one of its members, at a moment (live shape: now minus 0-60 s;
backfill shape: 90 days). At a tenant count ``n`` the fine workspace ``f`` is workspace
``f % n`` of org ``(f % n) // 10``. Subjects carry their fine workspace (``u<f>.<member>``), so
every run holds the very same messages but for the org and workspace fields (fixed-width names,
so even the byte count is the same), the same subjects, the same number of distinct subjects,
and only the workspace each login goes to changes. Modulo rather than consecutive grouping keeps
the Zipf head spread over the coarse workspaces instead of piling it onto the first one.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np

from sketches.keys import Scope
from usage_metrics.synth import WEEKDAY_FACTOR, workspace_sizes

Shape = Literal["live", "backfill"]
SHAPES: tuple[Shape, ...] = ("live", "backfill")
WORKSPACES_PER_ORG = 10
LIVE_WINDOW_MS = 60_000
BACKFILL_DAYS = 90
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

SKETCH = "sketch"
METADATA = "metadata"

# A sketch key names its mode and its period: ``...:hll:d:2026-11-24``, ``...:set:w:2026-W48``,
# ``...:hll:s:S2026-11-22`` (Sunday weeks), ``...:hll:m:2026-11``; a rebuild's generation writes
# ``...:hll~<generation>:d:...`` until its switch renames them. Everything else under a scope's
# hash tag (the meta hash, stored results, settings) is metadata.
SKETCH_KEY = re.compile(r":(?:hll|set)(?:~\d+)?:[dwsm]:")


def key_kind(key: str) -> str:
    """Sketch or metadata, for a key under a scope's hash tag: the one place that decides."""
    return SKETCH if SKETCH_KEY.search(key) else METADATA


def names(index: int) -> Scope:
    """Workspace ``index`` of a sweep (10 an org), with fixed-width ids."""
    return Scope(f"org-{index // WORKSPACES_PER_ORG:05d}", f"ws-{index:06d}")


@dataclass(frozen=True)
class Plan:
    """The logins of one shape, for every tenant count (arrays in message order)."""

    shape: Shape
    fine_count: int
    fine: np.ndarray  # fine workspace of each message
    member: np.ndarray  # member of that fine workspace
    other: np.ndarray  # another metric type (not a login)
    moment: np.ndarray  # live: age in ms (oldest first); backfill: seconds since the first day
    fine_sizes: np.ndarray

    @property
    def messages(self) -> int:
        return len(self.fine)

    @property
    def logins(self) -> int:
        return int((~self.other).sum())


def plan(shape: Shape, events: int, fine_count: int, largest: int, other_share: float,
         seed: int) -> Plan:
    rng = np.random.default_rng([seed, 17, SHAPES.index(shape)])
    sizes = np.array(workspace_sizes(fine_count, largest, random.Random(seed)), dtype=np.int64)
    fine = rng.choice(fine_count, size=events, p=sizes / sizes.sum())
    # Engaged members (low indices) log in more often than the rest, as bench.ingest draws them.
    member = (sizes[fine] * rng.random(events) ** 2).astype(np.int64)
    other = rng.random(events) < other_share
    if shape == "live":
        moment = np.sort(rng.integers(0, LIVE_WINDOW_MS, size=events))[::-1]
    else:
        first = date(2026, 1, 5)  # only its weekdays matter here; the days are placed at render
        weights = np.array([
            WEEKDAY_FACTOR[(first + timedelta(days=i)).weekday()]
            * (0.6 + 0.4 * (i + 1) / BACKFILL_DAYS) for i in range(BACKFILL_DAYS)])
        day = rng.choice(BACKFILL_DAYS, size=events, p=weights / weights.sum())
        moment = np.sort(day * 86_400 + rng.integers(7 * 3600, 20 * 3600, size=events))
    return Plan(shape, fine_count, fine, member, other, moment, sizes)


def workspace_of(p: Plan, count: int) -> np.ndarray:
    return p.fine % count


@dataclass
class Rendered:
    values: list[bytes]
    keys: list[bytes]
    parts: np.ndarray
    day: np.ndarray  # UTC day of each message, as days since 1970-01-01
    workspace: np.ndarray


def backfill_first_day(now: datetime) -> date:
    return now.date() - timedelta(days=BACKFILL_DAYS - 1)


def render(p: Plan, count: int, partitions: int, now: datetime) -> Rendered:
    """The messages of ``p`` at ``count`` workspaces, keyed and partitioned by workspace (key
    ``org/ws``, CRC-32, as ``bench.ingest`` keys), timestamps placed relative to ``now``."""
    ws = workspace_of(p, count)
    scopes = [names(i) for i in range(count)]
    tails = [f'","org_id":"{s.org_id}","workspace_id":"{s.workspace_id}","timestamp":"'
             for s in scopes]
    msg_keys = [f"{s.org_id}/{s.workspace_id}".encode() for s in scopes]
    ws_part = np.array([zlib.crc32(k) % partitions for k in msg_keys], dtype=np.int64)
    kind = ('{"metric_type":"login","subject":"u',
            '{"metric_type":"page_view","subject":"u')
    if p.shape == "live":
        moments = [now - timedelta(milliseconds=a) for a in range(LIVE_WINDOW_MS)]
        texts = [m.isoformat(timespec="milliseconds").replace("+00:00", "Z") for m in moments]
        ordinal = np.array([m.date().toordinal() for m in moments], dtype=np.int64)
        stamp_of = p.moment
        day = ordinal[stamp_of] - _EPOCH_ORDINAL
        stamps = [texts[a] for a in stamp_of.tolist()]
    else:
        first = backfill_first_day(now)
        day_text = [(first + timedelta(days=d)).isoformat() for d in range(BACKFILL_DAYS)]
        clock = [f"T{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}Z" for s in range(86_400)]
        d_idx, secs = np.divmod(p.moment, 86_400)
        day = d_idx + (first.toordinal() - _EPOCH_ORDINAL)
        stamps = [day_text[d] + clock[s] for d, s in zip(d_idx.tolist(), secs.tolist(),
                                                         strict=True)]
    values = [
        f'{kind[o]}{f:06d}.{m}{tails[w]}{t}"}}'.encode()
        for o, f, m, w, t in zip(p.other.tolist(), p.fine.tolist(), p.member.tolist(),
                                 ws.tolist(), stamps, strict=True)
    ]
    return Rendered(values, [msg_keys[w] for w in ws.tolist()], ws_part[ws], day, ws)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> int:
    if not len(a):
        return 0
    return int(np.unique(np.stack([a, b]), axis=1).shape[1])


def expected_sketch_keys(workspace: np.ndarray, day: np.ndarray, logins: np.ndarray) -> int:
    """Sketch keys the store must hold after the logins (UTC days, ISO weeks, months; the
    default settings): one per scope and period with a login, for each workspace and its org."""
    ws, d = workspace[logins], day[logins]
    week = d - (d + 3) % 7  # 1970-01-01 was a Thursday: weeks start on the Monday before
    month = d.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
    total = 0
    for scope in (ws, ws // WORKSPACES_PER_ORG):
        total += _unique_pairs(scope, d) + _unique_pairs(scope, week) + _unique_pairs(scope, month)
    return total


@dataclass(frozen=True)
class Sample:
    """Workspaces to measure: ``one_day`` (logins on exactly one UTC day, the median login count
    among those) and ``median`` (the median login count of all workspaces with data)."""

    one_day: list[int]
    median: list[int]
    logins: dict[int, int]
    days: dict[int, int]


def samples(workspace: np.ndarray, day: np.ndarray, logins: np.ndarray, count: int,
            k: int) -> Sample:
    ws, d = workspace[logins], day[logins]
    per_ws = np.bincount(ws, minlength=count)
    if len(ws):
        pairs = np.unique(np.stack([ws, d]), axis=1)
        days = np.bincount(pairs[0], minlength=count)
    else:
        days = np.zeros(count, dtype=np.int64)

    def around_median(candidates: np.ndarray) -> list[int]:
        if not len(candidates):
            return []
        target = float(np.median(per_ws[candidates]))
        order = sorted(candidates.tolist(), key=lambda i: (abs(per_ws[i] - target), i))
        return sorted(order[:k])

    one = around_median(np.flatnonzero(days == 1))
    med = around_median(np.flatnonzero(per_ws > 0))
    chosen = set(one) | set(med)
    return Sample(one, med, {i: int(per_ws[i]) for i in chosen},
                  {i: int(days[i]) for i in chosen})


def scopes_with_data(workspace: np.ndarray, logins: np.ndarray) -> tuple[int, int]:
    ws = np.unique(workspace[logins])
    return len(ws), len(np.unique(ws // WORKSPACES_PER_ORG))


def background(count: int, days: int, now: datetime, seed: int
               ) -> tuple[list[bytes], list[Scope]]:
    """A day or a few of logins for each of ``count`` workspaces (the live query's neighbours):
    one login a day on each of the last ``days`` days, today's a few minutes old."""
    rng = np.random.default_rng([seed, 23])
    values: list[bytes] = []
    scopes: list[Scope] = []
    for back in range(days - 1, -1, -1):
        day = now - timedelta(days=back)
        offsets = rng.integers(60, 600 if back == 0 else 20 * 3600, size=count)
        members = rng.integers(0, 10, size=count)
        for i, (off, m) in enumerate(zip(offsets.tolist(), members.tolist(), strict=True)):
            moment = (now - timedelta(seconds=off) if back == 0 else
                      datetime.combine(day.date(), datetime.min.time(), UTC)
                      + timedelta(seconds=7 * 3600 + off % (13 * 3600)))
            s = names(i)
            stamp = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
            values.append(
                (f'{{"metric_type":"login","subject":"b{i:06d}.{m}","org_id":"{s.org_id}",'
                 f'"workspace_id":"{s.workspace_id}","timestamp":"{stamp}"}}').encode())
            scopes.append(s)
    return values, scopes


# ---------------------------------------------------------------------------------------------
# Kafka's default partitioner (Java client, and librdkafka's ``murmur2_random``) for keyed records
# ---------------------------------------------------------------------------------------------

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` as an unsigned 32-bit value."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    for i in range(0, length - length % 4, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & ~3
    extra = length % 4
    if extra == 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def workspace_key(ws: Scope) -> bytes:
    """The key of a producer that keys by workspace id (the rebuild's keyed topic)."""
    return ws.workspace_id.encode()


def rebuild_keying(workspace: np.ndarray, partitions: int, keyed: bool, seed: int
                   ) -> tuple[list[bytes | None], np.ndarray]:
    """Keys and partitions of the rebuild topics: unkeyed records spread at random (what a
    producer without a key does), or keyed by workspace id through the default partitioner."""
    if not keyed:
        rng = np.random.default_rng([seed, 29])
        return [None] * len(workspace), rng.integers(0, partitions, size=len(workspace))
    distinct = np.unique(workspace).tolist()
    key_of = {w: workspace_key(names(w)) for w in distinct}
    part_of = {w: default_partition(key_of[w], partitions) for w in distinct}
    ws = workspace.tolist()
    return [key_of[w] for w in ws], np.array([part_of[w] for w in ws], dtype=np.int64)


def parse_env(text: str) -> dict[str, str]:
    """``NAME=value,NAME=value`` (the settings a keyed rebuild is given) as a mapping."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise ValueError(f"expected NAME=value, got {item!r}")
        out[name] = value
    return out


def per_partition(parts: np.ndarray, partitions: int) -> list[int]:
    return [int(x) for x in np.bincount(parts, minlength=partitions)]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def median_of(values: Sequence[float | None]) -> float | None:
    """The median of the figures a run has (a tiny run has no rate: one batch, no window)."""
    present = [v for v in values if v is not None and v == v]
    return float(np.median(present)) if present else None


def summarize_keys(rows: list[tuple[str, str, int]]) -> dict[str, Any]:
    """Totals of ``(tag, kind, bytes)`` rows: keys and bytes per kind, tags that hold each."""
    out: dict[str, Any] = {SKETCH: {"keys": 0, "bytes": 0}, METADATA: {"keys": 0, "bytes": 0}}
    tags: dict[str, set[str]] = {SKETCH: set(), METADATA: set()}
    for tag, kind, size in rows:
        out[kind]["keys"] += 1
        out[kind]["bytes"] += size
        tags[kind].add(tag)
    out["tags"] = len(tags[SKETCH] | tags[METADATA])
    return out
