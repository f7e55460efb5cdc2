"""The write path's pure parts (``sketches.writes``): grouping a batch per scope, the days it
stamps, and cutting a large write into bounded script calls."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from sketches.keys import KeySpace, Workspace
from sketches.periods import day_of, month_of, periods_holding, sunday_week_of, week_of
from sketches.writes import ScopeWrite, by_day, expire_at, group_by_scope, script_call

WS = Workspace("acme", "ws")
D = date(2026, 11, 24)


def test_each_scope_stamps_the_days_it_writes_and_the_first_day_of_a_lone_week_or_month() -> None:
    grouped = group_by_scope({
        (WS, day_of(D)): {"a"}, (WS, week_of(D)): {"a"}, (WS, month_of(D)): {"a"},
        (WS.org, week_of(D - timedelta(days=14))): {"b"},  # no day of that week written
        (WS.org, day_of(D)): set(),  # nothing to add: not written at all
    })
    assert grouped[WS].days == {D}
    assert grouped[WS.org].days == {week_of(D - timedelta(days=14)).start}
    assert day_of(D) not in grouped[WS.org].sketches


@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=12),
    limit=st.integers(1, 50),
)
def test_parts_carry_every_member_once_within_the_limit_and_stamp_every_day(
    sizes: list[int], limit: int
) -> None:
    write = ScopeWrite(days={D, D - timedelta(days=1)})
    for i, n in enumerate(sizes):
        write.sketches[day_of(D - timedelta(days=i))] = {f"m{i}-{k}" for k in range(n)}
    seen: dict[object, list[str]] = {}
    for part in write.parts(limit):
        assert part.days == write.days
        assert sum(len(m) for m in part.sketches.values()) <= limit
        for period, members in part.sketches.items():
            seen.setdefault(period, []).extend(members)
    assert {p: sorted(m) for p, m in seen.items()} == {
        p: sorted(m) for p, m in write.sketches.items()
    }


def test_a_key_past_its_deadline_is_left_out_of_the_script_call() -> None:
    keys = KeySpace("um", "hll")
    old = D - timedelta(days=900)
    write = group_by_scope({(WS, p): {"a"} for p in (*periods_holding(D), day_of(old))})[WS]
    now = 1_800_000_000.0  # 2027-01-15: the 900-day-old day is past an 800-day retention
    call, written = script_call("sha", keys, WS, write, retention_days=800, now=now,
                                token="t", command="PFADD")
    assert keys.sketch(WS, day_of(old)) not in written
    assert written == [keys.sketch(WS, p) for p in periods_holding(D)]
    assert call[0] == "EVALSHA"
    assert call[2] == 3 + len(written)  # seq, stamps, version, then the sketch keys


def test_by_day_merges_hll_weeks_and_months_from_the_days_and_sends_exact_members() -> None:
    days = {(WS, D): {"a", "b"}, (WS, D - timedelta(days=1)): {"c"}, (WS.org, D): {"a"}}
    starts = {WS: "monday", WS.org: "sunday"}
    now = 1_780_000_000.0  # 2026-05-28: every key of late 2026 is alive
    merged = by_day(days, starts, merge=True, retention_days=800, now=now)  # type: ignore[arg-type]
    ws = merged[WS]
    assert set(ws.sketches) == {day_of(D), day_of(D - timedelta(days=1))}
    assert sorted(ws.merges[week_of(D)]) == sorted([day_of(D), day_of(D - timedelta(days=1))])
    assert set(merged[WS.org].merges) == {sunday_week_of(D), month_of(D)}
    assert merged[WS].days == {D, D - timedelta(days=1)}
    exact = by_day(days, starts, merge=False, retention_days=800, now=now)  # type: ignore[arg-type]
    assert exact[WS].merges == {}
    assert exact[WS].sketches[week_of(D)] == {"a", "b", "c"}
    assert exact[WS].sketches[month_of(D)] == {"a", "b", "c"}
    # A day past its deadline is not written; its members reach its week and month directly.
    late = by_day({(WS, D): {"z"}}, starts, merge=True, retention_days=800,  # type: ignore[arg-type]
                  now=expire_at(day_of(D), 800) + 1)
    assert late[WS].sketches[week_of(D)] == {"z"}
    assert late[WS].merges == {}


def test_merges_ride_in_the_last_part_after_every_member() -> None:
    write = by_day({(WS, D - timedelta(days=i)): {f"m{i}-{k}" for k in range(30)}
                    for i in range(5)}, {WS: "monday"}, merge=True, retention_days=800,
                   now=1_780_000_000.0)[WS]
    parts = list(write.parts(40))
    assert all(not p.merges for p in parts[:-1])
    assert parts[-1].merges == write.merges
