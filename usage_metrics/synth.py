"""Synthetic but plausible login traffic, for the demo, the tests and the benchmark.

Workspaces have Zipf-distributed sizes; each member logs in on a given day with a probability
that depends on how engaged that member is and on the weekday (weekends are quiet), and a team
grows over time. That gives DAU below WAU below MAU in realistic ratios, instead of the flat lines
uniform random data draws.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import orjson

WEEKDAY_FACTOR = (1.0, 1.0, 0.97, 0.95, 0.85, 0.25, 0.2)


@dataclass(frozen=True)
class SynthEvent:
    org_id: str
    workspace_id: str
    subject: str
    timestamp: datetime
    metric_type: str = "login"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "metric_type": self.metric_type,
                "subject": self.subject,
                "org_id": self.org_id,
                "workspace_id": self.workspace_id,
                "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
            }
        )


def workspace_sizes(n: int, largest: int, rng: random.Random, s: float = 1.1) -> list[int]:
    return [max(3, int(largest / (rank**s) * rng.uniform(0.8, 1.2))) for rank in range(1, n + 1)]


def logins(
    workspaces: list[tuple[str, str, int]],
    first: date,
    days: int,
    seed: int = 7,
    other_types: float = 0.0,
) -> Iterator[SynthEvent]:
    """Events for ``(org, workspace, members)`` over ``days`` days from ``first``, day by day."""
    rng = random.Random(seed)
    engagement = {
        (org, ws): [rng.betavariate(1.2, 2.5) for _ in range(members)]
        for org, ws, members in workspaces
    }
    for offset in range(days):
        day = first + timedelta(days=offset)
        weekday = WEEKDAY_FACTOR[day.weekday()]
        growth = 0.6 + 0.4 * (offset + 1) / days
        for org, ws, members in workspaces:
            active = int(members * growth)
            for i, p in enumerate(engagement[(org, ws)][:active]):
                if rng.random() < p * weekday:
                    seconds = rng.randrange(7 * 3600, 20 * 3600)
                    moment = datetime.combine(day, time(), UTC) + timedelta(seconds=seconds)
                    yield SynthEvent(org, ws, f"member_{i}", moment)
                    if other_types and rng.random() < other_types:
                        yield SynthEvent(org, ws, f"member_{i}", moment, "page_view")
