"""Where reading starts when offsets are gone, and replay from a point in time."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from consumer.replay import ReplayStart, replay
from sketches.config import Settings
from sketches.store import SketchStore
from tests.faults.helpers import (
    assert_buckets_exact,
    assert_rows_exact,
    cli,
    logins,
    make_topics,
    service_env,
    unique,
    wait_until,
)
from tests.support.kafka import committed, merge_ends, produce, running, wait_applied

EARLIEST = "reading from the earliest retained offset"



async def test_a_group_whose_offsets_are_gone_reads_from_the_earliest_and_says_so(
    xsettings: Settings, xstore: SketchStore, caplog: pytest.LogCaptureFixture
) -> None:
    settings, store = xsettings, xstore
    await make_topics(settings, partitions=2)
    traffic = logins(800, seed=21)
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic, traffic.values)
    async with running(settings, store):
        await wait_applied(store, settings.kafka_topic, ends)

    # Every trace of progress is gone: a new group (nothing committed), no offset records in
    # the store, and no sketches, so only a read from the earliest offset brings counts back.
    for p in ends:
        await store.client.delete(store.keys.offsets(settings.kafka_topic, p))
    for ws in traffic.workspaces:
        await store.delete_workspace(ws)
    fresh = settings.model_copy(update={"kafka_group_id": unique("group")})
    before = await committed(fresh.kafka_bootstrap_servers, fresh.kafka_group_id,
                             fresh.kafka_topic, sorted(ends))
    assert before == {p: None for p in ends}

    caplog.set_level(logging.INFO, logger="consumer.runner")
    async with running(fresh, store):
        await wait_applied(store, settings.kafka_topic, ends)
    said = [r.getMessage() for r in caplog.records if EARLIEST in r.getMessage()]
    assert said, caplog.text
    for p in ends:
        assert any(f"partition={p})" in line for line in said), said
    await assert_buckets_exact(store, traffic.events)
    await assert_rows_exact(store, traffic.oracle(), sorted(traffic.workspaces)[:1])


async def test_replay_from_a_timestamp_asks_offsets_for_times_and_changes_no_count(
    xsettings: Settings, xstore: SketchStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    settings, store = xsettings, xstore
    await make_topics(settings, partitions=2)
    older = logins(400, orgs=("old",), seed=23)
    newer = logins(400, orgs=("new",), seed=24)
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic, older.values)
    await asyncio.sleep(0.05)
    moment = datetime.now(UTC)
    await asyncio.sleep(0.05)
    ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                          newer.values))
    async with running(settings, store):
        await wait_applied(store, settings.kafka_topic, ends)
    everything = [*older.events, *newer.events]
    # The newer workspaces lost their sketches: a replay from ``moment`` must bring them back.
    for ws in newer.workspaces:
        await store.delete_workspace(ws)

    asked: list[dict[Any, int]] = []
    answered: list[dict[Any, Any]] = []
    real = AIOKafkaConsumer.offsets_for_times

    async def spy(self: AIOKafkaConsumer, timestamps: dict[Any, int]) -> Any:
        asked.append(dict(timestamps))
        found = await real(self, timestamps)
        answered.append(dict(found))
        return found

    monkeypatch.setattr(AIOKafkaConsumer, "offsets_for_times", spy)
    stats = await replay(settings, store, ReplayStart("timestamp", timestamp=moment))
    monkeypatch.undo()

    want_ms = int(moment.timestamp() * 1000)
    assert len(asked) == 1
    assert {tp.partition: ms for tp, ms in asked[0].items()} == {0: want_ms, 1: want_ms}
    offsets = {tp.partition: (hit.offset if hit is not None else None)
               for tp, hit in answered[0].items()}
    if all(o == 0 for o in offsets.values()):
        # Tansu (the test broker) answers offset 0 for any time (shared notes): the replay
        # re-reads everything. Adds are idempotent, so the counts below are right all the same.
        assert stats.messages == len(everything)
    else:
        # Apache Kafka: the first offset at or after ``moment``; only the newer messages.
        assert stats.messages == len(newer.events), (offsets, stats)
    await assert_buckets_exact(store, everything)

    # The command does the same, and exits 0.
    done = subprocess.run(
        [*cli(), "replay", "--from-timestamp", moment.isoformat()], cwd=tmp_path,
        env=service_env(settings), capture_output=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"replayed" in done.stdout
    await assert_buckets_exact(store, everything)

    async def nothing_committed_by_replay() -> bool:
        got = await committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                              settings.kafka_topic, [0, 1])
        return got == {p: ends.get(p) for p in (0, 1)}

    # Replay reads outside the group: the group's offsets are where the consumer left them.
    await wait_until(nothing_committed_by_replay, "the group's offsets to stay put", 10)
