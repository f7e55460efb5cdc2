"""Dead letters the broker refuses as too large (issue 11).

Apache Kafka refuses a batch larger than the topic's ``max.message.bytes`` with
``MESSAGE_SIZE_TOO_LARGE`` (error 10), and a produce request over its limits with
``RECORD_LIST_TOO_LARGE`` (error 18); Tansu, the test broker, accepts anything. So the producer
here is the real one on the real broker behind ``BrokerLimit``, which answers a record over the
limit the way Kafka does: with a future that fails with the aiokafka class of either broker
error. Everything else (sending, reading the dead-letter topic back, the store write, and
aiokafka's own refusal of a record over ``max_request_size``) is real.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import ConsumerRecord

from consumer.dlq import (
    MAX_DLQ_REQUEST_BYTES,
    MAX_REASON_BYTES,
    ORIGINAL_SIZE_HEADER,
    REASON_HEADER,
    TRUNCATED_HEADERS_BYTES,
    TRUNCATED_KEY_BYTES,
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


# The two broker errors that say "too large": for a record over the topic's max.message.bytes
# (10), and for a request over the broker's limits (18).
TOO_LARGE = [MessageSizeTooLargeError, RecordListTooLargeError]


class BrokerLimit:
    """The real producer, refusing records as a broker with ``max.message.bytes=limit`` would,
    with ``error``; the first ``refuse_first`` sends are refused whatever their size, as a
    whole batch is refused for one record too large among them."""

    def __init__(self, producer: AIOKafkaProducer, limit: int,
                 error: type[KafkaError] = MessageSizeTooLargeError,
                 refuse_first: int = 0) -> None:
        self.producer = producer
        self.limit = limit
        self.error = error
        self.refuse_first = refuse_first
        self.refused = 0
        # Refusals per dead letter (its dlq.source.offset).
        self.refused_offsets: Counter[int] = Counter()

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None, **kw: Any) -> Any:
        size = size_as_broker_counts(key, value, headers or [])
        if size > self.limit or self.refused < self.refuse_first:
            self.refused += 1
            self.refused_offsets[int(dict(headers or [])["dlq.source.offset"])] += 1
            refusal: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            refusal.set_exception(self.error())
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


@pytest.mark.parametrize("error", TOO_LARGE, ids=lambda e: e.__name__)
async def test_dead_letters_too_large_for_the_topic_are_sent_truncated_headers_included(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
    error: type[KafkaError],
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
    broker = BrokerLimit(producer, limit, error)
    letters = DeadLetters(broker, dlq)  # type: ignore[arg-type]
    await asyncio.wait_for(letters.send(dead), 30)
    assert letters.undeliverable == 0
    # Each is sent once in each form until one is taken; one refused for its own value is not
    # sent whole again (13's value is small: it was refused for its header, and goes truncated).
    assert broker.refused_offsets == {11: 1, 12: 1, 13: 2}

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


@pytest.mark.parametrize("error", TOO_LARGE, ids=lambda e: e.__name__)
async def test_a_refusal_stops_neither_the_batch_nor_its_offsets(
    settings: Settings, store: SketchStore, topics: tuple[str, str],
    producer: AIOKafkaProducer, error: type[KafkaError],
) -> None:
    """Through the consumer's batch writer, on the real store: refused dead letters, even one
    no form of which the topic takes, never make the batch retry until the stall watchdog
    restarts the consumer (before: ``MessageSizeTooLargeError`` from the broker was retried
    forever). The offsets are recorded once the dead letters are done with."""
    topic, dlq = topics
    limit = 200  # not even the dlq.* headers fit: the loss is logged and counted
    letters = DeadLetters(BrokerLimit(producer, limit, error), dlq)  # type: ignore[arg-type]
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


def source_headers(letter: Any) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in letter.headers if not k.startswith("dlq.")]


async def test_a_truncated_dead_letter_keeps_its_first_headers_within_8_kib_and_a_cut_key(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
) -> None:
    """The truncated form must fit where the whole did not: its source headers are cut to their
    first 256-byte key and 1 KiB value, and kept in order while they fit in 8 KiB; its key to
    its first KiB, whatever the sizes it came with."""
    _, dlq = topics
    long_key = "long-" + "k" * 5000
    headers = [(long_key, b"first"), *((f"h{i:02d}", bytes([65 + i]) * 1024) for i in range(20))]
    key = b"K" * (2 * 1024 * 1024)  # alone over the topic's limit
    value = b"v" * (3 * 1024 * 1024)
    letters = DeadLetters(BrokerLimit(producer, 1024 * 1024), dlq)  # type: ignore[arg-type]
    await asyncio.wait_for(letters.send([(record(7, value, key=key, headers=headers), "big")]),
                           30)
    [letter] = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    assert letter.value == value[:TRUNCATED_PREFIX_BYTES]
    assert letter.key == key[:TRUNCATED_KEY_BYTES]
    kept = source_headers(letter)
    cut_key = long_key[:256]
    # 256 + 5 bytes, then 1,027 each: seven more fit in 8 KiB, the eighth would not.
    assert kept == [(cut_key, b"first"), *headers[1:8]]
    assert sum(len(k) + len(v) for k, v in kept) <= TRUNCATED_HEADERS_BYTES
    assert dict(letter.headers)[ORIGINAL_SIZE_HEADER] == str(len(value)).encode()


@pytest.mark.parametrize("error", TOO_LARGE, ids=lambda e: e.__name__)
async def test_a_small_dead_letter_refused_with_its_batch_is_sent_again_whole(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
    error: type[KafkaError],
) -> None:
    """A broker refuses a whole batch for one record too large in it: the small dead letters
    that shared it go again as they were, not truncated."""
    _, dlq = topics
    broker = BrokerLimit(producer, 1024 * 1024, error, refuse_first=1)
    letters = DeadLetters(broker, dlq)  # type: ignore[arg-type]
    small = record(20, b"s" * 100, key=b"key-20", headers=[("trace", b"t-20")])
    await asyncio.wait_for(letters.send([(small, "small")]), 30)
    [letter] = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    assert broker.refused_offsets == {20: 1}
    assert (letter.value, letter.key) == (b"s" * 100, b"key-20")
    assert source_headers(letter) == [("trace", b"t-20")]
    assert ORIGINAL_SIZE_HEADER not in dict(letter.headers)


async def test_a_dead_letter_over_the_producers_own_limit_goes_truncated(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
) -> None:
    """aiokafka itself refuses a record over ``max_request_size`` (8 MiB) in ``send()``, before
    any broker sees it: the same smaller forms follow."""
    _, dlq = topics
    letters = DeadLetters(producer, dlq)
    value = b"b" * (MAX_DLQ_REQUEST_BYTES + 1024)
    await asyncio.wait_for(letters.send([(record(30, value), "over the request size")]), 30)
    [letter] = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    assert letter.value == value[:TRUNCATED_PREFIX_BYTES]
    assert dict(letter.headers)[ORIGINAL_SIZE_HEADER] == str(len(value)).encode()
    assert letters.undeliverable == 0


async def test_a_small_dead_letter_with_headers_over_the_producers_own_limit_goes_truncated(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
) -> None:
    """A small value is sent whole once more, alone (its batch may have been refused for a
    neighbour), and aiokafka refuses it again for its headers: then it goes truncated."""
    _, dlq = topics
    letters = DeadLetters(producer, dlq)
    big = [("trace", b"t" * (MAX_DLQ_REQUEST_BYTES + 1024)), ("x", b"y")]
    await asyncio.wait_for(letters.send([(record(31, b"small", headers=big), "headers")]), 30)
    [letter] = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    assert letter.value == b"small"
    assert source_headers(letter) == [("trace", b"t" * 1024), ("x", b"y")]
    assert dict(letter.headers)[ORIGINAL_SIZE_HEADER] == b"5"


async def test_a_dead_letters_own_headers_replace_the_sources_and_its_reason_is_cut(
    settings: Settings, topics: tuple[str, str], producer: AIOKafkaProducer,
) -> None:
    """A message that was a dead letter once (sent back from the dead-letter topic) carries
    ``dlq.*`` headers: the new dead letter's replace them rather than stand beside them, and a
    reason is cut at 2 KiB."""
    _, dlq = topics
    old = [("dlq.reason", b"an older reason"), ("dlq.source.offset", b"999"),
           ("trace", b"t")]
    reason = "r" * (MAX_REASON_BYTES * 3)
    letters = DeadLetters(producer, dlq)
    await asyncio.wait_for(letters.send([(record(40, b"x", headers=old), reason)]), 30)
    [letter] = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    names = [k for k, _ in letter.headers]
    assert names.count(REASON_HEADER) == 1
    assert names.count("dlq.source.offset") == 1
    assert dict(letter.headers)[REASON_HEADER] == reason.encode()[:MAX_REASON_BYTES]
    assert dict(letter.headers)["dlq.source.offset"] == b"40"
    assert source_headers(letter) == [("trace", b"t")]
