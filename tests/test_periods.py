"""Period math: UTC days, ISO weeks named by their ISO year, calendar months."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sketches.periods import (
    Granularity,
    day_of,
    month_of,
    periods_between,
    periods_holding,
    utc_date,
    week_of,
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
