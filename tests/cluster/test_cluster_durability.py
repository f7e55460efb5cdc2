"""The store's offset records hold on a cluster: a master that loses the tail of its AOF drags the
resume point back to what it still holds, and the consumer re-reads what it lost.

A cluster of its own, with ``appendonly yes``. Two rounds of logins are consumed; then one master
(one that holds workspaces but none of the partitions' own offset records) is killed with SIGKILL
and its AOF cut back to where it stood after round 1, as a machine that lost its page cache would
leave it. The partition records still say "round 2 applied": with them alone round 2 would be
lost on that master for good. The per-master records make ``applied_offsets`` answer round 1's
offsets, the consumer (same group, whose Kafka offsets say round 2) resumes there, and every count
reaches the oracle again. Then slots move (``redis-cli --cluster reshard``) so that a master's
anchor slot changes: the store knows nothing for sure, says so, and the records follow the new
slot map at the next batch.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.store import SketchStore, master_tags, node_record_key
from tests.cluster.helpers import on_cluster
from tests.cluster.servers import RedisClusterServers, last_incr_aof, redis_cli_bin
from tests.support.kafka import merge_ends, produce, wait_applied
from tests.support.servers import RedisServer
from tests.test_consumer import TODAY, check_against_oracle, oracle_of, running
from usage_metrics.synth import SynthEvent

pytestmark = pytest.mark.xdist_group("cluster")

WORKSPACES = [Scope("durable", f"ws-{i}") for i in range(24)]


@pytest.fixture(scope="module")
def aof_cluster() -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(masters=3, appendonly=True).start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def settings(settings: Settings, aof_cluster: RedisClusterServers) -> Settings:
    return on_cluster(settings, aof_cluster.url)  # short group sessions kept (conftest.py)


@pytest.fixture
def sketch_mode() -> str:
    return "exact"  # a lost subject must show as a wrong count, not hide in HLL's error


def logins(tag: str, seed: int, per_workspace: int = 20) -> list[SynthEvent]:
    """Logins of every workspace over the last 10 days, by subjects new to this round."""
    rng = random.Random(seed)
    out = []
    for ws in WORKSPACES:
        for _ in range(per_workspace):
            d = TODAY - timedelta(days=rng.randrange(10))
            moment = datetime(d.year, d.month, d.day, rng.randrange(24), tzinfo=UTC)
            out.append(SynthEvent(ws.org_id, ws.workspace_id, f"{tag}-u{rng.randrange(15)}",
                                  moment))
    return out


def node_port(cluster: RedisClusterServers, key: str) -> int:
    return cluster.node_of_slot(key_slot(key.encode())).port


async def check_all(store: SketchStore, events: list[SynthEvent]) -> None:
    oracle = oracle_of(events)
    for ws in WORKSPACES:
        await check_against_oracle(store, oracle, ws, "exact")


async def test_a_master_that_loses_its_aof_tail_drags_the_resume_point_back(
    settings: Settings, store: SketchStore, topics: tuple[str, str],
    aof_cluster: RedisClusterServers,
) -> None:
    topic, _ = topics
    keys = store.keys
    bootstrap = settings.kafka_bootstrap_servers
    # The victim holds workspaces but neither partition's own record.
    record_ports = {node_port(aof_cluster, keys.offsets(topic, p)) for p in (0, 1)}
    victim: RedisServer = next(n for n in aof_cluster.nodes if n.port not in record_ports)
    on_victim = [ws for ws in WORKSPACES
                 if node_port(aof_cluster, keys.hash_tag(ws)) == victim.port]
    assert on_victim

    round1, round2 = logins("r1", 1), logins("r2", 2)
    async with running(settings, store):
        ends1 = await produce(bootstrap, topic, [e.to_json() for e in round1])
        await wait_applied(store, topic, ends1)
        aof = last_incr_aof(victim)
        cut = aof.stat().st_size  # Redis writes its AOF before it answers: round 1 is in
        ends2 = merge_ends(ends1, await produce(bootstrap, topic, [e.to_json() for e in round2]))
        await wait_applied(store, topic, ends2)
    await check_all(store, round1 + round2)
    assert aof.stat().st_size > cut

    aof_cluster.kill(victim)
    with aof.open("r+b") as f:  # the tail that never reached the disk
        f.truncate(cut)
    aof_cluster.restart(victim)

    async with open_store(settings) as after:
        parts = [(topic, p) for p in sorted(ends2)]
        # The partitions' own records survived on the other masters and still say round 2...
        own = [await after.client.get(keys.offsets(topic, p)) for p in sorted(ends2)]
        assert own == [str(ends2[p]).encode() for p in sorted(ends2)]
        # ...but the victim lost round 2, and its records say so: the store answers round 1.
        assert await after.applied_offsets(parts) == [ends1.get(p) for p in sorted(ends2)]
        oracle1, oracle12 = oracle_of(round1), oracle_of(round1 + round2)
        for ws in WORKSPACES:
            want = oracle1 if ws in on_victim else oracle12
            await check_against_oracle(after, want, ws, "exact")

        # The same group resumes where the store says, not where Kafka's commits say.
        async with running(settings, after):
            await wait_applied(after, topic, ends2)
        await check_all(after, round1 + round2)

        # Slots move so that one master's highest slot, its anchor, changes.
        await reshard(aof_cluster)
        assert await after.applied_offsets(parts) == [None, None]  # that master has no record
        round3 = logins("r3", 3, per_workspace=5)
        ends3 = merge_ends(ends2, await produce(bootstrap, topic, [e.to_json() for e in round3]))
        async with running(settings, after):
            await wait_applied(after, topic, ends3)
        await check_all(after, round1 + round2 + round3)
        assert isinstance(after.client, RedisCluster)
        tags = await master_tags(after.client)
        for p in sorted(ends3):
            values = [await after.client.get(node_record_key(keys.offsets(topic, p), t))
                      for t in tags]
            assert values == [str(ends3[p]).encode()] * 3


async def reshard(cluster: RedisClusterServers) -> None:
    """Move the lowest 100 slots of the master with the highest slots to the master below it,
    whose highest slot (its anchor) then changes."""
    with redis.Redis(port=cluster.nodes[0].port) as c:
        ranges = c.execute_command("CLUSTER SLOTS")
    by_port: dict[int, int] = {}
    for _, end, primary, *_ in ranges:
        by_port[int(primary[1])] = max(by_port.get(int(primary[1]), -1), int(end))
    ordered = sorted(by_port, key=by_port.__getitem__)
    source, target = ordered[-1], ordered[-2]
    ids = {}
    for port in (source, target):
        with redis.Redis(port=port) as c:
            ids[port] = c.execute_command("CLUSTER MYID").decode()
    out = subprocess.run(
        [redis_cli_bin(), "--cluster", "reshard", f"127.0.0.1:{source}",
         "--cluster-from", ids[source], "--cluster-to", ids[target],
         "--cluster-slots", "100", "--cluster-yes"],
        capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    cluster.wait_ok()
