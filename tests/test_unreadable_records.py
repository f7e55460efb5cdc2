"""Records aiokafka itself cannot hand over (issue 11), sent by hand-built batches the way a
producer in another language could write them, against one ``usage-metrics consume`` process:

- a header key that is not UTF-8, in a batch between good logins: aiokafka raises
  ``UnicodeDecodeError`` from ``getmany`` at that offset forever;
- a zstd batch of 2 KB that inflates to 1 GiB: aiokafka would inflate it whole.

The consumer must count every login it can read, skip the smallest unreadable range with one
dead letter that names it, keep running, and stay within its inflation budget in memory.

Crafted batches (issue 16) that Tansu takes at produce, because it stores a batch without
inflating or parsing its records: a snappy batch whose xerial block length is -4 (the decoder
looped for ever on the event loop) and a record whose key claims 2^63 bytes (``OverflowError``,
which made the consumer exit and restart at the same offset). Tansu refuses codec numbers 5 to 7
at produce, and batches in the legacy formats: those, and every other damage, are read by the
consumer's own reader in ``tests/test_crafted_batches.py``.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cramjam
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.record import default_records
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.util import encode_varint

from sketches.config import Settings
from sketches.keys import Scope
from sketches.store import SketchStore
from tests.support.crafted import RECORDS, key_of_2_63_bytes, xerial_with_block_length
from tests.support.kafka import read_to_end
from tests.test_consumer import check_against_oracle, cli, consumer_env, oracle_of, synth
from usage_metrics.synth import SynthEvent

WS = Scope("unreadable", "ws")
ZSTD = 4  # the batch attribute bits of the zstd codec


@pytest.fixture
def sketch_mode() -> str:
    return "exact"


class RawKey(str):
    """A header key whose bytes on the wire are not UTF-8: aiokafka's pure-Python batch builder
    asks the key for its encoding, which this one answers with raw bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> RawKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


async def send_batch(
    producer: AIOKafkaProducer, topic: str, partition: int,
    records: list[tuple[bytes, list[tuple[str, bytes]]]], codec: int = 0,
) -> list[int]:
    """One batch holding ``records`` (value, headers), built by aiokafka's pure-Python builder;
    returns their offsets."""
    batch = producer.create_batch()
    batch._builder = _DefaultRecordBatchBuilderPy(  # type: ignore[attr-defined]
        2, codec, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=0,
        batch_size=1 << 20,
    )
    for value, headers in records:
        assert batch.append(timestamp=None, key=None, value=value, headers=headers)
    meta = await (await producer.send_batch(batch, topic, partition=partition))
    return [meta.offset + i for i in range(len(records))]


def zstd_bomb(size: int) -> bytes:
    """zstd frames that inflate to one v2 record whose value is ``size`` zero bytes, built from
    16 MiB frames so that the test never holds more than that."""
    head = bytearray()
    for field in (0, 0, -1, size):  # timestamp delta, offset delta, key length, value length
        encode_varint(field, head.append)
    tail = bytearray()
    encode_varint(0, tail.append)  # no headers
    body_length = 1 + len(head) + size + len(tail)  # attributes byte first
    prefix = bytearray()
    encode_varint(body_length, prefix.append)
    prefix += b"\x00" + head
    chunk = 16 << 20
    zeros = bytes(cramjam.zstd.compress(b"\x00" * chunk))
    rest = bytes(cramjam.zstd.compress(b"\x00" * (size % chunk))) if size % chunk else b""
    return (bytes(cramjam.zstd.compress(bytes(prefix))) + zeros * (size // chunk) + rest
            + bytes(cramjam.zstd.compress(bytes(tail))))


async def send_bomb(producer: AIOKafkaProducer, topic: str, partition: int, size: int) -> int:
    """A one-record zstd batch that inflates to ``size`` bytes: the builder compresses a
    placeholder record, and its compressor is swapped for the bomb (the batch's CRC covers
    what is sent). The placeholder is larger than the bomb: the builder sends a batch
    uncompressed when compressing would not make it smaller."""
    bomb = zstd_bomb(size)
    placeholder = b"p" * (len(bomb) + 1024)
    real: Callable[..., bytes] = default_records.zstd_encode  # type: ignore[attr-defined]
    default_records.zstd_encode = lambda payload, level=None: bomb  # type: ignore[attr-defined]
    try:
        [offset] = await send_batch(producer, topic, partition, [(placeholder, [])], ZSTD)
    finally:
        default_records.zstd_encode = real  # type: ignore[attr-defined]
    return offset


class CraftedBuilder(_DefaultRecordBatchBuilderPy):
    """aiokafka's batch builder, handing the producer bytes built by the test instead of its
    own, as a producer in another language, or a broker that does not validate, would."""

    crafted: bytes

    def build(self) -> bytearray:
        return bytearray(self.crafted)


async def send_crafted(producer: AIOKafkaProducer, topic: str, partition: int,
                       crafted: bytes) -> int:
    """Produce ``crafted`` as one batch; returns its first offset."""
    batch = producer.create_batch()
    builder = CraftedBuilder(2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1,
                             base_sequence=0, batch_size=1 << 20)
    builder.crafted = crafted
    batch._builder = builder  # type: ignore[attr-defined]
    assert batch.append(timestamp=None, key=None, value=b"placeholder", headers=[])
    meta = await (await producer.send_batch(batch, topic, partition=partition))
    return int(meta.offset)


class Consumer:
    def __init__(self, settings: Settings, log: Path, **env: str) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*cli(), "consume"], stdout=out, stderr=subprocess.STDOUT,
                env=consumer_env(settings, PYTHONUNBUFFERED="1", **env),
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def start_consumer(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Consumer]]:
    started: list[Consumer] = []

    def start(**env: str) -> Consumer:
        c = Consumer(settings, tmp_path / f"consumer-{len(started)}.log", **env)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


async def wait_applied_alive(store: SketchStore, topic: str, ends: dict[int, int],
                             consumer: Consumer) -> None:
    parts = sorted(ends)
    deadline = time.monotonic() + 90
    while True:
        assert consumer.proc.poll() is None, f"the consumer exited:\n{consumer.output()[-4000:]}"
        got = await store.applied_offsets([(topic, p) for p in parts])
        if all(g is not None and g >= ends[p] for g, p in zip(got, parts, strict=True)):
            return
        assert time.monotonic() < deadline, f"applied {got}, want {ends}\n{consumer.output()}"
        await asyncio.sleep(0.1)


async def produce_events(producer: AIOKafkaProducer, topic: str, partition: int,
                         events: list[SynthEvent]) -> int:
    futures = [await producer.send(topic, e.to_json(), partition=partition) for e in events]
    return max(m.offset for m in await asyncio.gather(*futures)) + 1


async def test_a_header_key_that_is_not_utf8_is_skipped_with_a_dead_letter_naming_it(
    settings: Settings, store: SketchStore, topics: tuple[str, str],
    start_consumer: Callable[..., Consumer],
) -> None:
    topic, dlq = topics
    before, after, other = synth(40, WS, seed=31), synth(40, WS, seed=32), synth(40, WS, seed=33)
    first = SynthEvent(WS.org_id, WS.workspace_id, "first", before[0].timestamp)
    lost = SynthEvent(WS.org_id, WS.workspace_id, "lost", before[0].timestamp)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await produce_events(producer, topic, 0, before)
        # A good login, the unreadable one, and a good login that shares its batch after it.
        offsets = await send_batch(producer, topic, 0, [
            (first.to_json(), [("trace", b"1")]),
            (b'{"metric_type": "login"}', [(RawKey(b"\xff\xfekey"), b"v")]),
            (lost.to_json(), []),
        ])
        end0 = await produce_events(producer, topic, 0, after)
        end1 = await produce_events(producer, topic, 1, other)
    finally:
        await producer.stop()

    consumer = start_consumer()
    await wait_applied_alive(store, topic, {0: end0, 1: end1}, consumer)
    assert consumer.proc.poll() is None

    await check_against_oracle(store, oracle_of([*before, first, *after, *other]), WS, "exact")
    letters = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    assert len(letters) == 1, [dict(r.headers) for r in letters]
    headers = dict(letters[0].headers)
    assert int(headers["dlq.source.offset"]) == offsets[1]
    reason = headers["dlq.reason"].decode()
    assert f"offsets {offsets[1]}..{offsets[2]}" in reason, reason
    assert "UnicodeDecodeError" in reason
    assert f"offsets {offsets[1]}..{offsets[2]}" in consumer.output()


async def test_a_batch_that_inflates_to_a_gibibyte_is_skipped_within_the_memory_budget(
    settings: Settings, store: SketchStore, topics: tuple[str, str],
    start_consumer: Callable[..., Consumer],
) -> None:
    topic, dlq = topics
    before, after = synth(50, WS, seed=41), synth(50, WS, seed=42)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await produce_events(producer, topic, 0, before)
        bomb = await send_bomb(producer, topic, 0, 1 << 30)
        end0 = await produce_events(producer, topic, 0, after)
    finally:
        await producer.stop()

    consumer = start_consumer(CONSUMER_MAX_FETCH_INFLATED_BYTES=str(8 << 20))
    await wait_applied_alive(store, topic, {0: end0}, consumer)
    peak = peak_rss_kib(consumer.proc.pid)
    assert peak < 400 * 1024, f"peak RSS {peak} KiB: the batch was inflated"

    await check_against_oracle(store, oracle_of([*before, *after]), WS, "exact")
    letters = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    assert len(letters) == 1
    reason = dict(letters[0].headers)["dlq.reason"].decode()
    assert f"offsets {bomb}..{bomb}" in reason, reason
    assert "BatchTooLarge" in reason


async def test_a_fetch_that_would_inflate_beyond_its_budget_is_read_in_smaller_fetches(
    settings: Settings, store: SketchStore, topics: tuple[str, str],
    start_consumer: Callable[..., Consumer],
) -> None:
    """Batches that each fit the budget but not together: nothing is skipped or lost."""
    topic, dlq = topics
    events = synth(12_000, WS, days=20, users=3000, seed=43)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                compression_type="zstd", max_batch_size=512 * 1024,
                                linger_ms=200)
    await producer.start()
    try:
        end0 = await produce_events(producer, topic, 0, events)
    finally:
        await producer.stop()

    consumer = start_consumer(CONSUMER_MAX_FETCH_INFLATED_BYTES=str(1 << 20))
    await wait_applied_alive(store, topic, {0: end0}, consumer)
    await check_against_oracle(store, oracle_of(events), WS, "exact")
    assert await read_to_end(settings.kafka_bootstrap_servers, dlq) == []
    assert "records at a time" in consumer.output()


async def test_crafted_batches_the_broker_took_are_skipped_with_a_dead_letter_each(
    settings: Settings, store: SketchStore, topics: tuple[str, str],
    start_consumer: Callable[..., Consumer],
) -> None:
    """Through the real broker: a snappy batch whose xerial block length is -4 and a record
    whose key claims 2^63 bytes, between good logins. Before, the first held the consumer's
    event loop for good and the second made it exit; now each is one dead letter naming its
    range and its error, and every good login on both partitions is counted."""
    topic, dlq = topics
    before, between, after = (synth(40, WS, seed=s) for s in (51, 52, 53))
    other = synth(40, WS, seed=54)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await produce_events(producer, topic, 0, before)
        snappy = await send_crafted(producer, topic, 0, xerial_with_block_length(-4))
        await produce_events(producer, topic, 0, between)
        overflow = await send_crafted(producer, topic, 0, key_of_2_63_bytes())
        end0 = await produce_events(producer, topic, 0, after)
        end1 = await produce_events(producer, topic, 1, other)
    finally:
        await producer.stop()

    consumer = start_consumer()
    await wait_applied_alive(store, topic, {0: end0, 1: end1}, consumer)
    await check_against_oracle(store, oracle_of([*before, *between, *after, *other]), WS, "exact")
    letters = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    reasons = {int(dict(r.headers)["dlq.source.offset"]): dict(r.headers)["dlq.reason"].decode()
               for r in letters}
    assert len(letters) == 2, reasons
    assert sorted(reasons) == [snappy, overflow], reasons
    last = snappy + len(RECORDS) - 1
    assert f"offsets {snappy}..{last} " in reasons[snappy], reasons
    assert ("skipped unread): MalformedBatch: a snappy (xerial) block at byte 16 states -4 "
            "bytes") in reasons[snappy], reasons
    assert f"offsets {overflow}..{overflow} " in reasons[overflow], reasons
    assert "skipped unread): OverflowError: " in reasons[overflow], reasons
    assert consumer.proc.poll() is None
