"""An independent, naive computation of the endpoint's rows from raw events: the oracle.

It shares no code with ``sketches/`` beyond the ``Scope`` value type: weeks come from
``date.isocalendar()``, windows from plain set unions, so a bug in the service's period math or
fill logic cannot hide in both places.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import date, timedelta

from sketches.keys import Scope

Event = tuple[Scope, str, date]


class Oracle:
    def __init__(self, events: Iterable[Event] = ()) -> None:
        self.days: dict[Scope, dict[date, set[str]]] = defaultdict(lambda: defaultdict(set))
        for ws, subject, day in events:
            self.add(ws, subject, day)

    def add(self, ws: Scope, subject: str, day: date) -> None:
        self.days[ws][day].add(subject)

    def _union(self, ws: Scope, days: Iterable[date]) -> set[str]:
        out: set[str] = set()
        per_day = self.days.get(ws, {})
        for d in days:
            out |= per_day.get(d, set())
        return out

    def dau(self, ws: Scope, d: date) -> int | None:
        return len(self._union(ws, [d])) or None

    def week_days(self, d: date, week_start: str = "monday") -> list[date]:
        """The 7 days of the week holding ``d``: Monday to Sunday (ISO), or Sunday to
        Saturday."""
        back = d.isocalendar().weekday - 1 if week_start == "monday" else d.isoweekday() % 7
        first = d - timedelta(days=back)
        return [first + timedelta(days=i) for i in range(7)]

    def month_days(self, d: date) -> list[date]:
        first = d.replace(day=1)
        out, cur = [], first
        while cur.month == first.month:
            out.append(cur)
            cur += timedelta(days=1)
        return out

    def _filled(self, ws: Scope, d: date, span: str, week_start: str) -> int | None:
        """The period's count, else the previous day's value, back to the first data."""
        oldest = min(self.days.get(ws, {d: set()}), default=d)
        cur = d
        while True:
            days = self.week_days(cur, week_start) if span == "week" else self.month_days(cur)
            if days[-1] < oldest:
                return None
            n = len(self._union(ws, days))
            if n:
                return n
            cur = days[0] - timedelta(days=1)

    def rows(
        self, ws: Scope, end: date, period_length: int, window: str = "calendar",
        week_start: str = "monday",
    ) -> list[dict[str, object]]:
        out = []
        for i in range(period_length, -1, -1):
            d = end - timedelta(days=i)
            if window == "calendar":
                wau = self._filled(ws, d, "week", week_start)
                mau = self._filled(ws, d, "month", week_start)
            else:
                wau = len(self._union(ws, [d - timedelta(days=k) for k in range(7)])) or None
                mau = len(self._union(ws, [d - timedelta(days=k) for k in range(30)])) or None
            out.append({"date": d.isoformat(), "dau": self.dau(ws, d), "wau": wau, "mau": mau})
        return out
