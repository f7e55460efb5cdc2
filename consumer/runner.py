"""The group consumer: fetch a batch, write it to the store, dead-letter the bad, then commit.

The loop is aiokafka's manual-commit pattern (``getmany`` batches, commit after processing, a
rebalance listener, ``finally: stop()``), with four additions that make "nothing lost" hold:

1. **The store decides where to resume.** After a batch's sketches, the same pipeline records the
   next offset of each partition in Redis (``KeySpace.offsets``). Redis executes and logs one
   connection's commands in order, so if an AOF loses its tail the offset record goes with the
   writes it vouched for. On assignment the consumer seeks to the offsets the store holds; a
   partition the store knows nothing of is read from the earliest retained offset, since a
   metrics store should see all the history it can and adds are idempotent. Kafka's committed
   offsets are still committed after each batch, for lag monitoring and tooling.
   On a Redis Cluster a batch's sketches sit on every master, each with its own AOF, and no
   transaction spans slots: the store writes the sketches first and, once every master has
   acknowledged them, the offset records, the partition's own and one copy per master
   (hash-tagged into that master's slots), so that on each master the record follows that
   master's share of the batch. The applied offset is the minimum over the masters' records, so
   a master that lost the tail of its log drags the resume point back (``sketches/store.py``).
2. **Redis down means wait, not skip.** A write that fails for want of Redis is retried with a
   growing backoff, each attempt logged; nothing is committed or dead-lettered meanwhile.
3. **A revocation waits for the batch in flight.** Processing holds a lock that
   ``on_partitions_revoked`` also takes, so a rebalance never cuts a batch between its write and
   its commit. A commit that still fails (the group moved on) is logged, not fatal: the new owner
   re-reads from the store's offsets and the adds are idempotent.
4. **An assignment is positioned before it is read.** Its partitions stay paused until the
   listener has moved them to the store's offsets, and a batch fetched before a rebalance is
   dropped unprocessed (see ``GroupConsumer.on_assigned``).

A consumer that stays alive but makes no progress while it has lag (aiokafka #1154) raises
``ConsumerStalled`` after ``CONSUMER_STALL_TIMEOUT_S``, so that its supervisor restarts it. A
consumer waiting for a full Redis (``consumer.pause``) is not stalled: a restart frees no memory,
and it resumes by itself once Redis takes writes again.

Before it joins the group, the consumer checks Redis's ``maxmemory-policy``
(``sketches.eviction``): an evicting Redis is refused (``EvictionRefused``), and a Redis that
does not answer yet is waited for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from consumer import metrics
from consumer.batch import Parsed, Record
from consumer.dlq import DeadLetters
from consumer.fetching import FetchOverBudget, InflateBudget, describe, install, unreadable
from consumer.kafka import make_dlq_producer, make_kafka_consumer
from consumer.pause import Pause
from consumer.writer import BatchWriter, Clock, utc_now
from sketches.config import Settings
from sketches.errors import StoreUnavailable, UsageMetricsError
from sketches.eviction import check_policy
from sketches.store import SketchStore

log = logging.getLogger(__name__)

# Fault injection for the crash tests: with USAGE_METRICS_FAULT=exit-after-write the process dies
# (os._exit, no cleanup, like SIGKILL) after a batch is stored and before its offsets are committed.
FAULT_ENV = "USAGE_METRICS_FAULT"
# Fetches one batch may gather (each bounded by the fetch sizes and the inflation budget), so
# that a batch's memory stays bounded whatever the records weigh.
GATHER_FETCHES = 8

# How long one probe of an unreadable range waits for a fetch, and how often it tries.
PROBE_TIMEOUT_MS = 500
PROBE_ATTEMPTS = 20


class ConsumerStalled(UsageMetricsError):
    """No progress for too long while there is lag: exit so a supervisor restarts us."""


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: GroupConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the batch in flight: it commits before the partitions move.
        async with self.owner.lock:
            self.owner.epoch += 1
            log.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.owner.on_assigned(assigned)


class GroupConsumer:
    def __init__(
        self,
        settings: Settings,
        store: SketchStore,
        *,
        clock: Clock = utc_now,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.last_progress = time.monotonic()
        self.batches = 0
        self.ready = False
        # Changes with every revocation and assignment: a batch fetched under an older epoch is
        # dropped unprocessed (its partitions have been, or will be, positioned again).
        self.epoch = 0
        self._listener_failed: Exception | None = None
        # Per assigned partition, where the next batch starts: every record before it has been
        # handed to processing (None: the earliest retained offset). A failed fetch rewinds
        # here, because aiokafka drops the records it drained before the failure.
        self.read_from: dict[TopicPartition, int | None] = {}
        self.max_records = settings.consumer_max_batch
        self.budget = InflateBudget(settings.consumer_max_fetch_inflated_bytes)
        self._fault = os.environ.get(FAULT_ENV)
        # Why the writer is waiting, if it is (a full Redis): for /readyz and the watchdog.
        self.pause = Pause()

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Position a new assignment at the store's offsets before any of it is processed.

        aiokafka marks the assignment done, and starts resolving positions and fetching, before
        it calls the rebalance listener; a listener that waits for Redis (a fresh process's
        first round trips, a Redis Cluster's slot map) would otherwise let the first batch be
        fetched from Kafka's committed offset, processed, and then rewound to the store's
        offset and processed again: every dead letter sent twice (issue 11, seen on a
        3-master cluster). So the partitions are paused before the first await, which is
        before aiokafka can have fetched anything for them, and resumed once positioned.
        """
        consumer = self.consumer
        assert consumer is not None
        consumer.pause(*assigned)
        self.epoch += 1
        try:
            async with self.lock:  # not while a fetch that failed is being read carefully
                await self.seek_to_store_offsets(assigned)
        except Exception as err:
            # aiokafka only logs a listener's exception and goes on fetching from wherever it
            # stands; the loop raises it instead, so a supervisor restarts the consumer.
            self._listener_failed = err
            raise
        still = consumer.assignment()
        consumer.resume(*(tp for tp in assigned if tp in still))

    async def seek_to_store_offsets(self, assigned: set[TopicPartition]) -> None:
        consumer = self.consumer
        assert consumer is not None
        if not assigned:
            return
        tps = sorted(assigned)
        attempt = 0
        while True:
            attempt += 1
            try:
                values = await self.store.applied_offsets([(tp.topic, tp.partition) for tp in tps])
                break
            except StoreUnavailable as err:
                log.warning("cannot read stored offsets (attempt %d), retrying: %s", attempt, err)
                await asyncio.sleep(min(0.1 * 2**attempt, self.settings.redis_retry_max_backoff_s))
        fresh = []
        known: dict[TopicPartition, int] = {}
        self.read_from = dict(zip(tps, values, strict=True))
        for tp, value in zip(tps, values, strict=True):
            if value is None:
                fresh.append(tp)
            else:
                consumer.seek(tp, value)
                known[tp] = value
                log.info("partition %s resumes at stored offset %d", tp, value)
        if known:
            # Bring Kafka's committed offsets up to what the store holds (a crash between write
            # and commit leaves them behind), so that lag seen by Kafka tools is true.
            try:
                await consumer.commit(known)
            except KafkaError as err:
                log.warning("could not commit the store's offsets on assignment: %s", err)
        if fresh:
            log.info(
                "the store holds no offset for %s: reading from the earliest retained offset",
                sorted(str(tp) for tp in fresh),
            )
            await consumer.seek_to_beginning(*fresh)
        self.last_progress = time.monotonic()

    async def lag(self) -> dict[TopicPartition, int]:
        """Messages between our position and the high watermark of each assigned partition (the
        watermark comes with every fetch response, so this needs no extra request)."""
        consumer = self.consumer
        if consumer is None:
            return {}
        out: dict[TopicPartition, int] = {}
        for tp in list(consumer.assignment()):
            # A rebalance during an await below may take a partition of this snapshot: aiokafka
            # asserts on a partition it no longer holds, which is no lag of ours.
            if tp not in consumer.assignment():
                continue
            high = consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await asyncio.wait_for(consumer.position(tp), 1.0)
            except (TimeoutError, KafkaError, AssertionError):
                continue
            out[tp] = max(0, high - position)
        return out

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set. Raises ``EvictionRefused`` before joining the group if
        Redis may evict keys (and ``REDIS_ALLOW_EVICTION`` is not set)."""
        settings = self.settings
        policy = await check_policy(self.store.client, settings.redis_allow_eviction,
                                    max_backoff=settings.redis_retry_max_backoff_s, stop=stop,
                                    where=settings.redis_url_redacted())
        if policy is None:
            return  # asked to stop while waiting for Redis
        consumer = make_kafka_consumer(settings, settings.kafka_group_id)
        producer = make_dlq_producer(settings)
        self.consumer = consumer
        install(self.budget)
        writer = BatchWriter(
            settings, self.store, DeadLetters(producer, settings.kafka_dlq_topic),
            self.clock, pause=self.pause,
        )
        await producer.start()
        try:
            await consumer.start()
            consumer.subscribe([settings.kafka_topic], listener=_Listener(self))
            self.ready = True
            log.info(
                "consuming %s as group %s into %s (%s mode)",
                settings.kafka_topic, settings.kafka_group_id,
                settings.redis_url_redacted(), settings.sketch_mode,
            )
            while not stop.is_set():
                fetched, epoch = await self._fetch(consumer, writer, stop)
                if self._listener_failed is not None:
                    raise self._listener_failed
                if fetched:
                    await self._process(consumer, writer, fetched, stop, epoch)
                await self._watch_progress()
        finally:
            self.ready = False
            await consumer.stop()
            await producer.stop()
            log.info("consumer stopped after %d batches", self.batches)

    async def _process(
        self,
        consumer: AIOKafkaConsumer,
        writer: BatchWriter,
        fetched: Mapping[TopicPartition, list[Record]],
        stop: asyncio.Event,
        epoch: int,
    ) -> None:
        async with self.lock:
            if epoch != self.epoch:
                # A rebalance ran between the fetch and here; the new assignment's positions
                # (the store's offsets) decide what is read, so this batch is read again if
                # it is still ours.
                log.info("dropping a batch fetched before a rebalance: %s",
                         {str(tp): len(batch) for tp, batch in fetched.items()})
                return
            for tp, batch in fetched.items():
                if batch:
                    self.read_from[tp] = batch[-1].offset + 1
            records = [r for batch in fetched.values() for r in batch]
            parsed = writer.parse(records)
            give_up = self._give_up(stop)
            if await writer.write(parsed, record_offsets=True, should_stop=give_up) is None:
                return
            if self._fault == "exit-after-write":
                log.error("fault injection: exiting between store write and commit")
                os._exit(137)
            try:
                await consumer.commit(dict(parsed.next_offsets))
            except CommitFailedError as err:
                log.warning("commit refused after a rebalance (the store has the batch): %s", err)
            self.batches += 1
            self.last_progress = time.monotonic()
            for tp, lag in (await self.lag()).items():
                metrics.LAG.labels(tp.topic, str(tp.partition)).set(lag)

    async def _fetch(
        self, consumer: AIOKafkaConsumer, writer: BatchWriter, stop: asyncio.Event
    ) -> tuple[Mapping[TopicPartition, list[Record]], int]:
        """One batch and the epoch it was fetched under. A fetch that would inflate beyond its
        budget is retried with half the records; one that fails on a record aiokafka cannot
        read is read again partition by partition, which finds and skips that record."""
        self.budget.start_fetch()
        try:
            fetched: dict[TopicPartition, list[Record]] = dict(await consumer.getmany(
                timeout_ms=self.settings.consumer_fetch_timeout_ms, max_records=self.max_records
            ))
        except FetchOverBudget as err:
            async with self.lock:
                await self._rewind(consumer)
            self.max_records = max(1, self.max_records // 2)
            log.warning("%s: fetching %d records at a time", err, self.max_records)
            return {}, self.epoch
        except Exception as err:
            if not unreadable(err):
                raise
            return await self._read_carefully(consumer, writer, err, stop)
        if self.max_records < self.settings.consumer_max_batch:
            self.max_records = min(self.settings.consumer_max_batch, self.max_records * 2)
        if fetched:
            await self._gather(consumer, fetched)
        return fetched, self.epoch

    async def _gather(
        self, consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, list[Record]]
    ) -> None:
        """Top a batch up with what arrives within ``CONSUMER_BATCH_WINDOW_MS`` of its first
        fetch, up to the fetch's record limit.

        A batch costs per distinct sketch key it writes, and a key is shared by every login of
        one scope and day: the larger the batch, the more logins share each key. One fetch
        returns at most about one partition fetch size per partition, so a batch is gathered
        from several. Whatever goes wrong in a later fetch (a record the client cannot read, a
        fetch over its memory budget) ends the gathering: the batch so far is processed, and
        the next fetch meets the problem first. A rebalance meanwhile moves the epoch, and the
        caller drops the whole batch."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.consumer_batch_window_ms / 1000
        epoch = self.epoch
        count = sum(len(b) for b in fetched.values())
        for _ in range(GATHER_FETCHES):
            if count >= self.max_records or self.epoch != epoch:
                return
            left_ms = int((deadline - loop.time()) * 1000)
            if left_ms <= 0:
                return
            self.budget.start_fetch()
            try:
                more = await consumer.getmany(
                    timeout_ms=left_ms, max_records=self.max_records - count
                )
            except Exception:  # noqa: BLE001 - the next _fetch meets it and deals with it
                return
            if not more:
                return
            for tp, batch in more.items():
                fetched.setdefault(tp, []).extend(batch)
                count += len(batch)

    async def _rewind(self, consumer: AIOKafkaConsumer) -> None:
        """Back to where the next batch starts, for every partition (caller holds the lock)."""
        fresh = []
        for tp in consumer.assignment():
            if tp not in self.read_from:
                continue  # not positioned yet: the rebalance listener will do it
            offset = self.read_from[tp]
            if offset is None:
                fresh.append(tp)
            else:
                consumer.seek(tp, offset)
        if fresh:
            await consumer.seek_to_beginning(*fresh)

    async def _read_carefully(
        self, consumer: AIOKafkaConsumer, writer: BatchWriter, err: Exception,
        stop: asyncio.Event,
    ) -> tuple[Mapping[TopicPartition, list[Record]], int]:
        """After a fetch failed on a record the client cannot read: each partition one record
        at a time, so that the readable records before it are processed and the partition that
        is stuck is found at the unreadable offset itself, where it is skipped.

        The lock is held only to move positions and to write, never around ``getmany``: a
        rebalance makes ``getmany`` wait for the new assignment, whose revocation listener
        waits for the lock. A rebalance meanwhile (the epoch moves) ends the careful read: the
        records read are dropped and the listener's positions stand."""
        log.warning("a fetch failed on a record the Kafka client cannot read (%s); "
                    "reading partition by partition", describe(err))
        async with self.lock:
            epoch = self.epoch
            await self._rewind(consumer)
        out: dict[TopicPartition, list[Record]] = {}
        for tp in sorted(consumer.assignment()):
            if tp not in self.read_from:
                continue
            records: list[Record] = []
            while len(records) < self.settings.consumer_max_batch and self.epoch == epoch:
                self.budget.start_fetch()
                try:
                    got = await consumer.getmany(
                        tp, timeout_ms=self.settings.consumer_fetch_timeout_ms, max_records=1
                    )
                except Exception as failure:
                    if not unreadable(failure):
                        raise
                    if not records:
                        await self._skip(consumer, writer, tp, failure, stop, epoch)
                    break  # else: process these first; the next fetch fails right there
                if not got:
                    break
                records.extend(got.get(tp, ()))
            if records:
                out[tp] = records
        return out, epoch

    async def _readable(self, consumer: AIOKafkaConsumer, tp: TopicPartition, at: int) -> bool:
        """Whether fetching ``tp`` from offset ``at`` hands over a record (or finds the end).
        A fetch that keeps coming back empty counts as readable: wrongly so, the consumer only
        meets the unreadable record again and skips from there, whereas the other mistake would
        skip readable records."""
        for _ in range(PROBE_ATTEMPTS):
            if tp not in consumer.assignment():
                return True  # a rebalance took it: the caller sees the epoch move
            consumer.seek(tp, at)
            self.budget.start_fetch()
            try:
                got = await consumer.getmany(tp, timeout_ms=PROBE_TIMEOUT_MS, max_records=1)
            except Exception as failure:
                if not unreadable(failure):
                    raise
                return False
            high = consumer.highwater(tp)
            if got or (high is not None and at >= high):
                return True
        return True

    async def _skip(
        self, consumer: AIOKafkaConsumer, writer: BatchWriter, tp: TopicPartition,
        err: Exception, stop: asyncio.Event, epoch: int,
    ) -> None:
        """Skip the smallest range of offsets from the stuck position past which ``tp`` can be
        read, dead-letter one valueless record that names the range and the error, and record
        the new offset. Unreadable offsets fail to fetch up to the end of their batch, so the
        end is found by doubling the step, then halving the interval. If a rebalance ran
        meanwhile, nothing is skipped: the positions go back to where the new assignment
        starts, and the unreadable record is met again."""
        if tp not in consumer.assignment():
            return
        start = await consumer.position(tp)
        bad, step = start, 1
        while not await self._readable(consumer, tp, start + step):
            bad, step = start + step, step * 2
        good = start + step
        while good - bad > 1:
            mid = (bad + good) // 2
            if await self._readable(consumer, tp, mid):
                good = mid
            else:
                bad = mid
        async with self.lock:
            if self.epoch != epoch:
                await self._rewind(consumer)
                return
            consumer.seek(tp, good)
            reason = (
                f"the Kafka client cannot read offsets {start}..{good - 1} of this partition "
                f"({good - start} offsets, skipped unread): {describe(err)[:300]}"
            )
            log.error("skipping %s: %s", tp, reason,
                      extra={"topic": tp.topic, "partition": tp.partition, "offset": start})
            marker: Record = ConsumerRecord(
                tp.topic, tp.partition, start, -1, 0, None, b"", None, -1, 0, []
            )
            skipped = Parsed(dead=[(marker, reason)], next_offsets={tp: good})
            if await writer.write(skipped, record_offsets=True,
                                  should_stop=self._give_up(stop)):
                self.read_from[tp] = good
                try:
                    await consumer.commit({tp: good})
                except CommitFailedError as failure:
                    log.warning("commit refused after a rebalance: %s", failure)

    def _give_up(self, stop: asyncio.Event) -> Callable[[], bool]:
        """What the writer asks between retries. While a write retries, the loop's own stall
        check cannot run, and a batch waiting for the store is lag: so past the stall timeout the
        watchdog's verdict is given here (fault suite: the consumer without progress exits 3).
        Not while Redis is full (``self.pause``): the consumer knows why it waits, and a restart
        would not free memory, so that time counts as progress."""

        def check() -> bool:
            if self.pause.reason is not None:
                self.last_progress = time.monotonic()
                return stop.is_set()
            idle = time.monotonic() - self.last_progress
            if idle > self.settings.consumer_stall_timeout_s:
                raise ConsumerStalled(
                    f"no progress for {idle:.0f}s while a batch waits for the store: "
                    "exiting so a supervisor restarts the consumer"
                )
            return stop.is_set()

        return check

    async def _watch_progress(self) -> None:
        lag = await self.lag()
        if not lag or max(lag.values()) == 0:
            self.last_progress = time.monotonic()
            return
        idle = time.monotonic() - self.last_progress
        if idle > self.settings.consumer_stall_timeout_s:
            raise ConsumerStalled(
                f"no progress for {idle:.0f}s while lag is {sum(lag.values())}: "
                "exiting so a supervisor restarts the consumer"
            )
