"""The cluster suite: the same tests, on a real 3-master Redis Cluster.

One cluster serves the session (started here, or named by ``REDIS_CLUSTER_URL``). The
``settings`` and ``redis_client`` fixtures are overridden so that every test under this directory,
including the tests of ``tests/test_query.py`` and ``tests/test_consumer.py`` re-collected here,
builds its store on the cluster (``Settings(redis_url=<node>, redis_cluster=True)``). Every module
here is marked ``xdist_group("cluster")``, so under ``pytest -n 2 --dist loadgroup`` one worker
owns the cluster and runs these tests one after the other.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio.cluster import RedisCluster

from sketches.config import Settings
from tests.cluster.helpers import on_cluster, replaced
from tests.cluster.servers import RedisClusterServers


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    env = os.environ.get("REDIS_CLUSTER_URL")
    if env:
        yield env
        return
    cluster = RedisClusterServers(masters=3).start()
    try:
        yield cluster.url
    finally:
        cluster.cleanup()


@pytest.fixture
def settings(
    settings: Settings, redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The root fixture's settings, on the cluster. Consumer subprocesses copy ``os.environ``
    (``tests.test_consumer.consumer_env``), so they learn ``REDIS_CLUSTER`` from here. Group
    sessions are short, as in the fault suite: a consumer joining a group that another just left
    may otherwise wait out the old member's session."""
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    return replaced(on_cluster(settings, redis_cluster_url), consumer_session_timeout_ms=1500,
                    consumer_heartbeat_interval_ms=300)


@pytest.fixture
async def redis_client(redis_cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster_url)
    await client.initialize()  # the slot map, so that get_node_from_key answers at once
    try:
        yield client
    finally:
        await client.aclose()
