"""The query data set: workspaces with two years of days, written straight through the store.

Each workspace has a population of members, each with an engagement drawn from Beta(1.2, 2.5);
a member is active on a day with probability engagement x weekday factor x team growth. The day
sets are added to the day, ISO week and month sketches exactly as ``consumer.batch.prepare``
groups a batch (``store.add({(ws, period): subjects})``), a week of days per call.

Most workspaces are small (tens of active users a day, sparse sketches); a few are large
(thousands to tens of thousands a day, dense sketches). The most recent ``exact_days`` days (and
at least the whole previous calendar month) are also written in exact mode, for the memory
comparison.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
from redis.asyncio import Redis

from bench.config import BenchConfig
from bench.util import say
from sketches.keys import KeySpace, Scope
from sketches.periods import Period, day_of, month_of, week_of
from sketches.store import ExactStore, HllStore
from usage_metrics.synth import WEEKDAY_FACTOR

MEAN_ENGAGEMENT = 1.2 / (1.2 + 2.5)
RETENTION_DAYS = 800


@dataclass(frozen=True)
class QueryWorkspace:
    ws: Scope
    cls: str  # "small" or "large"
    target_dau: int
    population: int


@dataclass
class QueryData:
    prefix: str
    workspaces: list[QueryWorkspace]
    first: date
    last: date
    exact_first: date
    mean_dau: dict[Scope, float]
    elements_added: int
    seconds: float


def plan(cfg: BenchConfig) -> list[QueryWorkspace]:
    rng = np.random.default_rng(cfg.seed + 1)
    n_large = min(len(cfg.large_dau), cfg.query_workspaces)
    n_small = cfg.query_workspaces - n_large
    out: list[QueryWorkspace] = []
    for i in range(n_small):
        dau = int(10 + 90 * rng.random() ** 2)  # tens a day
        out.append(QueryWorkspace(Scope(f"org-{i % 20:02d}", f"small-{i:03d}"), "small", dau,
                                  int(dau / MEAN_ENGAGEMENT) + 1))
    for j, dau in enumerate(cfg.large_dau[:n_large]):
        out.append(QueryWorkspace(Scope("org-big", f"large-{j}-{dau}"), "large", dau,
                                  int(dau / MEAN_ENGAGEMENT) + 1))
    return out


def _day_factor(d: date, i: int, days: int) -> float:
    return WEEKDAY_FACTOR[d.weekday()] / 0.94 * (0.6 + 0.4 * (i + 1) / days) / 0.8


async def build(cfg: BenchConfig, redis_url: str, today: date) -> QueryData:
    started = time.perf_counter()
    prefix = "q"
    client = Redis.from_url(redis_url)
    hll = HllStore(client, KeySpace(prefix, "hll"), RETENTION_DAYS)
    exact = ExactStore(client, KeySpace(prefix, "exact"), RETENTION_DAYS)
    days = cfg.query_days
    first = today - timedelta(days=days - 1)
    prev_month_start = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    exact_first = min(today - timedelta(days=cfg.exact_days - 1), prev_month_start)
    dates = [first + timedelta(days=i) for i in range(days)]
    factors = np.array([_day_factor(d, i, days) for i, d in enumerate(dates)])
    spaces = plan(cfg)
    rng = np.random.default_rng(cfg.seed + 2)
    added = 0
    mean_dau: dict[Scope, float] = {}
    try:
        for n, qw in enumerate(spaces):
            engagement = rng.beta(1.2, 2.5, size=qw.population)
            names = [f"member_{i}" for i in range(qw.population)]
            dau_total = 0
            for lo in range(0, days, 7):
                chunk = range(lo, min(lo + 7, days))
                draws = rng.random((len(chunk), qw.population))
                batch: dict[tuple[Scope, Period], set[str]] = {}
                wide: defaultdict[tuple[Scope, Period], set[str]] = defaultdict(set)
                for row, i in enumerate(chunk):
                    d = dates[i]
                    idx = np.flatnonzero(draws[row] < engagement * factors[i])
                    subjects = {names[k] for k in idx.tolist()}
                    if not subjects:
                        continue
                    dau_total += len(subjects)
                    batch[(qw.ws, day_of(d))] = subjects
                    wide[(qw.ws, week_of(d))] |= subjects
                    wide[(qw.ws, month_of(d))] |= subjects
                batch.update(wide)
                added += sum(len(v) for v in batch.values())
                await hll.add(batch)
                # Exact mode: recent days, and every week or month that reaches into them.
                exact_batch = {
                    k: v for k, v in batch.items()
                    if (k[1].start if k[1].granularity == "d" else k[1].end) >= exact_first
                }
                if exact_batch:
                    await exact.add(exact_batch)
            mean_dau[qw.ws] = dau_total / days
            await new_versions(client, prefix, [qw])
            if qw.cls == "large" or n % 25 == 0:
                say(f"query data: {n + 1}/{len(spaces)} workspaces written "
                    f"({qw.ws.workspace_id}, mean DAU {mean_dau[qw.ws]:,.0f})")
    finally:
        await client.aclose()
    return QueryData(prefix, spaces, first, today, exact_first, mean_dau, added,
                     time.perf_counter() - started)


async def new_versions(client: Redis, prefix: str, spaces: list[QueryWorkspace]) -> None:
    """What a consumer batch does to each workspace it writes: a new version token, which makes
    the API's result cache miss (``KeySpace.version``; a workspace without one is never cached).
    Skipped when the keyspace has no version keys (older code)."""
    keys = KeySpace(prefix, "hll")
    version = getattr(keys, "version", None)
    if version is None:
        return
    token = uuid.uuid4().hex
    pipe = client.pipeline(transaction=False)
    for q in spaces:
        pipe.set(version(q.ws), token)
    await pipe.execute()


async def invalidate_caches(client: Redis, prefix: str) -> int:
    """Mark every HLL's cached cardinality stale, as ``PFADD`` does when it changes a register
    (the top bit of header byte 15), so that the next single-key ``PFCOUNT`` recomputes it: the
    state of sketches freshly written by the consumer."""
    n = 0
    pipe = client.pipeline(transaction=False)
    # Sketches only (d, w, s, m): not a scope's seq hash, stamps or stored result.
    async for key in client.scan_iter(match=f"{prefix}:*:hll:[dwsm]:*", count=5000):
        pipe.setrange(key, 15, b"\x80")
        n += 1
        if n % 5000 == 0:
            await pipe.execute()
    await pipe.execute()
    return n


def describe(data: QueryData) -> dict[str, Any]:
    small = [q for q in data.workspaces if q.cls == "small"]
    large = [q for q in data.workspaces if q.cls == "large"]
    return {
        "workspaces": len(data.workspaces),
        "small": len(small),
        "large": len(large),
        "days": (data.last - data.first).days + 1,
        "first": data.first.isoformat(),
        "last": data.last.isoformat(),
        "small_mean_dau_median": float(np.median([data.mean_dau[q.ws] for q in small]))
        if small else None,
        "small_mean_dau_range": [min(data.mean_dau[q.ws] for q in small),
                                 max(data.mean_dau[q.ws] for q in small)] if small else None,
        "large_mean_dau": {q.ws.workspace_id: data.mean_dau[q.ws] for q in large},
        "elements_added": data.elements_added,
        "build_seconds": data.seconds,
    }
