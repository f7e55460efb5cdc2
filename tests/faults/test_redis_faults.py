"""Redis killed, Redis losing the tail of its append-only file, and keys holding the wrong thing.

The kill and AOF tests run a Redis of their own (``appendonly yes``, ``appendfsync everysec``),
restarted on the same port and directory, and a real consumer process. The corrupt-key test runs
in both sketch modes on the session's Redis, under its own key prefix.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.periods import day_of, week_of
from sketches.store import SketchStore
from tests.faults.helpers import (
    TODAY,
    Procs,
    aof_incr_file,
    applied,
    assert_buckets_exact,
    expected_buckets,
    fault_settings,
    logins,
    make_topics,
    read_values,
    stored_buckets,
    wait_until,
)
from tests.support.compare import assert_rows_match
from tests.support.kafka import committed, merge_ends, produce, running, wait_applied
from tests.support.servers import RedisServer
from usage_metrics.synth import SynthEvent

USAGE = "/api/v2/org/{org}/workspace/{ws}/metrics/usage"
BAD = b"\x00 definitely not an event"

log = logging.getLogger(__name__)


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real application, lifespan and all, in this process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


def bearer(settings: Settings, role: str = "admin", org: str | None = "acme") -> dict[str, str]:
    token = issue_token(settings, role=role, org_id=org, ttl_seconds=600, now=time.time())
    return {"Authorization": f"Bearer {token}"}


async def committed_now(settings: Settings) -> dict[int, int | None]:
    return await committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                           settings.kafka_topic, [0, 1])


@pytest.mark.slow
async def test_redis_killed_nothing_committed_or_dead_lettered_until_it_returns(
    own_redis: RedisServer, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = fault_settings(own_redis.url, kafka_bootstrap)
    await make_topics(settings, partitions=2)
    first, second = logins(1000, seed=9), logins(1000, seed=10, tag="b")
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic, first.values)
    consumer = procs.consumer(settings)
    async with open_store(settings) as store:
        await wait_applied(store, settings.kafka_topic, ends, timeout=60)
    first_ends = dict(ends)

    async def first_committed() -> bool:
        got = await committed_now(settings)
        return all(got[p] == first_ends[p] for p in first_ends)

    await wait_until(first_committed, "the first batch's commit", 30, 0.2, consumer.output)

    own_redis.kill()
    ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                          [*second.values[:500], BAD, *second.values[500:]]))

    # The API answers 503 with a JSON body while Redis is away, and is ready again after.
    async with api_client(settings) as api:
        down = await api.get(USAGE.format(org="acme", ws="ws-0"), headers=bearer(settings),
                             params={"period_length": 7})
        assert down.status_code == 503, down.text
        assert down.headers["content-type"].startswith("application/json")
        assert "store unavailable" in down.json()["detail"]
        assert "Traceback" not in down.text
        assert (await api.get("/readyz")).status_code == 503

        # The consumer retries with a growing backoff and logs each attempt.
        def backoffs() -> list[float]:
            return [float(x) for x in re.findall(r"retrying in ([0-9.]+)s", consumer.output(0))]

        async def retried() -> bool:
            return len(backoffs()) >= 4

        await wait_until(retried, "four logged retries", 60, 0.2, consumer.output)
        steps = backoffs()
        assert steps[:4] == sorted(steps[:4]), steps
        assert steps[3] > steps[0], steps
        # Neither a commit nor a dead letter while the batch is not in the store.
        assert await committed_now(settings) == {p: first_ends.get(p) for p in (0, 1)}
        assert await read_values(settings.kafka_bootstrap_servers, settings.kafka_dlq_topic,
                                 {BAD}, timeout=2) == []
        assert consumer.alive()

        own_redis.start()  # same port, same directory: the AOF brings the data back
        async with open_store(settings) as store:
            await wait_applied(store, settings.kafka_topic, ends, timeout=60)

            async def all_committed() -> bool:
                got = await committed_now(settings)
                return all(got[p] == ends[p] for p in ends)

            await wait_until(all_committed, "commits after Redis returned", 30, 0.2,
                             consumer.output)
            assert await read_values(settings.kafka_bootstrap_servers,
                                     settings.kafka_dlq_topic, {BAD}) == [BAD]
            await assert_buckets_exact(store, [*first.events, *second.events])

        up = await api.get(USAGE.format(org="acme", ws="ws-0"), headers=bearer(settings),
                           params={"period_length": 7})
        assert up.status_code == 200, up.text
        assert (await api.get("/readyz")).status_code == 200
    assert consumer.terminate() == 0, consumer.output()


@pytest.mark.slow
async def test_redis_losing_the_tail_of_its_aof_is_repaired_from_the_store_offsets(
    own_redis: RedisServer, kafka_bootstrap: str, procs: Procs
) -> None:
    """Redis acknowledged writes, then lost them (its AOF cut as a power loss would cut it).
    Kafka's committed offsets are past those writes; only the offsets recorded in Redis, in the
    same log as the sketches, say where to resume."""
    settings = fault_settings(own_redis.url, kafka_bootstrap)
    await make_topics(settings, partitions=2)
    first, second = logins(1500, seed=11), logins(1500, seed=12, tag="late")
    parts = [0, 1]
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic, first.values)
    consumer = procs.consumer(settings, CONSUMER_MAX_BATCH="100")
    async with open_store(settings) as store:
        await wait_applied(store, settings.kafka_topic, ends, timeout=60)
    await asyncio.sleep(0.3)  # let the consumer go idle: nothing more reaches the AOF
    incr = aof_incr_file(own_redis.directory)
    safe_size = incr.stat().st_size

    ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                          second.values))
    async with open_store(settings) as store:
        await wait_applied(store, settings.kafka_topic, ends, timeout=60)
    assert consumer.terminate() == 0, consumer.output()  # commits everything to Kafka
    assert await committed_now(settings) == {p: ends.get(p) for p in parts}
    want = expected_buckets_of(settings, [*first.events, *second.events])

    # Power loss: the process dies and the last writes never reached the disk.
    own_redis.kill()
    full_size = incr.stat().st_size
    assert full_size > safe_size
    cut = safe_size + (full_size - safe_size) // 3
    with incr.open("r+b") as f:
        f.truncate(cut)
    own_redis.start()  # aof-load-truncated yes (the default): loads up to the last whole command
    redis_log = (own_redis.directory / "redis.log").read_text(errors="replace")
    assert "truncated" in redis_log.lower() or "short read" in redis_log.lower(), redis_log[-2000:]

    async with open_store(settings) as store:
        # The loss really happened: offsets and counts went backwards...
        after_loss = await applied(store, settings.kafka_topic, parts)
        assert any(after_loss[p] < ends[p] for p in ends), (after_loss, ends)
        got = await stored_buckets(store)
        lost = sum(len(want[k] - got.get(k, set())) for k in want)
        assert lost > 0, "cutting the AOF lost nothing: the test proves nothing"
        # ...while Kafka still says everything was processed.
        assert await committed_now(settings) == {p: ends.get(p) for p in parts}

        procs.consumer(settings, "after-restart")
        await wait_applied(store, settings.kafka_topic, ends, timeout=60)
        await assert_buckets_exact(store, [*first.events, *second.events])
    log.info(f"AOF cut from {full_size} to {cut} bytes; store offsets went back to {after_loss} "
          f"(end {ends}); {lost} subject-bucket entries lost, all recovered")


def expected_buckets_of(settings: Settings, events: list[SynthEvent]) -> dict[str, set[bytes]]:
    class _Keys:
        keys = settings.keyspace

    return expected_buckets(_Keys(), events)  # type: ignore[arg-type]



def _login(org: str, ws: str, subject: str, days_ago: int) -> SynthEvent:
    from datetime import UTC, datetime

    d = TODAY - timedelta(days=days_ago)
    return SynthEvent(org, ws, subject, datetime(d.year, d.month, d.day, 12, tzinfo=UTC))


async def test_a_corrupt_or_wrong_type_key_is_logged_and_the_rest_of_the_batch_kept(
    settings: Settings, store: SketchStore, sketch_mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    await make_topics(settings, partitions=1)
    broken, healthy = Scope("acme", "broken"), Scope("acme", "healthy")
    events = [
        *(_login("acme", "broken", f"acme/u{i}", days_ago) for i in range(20)
          for days_ago in (2, 3, 4)),
        *(_login("acme", "healthy", f"acme/u{i}", days_ago) for i in range(30)
          for days_ago in (2, 3, 4)),
    ]
    keys = store.keys
    as_string = keys.sketch(broken, day_of(TODAY - timedelta(days=2)))
    as_list = keys.sketch(broken, day_of(TODAY - timedelta(days=3)))
    client = store.client
    await client.set(as_string, b"\x00garbage that is no sketch")
    await client.rpush(as_list, b"a", b"list")
    damaged = [as_string, as_list]
    if sketch_mode == "hll":
        # A HyperLogLog whose header is right and whose registers are not.
        bad_hll = keys.sketch(broken, day_of(TODAY - timedelta(days=5)))
        await client.execute_command("PFADD", bad_hll, "x", "y", "z")
        raw = await client.get(bad_hll)
        assert isinstance(raw, bytes)
        await client.set(bad_hll, raw[:16] + b"\x7f" * 40)

    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                         [e.to_json() for e in events])
    caplog.set_level(logging.ERROR, logger="consumer.writer")
    async with running(settings, store) as group:
        await wait_applied(store, settings.kafka_topic, ends, timeout=60)
        batches = group.batches
    # Logged with the key, once per batch that touched it: no retry loop on a reply that will
    # never change.
    for key in damaged:
        lines = [r for r in caplog.records if key in r.getMessage()]
        assert 1 <= len(lines) <= max(1, batches), (key, len(lines), batches)
    # The damage stays as it was (nobody "repairs" data by deleting it)...
    assert await client.type(as_string) == b"string"
    assert await client.type(as_list) == b"list"
    # ...and everything else of the batch was counted: the healthy workspace in full, the broken
    # one's undamaged day, week and month.
    want = {k: v for k, v in expected_buckets(store, events).items() if k not in damaged}
    for key, members in want.items():
        if sketch_mode == "exact":
            assert set(await client.smembers(key)) == members, key
        else:
            assert await client.execute_command("PFCOUNT", key) == len(members), key

    async with api_client(settings) as api:
        params: dict[str, Any] = {"period_length": 10}
        hurt = await api.get(USAGE.format(org="acme", ws="broken"), params=params,
                             headers=bearer(settings))
        assert hurt.status_code == 500, hurt.text
        assert "unreadable" in hurt.json()["detail"]
        assert "Traceback" not in hurt.text
        assert "WRONGTYPE" not in hurt.text
        fine = await api.get(USAGE.format(org="acme", ws="healthy"), params=params,
                             headers=bearer(settings))
        assert fine.status_code == 200, fine.text
        from tests.faults.helpers import oracle_of

        oracle = oracle_of(events)
        assert_rows_match(fine.json(), oracle.rows(healthy, TODAY, 10), sketch_mode)
        # Before the damage begins, the broken workspace is served too.
        early = await api.get(USAGE.format(org="acme", ws="broken"), headers=bearer(settings),
                              params={"period_length": 0,
                                      "end_date": (TODAY - timedelta(days=40)).isoformat(),
                                      "metrics": "dau"})
        assert early.status_code == 200, early.text
        if sketch_mode == "hll":
            # The HyperLogLog with damaged registers: Redis answers INVALIDOBJ, we a clear 500.
            invalid = await api.get(USAGE.format(org="acme", ws="broken"),
                                    headers=bearer(settings),
                                    params={"period_length": 0, "metrics": "dau",
                                            "end_date": (TODAY - timedelta(days=5)).isoformat()})
            assert invalid.status_code == 500, invalid.text
            assert "unreadable" in invalid.json()["detail"]
    week = keys.sketch(broken, week_of(TODAY - timedelta(days=2)))
    assert await client.exists(week)
