"""A full Redis under ``noeviction``, end to end through the real consumer and broker.

A ``redis-server`` of 16 MiB is filled to within 64 KB of its ``maxmemory`` while logins wait
(exact mode, long subjects): every batch is refused (``OOM command not allowed``). The consumer
must then pause: ``/readyz`` 503 with the reason, the paused gauge at 1, no offset committed to
Kafka or recorded in the store, no exit when its stall timeout passes, a clean stop on SIGTERM
that still records nothing. Memory freed (the filler deleted), a new consumer counts every login
exactly and ``/readyz`` is 200 again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import redis.asyncio as aioredis

from sketches.connection import open_store
from tests.faults.helpers import (
    Procs,
    applied,
    assert_buckets_exact,
    fault_settings,
    logins,
    make_topics,
    wait_until,
)
from tests.support.kafka import committed, merge_ends, produce, wait_applied
from tests.support.memory import fill, redis_server, unfill
from tests.support.servers import free_port

STALL_TIMEOUT_S = 2.0
PAUSED = 'usage_metrics_consumer_paused{reason="redis_oom"}'


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(url)


def sample(metrics: str, name: str) -> float:
    [line] = [x for x in metrics.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def readyz_says(health: str, status: int, *words: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        try:
            got = await get(f"{health}/readyz")
        except httpx.TransportError:
            return False
        return got.status_code == status and all(w in got.text for w in words)

    return probe


async def test_a_full_redis_pauses_ingestion_commits_nothing_and_resumes_by_itself(
    kafka_bootstrap: str, procs: Procs
) -> None:
    with redis_server("--maxmemory", "16mb", "--maxmemory-policy", "noeviction") as server:
        settings = fault_settings(server.url, kafka_bootstrap)
        topic, parts = settings.kafka_topic, [0, 1]
        await make_topics(settings)
        port = free_port()
        health = f"http://127.0.0.1:{port}"
        env = {"CONSUMER_HEALTH_PORT": str(port), "CONSUMER_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
               "REDIS_RETRY_MAX_BACKOFF_S": "0.5"}
        first = logins(300, seed=21)
        second = logins(2000, seed=22, tag="long-subject-" + "s" * 200)
        ends = await produce(kafka_bootstrap, topic, first.values)
        consumer = procs.consumer(settings, **env)
        admin = aioredis.Redis(port=server.port)
        try:
            async with open_store(settings) as store:
                await wait_applied(store, topic, ends)

                async def kafka_caught_up() -> bool:
                    got = await committed(kafka_bootstrap, settings.kafka_group_id, topic, parts)
                    return all(got[p] == ends.get(p) for p in parts)

                await wait_until(kafka_caught_up, "the first commit", 30, 0.2, consumer.output)
                stored_before = await applied(store, topic, parts)
                kafka_before = await committed(kafka_bootstrap, settings.kafka_group_id, topic,
                                               parts)

                await fill(admin, leave=64_000)
                all_ends = merge_ends(ends, await produce(kafka_bootstrap, topic, second.values))
                await wait_until(readyz_says(health, 503, "Redis is out of memory",
                                             f"127.0.0.1:{server.port}: maxmemory 16.0 MiB",
                                             "ingestion paused, retrying"),
                                 "/readyz to say Redis is out of memory", 60, 0.2,
                                 consumer.output)
                metrics = (await get(f"{health}/metrics")).text
                assert sample(metrics, PAUSED) == 1
                assert sample(metrics, "usage_metrics_consumer_redis_errors_total") >= 1

                # Past its stall timeout the consumer is still there: a full Redis is no stall.
                await asyncio.sleep(STALL_TIMEOUT_S + 2)
                assert consumer.alive(), consumer.output()
                assert await applied(store, topic, parts) == stored_before
                assert await committed(kafka_bootstrap, settings.kafka_group_id, topic,
                                       parts) == kafka_before

                # Stopped while paused: a clean exit that records nothing either.
                assert consumer.terminate() == 0, consumer.output()
                assert await applied(store, topic, parts) == stored_before
                out = consumer.output(0)
                assert "Traceback" not in out, out
                [line] = [x for x in out.splitlines() if "ingestion paused" in x]
                assert " ERROR " in line, line

                # The supervisor's restart meets the same full Redis and waits the same way.
                again = procs.consumer(settings, "again", **env)
                await wait_until(readyz_says(health, 503, "Redis is out of memory"),
                                 "the restarted consumer to pause", 60, 0.2, again.output)

                assert await unfill(admin) > 0  # an operator frees memory
                await wait_applied(store, topic, all_ends, timeout=120)
                await wait_until(readyz_says(health, 200, "ready"), "/readyz 200 again", 30,
                                 0.2, again.output)
                assert sample((await get(f"{health}/metrics")).text, PAUSED) == 0
                assert "ingestion resumed" in again.output(0), again.output()
                await assert_buckets_exact(store, [*first.events, *second.events])
                assert again.terminate() == 0, again.output()
        finally:
            await admin.aclose()
