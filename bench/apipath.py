"""``python -m bench.apipath``: one API request's own cost, in process (ASGI, no network), for a
dense workspace (760 days of 1,500 logins): the first 730-day answer, a repeated identical one
(response cache) and one after a single new login (stored results recompute today only), with
``/healthz`` beside them. The harness that found the thread-pool dependencies and the row
rendering; profile it with ``python -m cProfile -m bench.apipath``."""

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
from tests.support.servers import RedisServer

ROUNDS = 40


async def main() -> None:
    server = RedisServer().start()
    try:
        settings = Settings(redis_url=server.url, jwt_secret="x" * 40, rate_limit_per_minute=0,
                            _env_file=None)
        ws = Scope("acme", "dense")
        today = utc_today()
        hll.warm_up()
        async with open_store(settings) as store:
            rng = random.Random(1)
            for first in range(0, 760, 20):
                batch: dict[Any, set[str]] = {}
                for back in range(first, min(first + 20, 760)):
                    members = {f"u{rng.randrange(100_000)}" for _ in range(1500)}
                    for scope in (ws, ws.org):
                        for p in periods_holding(today - timedelta(days=back)):
                            batch.setdefault((scope, p), set()).update(members)
                await store.add(batch)
            app = create_app(settings, store)
            token = issue_token(settings, role="admin", org_id="acme", ttl_seconds=3600,
                                now=time.time())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t",
                                         headers={"Authorization": f"Bearer {token}"}) as c:
                url = "/api/v2/org/acme/workspace/dense/metrics/usage"
                for window in ("rolling", "calendar"):
                    params = {"period_length": 730, "window": window}
                    t0 = time.perf_counter()
                    await c.get(url, params=params)
                    first_ms = (time.perf_counter() - t0) * 1e3
                    hits, fresh = [], []
                    for k in range(ROUNDS):
                        t0 = time.perf_counter()
                        await c.get(url, params=params)
                        hits.append(time.perf_counter() - t0)
                        await store.add({(ws, p): {f"new-{window}-{k}"}
                                         for p in periods_holding(today)})
                        t0 = time.perf_counter()
                        await c.get(url, params=params)
                        fresh.append(time.perf_counter() - t0)
                    print(f"{window}: first {first_ms:.1f} ms; repeated p50 "
                          f"{statistics.median(hits) * 1e3:.2f} ms; after one new login p50 "
                          f"{statistics.median(fresh) * 1e3:.2f} ms, p95 "
                          f"{sorted(fresh)[int(ROUNDS * 0.95) - 1] * 1e3:.2f} ms")
                health = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    await c.get("/healthz")
                    health.append(time.perf_counter() - t0)
                print(f"/healthz p50 {statistics.median(health) * 1e3:.2f} ms")
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
