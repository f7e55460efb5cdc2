"""Why ingestion is waiting: what ``/readyz``, the ``usage_metrics_consumer_paused`` gauge and
the stall watchdog need to know while a batch is being retried.

A Redis at ``maxmemory`` under ``noeviction`` refuses every write (``StoreOutOfMemory``) but
answers ``PING``: without this, the consumer would look ready while it stands still. The batch
writer (``consumer.writer``) reports each failed attempt and each success here.
"""

from __future__ import annotations

import logging
import time

from consumer import metrics
from sketches.errors import StoreOutOfMemory

log = logging.getLogger(__name__)

REDIS_OOM = "redis_oom"


class Pause:
    def __init__(self) -> None:
        self.reason: str | None = None
        self.since = 0.0
        self.attempts = 0
        self.error = ""
        metrics.PAUSED.labels(REDIS_OOM).set(0)  # the series exists before the first pause

    def failed(self, err: BaseException) -> None:
        """An attempt failed with ``err``: paused for its reason, or not paused for one this
        class names (Redis away, the broker away: ``/readyz`` sees those by itself)."""
        reason = REDIS_OOM if isinstance(err, StoreOutOfMemory) else None
        if reason != self.reason:
            self._set(reason)
            if reason is not None:
                log.error("Redis is out of memory (maxmemory, policy noeviction): ingestion "
                          "paused, nothing committed; retrying until memory is freed or "
                          "maxmemory raised: %s", err)
        self.error = str(err)
        self.attempts = self.attempts + 1 if reason is not None else 0

    def resumed(self) -> None:
        """An attempt succeeded: whatever paused ingestion is over."""
        if self.reason is not None:
            log.warning("Redis takes writes again: ingestion resumed after %d failed attempts "
                        "(%.0fs)", self.attempts, time.monotonic() - self.since)
            self._set(None)
            self.attempts = 0

    def _set(self, reason: str | None) -> None:
        if self.reason is not None:
            metrics.PAUSED.labels(self.reason).set(0)
        self.reason = reason
        if reason is not None:
            metrics.PAUSED.labels(reason).set(1)
            self.since = time.monotonic()
