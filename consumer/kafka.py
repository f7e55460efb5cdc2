"""The Kafka clients of every process, built from settings in one place: the group consumer, the
dead-letter producer (and replay's consumer outside any group)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.dlq import MAX_DLQ_REQUEST_BYTES
from sketches.config import Settings

FETCH_MAX_BYTES = 16 * 1024 * 1024


def make_kafka_consumer(settings: Settings, group_id: str | None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Room for one oversized message per partition, so it can be dead-lettered.
        max_partition_fetch_bytes=max(1024 * 1024, 2 * settings.max_message_bytes) + 65536,
        # What one fetch may hold before it is inflated (consumer.fetching bounds the rest).
        fetch_max_bytes=FETCH_MAX_BYTES,
        session_timeout_ms=settings.consumer_session_timeout_ms,
        heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
    )


def make_dlq_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        linger_ms=5,
        max_request_size=MAX_DLQ_REQUEST_BYTES,
        # A multi-megabyte bad value is usually text: compressed, it fits the topic's limit.
        compression_type="zstd",
    )
