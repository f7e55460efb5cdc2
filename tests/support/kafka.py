"""Producing test traffic and waiting for the consumer, on the real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from consumer.runner import GroupConsumer
from sketches.config import Settings
from sketches.store import SketchStore


@asynccontextmanager
async def running(settings: Settings, store: SketchStore) -> AsyncIterator[GroupConsumer]:
    """The real group consumer, in this process, for the duration of the block."""
    stop = asyncio.Event()
    group = GroupConsumer(settings, store)
    task = asyncio.create_task(group.run(stop))
    try:
        yield group
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | None],
    *,
    partition: int | None = None,
    compression: str | None = None,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    max_request_size: int = 1048576,
) -> dict[int, int]:
    """Send the values and return the end offset (last offset + 1) reached per partition."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        compression_type=compression,
        linger_ms=5,
        max_request_size=max_request_size,
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        futures = [
            await producer.send(topic, v, key=key, partition=partition, headers=headers)
            for v in values
        ]
        for meta in await asyncio.gather(*futures):
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


def merge_ends(*ends: dict[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for e in ends:
        for p, o in e.items():
            out[p] = max(out.get(p, 0), o)
    return out


async def wait_applied(
    store: SketchStore, topic: str, ends: dict[int, int], timeout: float = 60.0
) -> None:
    """Wait until the store records having applied every partition up to ``ends``."""
    parts = sorted(ends)
    deadline = time.monotonic() + timeout
    while True:
        got = await store.applied_offsets([(topic, p) for p in parts])
        if all(g is not None and g >= ends[p] for g, p in zip(got, parts, strict=True)):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"store applied {got}, want {ends}")
        await asyncio.sleep(0.1)


async def committed(
    bootstrap: str, group: str, topic: str, partitions: Sequence[int]
) -> dict[int, int | None]:
    """The group's committed offsets, read without joining the group (Tansu cannot answer the
    admin client's ListConsumerGroupOffsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list:
    """Every record of a topic (at least ``expect`` of them), from the beginning."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    out: list = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def read_to_end(bootstrap: str, topic: str, timeout: float = 30.0) -> list:
    """Every record a topic holds now, duplicates included: read from the beginning until each
    partition's position reaches the high watermark a fetch reported (never a record count,
    so that a duplicate cannot hide behind an early stop)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    out: list = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
            tps = consumer.assignment()
            highs = {tp: consumer.highwater(tp) for tp in tps}
            if tps and all(h is not None for h in highs.values()):
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= h for tp, h in highs.items() if h is not None):
                    return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: read {len(out)} records, high watermarks {highs}")
    finally:
        await consumer.stop()

