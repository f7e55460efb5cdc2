"""The HTTP API on a cluster store: the same answers, readiness, and a 503 (never a 500) when the
cluster cannot be reached."""

from __future__ import annotations

import random
import time
from datetime import timedelta

import httpx
import pytest

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.periods import utc_today
from sketches.store import SketchStore
from tests.cluster.helpers import replaced
from tests.support.compare import assert_rows_match
from tests.support.oracle import Oracle
from tests.support.servers import free_port
from tests.test_query import add_logins

pytestmark = pytest.mark.xdist_group("cluster")

TODAY = utc_today()


def bearer(settings: Settings) -> dict[str, str]:
    token = issue_token(settings, role="superadmin", org_id=None, ttl_seconds=600,
                        now=time.time())
    return {"Authorization": f"Bearer {token}"}


async def test_the_api_answers_from_the_cluster_as_the_oracle_does(
    settings: Settings, store: SketchStore, sketch_mode: str
) -> None:
    rng = random.Random(5)
    wss = [Scope("api", f"ws-{i}") for i in range(6)]  # over all three masters
    events = [(ws, f"u{rng.randrange(50)}", TODAY - timedelta(days=rng.randrange(40)))
              for ws in wss for _ in range(150)]
    await add_logins(store, events)
    oracle = Oracle(events)
    app = create_app(settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers=bearer(settings)) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        for ws in wss:
            for window in ("calendar", "rolling"):
                resp = await client.get(
                    f"/api/v2/org/{ws.org_id}/workspace/{ws.workspace_id}/metrics/usage",
                    params={"period_length": 45, "window": window},
                )
                assert resp.status_code == 200, resp.text
                assert_rows_match(resp.json(), oracle.rows(ws, TODAY, 45, window), sketch_mode)


async def test_an_unreachable_cluster_is_a_503(settings: Settings) -> None:
    nowhere = replaced(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with open_store(nowhere) as store:
        app = create_app(nowhere, store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t", headers=bearer(nowhere)) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            resp = await client.get("/api/v2/org/a/workspace/b/metrics/usage",
                                    params={"period_length": 3})
            assert resp.status_code == 503, resp.text
            assert "Traceback" not in resp.text
