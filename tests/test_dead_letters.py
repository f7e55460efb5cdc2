"""Dead letters the broker refuses as too large (issue 11).

Apache Kafka refuses a batch larger than the topic's ``max.message.bytes`` with
``MESSAGE_SIZE_TOO_LARGE``; Tansu, the test broker, accepts anything. So the producer here is the
real one on the real broker behind ``BrokerLimit``, which answers a record over the limit the
way Kafka does: with a future that fails with aiokafka's ``MessageSizeTooLargeError``, the class
aiokafka raises for that broker error. Everything else (sending, reading the dead-letter topic
back, the store write) is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord

from consumer.dlq import (
    MAX_DLQ_REQUEST_BYTES,
    ORIGINAL_SIZE_HEADER,
    TRUNCATED_PREFIX_BYTES,
    DeadLetters,
)
from consumer.writer import BatchWriter
from sketches.config import Settings
from sketches.store import SketchStore
from tests.support.kafka import read_to_end


def size_as_broker_counts(key: bytes | None, value: bytes | None,
                          headers: list[tuple[str, bytes]]) -> int:
    """A one-record batch, header included, as max.message.bytes counts it (aiokafka's upper
    bound of it)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


class BrokerLimit:
    """The real producer, refusing records as a broker with ``max.message.bytes=limit`` would."""

    def __init__(self, producer: AIOKafkaProducer, limit: int) -> None:
        self.producer = producer
        self.limit = limit
        self.refused = 0

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None, **kw: Any) -> Any:
        size = size_as_broker_counts(key, value, headers or [])
        if size > self.limit:
            self.refused += 1
            refusal: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            refusal.set_exception(MessageSizeTooLargeError())
            return refusal
        return await self.producer.send(topic, value=value, key=key, headers=headers, **kw)


@pytest.fixture
def sketch_mode() -> str:
    return "exact"


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                         max_request_size=MAX_DLQ_REQUEST_BYTES, linger_ms=5,
                         compression_type="zstd")
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def record(offset: int, value: bytes, key: bytes | None = b"k",
           headers: list[tuple[str, bytes]] | None = None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("metrics", 3, offset, 1_796_000_000_000 + offset, 0, key, value,
                          None, len(key or b""), len(value), headers or [])


async def test_dead_letters_too_large_for_the_topic_are_sent_truncated_headers_included(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
) -> None:
    _, dlq = topics
    limit = 1024 * 1024
    near = limit - size_as_broker_counts(b"k", b"", []) - 50  # the dlq.* headers push it over
    dead = [
        (record(10, b"s" * 100), "small"),
        (record(11, b"b" * (3 * 1024 * 1024)), "a compressed multi-megabyte value"),
        (record(12, b"n" * near), "near the limit"),
        (record(13, b"h" * 10, headers=[("trace", b"t" * (2 * 1024 * 1024)), ("x", b"y")]),
         "huge source header"),
        (record(14, b"s" * 100, headers=[("trace", b"t-14")]), "small after them"),
    ]
    letters = DeadLetters(BrokerLimit(producer, limit), dlq)  # type: ignore[arg-type]
    await asyncio.wait_for(letters.send(dead), 30)
    assert letters.undeliverable == 0

    got = {int(dict(r.headers)["dlq.source.offset"]): r
           for r in await read_to_end(settings.kafka_bootstrap_servers, dlq)}
    assert sorted(got) == [10, 11, 12, 13, 14]
    for offset in (10, 14):
        assert got[offset].value == b"s" * 100
        assert ORIGINAL_SIZE_HEADER not in dict(got[offset].headers)
    assert dict(got[14].headers)["trace"] == b"t-14"
    for offset, size in ((11, 3 * 1024 * 1024), (12, near), (13, 10)):
        r = got[offset]
        headers = dict(r.headers)
        assert r.value == dead[offset - 10][0].value[:TRUNCATED_PREFIX_BYTES]
        assert headers[ORIGINAL_SIZE_HEADER] == str(size).encode()
        assert headers["dlq.reason"] == dead[offset - 10][1].encode()
        assert headers["dlq.source.topic"] == b"metrics"
        assert headers["dlq.source.partition"] == b"3"
        assert headers["dlq.source.timestamp"] == str(1_796_000_000_000 + offset).encode()
        assert r.key == b"k"
    assert len(dict(got[13].headers)["trace"]) == 1024
    assert dict(got[13].headers)["x"] == b"y"


async def test_a_topic_smaller_than_the_truncated_form_gets_the_headers_alone(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
) -> None:
    _, dlq = topics
    letters = DeadLetters(BrokerLimit(producer, 4096), dlq)  # type: ignore[arg-type]
    await asyncio.wait_for(letters.send([(record(5, b"v" * 100_000), "big")]), 30)
    [r] = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    assert r.value == b""
    assert dict(r.headers)[ORIGINAL_SIZE_HEADER] == b"100000"
    assert dict(r.headers)["dlq.source.offset"] == b"5"


async def test_a_refusal_stops_neither_the_batch_nor_its_offsets(
    settings: Settings, store: SketchStore, topics: tuple[str, str],
    producer: AIOKafkaProducer,
) -> None:
    """Through the consumer's batch writer, on the real store: refused dead letters, even one
    no form of which the topic takes, never make the batch retry until the stall watchdog
    restarts the consumer (before: ``MessageSizeTooLargeError`` from the broker was retried
    forever). The offsets are recorded once the dead letters are done with."""
    topic, dlq = topics
    limit = 200  # not even the dlq.* headers fit: the loss is logged and counted
    letters = DeadLetters(BrokerLimit(producer, limit), dlq)  # type: ignore[arg-type]
    writer = BatchWriter(settings, store, letters)
    bad = [ConsumerRecord(topic, 0, i, 0, 0, None, b"x" * 5000, None, 0, 5000, [])
           for i in range(3)]
    parsed = writer.parse(bad)
    assert len(parsed.dead) == 3
    prepared = await asyncio.wait_for(writer.write(parsed, record_offsets=True), 30)
    assert prepared is not None
    assert letters.undeliverable == 3
    assert await store.applied_offsets([(topic, 0)]) == [3]
    assert await read_to_end(settings.kafka_bootstrap_servers, dlq) == []
