"""Prometheus series of the consumer. prometheus-client keeps one process-wide registry, so the
series are declared once here; they hold numbers, not clients."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "usage_metrics_events_total",
    "Kafka messages handled, by outcome (counted, filtered, excluded, dead_lettered)",
    ["outcome"],
)
BATCH_WRITE_SECONDS = Histogram(
    "usage_metrics_batch_write_seconds",
    "Time to write one batch to Redis (one pipeline)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAG = Gauge(
    "usage_metrics_consumer_lag",
    "Messages between the consumer's position and the high watermark",
    ["topic", "partition"],
)
REDIS_ERRORS = Counter(
    "usage_metrics_consumer_redis_errors_total", "Batch writes that failed for want of Redis"
)
CORRUPT_KEYS = Counter(
    "usage_metrics_corrupt_keys_total", "Sketch keys that could not be updated (wrong type)"
)
DEAD_LETTERS_UNDELIVERABLE = Counter(
    "usage_metrics_dead_letters_undeliverable",
    "Dead letters the broker refused as too large in every form (logged with the source offset)",
)
PAUSED = Gauge(
    "usage_metrics_consumer_paused",
    "1 while ingestion waits and why (redis_oom: Redis refuses writes at maxmemory; the batch "
    "is retried, nothing is committed)",
    ["reason"],
)
