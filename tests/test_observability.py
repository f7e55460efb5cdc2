"""The API's Prometheus series, request ids and log hygiene (api/observability.py).

Requests go through the whole application (create_app with every middleware and exception
handler, its lifespan running) over httpx's ASGI transport, against the session's real Redis; the
503 cases use a store whose Redis port nobody listens on. The series are scraped as Prometheus
would: over TCP from the metrics listener the lifespan opens (``API_METRICS_PORT``), never from
the API's own routes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis import exceptions as redis_exceptions

from api.app import create_app
from api.auth import issue_token
from api.observability import current_request_id, sane_request_id
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope
from sketches.periods import periods_holding, utc_today
from sketches.store import SketchStore
from tests.conftest import unique
from tests.support.servers import free_port
from usage_metrics.logs import JsonFormatter, TextFormatter

ORG = "acme"
WS = "ws/1 ü"  # a "/" and unicode: the metric labels must hold the template, never the ids
USAGE_TEMPLATE = "/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage"
USAGE_PATH = "/api/v2/org/acme/workspace/ws%2F1%20%C3%BC/metrics/usage"
SECRET = "observability-secret-at-least-32-bytes!"


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """One sketch mode is enough here: nothing in this module depends on how counts are kept."""
    return Settings(
        redis_url=redis_url,
        redis_key_prefix=unique("obs"),
        sketch_mode="exact",
        jwt_secret=SECRET,
        _env_file=None,
    )


def token(settings: Settings, role: str = "admin", org: str | None = ORG) -> str:
    return issue_token(settings, role=role, org_id=org, ttl_seconds=600, now=time.time())


@asynccontextmanager
async def running(
    settings: Settings, store: Any, **transport: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The application with its lifespan, its metrics listener on a free loopback port."""
    app = create_app(settings.model_copy(update={"api_metrics_port": 0}), store)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **transport),
                          base_url="http://api") as c,
    ):
        yield c


def metrics_address(client: httpx.AsyncClient) -> tuple[str, int]:
    app = client._transport.app  # type: ignore[attr-defined]
    host, port = app.state.metrics_server.sockets[0].getsockname()[:2]
    return str(host), int(port)


async def scrape(client: httpx.AsyncClient) -> str:
    """``GET /metrics`` from the application's metrics listener, over TCP."""
    host, port = metrics_address(client)
    async with httpx.AsyncClient() as prometheus:
        response = await prometheus.get(f"http://{host}:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.fixture
async def client(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    async with running(settings, store) as c:
        yield c


@pytest.fixture
async def dead_store_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app over a store whose Redis is not there: every usage request is a 503."""
    dead = settings.model_copy(
        update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")}
    )
    async with open_store(dead) as store, running(settings, store) as c:
        yield c


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text, or None when it is absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        series, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', series))
        if series.split("{")[0] == name and found == labels:
            return float(value)
    return None


async def test_metrics_count_requests_by_route_template_and_status(
    client: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    day = utc_today()
    await store.add({(Scope(ORG, WS), p): {"u1", "u2"} for p in periods_holding(day)})
    auth = {"Authorization": f"Bearer {token(settings)}"}

    ok = await client.get(USAGE_PATH, params={"period_length": 0}, headers=auth)
    assert ok.status_code == 200, ok.text
    assert ok.json()[0]["dau"] == 2
    assert (await client.get(USAGE_PATH)).status_code == 401
    assert (await client.get("/no/such/page")).status_code == 404

    text = await scrape(client)
    route = {"method": "GET", "route": USAGE_TEMPLATE}
    assert sample(text, "usage_metrics_api_requests_total", **route, status="200") == 1
    assert sample(text, "usage_metrics_api_requests_total", **route, status="401") == 1
    assert sample(
        text, "usage_metrics_api_requests_total", method="GET", route="unmatched", status="404"
    ) == 1
    assert sample(
        text, "usage_metrics_api_request_duration_seconds_count", **route, status="200"
    ) == 1
    assert sample(
        text, "usage_metrics_api_request_duration_seconds_bucket", **route, status="200", le="+Inf"
    ) == 1
    total = sample(text, "usage_metrics_api_request_duration_seconds_sum", **route, status="200")
    assert total is not None
    assert 0 < total < 10
    # The concrete ids never become label values; nor does the unknown path.
    assert "ws/1" not in text
    assert "ws%2F1" not in text
    assert "/no/such/page" not in text
    assert sample(text, "usage_metrics_api_redis_errors_total", route=USAGE_TEMPLATE) is None
    # Process series of the default registry are served too.
    assert "process_cpu_seconds_total" in text or "python_info" in text


async def test_metrics_are_served_on_their_own_listener_never_on_the_api_port(
    client: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    """The API port faces callers; the series name its routes, statuses and load, so they are
    served only where the operator binds API_METRICS_PORT (issue 16)."""
    on_api = await client.get("/metrics")
    assert on_api.status_code == 404
    assert "usage_metrics_api" not in on_api.text
    host, port = metrics_address(client)
    assert host == "127.0.0.1"  # API_METRICS_HOST's default: loopback only
    text = await scrape(client)
    assert sample(text, "usage_metrics_api_requests_total", method="GET", route="unmatched",
                  status="404") == 1  # the API port's 404 above; the scrape is not a request
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as other:
        assert (await other.get("/")).status_code == 404
        assert (await other.get("/api/v2/org/acme/metrics/usage")).status_code == 404
        assert (await other.post("/metrics", content=b"x")).status_code == 405
        head = await other.head("/metrics")
        assert head.status_code == 200
        assert head.content == b""
    # A client that opens the port and sends nothing gets nothing, and breaks nothing.
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no end of the head
    await writer.drain()
    writer.close()
    assert "usage_metrics_api_requests_total" in await scrape(client)
    # Without API_METRICS_PORT nothing serves the series at all.
    app = create_app(settings, store)
    async with app.router.lifespan_context(app):
        assert getattr(app.state, "metrics_server", None) is None


async def test_a_metrics_port_in_use_is_one_clear_error_and_the_api_still_answers(
    settings: Settings, store: SketchStore, caplog: pytest.LogCaptureFixture
) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        app = create_app(settings.model_copy(update={"api_metrics_port": port}), store)
        caplog.set_level(logging.INFO)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as c,
        ):
            assert (await c.get("/healthz")).status_code == 200
            assert getattr(app.state, "metrics_server", None) is None
    finally:
        taken.close()
        await taken.wait_closed()
    [record] = [r for r in caplog.records if "API_METRICS_PORT" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert f"127.0.0.1:{port}" in record.getMessage()
    assert record.exc_info is None  # a sentence, not a traceback


async def test_request_id_is_echoed_when_sane(client: httpx.AsyncClient) -> None:
    rid = "req-2026.11.24:abc_DEF/1+2=3@edge"
    r = await client.get("/healthz", headers={"X-Request-ID": rid})
    assert r.status_code == 200
    assert r.headers["X-Request-ID"] == rid
    assert current_request_id() is None  # the id does not outlive its request


async def test_request_id_is_generated_when_missing(client: httpx.AsyncClient) -> None:
    first = (await client.get("/healthz")).headers["X-Request-ID"]
    second = (await client.get("/healthz")).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert re.fullmatch(r"[0-9a-f]{32}", second)
    assert first != second


@pytest.mark.parametrize(
    "given",
    ["", "has space", "x" * 129, "<script>", "a;b", "ünïcode", "tab\there"],
)
async def test_request_id_is_replaced_when_not_sane(client: httpx.AsyncClient, given: str) -> None:
    r = await client.get("/healthz", headers=[(b"X-Request-ID", given.encode())])
    echoed = r.headers["X-Request-ID"]
    assert echoed != given
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_sane_request_id_rules() -> None:
    assert sane_request_id("abc-123") == "abc-123"
    assert sane_request_id("x" * 128) == "x" * 128
    assert sane_request_id("x" * 129) is None
    assert sane_request_id("a\nb") is None
    assert sane_request_id(None) is None
    assert current_request_id() is None  # outside a request


async def test_error_responses_carry_a_request_id(client: httpx.AsyncClient) -> None:
    r = await client.get(USAGE_PATH, headers={"X-Request-ID": "err-401"})
    assert r.status_code == 401
    assert r.headers["X-Request-ID"] == "err-401"
    r = await client.get(USAGE_PATH, params={"window": "weekly"}, headers={"X-Request-ID": "e422"})
    assert r.headers["X-Request-ID"] == "e422"


async def test_a_503_counts_a_redis_error_and_logs_with_the_request_id(
    dead_store_client: httpx.AsyncClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    secret_token = token(settings)
    caplog.set_level(logging.DEBUG)
    r = await dead_store_client.get(
        USAGE_PATH,
        headers={"Authorization": f"Bearer {secret_token}", "X-Request-ID": "rid-503-check"},
    )
    assert r.status_code == 503, r.text
    assert r.headers["X-Request-ID"] == "rid-503-check"

    # The route's own line (the start-up policy check, which cannot reach Redis either, says
    # "store unavailable at ..." from outside any request).
    failing = [rec for rec in caplog.records if rec.getMessage().startswith("store unavailable:")]
    assert failing, [rec.getMessage() for rec in caplog.records]
    assert all(getattr(rec, "request_id", None) == "rid-503-check" for rec in failing)
    # Both formatters of usage_metrics.logs print it.
    assert '"request_id":"rid-503-check"' in JsonFormatter().format(failing[0])
    assert "request_id=rid-503-check" in TextFormatter().format(failing[0])

    text = await scrape(dead_store_client)
    assert sample(text, "usage_metrics_api_redis_errors_total", route=USAGE_TEMPLATE) == 1
    assert sample(text, "usage_metrics_api_busy_total", route=USAGE_TEMPLATE) is None
    assert sample(
        text, "usage_metrics_api_requests_total", method="GET", route=USAGE_TEMPLATE, status="503"
    ) == 1
    assert_never_logged(caplog, secret_token, SECRET)


async def test_an_unhandled_error_logs_its_request_id(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    class Unreachable:
        """The client's one use at start-up (the eviction-policy check): Redis does not answer,
        so the check waits in the background and the requests meet the store's bug."""

        async def config_get(self, *args: Any) -> Any:
            raise redis_exceptions.ConnectionError("nobody listens")

    class BrokenStore:
        """Fails the way a bug fails: not a StoreUnavailable, so it becomes a plain 500."""

        client = Unreachable()

        def __getattr__(self, name: str) -> Any:
            async def fail(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("bug in the store")

            return fail

    caplog.set_level(logging.DEBUG)
    secret_token = token(settings)
    async with running(settings, BrokenStore(), raise_app_exceptions=False) as c:
        r = await c.get(
            USAGE_PATH,
            headers={"Authorization": f"Bearer {secret_token}", "X-Request-ID": "rid-500"},
        )
        assert r.status_code == 500
        assert "Traceback" not in r.text
        text = await scrape(c)
    logged = [rec for rec in caplog.records if "unhandled error" in rec.getMessage()]
    assert logged
    assert getattr(logged[0], "request_id", None) == "rid-500"
    assert sample(
        text, "usage_metrics_api_requests_total", method="GET", route=USAGE_TEMPLATE, status="500"
    ) == 1
    assert_never_logged(caplog, secret_token, SECRET)


async def test_tokens_never_reach_the_logs(
    client: httpx.AsyncClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = [
        token(settings),  # 200
        token(settings, role="basic"),  # 403
        token(settings, org="other-org"),  # 403
        "not.a.jwt-but-still-a-secret-value",  # 401
        token(settings.model_copy(update={"jwt_secret": SecretStr("x" * 40)})),  # 401: signature
    ]
    for t in tokens:
        await client.get(
            USAGE_PATH, params={"period_length": 2}, headers={"Authorization": f"Bearer {t}"}
        )
    await client.get(USAGE_PATH, params={"period_length": -1},
                     headers={"Authorization": f"Bearer {tokens[0]}"})
    await scrape(client)
    assert_never_logged(caplog, *tokens, SECRET)


def assert_never_logged(caplog: pytest.LogCaptureFixture, *secrets: str) -> None:
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    for rec in caplog.records:
        rendered = " ".join(
            [json_fmt.format(rec), text_fmt.format(rec), repr(rec.args), repr(rec.__dict__)]
        )
        for s in secrets:
            assert s not in rendered, f"a secret reached the log: {rec.getMessage()!r}"
            # A JWT's signature alone is a credential too.
            tail = s.rsplit(".", 1)[-1]
            if len(tail) >= 20:
                assert tail not in rendered
