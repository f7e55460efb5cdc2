"""``python -m bench.admission``: heavy-recompute slots under the two loads of issue 16, in process
(ASGI, no network) over a real ``redis-server``, before (one global bound, no wait: what
``Answers`` did until then) and after (``sketches.admission`` with the default settings).

- **dashboard**: 16 workspaces of one org, 760 days each (HLL), none answered yet (as right after
  a backfill); 16 concurrent 730-day rolling requests, one per workspace.
- **flood**: another org sends 64 concurrent 730-day rolling requests for workspaces that hold no
  data (each a heavy direct computation); the dashboard's 16 start while it runs.

Each run starts from no stored result and an empty response cache. Prints, per setting, the
statuses and the latency of the dashboard's requests (and of the flood's)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from datetime import timedelta
from typing import Any

import httpx

from api.app import create_app
from api.auth import issue_token
from sketches import hll
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.periods import periods_holding, utc_today
from sketches.store import SketchStore
from tests.support.servers import RedisServer

WORKSPACES = 16
DAYS = 760
MEMBERS = 150
FLOOD = 64
ROLLING = {"period_length": 730, "window": "rolling"}
# Before: one bound for the whole process, refused at once; after: the defaults.
SETUPS = {
    "before (4 slots, no share, no wait)": {"api_max_expensive_per_org": 4,
                                            "api_expensive_wait_s": 0.0},
    "after (defaults: 4 slots, 2 per org, 2 s wait)": {},
}


async def seed(store: SketchStore) -> None:
    rng = random.Random(1)
    today = utc_today()
    for i in range(WORKSPACES):
        ws = Scope("acme", f"ws-{i}")
        for first in range(0, DAYS, 40):
            batch: dict[Any, set[str]] = {}
            for back in range(first, min(first + 40, DAYS)):
                members = {f"u{rng.randrange(20_000)}" for _ in range(MEMBERS)}
                for p in periods_holding(today - timedelta(days=back)):
                    batch.setdefault((ws, p), set()).update(members)
            await store.add(batch)


async def forget_answers(store: SketchStore) -> None:
    """No stored result: every first answer is a full recompute, as after a backfill."""
    keys = [k async for k in store.client.scan_iter(match="*result*", count=1000)]
    if keys:
        await store.client.delete(*keys)


async def timed(c: httpx.AsyncClient, url: str, headers: dict[str, str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await c.get(url, params=ROLLING, headers=headers)
    return r.status_code, (time.perf_counter() - t0) * 1e3


def summary(results: list[tuple[int, float]]) -> str:
    codes: dict[int, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    ok = sorted(ms for code, ms in results if code == 200)
    lat = (f"200 in p50 {statistics.median(ok):.0f} ms, max {ok[-1]:.0f} ms" if ok
           else "none served")
    return f"{dict(sorted(codes.items()))}; {lat}"


async def run(settings: Settings, store: SketchStore, flood: bool) -> tuple[str, str]:
    await forget_answers(store)
    app = create_app(settings, store)
    now = time.time()
    acme = {"Authorization": "Bearer " + issue_token(settings, role="admin", org_id="acme",
                                                     ttl_seconds=3600, now=now)}
    mallory = {"Authorization": "Bearer " + issue_token(settings, role="admin", org_id="flood",
                                                        ttl_seconds=3600, now=now)}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 timeout=60) as c:
        flooding = [asyncio.create_task(timed(c, f"/api/v2/org/flood/workspace/none-{i}/"
                                              "metrics/usage", mallory))
                    for i in range(FLOOD if flood else 0)]
        if flood:
            await asyncio.sleep(0.05)
        dashboard = await asyncio.gather(*(
            timed(c, f"/api/v2/org/acme/workspace/ws-{i}/metrics/usage", acme)
            for i in range(WORKSPACES)))
        flooded = await asyncio.gather(*flooding)
    return summary(dashboard), summary(flooded) if flood else "-"


async def main() -> None:
    server = RedisServer().start()
    try:
        base = Settings(redis_url=server.url, jwt_secret="x" * 40, rate_limit_per_minute=0,
                        _env_file=None)
        hll.warm_up()
        async with open_store(base) as store:
            t0 = time.perf_counter()
            await seed(store)
            print(f"seeded {WORKSPACES} workspaces x {DAYS} days x {MEMBERS} members "
                  f"in {time.perf_counter() - t0:.0f} s")
            for flood in (False, True):
                print(f"\n{'flood + dashboard' if flood else 'dashboard alone'}:")
                for name, limits in SETUPS.items():
                    settings = base.model_copy(update=limits)
                    dash, fl = await run(settings, store, flood)
                    print(f"  {name}\n    dashboard: {dash}")
                    if flood:
                        print(f"    flood:     {fl}")
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
