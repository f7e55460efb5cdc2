"""The settings feed on a cluster: settings in every slot, the feed on one node. A fill finds the
settings of every master, a change reaches the cache, and unknown scopes cost one feed read in
all and no settings read on any node."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster

from consumer.settings_cache import SettingsCache
from sketches import scope_settings as wss
from sketches import settings_feed
from sketches.keys import Scope, org_scope
from sketches.scope_settings import OrgSettings, WorkspaceSettings
from sketches.store import SketchStore

pytestmark = pytest.mark.xdist_group("cluster")


@pytest.fixture
def sketch_mode() -> str:
    return "exact"  # settings do not depend on the sketch mode


async def calls(client: RedisCluster, *names: str) -> dict[str, int]:
    """Calls of each command, summed over the masters."""
    per_node = await client.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
    total = dict.fromkeys(names, 0)
    for stats in per_node.values():
        for name in names:
            total[name] += int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
    return total


async def test_the_feed_serves_scopes_of_every_slot(
    store: SketchStore, redis_client: RedisCluster
) -> None:
    tuned = [Scope(f"org{i}", f"ws{i}") for i in range(12)] + [org_scope("org3")]
    for scope in tuned:
        model = OrgSettings if scope.is_org else WorkspaceSettings
        await wss.save(store.client, store.keys, scope, model(timezone="Asia/Tokyo"))
    # Forget the announcements: the fill alone must find every master's settings.
    await redis_client.delete(store.keys.settings_feed())
    assert await settings_feed.fill(store.client, store.keys)
    cache = SettingsCache(store, "UTC", ttl_seconds=0, fill=False)
    unknown = [Scope(f"org{i}", f"other{i}") for i in range(1000)]
    before = await calls(redis_client, "get", "zrangebyscore")
    got = await cache.resolve([*tuned, *unknown])
    after = await calls(redis_client, "get", "zrangebyscore")
    assert cache.complete
    assert {got[s].timezone for s in tuned} == {"Asia/Tokyo"}
    assert {got[s].timezone for s in unknown} == {"UTC"}
    assert after["get"] - before["get"] == len(tuned)
    assert after["zrangebyscore"] - before["zrangebyscore"] == 1

    await wss.save(store.client, store.keys, tuned[5], WorkspaceSettings(timezone="UTC"))
    got = await cache.resolve(tuned)
    assert got[tuned[5]].timezone == "UTC"
    assert got[tuned[4]].timezone == "Asia/Tokyo"
