"""Replay: re-read a range of the topic into the store, then exit.

Replay reads outside the consumer group (it assigns partitions itself), so it never moves the
group's committed offsets and never records the store's applied offsets. Because every add is
idempotent, replaying any range, any number of times, changes no count: it can only fill in what
is missing.

Where to stop is the end of each partition as it stood when replay began. ``end_offsets()`` says
where that is on Apache Kafka; some brokers (Tansu, the test broker) answer it with the base
offset of the last batch, so the stop point is also raised to the first high watermark a fetch
response reports, which every broker gets right.

Bad messages are counted but not dead-lettered again: the live consumer already did that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from consumer.batch import Record
from consumer.fetching import FetchOverBudget, InflateBudget, install, unreadable
from consumer.kafka import make_kafka_consumer
from consumer.recordfilter import RecordFilter
from consumer.selection import Selection
from consumer.writer import BatchWriter, Clock, utc_now
from sketches.config import Settings
from sketches.errors import UsageMetricsError
from sketches.keys import Scope
from sketches.store import SketchStore

log = logging.getLogger(__name__)

StartKind = Literal["beginning", "timestamp", "offsets"]
Progress = Callable[[int, int], None]


class UnreadableRange(UsageMetricsError):
    """The topic holds a record the Kafka client cannot decode: replay stops there."""


@dataclass(frozen=True)
class ReplayStart:
    kind: StartKind
    timestamp: datetime | None = None
    offsets: dict[int, int] | None = None


@dataclass
class ReplayStats:
    messages: int = 0
    logins: int = 0
    filtered: int = 0
    excluded: int = 0
    bad: int = 0


def parse_offsets(text: str) -> dict[int, int]:
    """``0:100,1:250`` to ``{0: 100, 1: 250}``."""
    out: dict[int, int] = {}
    for item in text.split(","):
        part, sep, offset = item.strip().partition(":")
        if not sep or not part.isdigit() or not offset.isdigit():
            raise ValueError(f"expected PARTITION:OFFSET, got {item!r}")
        out[int(part)] = int(offset)
    return out


async def _seek(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], start: ReplayStart
) -> list[TopicPartition]:
    if start.kind == "offsets":
        assert start.offsets is not None
        chosen = [tp for tp in tps if tp.partition in start.offsets]
        unknown = set(start.offsets) - {tp.partition for tp in tps}
        if unknown:
            raise ValueError(f"the topic has no partition {sorted(unknown)}")
        consumer.assign(chosen)
        for tp in chosen:
            consumer.seek(tp, start.offsets[tp.partition])
        return chosen
    consumer.assign(tps)
    if start.kind == "beginning":
        await consumer.seek_to_beginning(*tps)
        return tps
    assert start.timestamp is not None
    found = await consumer.offsets_for_times(
        {tp: int(start.timestamp.timestamp() * 1000) for tp in tps}
    )
    ends = await consumer.end_offsets(tps)
    for tp in tps:
        hit = found.get(tp)
        consumer.seek(tp, hit.offset if hit is not None else ends[tp])
    return tps


async def replay(
    settings: Settings,
    store: SketchStore,
    start: ReplayStart,
    *,
    progress: Progress | None = None,
    clock: Clock = utc_now,
    selection: Selection | None = None,
    building: Mapping[Scope, int] | None = None,
    record_filter: RecordFilter | None = None,
) -> ReplayStats:
    """Re-read from ``start`` to the end as it stands now. A rebuild (``consumer.rebuild``)
    gives the ``selection`` of scopes to keep, the store generation each is ``building``, and
    the ``record_filter`` that picks the partitions to read and the records to parse."""
    consumer = make_kafka_consumer(settings, group_id=None)
    await consumer.start()
    stats = ReplayStats()
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(settings.kafka_topic)
        if not parts:
            raise ValueError(f"topic {settings.kafka_topic!r} does not exist")
        chosen = record_filter.partitions(len(parts)) if record_filter is not None else None
        if chosen is not None:
            log.info("reading partitions %s of %d: producers key by workspace id", chosen,
                     len(parts))
        tps = await _seek(
            consumer,
            [TopicPartition(settings.kafka_topic, p) for p in sorted(parts)
             if chosen is None or p in chosen],
            start,
        )
        stop_at = await consumer.end_offsets(tps)
        first = {tp: await consumer.position(tp) for tp in tps}
        hw_seen: set[TopicPartition] = set()
        total = sum(max(0, stop_at[tp] - first[tp]) for tp in tps)
        writer = BatchWriter(settings, store, None, clock, selection=selection,
                             building=building)
        done = 0
        budget = InflateBudget(settings.consumer_max_fetch_inflated_bytes)
        install(budget)
        # Where each partition's next record is: a fetch that fails has drained (and dropped)
        # records of other partitions, so it is retried from here.
        next_offset = dict(first)
        max_records = settings.consumer_max_batch

        async def finished() -> bool:
            for tp in tps:
                if await consumer.position(tp) < stop_at[tp]:
                    return False
            return True

        while not await finished():
            budget.start_fetch()
            try:
                fetched = await consumer.getmany(timeout_ms=500, max_records=max_records)
            except FetchOverBudget:
                for tp, offset in next_offset.items():
                    consumer.seek(tp, offset)
                max_records = max(1, max_records // 2)
                continue
            except Exception as err:
                if not unreadable(err):
                    raise
                raise UnreadableRange(
                    f"the Kafka client cannot read a record of {settings.kafka_topic} after "
                    f"{ {tp.partition: o for tp, o in next_offset.items()} } "
                    f"({type(err).__name__}: {err}); the live consumer skips such records and "
                    "names them in a dead letter: replay --from-offsets past them"
                ) from err
            max_records = min(settings.consumer_max_batch, max_records * 2)
            for tp, batch in fetched.items():
                if batch:
                    next_offset[tp] = batch[-1].offset + 1
            for tp in fetched:
                high = consumer.highwater(tp)
                if tp not in hw_seen and high is not None:
                    hw_seen.add(tp)
                    if high > stop_at[tp]:
                        total += high - stop_at[tp]
                        stop_at[tp] = high
            records: list[Record] = []
            for tp, batch in fetched.items():
                if not batch:
                    continue
                stop = stop_at[tp]
                part = batch if batch[-1].offset < stop else [r for r in batch if r.offset < stop]
                records.extend(record_filter.select(part) if record_filter is not None else part)
            if records:
                parsed = writer.parse(records)
                if record_filter is not None:
                    record_filter.check(parsed)
                prepared = await writer.write(parsed, record_offsets=False)
                assert prepared is not None  # no stop callback: write retries until stored
                stats.logins += prepared.logins
                stats.filtered += prepared.filtered
                stats.excluded += prepared.excluded
                stats.bad += len(prepared.dead)
            count = sum(len(b) for b in fetched.values())
            stats.messages += count
            done += count
            if progress is not None:
                progress(min(done, total), total)
        log.info("replay done: %s", stats)
        return stats
    finally:
        await consumer.stop()
