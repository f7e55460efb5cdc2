"""Period math: UTC days, ISO weeks named by their ISO year, Sunday weeks named by their first day,
calendar months."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sketches.periods import (
    WEEK_STARTS,
    Granularity,
    WeekStart,
    day_of,
    month_of,
    periods_between,
    periods_holding,
    sunday_week_of,
    utc_date,
    week_granularity,
    week_of,
    week_starting,
)

dates = st.dates(min_value=date(1990, 1, 1), max_value=date(2100, 12, 31))


def test_week_across_2026_year_end_is_one_week_2026_w53() -> None:
    week = week_of(date(2026, 12, 28))
    assert week.label == "2026-W53"
    assert week.start == date(2026, 12, 28)
    assert week.end == date(2027, 1, 3)
    for d in week.days():
        assert week_of(d) == week
    assert week_of(date(2027, 1, 1)).label == "2026-W53"
    assert week_of(date(2027, 1, 4)).label == "2027-W01"


def test_2024_12_30_belongs_to_2025_w01() -> None:
    assert week_of(date(2024, 12, 30)).label == "2025-W01"
    assert week_of(date(2024, 12, 29)).label == "2024-W52"


def test_month_ends_and_leap_day() -> None:
    assert month_of(date(2024, 2, 29)).end == date(2024, 2, 29)
    assert month_of(date(2025, 2, 10)).end == date(2025, 2, 28)
    assert month_of(date(2026, 12, 31)).label == "2026-12"
    assert month_of(date(2026, 12, 31)).next().start == date(2027, 1, 1)
    assert month_of(date(2027, 1, 1)).previous().label == "2026-12"
    assert list(month_of(date(2024, 2, 1)).days())[-1] == date(2024, 2, 29)


@given(dates)
def test_week_label_is_iso_year_and_week(d: date) -> None:
    iso = d.isocalendar()
    week = week_of(d)
    assert week.label == f"{iso.year:04d}-W{iso.week:02d}"
    assert week.start.weekday() == 0
    assert week.start <= d <= week.end
    assert (week.end - week.start).days == 6


@given(dates)
def test_every_day_is_in_exactly_one_period_of_each_kind(d: date) -> None:
    day, week, month = periods_holding(d)
    assert day == day_of(d)
    assert month.start == date(d.year, d.month, 1)
    assert month.start <= d <= month.end
    assert (month.end + timedelta(days=1)).day == 1
    assert week.next().start == week.end + timedelta(days=1)
    assert week.previous().end == week.start - timedelta(days=1)


@given(dates, st.integers(min_value=0, max_value=800))
def test_periods_between_cover_the_range_without_gaps(first: date, span: int) -> None:
    last = first + timedelta(days=span)
    for g in Granularity:
        periods = periods_between(g, first, last)
        assert periods[0].start <= first <= periods[0].end
        assert periods[-1].start <= last <= periods[-1].end
        for a, b in itertools.pairwise(periods):
            assert b.start == a.end + timedelta(days=1)


def test_utc_date_uses_the_utc_calendar_day() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert utc_date(datetime(2026, 11, 25, 1, 30, tzinfo=plus2)) == date(2026, 11, 24)
    assert utc_date(datetime(2026, 11, 24, 23, 30, tzinfo=timezone(timedelta(hours=-5)))) == date(
        2026, 11, 25
    )
    assert utc_date(datetime(2026, 11, 24, 0, 0, tzinfo=UTC)) == date(2026, 11, 24)
    with pytest.raises(ValueError, match="naive"):
        utc_date(datetime(2026, 11, 24, 12, 0))


# ---------------------------------------------------------------- Sunday weeks


@pytest.mark.parametrize(
    ("day", "sunday_week", "iso_week"),
    [
        # Saturday 2026-11-28 ends a Sunday week and is the 6th day of an ISO week...
        (date(2026, 11, 28), "S2026-11-22", "2026-W48"),
        # ...Sunday 2026-11-29 starts the next Sunday week but still ends its ISO week...
        (date(2026, 11, 29), "S2026-11-29", "2026-W48"),
        # ...and Monday 2026-11-30 starts the next ISO week, inside that same Sunday week.
        (date(2026, 11, 30), "S2026-11-29", "2026-W49"),
        (date(2026, 12, 5), "S2026-11-29", "2026-W49"),
        (date(2026, 12, 6), "S2026-12-06", "2026-W49"),
    ],
)
def test_sunday_and_iso_weeks_part_at_their_own_boundaries(
    day: date, sunday_week: str, iso_week: str
) -> None:
    assert sunday_week_of(day).label == sunday_week
    assert week_starting("sunday", day).label == sunday_week
    assert week_of(day).label == iso_week
    assert week_starting("monday", day).label == iso_week


def test_sunday_week_across_the_2026_year_end_is_one_week() -> None:
    week = sunday_week_of(date(2026, 12, 27))
    assert week.label == "S2026-12-27"
    assert (week.start, week.end) == (date(2026, 12, 27), date(2027, 1, 2))
    assert week.granularity is Granularity.SUNDAY_WEEK
    assert [sunday_week_of(d) for d in week.days()] == [week] * 7
    assert sunday_week_of(date(2027, 1, 3)).label == "S2027-01-03"
    assert sunday_week_of(date(2026, 12, 26)).label == "S2026-12-20"
    # The ISO week of the same days is shifted by one: 2026-W53 is 2026-12-28 .. 2027-01-03.
    iso = week_of(date(2027, 1, 3))
    assert (iso.label, iso.start, iso.end) == ("2026-W53", date(2026, 12, 28), date(2027, 1, 3))
    assert week_of(date(2026, 12, 27)).label == "2026-W52"


@pytest.mark.parametrize(("week_start", "granularity", "weekday"),
                         [("monday", Granularity.WEEK, 0),
                          ("sunday", Granularity.SUNDAY_WEEK, 6)])
def test_week_start_picks_the_granularity(
    week_start: WeekStart, granularity: Granularity, weekday: int
) -> None:
    assert week_granularity(week_start) is granularity
    _, week, _ = periods_holding(date(2026, 11, 25), week_start)
    assert week.granularity is granularity
    assert week.start.weekday() == weekday


@given(dates, st.sampled_from(WEEK_STARTS))
def test_every_day_lies_in_exactly_one_week_of_each_kind(d: date, week_start: WeekStart) -> None:
    week = week_starting(week_start, d)
    assert week.granularity is week_granularity(week_start)
    assert week.start <= d <= week.end
    assert (week.end - week.start).days == 6
    assert len(list(week.days())) == 7
    assert week.start.weekday() == (6 if week_start == "sunday" else 0)
    # Every day of the week maps back to it, and the days just outside to its neighbours.
    assert {week_starting(week_start, x) for x in week.days()} == {week}
    assert week_starting(week_start, week.start - timedelta(days=1)) == week.previous()
    assert week_starting(week_start, week.end + timedelta(days=1)) == week.next()
    assert periods_holding(d, week_start)[1] == week


@given(dates, dates, st.sampled_from(WEEK_STARTS))
def test_week_labels_are_one_to_one(a: date, b: date, week_start: WeekStart) -> None:
    wa, wb = week_starting(week_start, a), week_starting(week_start, b)
    assert (wa.label == wb.label) == (wa == wb)
    # Two kinds never share a label, so they can never share a key.
    assert sunday_week_of(a).label != week_of(b).label
