"""No caller can exhaust the API (issue 11): requests charged by their estimated cost, a bound
on the heavy recomputes one process runs at once, a capped settings body, and a bound on the
settings one admin can store for workspaces that have no data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.types import Scope as AsgiScope

from api.app import create_app
from api.auth import issue_token
from api.bodylimit import MAX_BODY_BYTES
from api.ratelimit import CostModel, TokenBuckets, retry_after
from sketches import scope_settings as wss
from sketches.config import Settings
from sketches.keys import Scope
from sketches.scope_settings import MAX_SETTINGS_WITHOUT_DATA, WorkspaceSettings
from sketches.store import SketchStore

USAGE = "/api/v2/org/acme/workspace/ws-1/metrics/usage"
SETTINGS = "/api/v2/org/acme/workspace/{ws}/settings"


@pytest.fixture
def sketch_mode() -> str:
    return "exact"  # these are matters of the API, not of sketches


def auth(settings: Settings, sub: str = "alice", role: str = "admin") -> dict[str, str]:
    token = issue_token(settings, role=role, org_id="acme", subject=sub, ttl_seconds=600,
                        now=time.time())
    return {"Authorization": f"Bearer {token}"}


def scope(path: str, query: str = "") -> AsgiScope:
    return {"type": "http", "path": path, "query_string": query.encode()}


def test_the_cost_model_in_units_of_a_30_day_calendar_query() -> None:
    model = CostModel(retention_days=800, max_period_length=730)

    def cost(query: str) -> float:
        return model.cost(scope(USAGE, query))

    assert cost("period_length=30") == pytest.approx(1.0)
    assert cost("") == pytest.approx(cost("period_length=365"))  # the default period
    assert 2.5 < cost("period_length=365") < 3.5
    # Both windows are served from stored per-day results: a row costs the same in either.
    long = cost("period_length=730")
    assert 4.5 < long < 6, long
    assert cost("period_length=730&window=rolling") == long
    assert cost("period_length=730&window=rolling&metrics=dau,mau") == long
    assert cost("period_length=0") == 1.0  # never less than one request
    # Over the maximum (the route answers 422): charged the most a query costs, whatever the
    # number of digits.
    for over in ("731", "1000", "9999999", "99999999", "99999999999", "9" * 4000):
        assert cost(f"period_length={over}") == long, over
    # What the route refuses as no number at all is charged the default period, and never
    # fails: `²` is a digit to str.isdigit and not to int().
    for invalid in ("²", "%C2%B2", "٣", "１２", "abc", "-1", "", "1e3", "nan", "730.5", "9" * 5000):
        assert cost(f"period_length={invalid}") == cost(""), invalid
    # Spellings the route reads as 730 are charged 730 days, and a repeated parameter counts
    # by its last value, as the route reads it.
    for same in ("%20730", "+730", "7_30", "730.0", "0730", "%09730%0A"):
        assert cost(f"period_length={same}") == long, same
    assert cost("period%5Flength=730") == long
    assert cost("period_length=5&period_length=730") == long
    assert cost("period_length=730&period_length=5") == 1.0
    assert cost("period_length=730&period_length=") == cost("")  # the last is blank: a 422
    assert model.cost(scope("/api/v2/org/acme/workspace/ws-1/settings")) == 1.0
    assert model.cost({"type": "http", "path": USAGE}) == cost("")  # no query string at all


def test_a_request_dearer_than_the_burst_takes_a_full_bucket_and_passes_again_later() -> None:
    """A cost above the burst is capped at the burst: without the cap such a request could
    never pass, however long its caller waited."""
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=3, clock=lambda: now[0])
    assert buckets.take("a", cost=10) == 0.0  # a full bucket is enough
    assert buckets.take("a", cost=10) == pytest.approx(3.0)  # it needs the whole burst again
    now[0] += 3.0
    assert buckets.take("a", cost=10) == 0.0


def test_a_bucket_never_holds_more_than_the_burst_and_forgets_the_least_recent_caller() -> None:
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=3, clock=lambda: now[0], max_callers=3)
    assert buckets.take("a") == 0.0
    now[0] += 3600  # an hour idle refills to the burst, not to 3,600 requests
    assert [buckets.take("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(1.0)]
    for key in ("b", "c"):
        assert buckets.take(key, cost=3) == 0.0  # b and c empty their buckets
    assert buckets.take("b", cost=3) > 0  # b seen again: a, then c, are the least recent
    assert buckets.take("d") == 0.0  # a fourth caller: the least recently seen goes...
    assert buckets.take("a") == 0.0  # ...which was a: forgiven, a full bucket again (c goes)
    assert buckets.take("b", cost=3) > 0  # b, seen since, was kept: still empty
    assert buckets.take("c", cost=3) == 0.0  # c was forgotten: forgiven too
    assert len(buckets) == 3
    assert retry_after(0.0) == 1  # never "Retry-After: 0"


def test_retry_after_counts_only_the_tokens_still_missing() -> None:
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=3, clock=lambda: now[0])  # one token a second
    assert buckets.take("a", cost=3) == 0.0
    now[0] += 0.5
    assert buckets.take("a", cost=1) == pytest.approx(0.5)  # half a token there, half missing
    now[0] += 1.5
    assert buckets.take("a", cost=3) == pytest.approx(1.0)  # two of three there
    assert retry_after(buckets.take("a", cost=2.5)) == 1


@pytest.fixture
async def client(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 600,
                                                 "rate_limit_burst": 60}), store)
    # The buckets' clock stands still: what a test takes is not refilled while it runs, however
    # slowly a loaded machine serves its requests (10 tokens a second at 600 a minute).
    app.state.rate_limits.clock = lambda: 0.0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


async def test_long_queries_take_more_of_their_callers_burst_and_only_theirs(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    long = {"period_length": 730, "window": "rolling"}  # about 5 units of a burst of 60
    codes = [(await client.get(USAGE, params=long, headers=auth(settings))).status_code
             for _ in range(13)]
    assert codes[:11] == [200] * 11
    assert codes[12] == 429, codes
    again = await client.get(USAGE, params=long, headers=auth(settings))
    assert again.status_code == 429
    assert int(again.headers["Retry-After"]) >= 1
    other = await client.get(USAGE, params=long, headers=auth(settings, sub="bob"))
    assert other.status_code == 200
    # Calendar queries of 30 days cost one unit: 60 in a row pass for a third caller.
    carol = auth(settings, sub="carol")
    codes = [(await client.get(USAGE, params={"period_length": 30}, headers=carol)).status_code
             for _ in range(60)]
    assert codes == [200] * 60


class HeldRecomputes:
    """The store's rolling read held on an event, on the real store: a heavy recompute that got
    its slot stays in it until ``release`` is set."""

    def __init__(self, store: SketchStore) -> None:
        self.release = asyncio.Event()
        self.inside: list[str] = []
        self.entered = asyncio.Event()
        self.real = store.rolling_and_daily
        store.rolling_and_daily = self  # type: ignore[method-assign]

    async def __call__(self, scope: Scope, *args: Any, **kwargs: Any) -> Any:
        self.inside.append(scope.org_id)
        self.entered.set()
        await self.release.wait()
        return await self.real(scope, *args, **kwargs)

    async def wait_inside(self, n: int) -> None:
        while len(self.inside) < n:
            self.entered.clear()
            await asyncio.wait_for(self.entered.wait(), 10)


async def until(done: Callable[[], bool]) -> None:
    """Yield to the loop until ``done()``: counted in turns of the loop, never in seconds."""
    for _ in range(100_000):
        if done():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the awaited state never came")


async def seed_history(store: SketchStore, *scopes: Scope) -> None:
    """Two years of weekly logins: the first 730-day rolling answer of each is heavy."""
    from datetime import timedelta

    from sketches.periods import periods_holding, utc_today

    today = utc_today()
    for ws in scopes:
        await store.add({(ws, p): {"a", "b"} for d in range(0, 400, 7)
                         for p in periods_holding(today - timedelta(days=d))})


def heavy_app(settings: Settings, store: SketchStore, **limits: Any) -> Any:
    return create_app(settings.model_copy(update={"rate_limit_per_minute": 0, **limits}), store)


ROLLING = {"period_length": 730, "window": "rolling"}


def url(org: str, ws: str) -> str:
    return f"/api/v2/org/{org}/workspace/{ws}/metrics/usage"


async def test_heavy_recomputes_share_the_process_slots_fairly_between_orgs(
    settings: Settings, store: SketchStore,
) -> None:
    """One org holds at most its share of the heavy-recompute slots: its next heavy request
    waits (briefly) and is refused with 503, while another org's is served at once and a light
    request of the same org is never held back. The 503 counts as busy, not as a Redis error."""
    from sketches.periods import periods_holding, utc_today

    await seed_history(store, Scope("acme", "ws-0"), Scope("acme", "ws-1"),
                       Scope("acme", "ws-3"), Scope("globex", "ws-0"))
    app = heavy_app(settings, store, api_max_expensive_queries=2, api_max_expensive_per_org=1,
                    api_expensive_wait_s=0.05)
    dau = {"period_length": 30, "metrics": "dau"}
    globex = {"Authorization": auth(settings, role="superadmin")["Authorization"]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t", headers=auth(settings)) as c:
        assert (await c.get(url("acme", "ws-3"), params=dau)).status_code == 200  # DAU stored
        await store.add({(Scope("acme", "ws-3"), p): {"new"} for p in periods_holding(
            utc_today())})
        held = HeldRecomputes(store)
        first = asyncio.create_task(c.get(url("acme", "ws-0"), params=ROLLING))
        await held.wait_inside(1)
        refused = await c.get(url("acme", "ws-1"), params=ROLLING)  # acme's share is taken
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert "heavy recomputes" in refused.json()["detail"]
        other = asyncio.create_task(c.get(url("globex", "ws-0"), params=ROLLING, headers=globex))
        await held.wait_inside(2)  # the other org got the slot acme may not have
        assert held.inside == ["acme", "globex"]
        light = await c.get(url("acme", "ws-3"), params=dau)  # one new login: one DAU entry
        assert light.status_code == 200, light.text
        held.release.set()
        assert [r.status_code for r in await asyncio.gather(first, other)] == [200, 200]
        assert app.state.answers.admission.in_use == 0
        assert (await c.get(url("acme", "ws-1"), params=ROLLING)).status_code == 200
    text = app.state.api_metrics.exposition().decode()
    route = 'route="/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage"'
    assert f"usage_metrics_api_busy_total{{{route}}} 1.0" in text
    assert "usage_metrics_api_redis_errors_total{" not in text


async def test_a_heavy_recompute_waits_for_a_slot_instead_of_an_immediate_503(
    settings: Settings, store: SketchStore,
) -> None:
    """A dashboard opening many workspaces after a backfill: heavy requests beyond the slots
    wait, and each is served as a slot frees, none refused."""
    scopes = [Scope("acme", f"ws-{i}") for i in range(6)]
    await seed_history(store, *scopes)
    app = heavy_app(settings, store, api_max_expensive_queries=2, api_max_expensive_per_org=2,
                    api_expensive_wait_s=60)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t", headers=auth(settings)) as c:
        held = HeldRecomputes(store)
        tasks = [asyncio.create_task(c.get(url("acme", ws.workspace_id), params=ROLLING))
                 for ws in scopes]
        await held.wait_inside(2)
        admission = app.state.answers.admission
        await until(lambda: admission.waiting("acme") == 4)
        assert admission.in_use == 2
        held.release.set()
        assert [r.status_code for r in await asyncio.gather(*tasks)] == [200] * 6
        assert admission.in_use == 0
        assert admission.waiting() == 0


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


@pytest.mark.parametrize("path", [SETTINGS.format(ws="ws-1"), "/api/v2/org/acme/settings"])
async def test_the_permission_decides_before_the_size_of_a_body(
    client: httpx.AsyncClient, settings: Settings, path: str
) -> None:
    """A caller that may not write gets 403 whatever it sends, never a 413 that would tell it
    the body was read; only a caller that may write learns that its body is too large."""
    big = b'{"timezone": "UTC", "junk": "' + b"x" * (2 * MAX_BODY_BYTES) + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    may_not_write = [auth(settings, role="basic"), auth(settings, role="controller"),
                     {"Authorization": auth(settings, role="admin")["Authorization"].replace(
                         "Bearer ", "Bearer x")}]  # the last one does not verify: 401
    for headers, status in zip(may_not_write, (403, 403, 401), strict=True):
        for method in ("PUT", "PATCH"):
            declared = await client.request(method, path, content=big, headers=headers)
            assert declared.status_code == status, (method, declared.text)
            streamed = await client.request(method, path, content=chunked(), headers=headers)
            assert streamed.status_code == status, (method, streamed.text)
    other_org = auth(settings)  # an admin of acme...
    elsewhere = path.replace("/org/acme/", "/org/globex/")  # ...writing globex's settings
    assert (await client.put(elsewhere, content=big, headers=other_org)).status_code == 403
    assert (await client.put(path, content=big, headers=auth(settings))).status_code == 413


async def test_a_streamed_body_is_read_no_further_than_the_cap(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    chunk = 8192
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(10_000):  # 80 MiB if it were all read
            pulled += 1
            yield b" " * chunk

    refused = await client.put(SETTINGS.format(ws="ws-1"), content=endless(),
                               headers=auth(settings))
    assert refused.status_code == 413
    assert refused.headers["Connection"] == "close"
    assert "64" in refused.json()["detail"] or str(MAX_BODY_BYTES) in refused.json()["detail"]
    assert pulled <= MAX_BODY_BYTES // chunk + 2, pulled


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
    await store.client.hset(store.keys.meta(Scope("acme", "has-data")), "n", 1)
    with_data = await client.put(SETTINGS.format(ws="has-data"), json=body,
                                 headers=auth(settings))
    assert with_data.status_code == 200
    # Once one of the counted workspaces receives data, it no longer counts.
    await store.client.hset(store.keys.meta(Scope("acme", "new-3")), "n", 1)
    assert (await client.put(SETTINGS.format(ws="one-too-many"), json=body,
                             headers=auth(settings))).status_code == 200
    # A patch that changes nothing stores nothing, so it takes no slot (else a no-op PATCH
    # could fill them): the bound is still full, and it still answers the settings in force.
    for noop in ({}, {"timezone": None}, {"week_start": "monday"}, {"excluded_subjects": []}):
        resp = await client.patch(SETTINGS.format(ws="never-set"), json=noop,
                                  headers=auth(settings))
        assert resp.status_code == 200, (noop, resp.text)
        assert resp.json()["week_start"] == "monday"
    refused = await client.patch(SETTINGS.format(ws="never-set"), json={"week_start": "sunday"},
                                 headers=auth(settings))
    assert refused.status_code == 409  # a real change is counted, and the bound is full
    # Another org has its own bound.
    await wss.save(store.client, store.keys, Scope("globex", "w"),
                   WorkspaceSettings(timezone="UTC"))
    assert await store.client.scard(store.keys.settings_without_data("globex")) == 1
    noop = await client.patch(SETTINGS.format(ws="w2").replace("acme", "globex"),
                              json={"timezone": None},
                              headers={"Authorization": auth(settings, role="superadmin")[
                                  "Authorization"]})
    assert noop.status_code == 200, noop.text
    assert await store.client.scard(store.keys.settings_without_data("globex")) == 1
    assert await store.client.scard(store.keys.settings_without_data("acme")) == (
        MAX_SETTINGS_WITHOUT_DATA)
