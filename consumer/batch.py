"""Turning one fetched batch of records into store writes and dead letters.

Subjects are grouped per sketch key before anything is sent, so a batch of 20,000 logins from a
few hundred workspaces becomes a few hundred ``PFADD``s with many members each, not 60,000 single
adds: the cost of a batch grows with the number of distinct (workspace, period) keys, not with
the number of events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TypeAlias

from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.events import Login, Rules, parse
from sketches.errors import BadMessage
from sketches.keys import Workspace
from sketches.periods import Period, day_of, month_of, week_of

Record: TypeAlias = ConsumerRecord[bytes, bytes]
# A predicate the workspace settings supply (excluded subjects); None means keep everyone.
Exclusion = Callable[[Workspace, str], bool]


@dataclass
class Prepared:
    sketches: dict[tuple[Workspace, Period], set[str]] = field(default_factory=dict)
    dead: list[tuple[Record, str]] = field(default_factory=list)
    logins: int = 0
    filtered: int = 0
    excluded: int = 0
    # Next offset to read, per partition: what gets committed once the batch is stored.
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)


def prepare(
    records: Iterable[Record],
    rules: Rules,
    now: datetime,
    excluded: Exclusion | None = None,
) -> Prepared:
    out = Prepared()
    per_day: defaultdict[tuple[Workspace, date], set[str]] = defaultdict(set)
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        out.next_offsets[tp] = max(out.next_offsets.get(tp, 0), record.offset + 1)
        try:
            login: Login | None = parse(record.value, rules, now)
        except BadMessage as err:
            out.dead.append((record, err.reason))
            continue
        if login is None:
            out.filtered += 1
            continue
        if excluded is not None and excluded(login.workspace, login.subject):
            out.excluded += 1
            continue
        out.logins += 1
        per_day[(login.workspace, login.day)].add(login.subject)

    sketches: defaultdict[tuple[Workspace, Period], set[str]] = defaultdict(set)
    for (ws, d), subjects in per_day.items():
        sketches[(ws, day_of(d))] = subjects
    for (ws, d), subjects in per_day.items():
        sketches[(ws, week_of(d))] |= subjects
        sketches[(ws, month_of(d))] |= subjects
    out.sketches = dict(sketches)
    return out
