"""The usage query: one row per day with DAU, WAU and MAU, in either window.

This is the direct computation, from the sketches alone: ``sketches.results`` serves requests
from stored per-day results and falls back to this where it cannot, and the tests hold the two
equal.

``calendar``: WAU is the week holding the day (ISO, or Sunday to Saturday where the scope's
settings say so), MAU the calendar month holding it, read with one
single-key count per period (Redis caches a sketch's cardinality in its header, so these are
cheap). A week or month with no login inherits the value of the day before it; that fill looks
back as far as data can exist (the retention horizon), not just to the first row, so a row never
depends on ``period_length``.

``rolling``: WAU of a day is the union of the 7 days ending on it, MAU of the 30 days ending on it,
computed by the store over each day's sketch read once.

A metric that was not asked for is ``None`` and costs no Redis command. ``None`` also means "no
login": the API never reports a 0 that could be mistaken for a measured quiet day.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum

from sketches.keys import Scope
from sketches.periods import (
    Granularity,
    Period,
    WeekStart,
    date_range,
    day_of,
    period_of,
    periods_between,
    week_granularity,
)
from sketches.store import SketchStore

WEEK_DAYS = 7
MONTH_DAYS = 30


class Metric(StrEnum):
    DAU = "dau"
    WAU = "wau"
    MAU = "mau"


class Window(StrEnum):
    CALENDAR = "calendar"
    ROLLING = "rolling"


ALL_METRICS = frozenset(Metric)


@dataclass(frozen=True, slots=True)
class UsageRow:
    date: date
    dau: int | None
    wau: int | None
    mau: int | None


def _none_if_zero(n: int) -> int | None:
    return n if n > 0 else None


def forward_filled(periods: Sequence[Period], counts: Sequence[int]) -> dict[Period, int | None]:
    """Each period's count, or the latest earlier non-empty period's count, or None."""
    out: dict[Period, int | None] = {}
    last: int | None = None
    for p, n in zip(periods, counts, strict=True):
        if n > 0:
            last = n
        out[p] = last
    return out


async def _calendar(
    store: SketchStore,
    ws: Scope,
    granularity: Granularity,
    days: Sequence[date],
    horizon: date,
) -> list[int | None]:
    periods = periods_between(granularity, min(horizon, days[0]), days[-1])
    filled = forward_filled(periods, await store.counts(ws, periods))
    return [filled[period_of(granularity, d)] for d in days]


async def usage(
    store: SketchStore,
    ws: Scope,
    *,
    end: date,
    period_length: int,
    metrics: Iterable[Metric] = ALL_METRICS,
    window: Window = Window.CALENDAR,
    horizon: date,
    week_start: WeekStart = "monday",
) -> list[UsageRow]:
    """Rows for ``end - period_length .. end``, oldest first.

    ``horizon`` is the oldest day that can still hold data (today minus retention): the calendar
    fill looks back to it and no further.
    """
    wanted = frozenset(metrics) or ALL_METRICS
    start = end - timedelta(days=period_length)
    days = date_range(start, end)
    blank: list[int | None] = [None] * len(days)

    dau = blank
    if Metric.DAU in wanted:
        dau = [_none_if_zero(n) for n in await store.counts(ws, [day_of(d) for d in days])]

    wau = mau = blank
    if window is Window.CALENDAR:
        if Metric.WAU in wanted:
            wau = await _calendar(store, ws, week_granularity(week_start), days, horizon)
        if Metric.MAU in wanted:
            mau = await _calendar(store, ws, Granularity.MONTH, days, horizon)
    else:
        widths = [w for m, w in ((Metric.WAU, WEEK_DAYS), (Metric.MAU, MONTH_DAYS)) if m in wanted]
        if widths:
            counts = await store.rolling_counts_many(ws, start, end, widths)
            if Metric.WAU in wanted:
                wau = [_none_if_zero(n) for n in counts[WEEK_DAYS]]
            if Metric.MAU in wanted:
                mau = [_none_if_zero(n) for n in counts[MONTH_DAYS]]

    return [
        UsageRow(d, a, w, m) for d, a, w, m in zip(days, dau, wau, mau, strict=True)
    ]
