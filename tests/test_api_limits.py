"""No caller can exhaust the API (issue 11): requests charged by their estimated cost, a bound
on the expensive queries one process runs at once, a capped settings body, and a bound on the
settings one admin can store for workspaces that have no data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from api.app import create_app
from api.auth import issue_token
from api.bodylimit import MAX_BODY_BYTES
from api.ratelimit import CostModel, ExpensiveQueryGate
from sketches import workspace_settings as wss
from sketches.keys import Workspace
from sketches.store import SketchStore
from sketches.workspace_settings import MAX_SETTINGS_WITHOUT_DATA, WorkspaceSettings
from usage_metrics.config import Settings

USAGE = "/api/v2/org/acme/workspace/ws-1/metrics/usage"
SETTINGS = "/api/v2/org/acme/workspace/{ws}/settings"


@pytest.fixture
def sketch_mode() -> str:
    return "exact"  # these are matters of the API, not of sketches


def auth(settings: Settings, sub: str = "alice", role: str = "admin") -> dict[str, str]:
    token = issue_token(settings, role=role, org_id="acme", subject=sub, ttl_seconds=600,
                        now=time.time())
    return {"Authorization": f"Bearer {token}"}


def scope(path: str, query: str = "") -> Scope:
    return {"type": "http", "path": path, "query_string": query.encode()}


def test_the_cost_model_in_units_of_a_30_day_calendar_query() -> None:
    model = CostModel(retention_days=800, max_period_length=730)

    def cost(query: str) -> float:
        return model.cost(scope(USAGE, query))

    assert cost("period_length=30") == pytest.approx(1.0)
    assert cost("") == pytest.approx(cost("period_length=365"))  # the default period
    assert 2.5 < cost("period_length=365") < 3.5
    rolling = cost("period_length=730&window=rolling")
    assert 85 < rolling < 100, rolling  # "about a hundred times a 30-day calendar query"
    assert cost("period_length=730&window=rolling&metrics=dau") == cost("period_length=730")
    assert cost("period_length=730&window=rolling&metrics=dau,mau") == rolling
    assert cost("period_length=0") == 1.0  # never less than one request
    assert cost("period_length=99999999999&window=rolling") == cost(
        "period_length=365&window=rolling")  # invalid: the route answers 422
    assert model.cost(scope("/api/v2/org/acme/workspace/ws-1/settings")) == 1.0


@pytest.fixture
async def client(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 600,
                                                 "rate_limit_burst": 60}), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


async def test_a_rolling_730_day_query_takes_the_whole_burst_of_its_caller_only(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    expensive = {"period_length": 730, "window": "rolling"}
    first = await client.get(USAGE, params=expensive, headers=auth(settings))
    assert first.status_code == 200, first.text
    again = await client.get(USAGE, params=expensive, headers=auth(settings))
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) >= 5  # 60 units at 10 units a second
    cheap = await client.get(USAGE, params={"period_length": 30}, headers=auth(settings))
    assert cheap.status_code == 429  # the bucket is empty: even one unit must wait
    other = await client.get(USAGE, params=expensive, headers=auth(settings, sub="bob"))
    assert other.status_code == 200
    # Calendar queries of 30 days cost one unit: 60 in a row pass for a third caller.
    carol = auth(settings, sub="carol")
    codes = [(await client.get(USAGE, params={"period_length": 30}, headers=carol)).status_code
             for _ in range(60)]
    assert codes == [200] * 60


async def test_expensive_queries_beyond_the_process_bound_get_503_at_once() -> None:
    """The gate around a stand-in for the app that holds each request until released."""
    release = asyncio.Event()
    entered: list[str] = []
    reached = {2: asyncio.Event(), 3: asyncio.Event()}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.append(scope["query_string"].decode())
        if len(entered) in reached:
            reached[len(entered)].set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    gate = ExpensiveQueryGate(app, CostModel(800, 730), limit=2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate),
                                 base_url="http://t") as c:
        rolling = {"period_length": 730, "window": "rolling"}
        held = [asyncio.create_task(c.get(USAGE, params=rolling)) for _ in range(2)]
        await asyncio.wait_for(reached[2].wait(), 10)
        refused = await c.get(USAGE, params=rolling)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "expensive" in refused.json()["detail"]
        cheap = asyncio.create_task(c.get(USAGE, params={"period_length": 30}))
        await asyncio.wait_for(reached[3].wait(), 10)  # a cheap query is not held back
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held, cheap)] == [200, 200, 200]
        assert gate.running == 0
        assert (await c.get(USAGE, params=rolling)).status_code == 200


async def test_a_settings_body_over_64_kib_is_refused_before_it_is_read(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = SETTINGS.format(ws="ws-1")
    big = b'{"timezone": "UTC", "excluded_subjects": ["' + b"x" * MAX_BODY_BYTES + b'"]}'
    declared = await client.put(url, content=big, headers=auth(settings))
    assert declared.status_code == 413, declared.text

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    streamed = await client.put(url, content=chunked(), headers=auth(settings))
    assert streamed.status_code == 413
    assert (await client.put(url, content=big)).status_code == 401  # no token: 401 first
    fine = await client.put(url, json={"timezone": "Asia/Tokyo"}, headers=auth(settings))
    assert fine.status_code == 200
    schema = (await client.get("/openapi.json")).json()
    put = schema["paths"]["/api/v2/org/{org_id}/workspace/{workspace_id}/settings"]["put"]
    assert {"409", "413"} <= set(put["responses"])


@pytest.fixture
async def unlimited(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 0}), store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


async def test_settings_of_workspaces_without_data_are_bounded_per_org(
    unlimited: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    client = unlimited
    body: dict[str, Any] = {"timezone": "Asia/Tokyo"}
    for i in range(MAX_SETTINGS_WITHOUT_DATA):
        resp = await client.put(SETTINGS.format(ws=f"new-{i}"), json=body, headers=auth(settings))
        assert resp.status_code == 200, (i, resp.text)
    refused = await client.put(SETTINGS.format(ws="one-too-many"), json=body,
                               headers=auth(settings))
    assert refused.status_code == 409
    assert "no data" in refused.json()["detail"]
    # Changing the settings of one already counted is fine, and so is any workspace with data.
    again = await client.put(SETTINGS.format(ws="new-7"), json={"timezone": "UTC"},
                             headers=auth(settings))
    assert again.status_code == 200
    await store.client.set(store.keys.version(Workspace("acme", "has-data")), "v")
    with_data = await client.put(SETTINGS.format(ws="has-data"), json=body,
                                 headers=auth(settings))
    assert with_data.status_code == 200
    # Once one of the counted workspaces receives data, it no longer counts.
    await store.client.set(store.keys.version(Workspace("acme", "new-3")), "v")
    assert (await client.put(SETTINGS.format(ws="one-too-many"), json=body,
                             headers=auth(settings))).status_code == 200
    # Another org has its own bound.
    await wss.save(store.client, store.keys, Workspace("globex", "w"),
                   WorkspaceSettings(timezone="UTC"))
    assert await store.client.scard(store.keys.settings_without_data("globex")) == 1
    assert await store.client.scard(store.keys.settings_without_data("acme")) == (
        MAX_SETTINGS_WITHOUT_DATA)
