"""The write protocol against the six ways an answer was once old or phantom (issue 15), on a real
Redis in both sketch modes, through the project's own write path and query code.

Each test plays one adversary: a request between the calls of one batch, a counter that restarts
or nears 2**32 and 2**63, a rebuild that switches while a request reads, a key deadline seen from
every zone, a sketch that vanishes under a stored result and a cached response. The answer is
always compared with a direct computation from the keys present when the request began.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

import sketches.results as results_module
import sketches.store as store_module
from sketches import scope_settings as wss
from sketches.keys import Scope
from sketches.periods import (
    Period,
    day_of,
    month_of,
    periods_holding,
    sunday_week_of,
    utc_today,
    week_of,
)
from sketches.query import ALL_METRICS, Metric, Window, usage
from sketches.results import Answers, Query, Series
from sketches.scope_settings import WorkspaceSettings
from sketches.store import WRITE_SHA, SketchStore, run_pipeline
from sketches.writes import (
    COUNTER_WRAP,
    DEADLINE_SLACK_DAYS,
    by_day,
    calls,
    expire_at,
    group_by_scope,
    needed_until,
    new_token,
)

WS = Scope("acme", "proto")
TODAY = utc_today()
RETENTION = 800


def answers_for(store: SketchStore, cache: int = 64) -> Answers:
    return Answers(store, retention_days=RETENTION, default_timezone="UTC", cache_entries=cache)


def render(series: Series) -> bytes:
    return json.dumps([series.dates, series.dau, series.wau, series.mau]).encode()


async def direct(
    answers: Answers, scope: Scope, query: Query, week_start: str = "monday"
) -> list[Any]:
    rows = await usage(
        answers.store, scope, end=query.end, period_length=query.period_length,
        metrics=query.metrics or ALL_METRICS, window=query.window,
        horizon=answers.horizon(query.today), week_start=week_start,  # type: ignore[arg-type]
    )
    return json.loads(render(Series.of_rows(rows)))


async def ask(answers: Answers, scope: Scope, query: Query) -> tuple[list[Any], bool]:
    snap = await answers.snapshot(scope)
    body, hit = await answers.answer(snap, query, render, "json")
    return json.loads(body), hit


def q(window: Window = Window.CALENDAR, metrics: frozenset[Metric] = ALL_METRICS,
      today: date = TODAY, period_length: int = 730) -> Query:
    return Query(today, period_length, metrics, window, today)


async def add_days(store: SketchStore, logins: dict[tuple[Scope, date], set[str]],
                   week_start: str = "monday") -> None:
    """As the consumer writes: members per (scope, local day), counted in its week and month."""
    assert await store.add_by_day(
        logins, {scope: week_start for scope, _ in logins}  # type: ignore[misc]
    ) == []


async def assert_honest(answers: Answers, scope: Scope, query: Query,
                        week_start: str = "monday") -> bool:
    """The answer equals the direct computation, asked twice (the second may be a cache hit,
    which must be just as honest). Returns whether the second was a hit."""
    want = await direct(answers, scope, query, week_start)
    got, _ = await ask(answers, scope, query)
    assert got == want
    again, hit = await ask(answers, scope, query)
    assert again == want
    return hit


# --------------------------------------------------------------------------------------------
# 1. A batch written in several script calls
# --------------------------------------------------------------------------------------------


async def test_every_call_of_a_split_batch_changes_what_a_reader_sees(
    store: SketchStore,
) -> None:
    """A scope's share of a batch goes out as several calls; a reader between any two (cache
    on) must never keep the partial answer once the rest has landed."""
    answers = answers_for(store)
    await add_days(store, {(WS, TODAY): {"seed"}, (WS.org, TODAY): {"seed"}})
    assert await assert_honest(answers, WS, q())
    members = {f"m{i}" for i in range(50)}
    grouped = by_day({(WS, TODAY): members, (WS.org, TODAY): members}, {WS: "monday",
                                                                        WS.org: "monday"})
    batch = calls(WRITE_SHA, store.keys, grouped, retention_days=RETENTION, now=time.time(),
                  token=new_token(), command=store._add_verb, limit=7)
    assert len(batch) >= 14
    for call in batch:
        await run_pipeline(store.client, [call.command])
        for scope in (WS, WS.org):
            assert_hit = await assert_honest(answers, scope, q())
            assert assert_hit, "an unchanged scope is served from the cache"
    got, hit = await ask(answers, WS, q())
    assert got[1][-1] == 51
    assert hit


async def test_every_call_bumps_the_counter_and_stamps_its_days(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    store.members_per_call = 5
    await add_days(store, {(WS, TODAY): {f"u{i}" for i in range(23)},
                           (WS, TODAY - timedelta(days=3)): {"x"}})
    meta = await redis_client.hgetall(store.keys.meta(WS))
    calls_made = 5  # 24 members, at most 5 a call
    assert int(meta[b"n"]) == calls_made
    assert int(meta[str(TODAY.toordinal()).encode()]) == calls_made
    assert int(meta[str((TODAY - timedelta(days=3)).toordinal()).encode()]) == calls_made
    assert len(meta[b"e"]) == 32


async def test_many_scopes_share_one_call_and_each_is_written_once(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    scopes = [Scope("many", f"w{i}") for i in range(300)]
    logins = {(s, TODAY): {f"{s.workspace_id}-a", f"{s.workspace_id}-b"} for s in scopes}
    grouped = by_day(logins, dict.fromkeys(scopes, "monday"))
    batch = calls(WRITE_SHA, store.keys, grouped, retention_days=RETENTION, now=time.time(),
                  token=new_token(), command=store._add_verb)
    assert len(batch) == 1
    assert len(batch[0].scopes) == 300
    await add_days(store, logins)
    for s in scopes:
        assert await store.counts(s, list(periods_holding(TODAY))) == [2, 2, 2]
        assert await redis_client.hget(store.keys.meta(s), "n") == b"1"


# --------------------------------------------------------------------------------------------
# 2. The counter lost, 3. the counter near 2**32 and 2**63
# --------------------------------------------------------------------------------------------


async def test_a_counter_that_starts_again_never_reissues_a_value_a_result_holds(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    answers = answers_for(store)
    await add_days(store, {(WS, TODAY - timedelta(days=i)): {f"u{i}"} for i in range(5)})
    assert await assert_honest(answers, WS, q())
    await redis_client.delete(store.keys.meta(WS))  # expiry, eviction or a deletion
    # No counter: answered directly, never from the stored result or the cache.
    want = await direct(answers, WS, q())
    got, hit = await ask(answers, WS, q())
    assert got == want
    assert not hit
    for i in range(6):  # the new counter climbs through the values the old one handed out
        await add_days(store, {(WS, TODAY - timedelta(days=i)): {f"again{i}"}})
        await assert_honest(answers, WS, q())


async def test_a_counter_that_went_back_under_the_same_epoch_drops_the_stored_result(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    """The meta restored from an older copy (same epoch, lower counter, older stamps) while the
    stored result stayed: the counter hands its values out again. A request that refreshes only
    DAU must drop the whole result, or the WAU column, filed under the old stamps, would later
    match the re-issued ones and keep its old number."""
    answers = answers_for(store, cache=0)
    day = TODAY - timedelta(days=2)
    await add_days(store, {(WS, day): {"first"}})
    old_meta = await redis_client.dump(store.keys.meta(WS))
    ttl = await redis_client.pttl(store.keys.meta(WS))
    for i in range(3):
        await add_days(store, {(WS, day): {f"t{i}"}})  # the day's stamp is 4
    await assert_honest(answers, WS, q())
    await answers.drain()
    assert old_meta is not None
    await redis_client.restore(store.keys.meta(WS), ttl, old_meta, replace=True)  # n is 1
    await assert_honest(answers, WS, q(metrics=frozenset({Metric.DAU})))
    await answers.drain()
    for i in range(3):  # 2, 3, 4 again, on the same day, with new members
        await add_days(store, {(WS, day): {f"again{i}"}})
    await assert_honest(answers, WS, q(metrics=frozenset({Metric.WAU})))


@pytest.mark.parametrize("start", [2**32 - 3, 2**53 - 3, COUNTER_WRAP - 3, 2**63 - 6])
async def test_stamps_are_as_wide_as_the_counter_or_start_a_new_epoch(
    store: SketchStore, redis_client: aioredis.Redis, start: int
) -> None:
    answers = answers_for(store)
    await add_days(store, {(WS, TODAY): {"a"}})
    meta = store.keys.meta(WS)
    epoch = await redis_client.hget(meta, "e")
    await redis_client.hset(meta, "n", start)
    for i in range(5):  # across 2**32, or where Lua's doubles end: no value handed out twice
        await add_days(store, {(WS, TODAY - timedelta(days=i % 2)): {f"u{i}"}})
        await assert_honest(answers, WS, q())
        await assert_honest(answers, WS, q(Window.ROLLING))
    fields = await redis_client.hgetall(meta)
    stamp = int(fields[str(TODAY.toordinal()).encode()])
    if start + 5 < COUNTER_WRAP:
        assert stamp == start + 5
        assert fields[b"e"] == epoch
    else:
        assert stamp <= 5
        assert fields[b"e"] != epoch


# --------------------------------------------------------------------------------------------
# 4. A request during a rebuild
# --------------------------------------------------------------------------------------------


def interleave(
    monkeypatch: pytest.MonkeyPatch, at: int, action: Callable[[], Awaitable[None]]
) -> list[bool]:
    """Run ``action`` just before the ``at``-th round trip the answer makes (its snapshot, its
    state read, every sketch read, its re-check, its write-back). Returns [whether it ran]."""
    seen = [0]
    ran = [False]
    real = store_module.run_pipeline

    async def hooked(client: Any, commands: Any) -> list[Any]:
        seen[0] += 1
        if seen[0] == at:
            ran[0] = True
            await action()
        return await real(client, commands)

    for module in (results_module, store_module):
        monkeypatch.setattr(module, "run_pipeline", hooked)
    return ran


@pytest.mark.parametrize("at", list(range(1, 9)))
async def test_a_rebuild_that_switches_mid_request_is_never_served_mixed(
    store: SketchStore, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    """The old generation holds 3 users a day, the rebuilt one 2 (another timezone, say). A
    request around the switch answers all old or all new, and every later one all new."""
    answers = answers_for(store)
    old = {(WS, TODAY - timedelta(days=i)): {"a", "b", f"c{i}"} for i in range(40)}
    await add_days(store, old)
    before = await direct(answers, WS, q())
    building = await store.begin_rebuild([WS])
    await store.add_by_day({(s, d): {"a", "b"} for (s, d) in old}, {WS: "monday"},
                           building=building)
    assert await direct(answers, WS, q()) == before  # readers see the live generation only

    async def switch() -> None:
        await store.finish_rebuild(building)

    ran = interleave(monkeypatch, at, switch)
    got, _ = await ask(answers, WS, q())
    await answers.drain()
    monkeypatch.undo()
    if not ran[0]:  # the request made fewer round trips: the switch comes after it
        await switch()
    after = await direct(answers, WS, q())
    assert after != before
    assert got in (before, after)
    assert await assert_honest(answers, WS, q()) or True
    await answers.drain()
    fresh = answers_for(store)  # another API process: reads only what Redis holds
    got, _ = await ask(fresh, WS, q())
    assert got == after


async def test_the_consumer_writes_both_generations_during_a_rebuild(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    answers = answers_for(store)
    await add_days(store, {(WS, TODAY): {"old"}})
    building = await store.begin_rebuild([WS])
    await add_days(store, {(WS, TODAY): {"live"}})  # the live consumer, mid-rebuild
    got, _ = await ask(answers, WS, q())
    assert got[1][-1] == 2
    await store.add_by_day({(WS, TODAY): {"replayed"}}, {WS: "monday"}, building=building)
    assert await store.finish_rebuild(building) == 3  # day, week, month
    assert await assert_honest(answers, WS, q()) is True
    got, _ = await ask(answers, WS, q())
    assert got[1][-1] == 2  # "live" and "replayed": "old" went with the old generation
    assert await redis_client.hget(store.keys.meta(WS), "b") is None
    assert not [k async for k in redis_client.scan_iter(match=f"{store.keys.sketch_head(WS)}~*")]


async def test_a_second_rebuild_is_refused_or_takes_over(store: SketchStore) -> None:
    from sketches.errors import RebuildInterrupted, RebuildRunning

    await add_days(store, {(WS, TODAY): {"a"}})
    first = await store.begin_rebuild([WS])
    with pytest.raises(RebuildRunning, match="already under way"):
        await store.begin_rebuild([WS])
    second = await store.begin_rebuild([WS], take_over=True)
    with pytest.raises(RebuildInterrupted):
        await store.add_by_day({(WS, TODAY): {"late"}}, {WS: "monday"}, building=first)
    with pytest.raises(RebuildInterrupted):
        await store.finish_rebuild(first)
    await store.cancel_rebuild(second)
    assert await store.counts(WS, [day_of(TODAY)]) == [1]  # the live sketches never changed


# --------------------------------------------------------------------------------------------
# 5. Deadlines and the horizon in every zone
# --------------------------------------------------------------------------------------------

PERIODS = st.builds(
    lambda d, kind: (day_of, week_of, sunday_week_of, month_of)[kind](d),
    st.dates(date(2000, 1, 1), date(2090, 1, 1)), st.integers(0, 3),
)


@given(PERIODS, st.integers(31, 3000), st.integers(-12 * 4, 14 * 4))
def test_a_key_outlives_the_last_instant_any_zone_holds_its_period(
    period: Period, retention: int, quarter_hours: int
) -> None:
    offset = timedelta(minutes=15 * quarter_hours)
    deadline = datetime.fromtimestamp(expire_at(period, retention), UTC)
    needed = needed_until(period, retention, offset)
    assert deadline >= needed + timedelta(hours=10)
    # ...and not by much more than the slack: keys do not linger for days.
    assert deadline - needed <= timedelta(days=DEADLINE_SLACK_DAYS, hours=12)


def test_needed_until_is_the_local_midnight_after_the_horizon_leaves_the_period() -> None:
    period = day_of(date(2026, 1, 10))
    west = needed_until(period, 100, timedelta(hours=-12))
    east = needed_until(period, 100, timedelta(hours=14))
    assert west == datetime(2026, 4, 21, 12, tzinfo=UTC)
    assert east == datetime(2026, 4, 20, 10, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# 6. Sketches that vanish under stored results and cached responses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["day", "week", "month"])
@pytest.mark.parametrize("window", [Window.CALENDAR, Window.ROLLING])
async def test_a_vanished_sketch_is_never_served(
    store: SketchStore, redis_client: aioredis.Redis, which: str, window: Window
) -> None:
    answers = answers_for(store)
    days = {(WS, TODAY - timedelta(days=i)): {f"u{i}", "all"} for i in range(20)}
    await add_days(store, days)
    assert await assert_honest(answers, WS, q(window))
    await answers.drain()
    victim = TODAY - timedelta(days=3)
    period = {"day": day_of(victim), "week": week_of(victim), "month": month_of(victim)}[which]
    assert await redis_client.delete(store.keys.sketch(WS, period)) == 1  # evicted, say
    want = await direct(answers, WS, q(window))
    got, hit = await ask(answers, WS, q(window))
    assert got == want
    assert not hit
    await answers.drain()
    got, _ = await ask(answers_for(store), WS, q(window))  # the stored result, another process
    assert got == want


# --------------------------------------------------------------------------------------------
# The mutants a previous audit left alive (issue 15), each with a test that notices it
# --------------------------------------------------------------------------------------------


async def test_rolling_wau_alone_sees_a_late_login_six_days_back(store: SketchStore) -> None:
    answers = answers_for(store, cache=0)
    await add_days(store, {(WS, TODAY - timedelta(days=i)): {"a"} for i in range(10)})
    wau = q(Window.ROLLING, frozenset({Metric.WAU}))
    await assert_honest(answers, WS, wau)
    await add_days(store, {(WS, TODAY - timedelta(days=6)): {"late"}})
    await assert_honest(answers, WS, wau)  # today's 7-day window holds day -6


async def test_a_sunday_week_scope_recomputes_its_own_week_after_a_late_login(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    await wss.save(redis_client, store.keys, WS,
                   WorkspaceSettings(timezone="UTC", week_start="sunday"))
    answers = answers_for(store, cache=0)
    sunday = TODAY - timedelta(days=(TODAY.weekday() + 1) % 7 + 14)
    await add_days(store, {(WS, sunday + timedelta(days=i)): {"a"} for i in range(7)},
                   week_start="sunday")
    wau = q(Window.CALENDAR, frozenset({Metric.WAU}))
    await assert_honest(answers, WS, wau, "sunday")
    await add_days(store, {(WS, sunday): {"late"}}, week_start="sunday")
    await assert_honest(answers, WS, wau, "sunday")  # Monday..Saturday after it show 2


async def test_a_new_day_without_logins_still_has_its_rolling_counts(store: SketchStore) -> None:
    answers = answers_for(store, cache=0)
    await add_days(store, {(WS, TODAY - timedelta(days=1)): {"a", "b"}})
    await assert_honest(answers, WS, q(Window.ROLLING))
    tomorrow = q(Window.ROLLING, today=TODAY + timedelta(days=1))
    got, _ = await ask(answers, WS, tomorrow)
    assert got == await direct(answers, WS, tomorrow)
    assert got[2][-1] == 2
    assert got[3][-1] == 2


async def test_a_stored_result_never_outlives_the_meta_that_stamped_it(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    answers = answers_for(store)
    await add_days(store, {(WS, TODAY): {"a"}})
    await redis_client.expire(store.keys.meta(WS), 5000)
    await ask(answers, WS, q())
    await answers.drain()
    result_expiry = await redis_client.pexpiretime(store.keys.result(WS, "v1"))
    assert 0 < result_expiry <= await redis_client.pexpiretime(store.keys.meta(WS))


def test_two_lone_periods_are_both_stamped_on_their_first_days() -> None:
    week = week_of(TODAY - timedelta(days=60))
    month = month_of(TODAY - timedelta(days=200))
    grouped = group_by_scope({(WS, week): {"a"}, (WS, month): {"b"}})
    assert grouped[WS].days == {week.start, month.start}


async def test_a_lone_week_and_month_written_are_answered(store: SketchStore) -> None:
    answers = answers_for(store, cache=0)
    await add_days(store, {(WS, TODAY): {"a"}})
    await assert_honest(answers, WS, q())
    week = week_of(TODAY - timedelta(days=60))
    month = month_of(TODAY - timedelta(days=200))
    assert await store.add({(WS, week): {"w"}, (WS, month): {"m"}}) == []
    await assert_honest(answers, WS, q())
