"""Issue 15's six defects, reproduced against the main this work started from (b95f4ae).

Run against a checkout of that commit, through its own write path and query code, exact mode:

    git worktree add /tmp/old b95f4ae
    PYTHONPATH=/tmp/old .venv/bin/python docs/evidence/old_main_defects.py

Each line compares the answer (stored result or response cache) with a direct computation from
the keys present. On b95f4ae every one differs; on today's code the same six are played by
``tests/test_protocol.py`` and ``tests/adversary.py`` (this script uses the old API: ``seq``,
``stamps``, ``version`` keys and ``script_call``, so it does not run on today's code).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sketches.store as S
import sketches.writes as W
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.periods import day_of, periods_holding, utc_today
from sketches.query import ALL_METRICS, Window, usage
from sketches.results import Answers, Query, Series
from tests.support.servers import RedisServer

TODAY = utc_today()
WS = Scope("acme", "old")
QUERY = Query(TODAY, 730, ALL_METRICS, Window.CALENDAR, TODAY)


def render(series: Series) -> bytes:
    return json.dumps([series.dates, series.dau, series.wau, series.mau]).encode()


def wrong_rows(got: list[Any], want: list[Any]) -> int:
    return sum(
        [got[c][i] for c in (1, 2, 3)] != [want[c][i] for c in (1, 2, 3)]
        for i in range(len(got[0]))
    )


class Old:
    """The old store, answers and the direct computation, for one scope."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def add(self, days: dict[tuple[Scope, date], set[str]]) -> None:
        batch: dict[Any, set[str]] = {}
        for (scope, d), members in days.items():
            for p in periods_holding(d):
                batch.setdefault((scope, p), set()).update(members)
        await self.store.add(batch)

    def answers(self) -> Answers:
        return Answers(self.store, retention_days=800, default_timezone="UTC", cache_entries=64)

    async def ask(self, answers: Answers) -> tuple[list[Any], bool]:
        snap = await answers.snapshot(WS)
        body, hit = await answers.answer(snap, QUERY, render, "json")
        await answers.drain()
        return json.loads(body), hit

    async def direct(self) -> list[Any]:
        rows = await usage(self.store, WS, end=QUERY.end, period_length=QUERY.period_length,
                           metrics=ALL_METRICS, window=QUERY.window,
                           horizon=TODAY - timedelta(days=800))
        return json.loads(render(Series.of_rows(rows)))

    async def wipe(self) -> None:
        keys = [k async for k in self.store.client.scan_iter(match="ev:*")]
        if keys:
            await self.store.client.delete(*keys)


async def split_batch(old: Old) -> str:
    """1. A request between two script calls of one batch caches the partial answer."""
    a = old.answers()
    await old.add({(WS, TODAY): {"seed"}})
    await old.ask(a)
    members = {f"m{i}" for i in range(5000)}
    grouped = W.group_by_scope({(WS, p): members for p in periods_holding(TODAY)})
    token = W.new_token()
    calls = [W.script_call(S.WRITE_SHA, old.store.keys, WS, part, retention_days=800,
                           now=time.time(), token=token, command="SADD")[0]
             for part in grouped[WS].parts()]
    await S.run_pipeline(old.store.client, [calls[0]])
    await old.ask(a)
    await S.run_pipeline(old.store.client, calls[1:])
    got, hit = await old.ask(a)
    want = await old.direct()
    return (f"today's DAU {got[1][-1]} (X-Cache {'hit' if hit else 'miss'}) vs "
            f"{want[1][-1]}; wrong rows {wrong_rows(got, want)}")


async def seq_lost(old: Old) -> str:
    """2. ``seq`` lost, the stamp ring kept: a later write re-issues an old value."""
    a = old.answers()
    day = TODAY - timedelta(days=3)
    for i in range(3):
        await old.add({(WS, day): {f"d{i}"}})
    await old.ask(a)
    await old.store.client.delete(old.store.keys.seq(WS))
    await old.add({(WS, TODAY): {"x"}})
    await old.ask(a)
    await old.add({(WS, TODAY): {"y"}})
    await old.add({(WS, day): {"late"}})  # the counter hands out 3 again
    got, _ = await old.ask(old.answers())
    want = await old.direct()
    return f"DAU of day-3 {got[1][-4]} vs {want[1][-4]}; wrong rows {wrong_rows(got, want)}"


async def stamp_wrap(old: Old) -> str:
    """3. At 2**32 a u32 stamp wraps to 0, the value of a day never written."""
    a = old.answers()
    await old.add({(WS, TODAY): {"a"}})
    await old.store.client.hset(old.store.keys.seq(WS), "n", 2**32 - 1)
    await old.ask(a)
    await old.add({(WS, TODAY - timedelta(days=5)): {"first"}})
    got, _ = await old.ask(old.answers())
    want = await old.direct()
    return (f"DAU of a day first written at 2**32: {got[1][-6]} vs {want[1][-6]}; "
            f"wrong rows {wrong_rows(got, want)}")


async def rebuild_between_chunks(old: Old) -> str:
    """4. A request between a rebuild's delete chunks stores counts under deleted stamps."""
    a = old.answers()
    await old.add({(WS, TODAY - timedelta(days=i)): {"a", "b", f"c{i}"} for i in range(40)})
    await old.ask(a)
    keys = old.store.keys
    await old.store.client.delete(keys.stamps(WS), keys.result(WS, "v1"), keys.version(WS))
    await old.ask(a)  # between chunks
    client = old.store.client
    rest = [k async for k in client.scan_iter(match="ev:*set:[dwsm]:*")]
    await client.delete(*rest)
    await old.add({(WS, TODAY - timedelta(days=i)): {"a", "b"} for i in range(7)})  # 7 retained
    got, _ = await old.ask(old.answers())
    return f"rows showing deleted counts {wrong_rows(got, await old.direct())}"


async def evicted(old: Old) -> str:
    """6. A sketch evicted under the stored result."""
    a = old.answers()
    await old.add({(WS, TODAY - timedelta(days=i)): {f"u{i}", "all"} for i in range(20)})
    await old.ask(a)
    await old.store.client.delete(old.store.keys.sketch(WS, day_of(TODAY - timedelta(days=3))))
    got, _ = await old.ask(old.answers())
    want = await old.direct()
    return (f"DAU of the evicted day {got[1][-4]} vs {want[1][-4]}; "
            f"wrong rows {wrong_rows(got, want)}")


def west_of_utc() -> str:
    """5. The key's deadline against the last instant UTC-12's horizon still holds its day."""
    period = day_of(TODAY)
    deadline = datetime.fromtimestamp(W.expire_at(period, 800), UTC)
    needed = datetime.combine(period.end + timedelta(days=801), datetime.min.time(), UTC)
    needed += timedelta(hours=12)
    return (f"key deadline {deadline:%Y-%m-%d %H:%M} UTC, needed until "
            f"{needed:%Y-%m-%d %H:%M} UTC: {'gone too early' if deadline < needed else 'ok'}")


async def main() -> None:
    server = RedisServer().start()
    lines: dict[int, str] = {}
    try:
        settings = Settings(redis_url=server.url, sketch_mode="exact", redis_key_prefix="ev",
                            _env_file=None)
        async with open_store(settings) as store:
            old = Old(store)
            for number, case in ((1, split_batch), (2, seq_lost), (3, stamp_wrap),
                                 (4, rebuild_between_chunks), (6, evicted)):
                await old.wipe()
                lines[number] = await case(old)
    finally:
        server.stop()
    lines[5] = west_of_utc()
    for number in sorted(lines):
        sys.stdout.write(f"defect {number}: {lines[number]}\n")


if __name__ == "__main__":
    asyncio.run(main())
