"""Writing one batch: bucket it, store it (retrying while Redis is away), dead-letter the bad.

The group consumer (``consumer.runner``) and replay (``consumer.replay``) share it; they differ
only in how they choose offsets, so replay need not import the group loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from aiokafka.errors import KafkaError

from consumer import metrics
from consumer.batch import Parsed, Prepared, Record, bucket, parse_records
from consumer.dlq import DeadLetters
from consumer.events import Rules
from consumer.pause import Pause
from consumer.settings_cache import SettingsCache
from sketches.config import Settings
from sketches.errors import CorruptSketch, StoreUnavailable
from sketches.keys import Scope
from sketches.store import SketchStore

if TYPE_CHECKING:
    from consumer.selection import Selection

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def rules_from(settings: Settings) -> Rules:
    return Rules(
        login_type=settings.login_metric_type,
        retention_days=settings.retention_days,
        max_bytes=settings.max_message_bytes,
    )


T = TypeVar("T")


class _Stopped:
    """What a retried step returns when the consumer was asked to stop before it succeeded."""


STOPPED = _Stopped()


class BatchWriter:
    """Writes batches to the store and the dead-letter topic; shared by the group consumer and
    replay, which differ only in how they pick offsets."""

    def __init__(
        self,
        settings: Settings,
        store: SketchStore,
        dead_letters: DeadLetters | None,
        clock: Clock = utc_now,
        pause: Pause | None = None,
        *,
        selection: Selection | None = None,
        building: Mapping[Scope, int] | None = None,
    ) -> None:
        """``selection`` and ``building`` are a rebuild's (``consumer.rebuild``): only the
        selected scopes are written, each only to the store generation it is building. The group
        consumer gives neither: every scope, to the generation that answers."""
        self.settings = settings
        # Why the writer waits (a full Redis), for readiness and the stall watchdog.
        self.pause = pause if pause is not None else Pause()
        self.store = store
        self.dead_letters = dead_letters
        self.rules = rules_from(settings)
        self.clock = clock
        self.selection = selection
        self.building = building
        self.workspace_settings = SettingsCache(
            store, settings.default_timezone, settings.settings_cache_seconds
        )

    def parse(self, records: list[Record]) -> Parsed:
        return parse_records(records, self.rules, self.clock())

    async def write(
        self,
        parsed: Parsed,
        record_offsets: bool,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Prepared | None:
        """Bucket and store the batch (retrying while Redis is away), then its dead letters.

        Returns None when asked to stop before the store took the batch: the caller must then
        not commit.
        """
        keys = self.store.keys
        offsets: list[tuple[Any, ...]] = [
            ("SET", keys.offsets(tp.topic, tp.partition), offset)
            for tp, offset in parsed.next_offsets.items()
        ] if record_offsets else []
        timing: list[float] = []
        deferred: list[tuple[Any, ...]] = []

        async def store_batch() -> tuple[Prepared, list[CorruptSketch]]:
            timing[:] = [time.perf_counter()]
            configs = await self.workspace_settings.resolve(parsed.scopes)
            prepared = bucket(parsed, configs, self.selection)
            # The store's offsets decide where a restart resumes, so they are recorded only once
            # the batch's dead letters (bucketing may add some) are acknowledged: recorded with
            # the sketches, a crash before the dead letters went out would skip them for good.
            # (Fault suite: a crash after the store write loses no dead letter.)
            if self.dead_letters is not None and prepared.dead:
                after, deferred[:] = [], offsets
            else:
                after, deferred[:] = offsets, []
            # After the sketches, on the same connection: the applied offsets.
            return prepared, await self.store.add_by_day(
                prepared.days, prepared.week_starts, after, building=self.building
            )

        stored = await self._retrying("storing the batch", store_batch, should_stop)
        if isinstance(stored, _Stopped):
            return None
        prepared, failed = stored
        metrics.BATCH_WRITE_SECONDS.observe(time.perf_counter() - timing[0])
        for corrupt in failed:
            metrics.CORRUPT_KEYS.inc()
            log.error("sketch not updated, the key holds something else: %s", corrupt,
                      extra={"key": corrupt.key})
        if self.dead_letters is not None and prepared.dead:
            dead_letters = self.dead_letters
            sent = await self._retrying(
                "sending dead letters", lambda: dead_letters.send(prepared.dead), should_stop
            )
            if isinstance(sent, _Stopped):
                return None
        if deferred:
            # The batch is then re-read, its dead letters sent again: at least once, never lost.
            done = await self._retrying(
                "storing the batch's offsets", lambda: self.store.add({}, deferred), should_stop
            )
            if isinstance(done, _Stopped):
                return None
        metrics.EVENTS.labels("counted").inc(prepared.logins)
        metrics.EVENTS.labels("filtered").inc(prepared.filtered)
        metrics.EVENTS.labels("excluded").inc(prepared.excluded)
        metrics.EVENTS.labels("dead_lettered").inc(len(prepared.dead))
        return prepared

    async def _retrying(
        self, what: str, op: Callable[[], Awaitable[T]], should_stop: Callable[[], bool]
    ) -> T | _Stopped:
        """Run ``op`` until it succeeds, backing off from 0.1 s to ``REDIS_RETRY_MAX_BACKOFF_S``
        and logging each failed attempt, while Redis or the broker is away or Redis is full
        (``StoreOutOfMemory``: ``self.pause`` says so until an attempt succeeds); ``STOPPED``
        when asked to stop (or told by the watchdog to give up) between attempts."""
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await op()
            except (StoreUnavailable, KafkaError) as err:
                if isinstance(err, StoreUnavailable):
                    metrics.REDIS_ERRORS.inc()
                self.pause.failed(err)
                if should_stop():
                    log.warning("stopping before %s succeeded: %s", what, err)
                    return STOPPED
                log.warning(
                    "%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, backoff, err
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.redis_retry_max_backoff_s)
            else:
                self.pause.resumed()
                return result
