"""Calendar periods: the local day, the week and the calendar month that hold a login.

Every login is added to three sketches, one per period that holds its day, so that the API can
answer DAU, calendar WAU and calendar MAU with one single-key count each. A week starts on Monday
(ISO, the default) or on Sunday (a per-workspace or per-org setting, for teams whose week starts
then). An ISO week is named by its ISO year, not by the calendar year of its days: 2024-12-30
belongs to 2025-W01 and 2027-01-01 to 2026-W53. Naming a week by ``date.year`` (bitmapist's bug,
fixed in its PR #86) splits one week into two keys at every year end, so this module is the only
place that turns a date into a week name. A Sunday week has no ISO name; it is named by its first
day (``S2026-11-29``) under its own granularity letter, so the two kinds never share a key.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Literal, NamedTuple

ONE_DAY = timedelta(days=1)

WeekStart = Literal["monday", "sunday"]
WEEK_STARTS: tuple[WeekStart, ...] = ("monday", "sunday")


class Granularity(StrEnum):
    DAY = "d"
    WEEK = "w"  # ISO week, Monday to Sunday
    SUNDAY_WEEK = "s"  # Sunday to Saturday
    MONTH = "m"

    @property
    def is_week(self) -> bool:
        return self is Granularity.WEEK or self is Granularity.SUNDAY_WEEK


def week_granularity(week_start: WeekStart) -> Granularity:
    return Granularity.SUNDAY_WEEK if week_start == "sunday" else Granularity.WEEK


class Period(NamedTuple):
    """A closed range of days named by its granularity and first day.

    A named tuple rather than a frozen dataclass: the consumer hashes one per sketch key of a
    batch (tens of thousands), and a tuple's hash and equality run in C."""

    granularity: Granularity
    start: date

    @property
    def end(self) -> date:
        if self.granularity is Granularity.DAY:
            return self.start
        if self.granularity.is_week:
            return self.start + timedelta(days=6)
        return next_month_start(self.start) - ONE_DAY

    @property
    def label(self) -> str:
        """The name used in keys: ``2026-11-24``, ``2026-W53`` (ISO year), ``S2026-11-29`` (a
        Sunday week, by its first day), ``2026-11``."""
        if self.granularity is Granularity.DAY:
            return self.start.isoformat()
        if self.granularity is Granularity.WEEK:
            iso = self.start.isocalendar()
            return f"{iso.year:04d}-W{iso.week:02d}"
        if self.granularity is Granularity.SUNDAY_WEEK:
            return "S" + self.start.isoformat()
        return f"{self.start.year:04d}-{self.start.month:02d}"

    def days(self) -> Iterator[date]:
        d = self.start
        while d <= self.end:
            yield d
            d += ONE_DAY

    def previous(self) -> Period:
        return period_of(self.granularity, self.start - ONE_DAY)

    def next(self) -> Period:
        return period_of(self.granularity, self.end + ONE_DAY)


def next_month_start(d: date) -> date:
    return date(d.year + 1, 1, 1) if d.month == 12 else date(d.year, d.month + 1, 1)


def day_of(d: date) -> Period:
    return Period(Granularity.DAY, d)


def week_of(d: date) -> Period:
    """The ISO week (Monday to Sunday) holding ``d``."""
    return Period(Granularity.WEEK, d - timedelta(days=d.weekday()))


def sunday_week_of(d: date) -> Period:
    """The Sunday-to-Saturday week holding ``d``."""
    return Period(Granularity.SUNDAY_WEEK, d - timedelta(days=(d.weekday() + 1) % 7))


def week_starting(week_start: WeekStart, d: date) -> Period:
    return sunday_week_of(d) if week_start == "sunday" else week_of(d)


def month_of(d: date) -> Period:
    return Period(Granularity.MONTH, d.replace(day=1))


def period_of(granularity: Granularity, d: date) -> Period:
    if granularity is Granularity.DAY:
        return day_of(d)
    if granularity is Granularity.WEEK:
        return week_of(d)
    if granularity is Granularity.SUNDAY_WEEK:
        return sunday_week_of(d)
    return month_of(d)


@functools.lru_cache(maxsize=1 << 14)
def periods_holding(d: date, week_start: WeekStart = "monday") -> tuple[Period, Period, Period]:
    """The day, week and month a login on ``d`` is counted in. Cached: a batch asks it for
    every (scope, day) it holds, always about the same few hundred days."""
    return day_of(d), week_starting(week_start, d), month_of(d)


def periods_between(granularity: Granularity, first: date, last: date) -> list[Period]:
    """Every period of one granularity that holds a day of ``first..last``, oldest first."""
    out: list[Period] = []
    if last < first:
        return out
    p = period_of(granularity, first)
    while p.start <= last:
        out.append(p)
        p = p.next()
    return out


def utc_date(moment: datetime) -> date:
    """The UTC calendar day of an aware moment; a naive datetime is a bug, not a guess."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("naive datetime: a moment needs a timezone to have a day")
    return moment.astimezone(UTC).date()


def utc_today() -> date:
    return datetime.now(UTC).date()


def date_range(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]
