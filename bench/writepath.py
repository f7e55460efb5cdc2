"""``python -m bench.writepath [backfill|live] [EVENTS_PER_BATCH] [WORKSPACES]``: the
consumer's own work per event, in process, without Kafka: parse, bucket into workspace and org
scopes, write (script calls of many scopes) into a private redis-server. What the ingestion
figures are made of, and the harness to profile them with (``py-spy record -- python -m
bench.writepath backfill``)."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from datetime import UTC, datetime, timedelta

import orjson
from aiokafka.structs import ConsumerRecord

from consumer.batch import bucket, parse_records
from consumer.events import Rules
from consumer.settings_cache import SettingsCache
from sketches.config import Settings
from sketches.connection import open_store
from tests.support.servers import RedisServer

WORKSPACES = 1000
EVENTS = 160_000


def records(shape: str, n: int, rng: random.Random, now: datetime,
            workspaces: int = WORKSPACES) -> list[ConsumerRecord]:
    """Logins of Zipf-sized workspaces (1,000 by default), 10 an org: over 90 days (backfill)
    or the last minute (live)."""
    sizes = [max(1, int(2000 / (i + 1) ** 1.1)) for i in range(workspaces)]
    cumulative = list(itertools.accumulate(sizes))
    out = []
    for i in range(n):
        w = rng.choices(range(workspaces), cum_weights=cumulative)[0]
        if shape == "backfill":
            t = now - timedelta(days=rng.randrange(90), seconds=rng.randrange(86400))
        else:
            t = now - timedelta(seconds=rng.randrange(60))
        value = orjson.dumps({
            "metric_type": "login", "subject": f"member_{rng.randrange(sizes[w] * 3)}",
            "org_id": f"org{w // 10}", "workspace_id": f"ws{w}",
            "timestamp": t.isoformat().replace("+00:00", "Z"),
        })
        out.append(ConsumerRecord("t", 0, i, 0, 0, None, value, None, 0, len(value), []))
    return out


async def main(shape: str, per_batch: int, workspaces: int = WORKSPACES) -> None:
    now = datetime.now(UTC)
    rng = random.Random(1)
    batches = [records(shape, per_batch, rng, now, workspaces)
               for _ in range(max(2, EVENTS // per_batch))]
    server = RedisServer().start()
    try:
        settings = Settings(redis_url=server.url, _env_file=None)
        rules = Rules("login", 800, 65536)
        async with open_store(settings) as store:
            cache = SettingsCache(store, "UTC", 30)
            parse = group = write = 0.0
            for batch in batches:
                t0 = time.perf_counter()
                parsed = parse_records(batch, rules, now)
                t1 = time.perf_counter()
                prepared = bucket(parsed, await cache.resolve(parsed.scopes))
                t2 = time.perf_counter()
                await store.add_by_day(prepared.days, prepared.week_starts)
                t3 = time.perf_counter()
                parse, group, write = parse + t1 - t0, group + t2 - t1, write + t3 - t2
            n = per_batch * len(batches)
            print(f"{shape}, batches of {per_batch:,}: parse {parse / n * 1e6:.2f} us/event, "
                  f"bucket {group / n * 1e6:.2f}, write {write / n * 1e6:.2f}; "
                  f"{n / (parse + group + write):,.0f} events/s; "
                  f"{len(prepared.days):,} scope-days in the last batch")
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "backfill",
                     int(sys.argv[2]) if len(sys.argv) > 2 else 100_000,
                     int(sys.argv[3]) if len(sys.argv) > 3 else WORKSPACES))
