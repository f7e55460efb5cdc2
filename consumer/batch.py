"""Turning one fetched batch of records into store writes and dead letters.

Two phases, because the second needs the settings of the workspaces the first finds:

1. ``parse_records``: every record becomes a login, a filtered message or a dead letter.
2. ``bucket``: each login goes to the local day, week and month that hold it, twice: in its
   workspace's timezone and week start, and in its org's (the org's own sketches count a member
   once across all of its workspaces), unless its workspace excludes the subject, which then
   counts in neither. Subjects are grouped per sketch key, so a batch of 20,000 logins from a few
   hundred workspaces becomes a few hundred keys with many members each, not 60,000 single adds:
   the cost of a batch grows with the number of distinct (scope, period) keys, not with the
   number of events.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from typing import TYPE_CHECKING, TypeAlias

from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer.events import Login, Parser, Rules
from sketches.errors import BadMessage
from sketches.keys import Scope
from sketches.periods import Period, WeekStart, periods_holding
from sketches.scope_settings import Resolved

if TYPE_CHECKING:
    from consumer.selection import Selection

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
    def workspaces(self) -> set[Scope]:
        return {login.workspace for login in self.logins}

    @property
    def scopes(self) -> set[Scope]:
        """The batch's workspaces and their orgs: whose settings bucketing needs."""
        workspaces = self.workspaces
        return workspaces | {ws.org for ws in workspaces}


@dataclass
class Prepared:
    # Members per (scope, local day); each scope's week and month follow from its week start.
    days: dict[tuple[Scope, date], set[str]] = field(default_factory=dict)
    week_starts: dict[Scope, WeekStart] = field(default_factory=dict)
    dead: list[tuple[Record, str]] = field(default_factory=list)
    logins: int = 0
    filtered: int = 0
    excluded: int = 0
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    @property
    def sketches(self) -> dict[tuple[Scope, Period], set[str]]:
        """Every sketch the batch adds to, with its members (what the store derives from
        ``days``; tests and tools read it)."""
        out: defaultdict[tuple[Scope, Period], set[str]] = defaultdict(set)
        for (scope, d), subjects in self.days.items():
            for p in periods_holding(d, self.week_starts[scope]):
                out[(scope, p)] |= subjects
        return dict(out)


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


def _local_date(moment: datetime, tz: tzinfo) -> date:
    if tz is UTC:
        return moment.date() if moment.tzinfo is UTC else moment.astimezone(UTC).date()
    return moment.astimezone(tz).date()


def bucket(
    parsed: Parsed,
    configs: Mapping[Scope, Resolved],
    only: Selection | None = None,
) -> Prepared:
    """Group the logins into sketches of their workspace and of their org. ``configs`` must hold
    every scope of ``parsed.scopes``; ``only`` keeps the scopes of a rebuild's selection:
    workspaces alone, and orgs' own sketches alone (from every workspace of the org). A login
    that fails here (a moment a timezone cannot hold, say) is dead-lettered alone."""
    keep = only.scopes if only is not None else None
    out = Prepared(
        dead=list(parsed.dead), filtered=parsed.filtered, next_offsets=parsed.next_offsets
    )
    per_day: defaultdict[tuple[Scope, date], set[str]] = defaultdict(set)
    # What each workspace of the batch needs, looked up once per workspace, not per login.
    plans: dict[Scope, tuple[Scope, Resolved, tzinfo, bool, bool] | None] = {}
    excluded = counted = 0
    for i, login in enumerate(parsed.logins):
        try:
            ws = login.workspace
            try:
                plan = plans[ws]
            except KeyError:
                org = ws.org
                mine, theirs = keep is None or ws in keep, keep is None or org in keep
                plan = plans[ws] = (
                    (org, configs[ws], configs[org].tz, mine, theirs) if mine or theirs else None
                )
            if plan is None:
                continue
            org, config, org_tz, mine, theirs = plan
            subject = login.subject
            if config.excluded is not None and config.is_excluded(subject):
                excluded += 1
                continue
            moment = login.moment
            day = _local_date(moment, config.tz)
            org_day = day if org_tz is config.tz else _local_date(moment, org_tz)
            if mine:
                per_day[(ws, day)].add(subject)
            if theirs:
                per_day[(org, org_day)].add(subject)
            counted += 1
        except Exception as err:  # noqa: BLE001 - one login must never stop every tenant
            out.dead.append((parsed.sources[i], unexpected_reason(err)))
    out.excluded = excluded
    out.logins = counted

    out.days = dict(per_day)
    out.week_starts = {scope: configs[scope].week_start for scope, _ in per_day}
    return out
