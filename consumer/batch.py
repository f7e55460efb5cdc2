"""Turning one fetched batch of records into store writes and dead letters.

Two phases, because the second needs the settings of the workspaces the first finds:

1. ``parse_records``: every record becomes a login, a filtered message or a dead letter.
2. ``bucket``: each login goes to the local day (in its workspace's timezone), ISO week and month
   that hold it, unless its subject is excluded. Subjects are grouped per sketch key, so a batch
   of 20,000 logins from a few hundred workspaces becomes a few hundred ``PFADD``s with many
   members each, not 60,000 single adds: the cost of a batch grows with the number of distinct
   (workspace, period) keys, not with the number of events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TypeAlias

from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.events import Login, Parser, Rules
from sketches.errors import BadMessage
from sketches.keys import Workspace
from sketches.periods import Period, day_of, month_of, week_of
from sketches.workspace_settings import Resolved

Record: TypeAlias = ConsumerRecord[bytes, bytes]


@dataclass
class Parsed:
    logins: list[Login] = field(default_factory=list)
    # The record each login came from (same order), so that a login bucketing fails on can be
    # dead-lettered with its own bytes.
    sources: list[Record] = field(default_factory=list)
    dead: list[tuple[Record, str]] = field(default_factory=list)
    filtered: int = 0
    # Next offset to read, per partition: what gets committed once the batch is stored.
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    @property
    def workspaces(self) -> set[Workspace]:
        return {login.workspace for login in self.logins}


@dataclass
class Prepared:
    sketches: dict[tuple[Workspace, Period], set[str]] = field(default_factory=dict)
    dead: list[tuple[Record, str]] = field(default_factory=list)
    logins: int = 0
    filtered: int = 0
    excluded: int = 0
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)


def unexpected_reason(err: BaseException) -> str:
    """A dead letter's reason for an error no rule anticipated: its type says where to look."""
    return f"message could not be processed: {type(err).__name__}: {str(err)[:200]}"


def parse_records(records: Iterable[Record], rules: Rules, now: datetime) -> Parsed:
    out = Parsed()
    offsets = out.next_offsets
    parse = Parser(rules, now).parse
    logins = out.logins
    sources = out.sources
    last: dict[tuple[str, int], int] = {}
    for record in records:
        last[(record.topic, record.partition)] = record.offset
        try:
            login = parse(record.value)
        except BadMessage as err:
            out.dead.append((record, err.reason))
            continue
        except Exception as err:  # noqa: BLE001 - one record must never stop every tenant
            # Whatever a decoder or a rule raises on hostile input (RecursionError on deep
            # nesting was one), the record is dead-lettered with the error as its reason; a
            # restarted consumer would only read it again and fail again.
            out.dead.append((record, unexpected_reason(err)))
            continue
        if login is None:
            out.filtered += 1
        else:
            logins.append(login)
            sources.append(record)
    for (topic, partition), offset in last.items():
        offsets[TopicPartition(topic, partition)] = offset + 1
    return out


def bucket(
    parsed: Parsed,
    configs: Mapping[Workspace, Resolved],
    only: Workspace | None = None,
) -> Prepared:
    """Group the logins into sketches. ``configs`` must hold every workspace of the batch;
    ``only`` keeps one workspace (a rebuild)."""
    out = Prepared(
        dead=list(parsed.dead), filtered=parsed.filtered, next_offsets=parsed.next_offsets
    )
    per_day: defaultdict[tuple[Workspace, date], set[str]] = defaultdict(set)
    for i, login in enumerate(parsed.logins):
        try:
            ws = login.workspace
            if only is not None and ws != only:
                continue
            config = configs[ws]
            if config.excluded is not None and config.is_excluded(login.subject):
                out.excluded += 1
                continue
            moment = login.moment
            if config.tz is UTC:
                day = moment.date() if moment.tzinfo is UTC else moment.astimezone(UTC).date()
            else:
                day = moment.astimezone(config.tz).date()
            per_day[(ws, day)].add(login.subject)
            out.logins += 1
        except Exception as err:  # noqa: BLE001 - one login must never stop every tenant
            out.dead.append((parsed.sources[i], unexpected_reason(err)))

    sketches: defaultdict[tuple[Workspace, Period], set[str]] = defaultdict(set)
    for (ws, d), subjects in per_day.items():
        sketches[(ws, day_of(d))] = subjects
    for (ws, d), subjects in per_day.items():
        sketches[(ws, week_of(d))] |= subjects
        sketches[(ws, month_of(d))] |= subjects
    out.sketches = dict(sketches)
    return out
