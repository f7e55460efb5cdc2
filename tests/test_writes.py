"""The write path's pure parts (``sketches.writes``): grouping a batch per scope, the days it
stamps, and cutting a large write into bounded script calls."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from sketches.keys import KeySpace, Scope
from sketches.periods import day_of, month_of, periods_holding, sunday_week_of, week_of
from sketches.writes import ScopeWrite, by_day, expire_at, group_by_scope, scope_section

WS = Scope("acme", "ws")
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
    section_keys, _, size = scope_section(keys, WS, write, retention_days=800, now=now,
                                          mode="L")
    written = section_keys[1:]
    assert keys.sketch(WS, day_of(old)) not in written
    assert written == [keys.sketch(WS, p) for p in periods_holding(D)]
    assert section_keys[0] == keys.meta(WS)  # the scope's bookkeeping, then its sketch keys
    assert size == 3


def test_by_day_sends_each_days_members_once_with_its_week_and_month_as_targets() -> None:
    days = {(WS, D): {"a", "b"}, (WS, D - timedelta(days=1)): {"c"}, (WS.org, D): {"a"}}
    grouped = by_day(days, {WS: "monday", WS.org: "sunday"})
    ws = grouped[WS]
    assert set(ws.sketches) == {day_of(D), day_of(D - timedelta(days=1))}
    assert ws.targets[day_of(D)] == (week_of(D), month_of(D))
    assert grouped[WS.org].targets[day_of(D)] == (sunday_week_of(D), month_of(D))
    assert ws.days == {D, D - timedelta(days=1)}


def test_a_day_past_its_deadline_still_reaches_its_week_and_month() -> None:
    keys = KeySpace("um", "hll")
    write = by_day({(WS, D): {"z"}}, {WS: "monday"})[WS]
    now = expire_at(day_of(D), 800) + 1  # the day has gone, its week and month have not
    section_keys, argv, _ = scope_section(keys, WS, write, retention_days=800, now=now,
                                          mode="L")
    assert section_keys[1:] == [keys.sketch(WS, p) for p in periods_holding(D)]
    # mode, head length, 1 day, 1 member key, 2 targets; the day; 2 target deadlines; then the
    # day's key: deadline 0 (not written), 1 member, "z", 2 targets (the scope's keys 2 and 3).
    assert argv[0] == "L"
    assert argv[1] == len(keys.sketch_head(WS).encode())
    assert argv[2:5] == [1, 1, 2]
    assert argv[5] == D.toordinal()
    assert argv[8:] == [0, 1, "z", 2, 2, 3]


def test_targets_ride_with_every_part_of_their_days_members() -> None:
    write = by_day({(WS, D - timedelta(days=i)): {f"m{i}-{k}" for k in range(30)}
                    for i in range(5)}, {WS: "monday"})[WS]
    for part in write.parts(40):
        assert set(part.targets) == set(part.sketches)
        for day in part.sketches:
            assert part.targets[day] == write.targets[day]
