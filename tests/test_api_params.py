"""The usage endpoint's parameters and rows (contract §3), and how it fails (§4: 422, 503)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.periods import (
    Granularity,
    day_of,
    month_of,
    periods_between,
    periods_holding,
    utc_today,
    week_of,
)
from sketches.store import SketchStore
from tests.support.servers import RedisServer, free_port

# Known bugs outside this file's owner's reach. Each mark is strict: once the bug is fixed the
# test XPASSes, fails, and the mark must go.

ORG = "acme"
WS = "ws-1"
KEYS = {"date", "dau", "wau", "mau"}
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def segment(raw: str) -> str:
    """One path segment as a careful client sends it: everything but unreserved characters
    percent-encoded, and the dot segments too (a client would otherwise resolve them away)."""
    encoded = quote(raw, safe="")
    return encoded.replace(".", "%2E") if encoded in {".", ".."} else encoded


def usage_path(org: str = ORG, ws: str = WS) -> str:
    return f"/api/v2/org/{segment(org)}/workspace/{segment(ws)}/metrics/usage"


async def raw_get(app: Any, path: str, query: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """Call the ASGI app directly: httpx refuses URLs over 64 KiB, a hostile client does not."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def token(settings: Settings, role: str = "superadmin", org: str | None = ORG) -> str:
    return issue_token(settings, role=role, org_id=org, ttl_seconds=600, now=time.time())


async def add_logins(store: SketchStore, ws: Scope, day: date, users: set[str]) -> None:
    """As the consumer does: a login counts in its day, its ISO week and its month."""
    assert await store.add({(ws, p): users for p in periods_holding(day)}) == []


def assert_validation_error(resp: httpx.Response, field: str) -> None:
    assert resp.status_code == 422, resp.text[:500]
    body = resp.json()
    assert isinstance(body["detail"], list)
    assert body["detail"], body
    locs = [tuple(e["loc"]) for e in body["detail"]]
    assert ("query", field) in locs, locs
    for e in body["detail"]:
        assert isinstance(e["msg"], str)
        assert isinstance(e["type"], str)


def assert_rows_shape(rows: list[dict[str, Any]], first: date, last: date) -> None:
    assert len(rows) == (last - first).days + 1
    for i, row in enumerate(rows):
        assert set(row) == KEYS
        assert DATE_RE.match(row["date"]), row
        assert row["date"] == (first + timedelta(days=i)).isoformat()
        for k in ("dau", "wau", "mau"):
            assert row[k] is None or (isinstance(row[k], int) and row[k] > 0), row


@pytest.fixture
async def client(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token(settings)}"},
    ) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# period_length


@pytest.mark.parametrize(("value", "rows"), [(None, 366), ("0", 1), ("1", 2), ("730", 731)])
async def test_period_length_gives_that_many_rows_plus_one(
    client: httpx.AsyncClient, value: str | None, rows: int
) -> None:
    end = utc_today() - timedelta(days=1)
    params = {"end_date": end.isoformat()}
    if value is not None:
        params["period_length"] = value
    resp = await client.get(usage_path(), params=params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body) == rows
    assert_rows_shape(body, end - timedelta(days=rows - 1), end)


@pytest.mark.parametrize(
    "value", ["-1", "731", "abc", "1.5", "", "1e2", "0x10", "99999999999999999999999"]
)
async def test_period_length_out_of_range_or_not_an_integer_is_422(
    client: httpx.AsyncClient, value: str
) -> None:
    resp = await client.get(usage_path(), params={"period_length": value})
    assert_validation_error(resp, "period_length")


async def test_period_length_bound_follows_max_period_length(
    settings: Settings, store: SketchStore
) -> None:
    s = settings.model_copy(update={"max_period_length": 10})
    app = create_app(s, store)
    headers = {"Authorization": f"Bearer {token(s)}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers
    ) as c:
        ok = await c.get(usage_path(), params={"period_length": 10})
        assert ok.status_code == 200, ok.text
        assert len(ok.json()) == 11
        too_long = await c.get(usage_path(), params={"period_length": 11})
        assert_validation_error(too_long, "period_length")
        # The default (365) is above this bound: asking nothing must not silently exceed it.
        default = await c.get(usage_path())
        assert default.status_code in (200, 422), default.text
        if default.status_code == 200:
            assert len(default.json()) <= 11
    s = settings.model_copy(update={"max_period_length": 1000})
    app = create_app(s, store)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=headers
    ) as c:
        resp = await c.get(usage_path(), params={"period_length": 1000})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()) == 1001


# ---------------------------------------------------------------------------------------------
# metrics


@pytest.fixture
async def busy(store: SketchStore) -> tuple[date, date]:
    """A login every day from ``first`` to today, so every metric is non-null in every row of
    ``first..today`` in both windows."""
    today = utc_today()
    first = today - timedelta(days=9)
    ws = Scope(ORG, WS)
    d = first
    while d <= today:
        await add_logins(store, ws, d, {"u0", f"u{d.day}"})
        d += timedelta(days=1)
    return first, today


def _params(first: date, last: date, **extra: Any) -> dict[str, Any]:
    return {"end_date": last.isoformat(), "period_length": (last - first).days, **extra}


@pytest.mark.parametrize(
    ("query", "asked"),
    [
        ("metrics=dau&metrics=mau", {"dau", "mau"}),
        ("metrics=dau,mau", {"dau", "mau"}),
        ("metrics=dau,mau&metrics=dau", {"dau", "mau"}),
        ("metrics=wau", {"wau"}),
        ("metrics=mau", {"mau"}),
        ("metrics=dau", {"dau"}),
        ("metrics=wau%2Cmau", {"wau", "mau"}),
        ("metrics=", {"dau", "wau", "mau"}),
        ("", {"dau", "wau", "mau"}),
        ("metrics=dau,wau,mau", {"dau", "wau", "mau"}),
    ],
)
@pytest.mark.parametrize("window", ["calendar", "rolling"])
async def test_metrics_selection(
    client: httpx.AsyncClient,
    busy: tuple[date, date],
    query: str,
    asked: set[str],
    window: str,
) -> None:
    first, last = busy
    params = _params(first, last, window=window)
    url = usage_path() + "?" + "&".join(
        [f"{k}={v}" for k, v in params.items()] + ([query] if query else [])
    )
    resp = await client.get(url)
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert_rows_shape(rows, first, last)
    for row in rows:
        for metric in ("dau", "wau", "mau"):
            if metric in asked:
                assert row[metric] is not None, (metric, row)
            else:
                assert row[metric] is None, (metric, row)


@pytest.mark.parametrize(
    "query",
    [
        "metrics=dau&metrics=yau",
        "metrics=dau,foo",
        "metrics=hau",
        "metrics=dau;mau",
        "metrics=dau%20mau",
        "metrics=*",
    ],
)
async def test_unknown_metric_is_422(client: httpx.AsyncClient, query: str) -> None:
    resp = await client.get(usage_path() + "?" + query)
    assert_validation_error(resp, "metrics")


# ---------------------------------------------------------------------------------------------
# Redis work per metric, counted on a Redis server of this module's own


READ_COMMANDS = ("pfcount", "scard", "get", "mget", "smembers", "sunion", "pfmerge", "sinter")


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@dataclass
class Counted:
    client: httpx.AsyncClient
    store: SketchStore
    admin: aioredis.Redis  # a separate connection that reads INFO commandstats
    app: Any


@pytest.fixture
async def counted(settings: Settings, private_redis: str) -> AsyncIterator[Counted]:
    s = settings.model_copy(update={"redis_url": SecretStr(private_redis)})
    async with open_store(s) as st:
        app = create_app(s, st)
        admin = aioredis.Redis.from_url(private_redis)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://t",
                headers={"Authorization": f"Bearer {token(s)}"},
            ) as c:
                yield Counted(c, st, admin, app)
        finally:
            await admin.aclose()


async def read_calls(admin: aioredis.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    out = {}
    for cmd in READ_COMMANDS:
        entry = stats.get(f"cmdstat_{cmd}")
        out[cmd] = int(entry["calls"]) if entry else 0
    return out


SNAPSHOT_GETS = 2  # settings, stored result (plus HMGET/HGETALL of meta, PTTL, EXISTS)


async def cost(
    admin: aioredis.Redis, c: httpx.AsyncClient, params: dict[str, Any]
) -> dict[str, int]:
    """Read commands Redis ran for one request's metrics (the server is this module's alone).

    Every request reads the scope's settings and stored result with exactly two GETs (and its
    meta with HMGET and HGETALL, its keys' presence with EXISTS); those reads are checked and
    taken out, so what remains is the metrics' own work."""
    before = await read_calls(admin)
    resp = await c.get(usage_path(), params=params)
    assert resp.status_code == 200, resp.text
    after = await read_calls(admin)
    assert after["get"] - before["get"] >= SNAPSHOT_GETS, "the snapshot reads are missing"
    before["get"] += SNAPSHOT_GETS
    return {k: after[k] - before[k] for k in READ_COMMANDS if after[k] != before[k]}


async def test_a_metric_not_asked_for_costs_no_redis_work(
    counted: Counted, settings: Settings
) -> None:
    c, st, admin = counted.client, counted.store, counted.admin
    today = utc_today()
    ws = Scope(ORG, WS)
    for i in range(4):
        await add_logins(st, ws, today - timedelta(days=i), {"u1", f"v{i}"})
    base = {"end_date": today.isoformat(), "period_length": 3}
    count_cmd = "pfcount" if settings.sketch_mode == "hll" else "scard"
    read_cmd = "get" if settings.sketch_mode == "hll" else "smembers"
    horizon = today - timedelta(days=settings.retention_days)
    span = settings.retention_days + 1  # the stored entries, horizon .. today
    weeks = len(periods_between(Granularity.WEEK, horizon, today))
    months = len(periods_between(Granularity.MONTH, horizon, today))
    cases = [  # (params, the one command it may use, bound on a first computation, after a login)
        ({"metrics": "dau"}, count_cmd, span, 1),
        ({"metrics": "dau", "window": "rolling"}, count_cmd, 0, 1),  # the DAU column is stored
        ({"metrics": "wau"}, count_cmd, weeks, 1),
        ({"metrics": "mau"}, count_cmd, months, 1),
        ({"metrics": "wau", "window": "rolling"}, read_cmd, span + 6, 7),
        ({"metrics": "mau", "window": "rolling"}, read_cmd, span + 29, 30),
    ]
    # The first computation of each column: only that column's commands, bounded by the span.
    for params, command, bound, _ in cases:
        got = await cost(admin, c, {**base, **params})
        assert set(got) <= {command}, (params, got)
        assert got.get(command, 0) <= bound, (params, got)
        if bound:
            assert got.get(command, 0) > 0, (params, got)
    # After one new login today, each column recomputes exactly the entries it changed: the
    # day's count, its week's and month's, the 7 or 30 days of today's rolling window.
    for i, (params, command, _, after_login) in enumerate(cases):
        await add_logins(st, ws, today, {f"new{i}"})
        got = await cost(admin, c, {**base, **params})
        assert got == {command: after_login}, (params, got)


async def test_ten_thousand_metric_values_are_422_without_redis_work(
    counted: Counted,
) -> None:
    c, admin = counted.client, counted.admin
    headers = {"authorization": c.headers["authorization"]}
    before = await read_calls(admin)
    for value in ("dau", "nope", ""):
        query = "&".join([f"metrics={value}"] * 10_000).encode()
        status, body = await raw_get(counted.app, usage_path(), query, headers)
        assert status == 422, body[:300]
        detail = json.loads(body)["detail"]
        assert ["query", "metrics"] in [e["loc"] for e in detail]
        assert len(body) < 10_000, "the 422 must not echo every value back"
    assert await read_calls(admin) == before


async def test_one_long_comma_separated_value_is_bounded(
    counted: Counted,
) -> None:
    c, admin = counted.client, counted.admin
    headers = {"authorization": c.headers["authorization"]}
    before = await read_calls(admin)
    for parts in (["x" * 50] * 2_000, ["dau"] * 20_000 + ["nope"]):
        query = ("metrics=" + ",".join(parts)).encode()
        status, body = await raw_get(counted.app, usage_path(), query, headers)
        assert status == 422, body[:300]
        assert ["query", "metrics"] in [e["loc"] for e in json.loads(body)["detail"]]
        assert len(body) < 10_000
    assert await read_calls(admin) == before


# ---------------------------------------------------------------------------------------------
# window


@pytest.fixture
async def calendar_differs(store: SketchStore) -> date:
    """A day whose own sketch, ISO week and month hold 2, 3 and 4 subjects: calendar and rolling
    windows give different answers on it."""
    d = utc_today() - timedelta(days=2)
    ws = Scope(ORG, WS)
    assert await store.add({
        (ws, day_of(d)): {"u1", "u2"},
        (ws, week_of(d)): {"u1", "u2", "u3"},
        (ws, month_of(d)): {"u1", "u2", "u3", "u4"},
    }) == []
    return d


async def test_window_default_is_calendar(
    client: httpx.AsyncClient, calendar_differs: date
) -> None:
    d = calendar_differs
    params: dict[str, Any] = {"end_date": d.isoformat(), "period_length": 0}
    default = await client.get(usage_path(), params=params)
    calendar = await client.get(usage_path(), params={**params, "window": "calendar"})
    rolling = await client.get(usage_path(), params={**params, "window": "rolling"})
    expected = [{"date": d.isoformat(), "dau": 2, "wau": 3, "mau": 4}]
    assert default.json() == expected
    assert calendar.json() == expected
    assert rolling.json() == [{"date": d.isoformat(), "dau": 2, "wau": 2, "mau": 2}]


@pytest.mark.parametrize("value", ["", "Rolling", "CALENDAR", "weekly", "rolling7", "1"])
async def test_unknown_window_is_422(client: httpx.AsyncClient, value: str) -> None:
    assert_validation_error(
        await client.get(usage_path(), params={"window": value}), "window"
    )


# ---------------------------------------------------------------------------------------------
# end_date


async def test_end_date_defaults_to_today_utc(client: httpx.AsyncClient) -> None:
    before = utc_today()
    resp = await client.get(usage_path(), params={"period_length": 3})
    after = utc_today()
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert rows[-1]["date"] in {before.isoformat(), after.isoformat()}
    last = date.fromisoformat(rows[-1]["date"])
    assert_rows_shape(rows, last - timedelta(days=3), last)


async def test_past_end_date_is_the_last_row(
    client: httpx.AsyncClient, calendar_differs: date
) -> None:
    end = calendar_differs + timedelta(days=1)
    resp = await client.get(usage_path(), params={"end_date": end.isoformat(), "period_length": 5})
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert rows[0]["date"] == (end - timedelta(days=5)).isoformat()
    assert rows[-1]["date"] == end.isoformat()
    assert_rows_shape(rows, end - timedelta(days=5), end)
    by_date = {r["date"]: r for r in rows}
    assert by_date[calendar_differs.isoformat()] == {
        "date": calendar_differs.isoformat(), "dau": 2, "wau": 3, "mau": 4
    }


async def test_end_date_today_is_allowed(client: httpx.AsyncClient) -> None:
    today = utc_today()
    params: dict[str, Any] = {"end_date": today.isoformat(), "period_length": 0}
    resp = await client.get(usage_path(), params=params)
    assert resp.status_code == 200, resp.text
    assert resp.json() == [{"date": today.isoformat(), "dau": None, "wau": None, "mau": None}]


async def test_end_date_tomorrow_is_422(client: httpx.AsyncClient) -> None:
    tomorrow = utc_today() + timedelta(days=1)
    resp = await client.get(usage_path(), params={"end_date": tomorrow.isoformat()})
    if utc_today() < tomorrow:  # not past midnight since
        assert_validation_error(resp, "end_date")


@pytest.mark.parametrize(
    "value",
    [
        "2026-13-01",
        "2026-02-30",
        "20261101",
        "20240101",
        "2024-1-5",
        "2024/01/05",
        "05-01-2024",
        "2024-01-05T00:00",
        "2024-W01-1",
        "2024001",
        "2024-001",
        "+2024-01-01",
        " 2024-01-01",
        "yesterday",
        "",
        "9999-12-31",
    ],
)
async def test_malformed_end_date_is_422(client: httpx.AsyncClient, value: str) -> None:
    resp = await client.get(usage_path(), params={"end_date": value})
    assert_validation_error(resp, "end_date")


@pytest.mark.parametrize(
    ("value", "period_length", "window"),
    [
        ("0001-01-01", 365, "calendar"),
        ("0001-12-31", 365, "calendar"),
        ("0001-01-05", 0, "rolling"),
        ("0001-01-01", 0, "calendar"),
        ("1970-01-01", 730, "calendar"),
        ("1970-01-01", 730, "rolling"),
    ],
)
async def test_ancient_end_date_is_never_a_500(
    client: httpx.AsyncClient, value: str, period_length: int, window: str
) -> None:
    """Rows before year 1 cannot exist: a 422 naming end_date, or rows of nulls, never a 500."""
    resp = await client.get(
        usage_path(),
        params={"end_date": value, "period_length": period_length, "window": window},
    )
    assert resp.status_code in (200, 422), resp.text
    if resp.status_code == 422:
        assert_validation_error(resp, "end_date")
    else:
        assert all((r["dau"], r["wau"], r["mau"]) == (None, None, None) for r in resp.json())


# ---------------------------------------------------------------------------------------------
# Unknown tenants and odd ids


@pytest.mark.parametrize(
    ("org", "ws"), [("nobody", "nothing"), (ORG, "no-such-ws"), ("no-such-org", WS)]
)
async def test_unknown_org_or_workspace_is_rows_of_nulls(
    client: httpx.AsyncClient, calendar_differs: date, org: str, ws: str
) -> None:
    resp = await client.get(usage_path(org, ws), params={"period_length": 30})
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert len(rows) == 31
    for row in rows:
        assert (row["dau"], row["wau"], row["mau"]) == (None, None, None), row


ODD_IDS: list[tuple[str, str]] = [
    ("a:b", "c"),
    ("a", "b:c"),
    ("{a}", "b"),
    ("{a", "}b"),
    ("a}", "{b"),
    ("a b", "c d"),
    (" a", "b "),
    ("ünïcødé-组织", "wś-😀"),
    ("a/b", "c"),
    ("a%2Fb", "c"),
    ("a", "b/c"),
    ("a", "b%2Fc"),
    ("100%", "x"),
    ("a", "b"),
    ("a?b", "c#d"),
    ("a+b", "c"),
    ("a b", "c"),  # vs "a+b": '+' is not a space in a path
    ("..", "."),
    ("x" * 128, "y" * 128),
]


async def test_ids_with_any_characters_are_served_and_isolated(
    client: httpx.AsyncClient, store: SketchStore
) -> None:
    d = utc_today() - timedelta(days=1)
    for n, (org, ws) in enumerate(ODD_IDS, start=1):
        await add_logins(store, Scope(org, ws), d, {f"u{i}" for i in range(n)})
    params: dict[str, Any] = {"end_date": d.isoformat(), "period_length": 0, "metrics": "dau"}
    for n, (org, ws) in enumerate(ODD_IDS, start=1):
        resp = await client.get(usage_path(org, ws), params=params)
        assert resp.status_code == 200, (org, ws, resp.text)
        assert resp.json() == [{"date": d.isoformat(), "dau": n, "wau": None, "mau": None}], (
            org, ws
        )


async def test_percent_encoded_slash_and_double_encoding_differ(
    client: httpx.AsyncClient, store: SketchStore
) -> None:
    d = utc_today() - timedelta(days=1)
    await add_logins(store, Scope("a/b", "w"), d, {"u1"})
    await add_logins(store, Scope("a%2Fb", "w"), d, {"u1", "u2"})
    params: dict[str, Any] = {"end_date": d.isoformat(), "period_length": 0, "metrics": "dau"}
    slash = await client.get("/api/v2/org/a%2Fb/workspace/w/metrics/usage", params=params)
    double = await client.get("/api/v2/org/a%252Fb/workspace/w/metrics/usage", params=params)
    lower = await client.get("/api/v2/org/a%2fb/workspace/w/metrics/usage", params=params)
    assert slash.json()[0]["dau"] == 1
    assert lower.json()[0]["dau"] == 1
    assert double.json()[0]["dau"] == 2
    # An unencoded slash is another path altogether, not the workspace "a/b".
    raw = await client.get("/api/v2/org/a/b/workspace/w/metrics/usage", params=params)
    assert raw.status_code == 404


async def test_admin_of_an_org_with_a_slash_reads_it_and_only_it(
    client: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    d = utc_today() - timedelta(days=1)
    await add_logins(store, Scope("a/b", "w"), d, {"u1"})
    headers = {"Authorization": f"Bearer {token(settings, role='admin', org='a/b')}"}
    params: dict[str, Any] = {"end_date": d.isoformat(), "period_length": 0}
    own = await client.get(usage_path("a/b", "w"), params=params, headers=headers)
    assert own.status_code == 200, own.text
    assert own.json()[0]["dau"] == 1
    for other in ("a%2Fb", "a", "a/b/"):
        resp = await client.get(usage_path(other, "w"), params=params, headers=headers)
        assert resp.status_code == 403, (other, resp.text)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/org/%FF/workspace/w/metrics/usage",
        "/api/v2/org/" + "x" * 129 + "/workspace/w/metrics/usage",
        "/api/v2/org/o/workspace/" + "y" * 129 + "/metrics/usage",
    ],
)
async def test_invalid_ids_are_422(client: httpx.AsyncClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status_code == 422, resp.text
    assert isinstance(resp.json()["detail"], list)


# ---------------------------------------------------------------------------------------------
# Redis down


@pytest.fixture
async def dead_store_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    dead = settings.model_copy(
        update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")}
    )
    async with open_store(dead) as st:
        app = create_app(dead, st)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            headers={"Authorization": f"Bearer {token(dead)}"},
        ) as c:
            yield c


@pytest.mark.parametrize(
    "params",
    [{}, {"metrics": "dau"}, {"window": "rolling"}, {"window": "rolling", "metrics": "mau"}],
)
async def test_redis_down_is_503_with_retry_after(
    dead_store_client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    resp = await dead_store_client.get(usage_path(), params={"period_length": 3, **params})
    assert resp.status_code == 503, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert set(resp.json()) == {"detail"}
    assert isinstance(resp.json()["detail"], str)
    retry_after = resp.headers.get("retry-after")
    assert retry_after is not None
    assert retry_after.isdigit()
    assert "Traceback" not in resp.text
    assert 'File "' not in resp.text


async def test_redis_down_still_checks_auth_and_params_first(
    dead_store_client: httpx.AsyncClient,
) -> None:
    no_token = await dead_store_client.get(usage_path(), headers={"Authorization": ""})
    assert no_token.status_code == 401
    bad = await dead_store_client.get(usage_path(), params={"period_length": -1})
    assert bad.status_code == 422


async def test_redis_down_readyz_503_healthz_200(dead_store_client: httpx.AsyncClient) -> None:
    ready = await dead_store_client.get("/readyz")
    assert ready.status_code == 503
    assert set(ready.json()) == {"detail"}
    assert "Traceback" not in ready.text
    health = await dead_store_client.get("/healthz")
    assert health.status_code == 200


async def test_redis_up_readyz_200(client: httpx.AsyncClient) -> None:
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200
