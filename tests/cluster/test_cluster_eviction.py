"""Eviction policy and a full master, on the real 3-master cluster.

Every master is asked for its ``maxmemory-policy``, and a master that differs is named on its
own. A batch whose share on one master is refused at ``maxmemory`` raises ``StoreOutOfMemory``
and leaves no offset record on any master, though the other masters took their share. Both tests
change one master for a moment and put it back as it was.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from sketches.config import Settings
from sketches.connection import open_store
from sketches.errors import StoreOutOfMemory
from sketches.eviction import NodePolicy, Verdict, decide, read_memory, read_policies
from sketches.keys import Scope
from sketches.periods import day_of, utc_today
from sketches.store import SketchStore

pytestmark = pytest.mark.xdist_group("cluster")


@pytest.fixture
async def cluster_store(redis_cluster_url: str) -> AsyncIterator[SketchStore]:
    settings = Settings(redis_url=redis_cluster_url, redis_cluster=True, sketch_mode="exact",
                        redis_key_prefix=f"ev-{uuid.uuid4().hex[:8]}", _env_file=None)
    async with open_store(settings) as store:
        yield store


@asynccontextmanager
async def changed(node: str, name: str, value: str) -> AsyncIterator[aioredis.Redis]:
    host, port = node.rsplit(":", 1)
    direct = aioredis.Redis(host=host, port=int(port))
    before = (await direct.config_get(name))[name]
    await direct.config_set(name, value)
    try:
        yield direct
    finally:
        await direct.config_set(name, before)
        await direct.aclose()


async def test_every_master_is_asked_and_the_one_that_evicts_is_named(
    cluster_store: SketchStore,
) -> None:
    nodes = await read_policies(cluster_store.client)
    assert len(nodes) == 3
    assert {n.policy for n in nodes} == {"noeviction"}
    assert decide(nodes, allow_eviction=False).verdict is Verdict.OK
    victim = nodes[1].node
    async with changed(victim, "maxmemory-policy", "volatile-lfu"):
        again = await read_policies(cluster_store.client)
        check = decide(again, allow_eviction=False)
    assert NodePolicy(victim, "volatile-lfu") in again
    assert check.verdict is Verdict.REFUSED
    assert f"Redis at {victim} may evict keys (maxmemory-policy volatile-lfu)" in check.message
    for other in (n.node for n in nodes if n.node != victim):
        assert other not in check.message


async def test_a_full_master_refuses_its_share_and_no_master_records_the_batch(
    cluster_store: SketchStore,
) -> None:
    store = cluster_store
    today = utc_today()
    scopes = [Scope("acme", f"ws-{i}") for i in range(12)]
    by_node: dict[str, list[Scope]] = {}
    client = store.client
    assert isinstance(client, RedisCluster)
    await client.initialize()
    for scope in scopes:
        node = client.get_node_from_key(store.keys.sketch(scope, day_of(today)))
        by_node.setdefault(node.name, []).append(scope)
    assert len(by_node) >= 2, "the scopes must span masters"
    full = sorted(by_node)[0]
    days = {(s, today): {f"{s.workspace_id}-{i}-" + "m" * 200 for i in range(400)}
            for s in scopes}
    starts = {s: "monday" for s in scopes}
    record = store.keys.offsets("metrics", 0)
    memory = {m.node: m for m in await read_memory(client)}
    async with changed(full, "maxmemory", str(memory[full].used + 40_000)):
        with pytest.raises(StoreOutOfMemory):
            await store.add_by_day(days, starts, [("SET", record, 7)])  # type: ignore[arg-type]
        others = [s for node, group in by_node.items() if node != full for s in group]
        assert await client.scard(store.keys.sketch(others[0], day_of(today))) == 400
        assert await store.applied_offsets([("metrics", 0)]) == [None]
        assert await client.get(record) is None
    assert await store.add_by_day(days, starts, [("SET", record, 7)]) == []  # type: ignore[arg-type]
    assert await store.applied_offsets([("metrics", 0)]) == [7]
