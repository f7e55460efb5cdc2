"""Stored per-day results (``sketches.results``) against the direct computation, on a real Redis,
in both sketch modes: an answer from stored results must equal a full recompute from the sketches,
whatever happened in between (late logins, batches landing mid-request, rebuilds, a Redis that
lost the tail of its log, settings changes, a new day)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from sketches import scope_settings as wss
from sketches.keys import Scope
from sketches.periods import periods_holding, utc_today
from sketches.query import ALL_METRICS, Metric, UsageRow, Window, usage
from sketches.results import SAFE_MARGIN, Answers, Query, Stored, runs, stamps_from, window_any
from sketches.scope_settings import WorkspaceSettings
from sketches.store import SketchStore

WS = Scope("acme", "ws-1")
OTHER = Scope("acme", "ws-2")
TODAY = utc_today()


async def add(store: SketchStore, logins: list[tuple[Scope, str, date]],
              week_start: str = "monday") -> None:
    """As the consumer writes them: each login to its workspace's sketches and its org's."""
    batch: dict[Any, set[str]] = {}
    for ws, subject, d in logins:
        for scope in (ws, ws.org):
            for p in periods_holding(d, week_start):  # type: ignore[arg-type]
                batch.setdefault((scope, p), set()).add(subject)
    assert await store.add(batch) == []


def answers_for(store: SketchStore, retention: int = 800) -> Answers:
    return Answers(store, retention_days=retention, default_timezone="UTC", cache_entries=0)


async def stored_and_direct(
    answers: Answers, scope: Scope, *, today: date = TODAY, end: date | None = None,
    period_length: int = 730, window: Window = Window.CALENDAR,
    metrics: frozenset[Metric] = ALL_METRICS,
) -> tuple[list[UsageRow], list[UsageRow]]:
    snap = await answers.snapshot(scope)
    query = Query(end or today, period_length, metrics, window, today)
    got = await answers.rows(snap, query)
    want = await usage(
        answers.store, scope, end=query.end, period_length=period_length, metrics=metrics,
        window=window, horizon=answers.horizon(today), week_start=snap.config.week_start,
    )
    return got, want


async def assert_equal_to_direct(answers: Answers, scope: Scope, **kw: Any) -> list[UsageRow]:
    got, want = await stored_and_direct(answers, scope, **kw)
    assert got == want
    return got


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


def test_window_any_marks_the_windows_that_hold_a_change() -> None:
    changed = [False] * 10
    changed[3] = True
    import numpy as np

    got = window_any(np.array(changed), 3).tolist()
    assert got == [False, False, False, True, True, True, False, False, False, False]


def test_runs_merge_what_is_closer_than_the_gap() -> None:
    assert runs([1, 2, 3, 40, 41, 100], 30) == [(1, 3), (40, 41), (100, 100)]
    assert runs([1, 31], 30) == [(1, 31)]
    assert runs([], 30) == []


def test_stamps_are_read_per_day_and_a_day_never_written_reads_zero() -> None:
    first = date(2026, 1, 1)
    o = first.toordinal()
    meta = {o: 7, o + 1: 2**40, o - 1: 5, o + 5: 9}
    assert stamps_from(meta, first, 3).tolist() == [7, 2**40, 0]
    assert stamps_from({}, first, 2).tolist() == [0, 0]
    # Stamps are as wide as the counter: no ring, no wrap, no day sharing another's slot.
    assert stamps_from(meta, first + timedelta(days=1024), 1).tolist() == [0]
    assert stamps_from({o: 2**63 - 1}, first, 1).tolist() == [2**63 - 1]


@given(st.integers(-900, 900), st.integers(1, 900))
def test_a_stored_result_moved_and_encoded_keeps_every_entry_that_overlaps(
    shift: int, n: int
) -> None:
    import numpy as np

    old = Stored.empty("UTC|monday", 5, date(2026, 1, 1), 300)
    old.values[:] = np.arange(old.values.size).reshape(old.values.shape)
    old.seen[:] = 3
    moved = Stored.decode(old.moved_to(date(2026, 1, 1) + timedelta(days=shift), n).encode())
    assert moved is not None
    for i in range(n):
        j = i + shift
        want = old.values[:, j] if 0 <= j < 300 else -1
        assert (moved.values[:, i] == want).all()
    assert Stored.decode(b"not a result") is None


# --------------------------------------------------------------------------------------------
# Against a real Redis, both modes
# --------------------------------------------------------------------------------------------


async def test_a_late_login_400_days_back_shows_at_once_in_every_row_it_touches(
    store: SketchStore, settings: Any
) -> None:
    answers = answers_for(store)
    late = TODAY - timedelta(days=400)
    await add(store, [(WS, f"u{i % 7}", TODAY - timedelta(days=i)) for i in range(0, 500, 3)])
    before = {
        w: await assert_equal_to_direct(answers, WS, window=w) for w in Window
    }
    await add(store, [(WS, "late-comer", late)])
    for w in Window:
        after = await assert_equal_to_direct(answers, WS, window=w)
        changed = {r.date for r, b in zip(after, before[w], strict=True) if r != b}
        if settings.sketch_mode == "exact":
            # exactly the rows whose day, week, month or rolling window holds the late day
            touched = {late}
            if w is Window.CALENDAR:
                touched |= {p_day for p in periods_holding(late)[1:] for p_day in p.days()}
            else:
                touched |= {late + timedelta(days=k) for k in range(30)}
            assert changed == touched, (w, sorted(changed ^ touched)[:5])
            row = {r.date: r for r in after}[late]
            assert row.dau == ({r.date: r for r in before[w]}[late].dau or 0) + 1
        else:
            assert late in changed


async def test_org_rows_count_each_member_once_and_equal_the_direct_computation(
    store: SketchStore, settings: Any
) -> None:
    answers = answers_for(store)
    day = TODAY - timedelta(days=3)
    await add(store, [(WS, "ann", day), (OTHER, "ann", day), (OTHER, "bob", day),
                      (Scope("globex", "ws-1"), "ann", day)])
    for w in Window:
        rows = await assert_equal_to_direct(answers, WS.org, window=w, period_length=10)
        assert {r.date: r.dau for r in rows}[day] == 2  # ann once, bob; not globex's ann


async def test_a_batch_landing_between_the_stamps_and_the_sketches_is_recomputed_next_time(
    store: SketchStore,
) -> None:
    answers = answers_for(store)
    await add(store, [(WS, "a", TODAY)])
    await assert_equal_to_direct(answers, WS, window=Window.ROLLING)
    snap = await answers.snapshot(WS)  # stamps read...
    await add(store, [(WS, "b", TODAY)])  # ...a batch lands...
    await answers.rows(snap, Query(TODAY, 30, ALL_METRICS, Window.ROLLING, TODAY))  # ...sketches
    rows = await assert_equal_to_direct(answers, WS, window=Window.ROLLING)
    assert rows[-1].dau == 2


async def test_a_redis_that_lost_the_tail_of_its_log_never_serves_an_old_number(
    store: SketchStore, redis_client: aioredis.Redis,
) -> None:
    answers = answers_for(store)
    await add(store, [(WS, "a", TODAY)])
    await assert_equal_to_direct(answers, WS)
    prefix = store.keys.workspace_prefix(WS)
    saved = {k: await redis_client.dump(k) async for k in redis_client.scan_iter(f"{prefix}*")}
    await add(store, [(WS, "b", TODAY), (WS, "c", TODAY)])
    await assert_equal_to_direct(answers, WS)
    # Everything written since goes (as a lost AOF tail does); the same seq value is handed out
    # again to another batch.
    async for k in redis_client.scan_iter(f"{prefix}*"):
        if k not in saved:
            await redis_client.delete(k)
    for k, v in saved.items():
        await redis_client.restore(k, 0, v, replace=True)
    await add(store, [(WS, "d", TODAY)])
    rows = await assert_equal_to_direct(answers, WS)
    assert rows[-1].dau == 2  # a and d


async def test_a_counter_that_went_away_while_the_result_stayed_is_not_trusted(
    store: SketchStore, redis_client: aioredis.Redis,
) -> None:
    answers = answers_for(store)
    await add(store, [(WS, f"u{i}", TODAY) for i in range(5)])
    await assert_equal_to_direct(answers, WS)
    await redis_client.delete(store.keys.meta(WS))  # starts again at 1, below the result's seq
    await add(store, [(WS, "new", TODAY)])
    rows = await assert_equal_to_direct(answers, WS)
    assert rows[-1].dau == 6


async def test_rebuild_timezone_and_week_start_changes_and_a_new_day_start_afresh(
    store: SketchStore,
) -> None:
    answers = answers_for(store)
    await add(store, [(WS, "a", TODAY - timedelta(days=2)), (WS, "b", TODAY)])
    await assert_equal_to_direct(answers, WS)
    await store.delete_workspace(WS)  # sketches, meta (stamps) and stored results all go
    rows = await assert_equal_to_direct(answers, WS)
    assert all(r.dau is None for r in rows)
    await add(store, [(WS, "c", TODAY)], week_start="sunday")
    await wss.save(store.client, store.keys, WS,
                   WorkspaceSettings(timezone="Asia/Tokyo", week_start="sunday"))
    for w in Window:
        rows = await assert_equal_to_direct(answers, WS, window=w)
        assert rows[-1].dau == 1
    # The next day (and the one after) move the stored span: still the direct answer.
    for shift in (1, 2, 40):
        await assert_equal_to_direct(answers, WS, today=TODAY + timedelta(days=shift))


async def test_requests_reaching_the_retention_edge_are_computed_directly(
    store: SketchStore,
) -> None:
    answers = answers_for(store, retention=100)
    await add(store, [(WS, "a", TODAY - timedelta(days=80)), (WS, "b", TODAY)])
    before = answers.counters.direct
    await assert_equal_to_direct(answers, WS, period_length=100 - SAFE_MARGIN + 1)
    assert answers.counters.direct == before + 1
    await assert_equal_to_direct(answers, WS, period_length=100 - SAFE_MARGIN)
    assert answers.counters.direct == before + 1


# A Hypothesis program of batches, queries, settings changes and rebuilds; every answer must
# equal the direct computation at that moment. Small retention keeps each example quick.
RETENTION = 80
days_back = st.integers(0, RETENTION + 10)
login = st.tuples(st.sampled_from([WS, OTHER]), st.sampled_from("abcdefgh"), days_back)
op = st.one_of(
    st.tuples(st.just("batch"), st.lists(login, min_size=1, max_size=12)),
    st.tuples(
        st.just("query"),
        st.sampled_from([WS, OTHER, WS.org]),
        st.sampled_from(list(Window)),
        st.frozensets(st.sampled_from(list(Metric))),
        st.integers(0, 30),  # end_date back from today
        st.integers(0, 60),  # period_length
        st.integers(0, 3),  # days the clock has moved on
    ),
    st.tuples(st.just("week_start"), st.sampled_from(["monday", "sunday"])),
    st.tuples(st.just("rebuild"), st.sampled_from([WS, WS.org])),
)


@pytest.mark.slow
@hyp_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
              HealthCheck.function_scoped_fixture])
@given(program=st.lists(op, min_size=2, max_size=14))
async def test_every_answer_equals_a_full_recompute_whatever_is_interleaved(
    store: SketchStore, program: list[tuple[Any, ...]]
) -> None:
    import uuid

    tag = uuid.uuid4().hex[:8]  # a fresh org per example: examples share one store
    scopes = {WS: Scope(tag, "ws-1"), OTHER: Scope(tag, "ws-2")}
    scopes[WS.org] = scopes[WS].org
    answers = answers_for(store, retention=RETENTION)
    week_start = "monday"
    for step in program:
        if step[0] == "batch":
            await add(store, [(scopes[ws], s, TODAY - timedelta(days=back))
                              for ws, s, back in step[1]], week_start)
        elif step[0] == "week_start":
            week_start = step[1]
            for scope in (scopes[WS], scopes[OTHER]):
                await wss.save(store.client, store.keys, scope,
                               WorkspaceSettings(timezone="UTC", week_start=week_start))
            await wss.save(store.client, store.keys, scopes[WS.org],
                           wss.OrgSettings(timezone="UTC", week_start=week_start))
        elif step[0] == "rebuild":
            await store.delete_workspace(scopes[step[1]])
        else:
            _, scope, window, metrics, back, length, shift = step
            today = TODAY + timedelta(days=shift)
            await assert_equal_to_direct(
                answers, scopes[scope], today=today, end=today - timedelta(days=back),
                period_length=length, window=window, metrics=metrics or ALL_METRICS,
            )


@given(
    n=st.integers(1, 60),
    runs=st.lists(st.tuples(st.integers(1, 40), st.integers(-1, 2**40)), min_size=1, max_size=30),
    seen_runs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 2**64 - 1)), min_size=1,
                       max_size=30),
    cut=st.integers(0, 400),
)
def test_a_stored_result_round_trips_whatever_its_runs_and_garbage_is_refused(
    n: int, runs: list[tuple[int, int]], seen_runs: list[tuple[int, int]], cut: int
) -> None:
    import numpy as np

    from sketches.results import LEAD, TAIL

    def filled(width: int, pattern: list[tuple[int, int]], dtype: Any) -> Any:
        out = np.concatenate([np.full(k, v, dtype=dtype) for k, v in pattern] * width)[:width]
        return out

    stored = Stored.empty("UTC|sunday#e", 7, date(2026, 1, 1), n)
    for c in range(stored.values.shape[0]):
        stored.values[c] = filled(n, runs[c:] + runs[:c], np.int64)
        stored.seen[c] = filled(n + LEAD + TAIL, seen_runs[c:] + seen_runs[:c], np.uint64)
    raw = stored.encode()
    back = Stored.decode(raw)
    assert back is not None
    assert (back.values == stored.values).all()
    assert (back.seen == stored.seen).all()
    assert (back.variant, back.seq, back.first) == (stored.variant, stored.seq, stored.first)
    damaged = Stored.decode(raw[: min(cut, len(raw) - 1)])
    assert damaged is None or damaged.n == n
