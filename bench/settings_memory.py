"""What the settings feed (issue 17) costs: Redis memory per scope in the feed, the consumer's
memory per scope it knows of and per scope whose settings it holds, and the time of the feed
reads. Its own redis-server on a free port (``tests/support/servers.py``), nothing else.

    .venv/bin/python -m bench.settings_memory [--scopes 100000] [--tuned 10000]

``--scopes`` scopes are announced (as many settings writes would), ``--tuned`` of them with
settings stored (a timezone, Sunday weeks, three excluded patterns), and resolved by one
``SettingsCache`` with ``max_entries`` above ``--tuned``. Python memory is ``tracemalloc``'s
net growth over each step (its own bookkeeping left out); each Excluder's verdict memo is empty
here and grows with the subjects a scope sees (at most ``MEMO_SUBJECTS`` per scope).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc
from typing import Any

from consumer.settings_cache import SettingsCache
from sketches import scope_settings as wss
from sketches import settings_feed
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.scope_settings import WorkspaceSettings
from sketches.store import run_pipeline
from tests.support.servers import RedisServer


def scope(i: int) -> Scope:
    return Scope(f"org-{i // 10:07d}", f"ws-{i:08d}")


async def zrange_usec(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_zrangebyscore", {}).get("usec", 0))


async def measure(url: str, scopes: int, tuned: int) -> dict[str, Any]:
    cfg = Settings(redis_url=url, kafka_bootstrap_servers="127.0.0.1:1", redis_key_prefix="um",
                   jwt_secret="bench-secret-at-least-32-bytes-long!!", _env_file=None)
    out: dict[str, Any] = {"scopes": scopes, "tuned": tuned}
    async with open_store(cfg) as store:
        client, keys = store.client, store.keys
        body = wss.encode(WorkspaceSettings(timezone="Asia/Tokyo", week_start="sunday",
                                            excluded_subjects=["qa-*", "*-bot", "load-tester"]))
        for start in range(0, tuned, 1000):
            await run_pipeline(client, [("SET", keys.settings(scope(i)), body)
                                        for i in range(start, min(tuned, start + 1000))])
        before = int((await client.info("memory"))["used_memory"])
        for start in range(0, scopes, settings_feed.FILL_CHUNK):
            await settings_feed.announce(
                client, keys,
                [scope(i) for i in range(start, min(scopes, start + settings_feed.FILL_CHUNK))])
        await settings_feed.fill(client, keys)
        after = int((await client.info("memory"))["used_memory"])
        feed_bytes = int(await client.memory_usage(keys.settings_feed(), samples=0))
        out["feed_memory_usage_bytes"] = feed_bytes
        out["feed_bytes_per_scope"] = round(feed_bytes / scopes, 1)
        out["used_memory_growth_per_scope"] = round((after - before) / scopes, 1)
        out["feed_encoding"] = (await client.object("encoding", keys.settings_feed())).decode()

        timed = SettingsCache(store, "UTC", ttl_seconds=0, fill=False)
        usec = await zrange_usec(client)
        t0 = time.perf_counter()
        await timed.resolve([])  # the whole feed, once (timed without tracemalloc)
        out["first_feed_read_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        out["first_feed_read_inside_redis_ms"] = round((await zrange_usec(client) - usec) / 1000, 1)
        del timed

        cache = SettingsCache(store, "UTC", ttl_seconds=0, fill=False,
                              max_entries=max(tuned, 1) * 2)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        await cache.resolve([])
        gc.collect()
        named = tracemalloc.get_traced_memory()[0]
        out["consumer_bytes_per_named_scope"] = round((named - base) / scopes, 1)
        for start in range(0, tuned, 1000):
            await cache.resolve([scope(i) for i in range(start, min(tuned, start + 1000))])
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out["consumer_bytes_per_cached_settings"] = round((held - named) / max(tuned, 1), 1)
        out["cached_settings"] = len(cache._cache)

        batch = [scope(i) for i in range(scopes, scopes + 500)]  # 500 scopes never announced
        polls = []
        for _ in range(20):
            t0 = time.perf_counter()
            await cache.resolve(batch)
            polls.append(time.perf_counter() - t0)
        out["poll_and_resolve_500_unknown_ms_median"] = round(sorted(polls)[10] * 1000, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scopes", type=int, default=100_000)
    parser.add_argument("--tuned", type=int, default=10_000)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        result = asyncio.run(measure(server.url, args.scopes, args.tuned))
    finally:
        server.stop()
    for name, value in result.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
