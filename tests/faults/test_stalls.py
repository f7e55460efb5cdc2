"""A broker that stops answering for a minute, and a consumer that cannot make progress.

The broker test pauses a Tansu of its own with SIGSTOP (restarting Tansu would lose every topic:
it keeps them in memory) and checks that the same consumer process carries on once it answers
again, with no restart. The watchdog test freezes a Redis of its own while messages wait, and
checks that the consumer gives up with exit status 3 so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from sketches.connection import open_store
from tests.faults.helpers import (
    Procs,
    Traffic,
    applied,
    assert_buckets_exact,
    fault_settings,
    logins,
    make_topics,
    wait_until,
)
from tests.support.kafka import committed, merge_ends, produce, wait_applied
from tests.support.servers import RedisServer, TansuBroker

BROKER_PAUSE_S = 60.0


@pytest.mark.slow
async def test_broker_paused_for_a_minute_the_consumer_carries_on_by_itself(
    own_broker: TansuBroker, redis_url: str, procs: Procs
) -> None:
    settings = fault_settings(redis_url, own_broker.bootstrap)
    await make_topics(settings, partitions=2)
    first, second = logins(6000, seed=5), logins(2000, seed=6)
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic, first.values)
    consumer = procs.consumer(settings, CONSUMER_MAX_BATCH="100")
    async with open_store(settings) as store:

        async def moving() -> bool:
            return sum((await applied(store, settings.kafka_topic, [0, 1])).values()) > 0

        await wait_until(moving, "the consumer to start", 60, 0.02, consumer.output)
        own_broker.pause()  # mid-stream: the consumer still has lag
        at_pause = await applied(store, settings.kafka_topic, [0, 1])
        await asyncio.sleep(BROKER_PAUSE_S)
        own_broker.resume()

        ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers,
                                              settings.kafka_topic, second.values))
        await wait_applied(store, settings.kafka_topic, ends, timeout=120)

        async def lag_zero() -> bool:
            got = await committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                                  settings.kafka_topic, [0, 1])
            return all(got[p] == ends[p] for p in ends)

        await wait_until(lag_zero, "committed offsets == end offsets", 60, 0.3, consumer.output)
        assert consumer.alive(), "the consumer exited instead of carrying on:\n" + \
            consumer.output()
        assert consumer.terminate() == 0, consumer.output()
        assert any(at_pause[p] < ends[p] for p in ends), "the pause came after the work"
        await assert_buckets_exact(store, Traffic([*first.events, *second.events]).events)


def _freeze(server: RedisServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)


def _thaw(server: RedisServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGCONT)


@pytest.mark.slow
async def test_a_consumer_without_progress_while_lagging_exits_3_for_its_supervisor(
    own_redis: RedisServer, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = fault_settings(own_redis.url, kafka_bootstrap)
    await make_topics(settings, partitions=2)
    first, second = logins(500, seed=7), logins(500, seed=8)
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic, first.values)
    consumer = procs.consumer(settings, "stalling", CONSUMER_STALL_TIMEOUT_S="5")
    async with open_store(settings) as store:
        await wait_applied(store, settings.kafka_topic, ends, timeout=60)
    first_ends = ends

    # The store records a batch's offsets before the consumer commits them to Kafka, and only
    # the store's decide where a consumer resumes; Kafka's follow for lag tools. Seen from here,
    # the store can hold the first batch while the consumer still waits for the rest of Redis's
    # reply to that write: if Redis freezes then, the consumer retries the write until its
    # watchdog gives up, and never commits (flaky that way on a loaded machine: committed
    # {0: None, 1: None}; the store's offsets, which the restart below resumes from, were
    # right). So the baseline of "nothing committed while Redis was away" is Kafka's own
    # commit of the first batch.
    async def first_batch_committed() -> bool:
        got = await committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                              settings.kafka_topic, [0, 1])
        return got == {p: first_ends.get(p) for p in (0, 1)}

    await wait_until(first_batch_committed, "Kafka's commit of the first batch", 60, 0.2,
                     consumer.output)

    # Redis stops answering (the process is frozen, its port still open) while messages wait.
    _freeze(own_redis)
    try:
        ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers,
                                              settings.kafka_topic, second.values))

        async def exited() -> bool:
            return not consumer.alive()

        await wait_until(exited, "the stalled consumer to exit", 120, 0.2, consumer.output)
        assert consumer.proc.returncode == 3, consumer.output()
        assert "no progress" in consumer.output(), consumer.output()
        got = await committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                              settings.kafka_topic, [0, 1])
        assert got == {p: first_ends.get(p) for p in (0, 1)}, "committed while Redis was away"
    finally:
        _thaw(own_redis)

    # The supervisor's restart picks up where the store stands.
    procs.consumer(settings, "restarted", CONSUMER_STALL_TIMEOUT_S="5")
    async with open_store(settings) as store:
        await wait_applied(store, settings.kafka_topic, ends, timeout=60)
        await assert_buckets_exact(store, [*first.events, *second.events])
