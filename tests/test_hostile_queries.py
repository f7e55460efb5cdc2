"""Hostile query strings, paths and headers against the whole application (issue 16).

``?period_length=²`` (``str.isdigit`` is true, ``int()`` raises) once crashed the rate limiter's
cost model before authentication: a 500 with two tracebacks, and the request was never charged,
so one anonymous client could flood the logs without meeting its limit. The property here sends
arbitrary requests straight into the ASGI application (raw bytes in the scope, as a server hands
them over: repeated and percent-encoded parameters, unicode digits, huge numbers, odd headers),
with and without a token, over the session's real Redis, and watches the limiter's own buckets:

- no request is answered 5xx, and nothing is logged at ERROR (no traceback);
- every ``/api/`` request is charged before anything else runs: the tokens taken from the
  buckets grow by at least one unit per request;
- a usage request that is served is charged exactly what it served: the cost of its rows.

The buckets' clock is frozen (the real ``TokenBuckets`` of the application, its clock pinned), so
that whatever a request takes stays taken and the charges add up exactly; the burst is large
enough that no request is refused for its rate.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_from_bytes, unquote

import jwt
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from api.app import create_app
from api.auth import issue_token
from api.ratelimit import CostModel, TokenBuckets
from sketches.config import Settings
from sketches.store import SketchStore

SECRET = "hostile-queries-secret-at-least-32-bytes"
BURST = 10**9
USAGE = "/api/v2/org/acme/workspace/ws-1/metrics/usage"
ORG_USAGE = "/api/v2/org/acme/metrics/usage"


@pytest.fixture
def sketch_mode() -> str:
    return "exact"  # a matter of the API, not of sketches


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    return Settings(redis_url=redis_url, redis_key_prefix=key_prefix, sketch_mode="exact",
                    jwt_secret=SECRET, rate_limit_per_minute=60, rate_limit_burst=BURST,
                    _env_file=None)


# ---------------------------------------------------------------- what a request is made of


def _signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _tokens(settings: Settings) -> list[bytes | None]:
    now = int(time.time())
    good = {"sub": "alice", "role": "admin", "org_id": "acme", "iat": now, "exp": now + 600}
    nested = base64.urlsafe_b64encode(b"[" * 5000).rstrip(b"=").decode()
    made = [
        issue_token(settings, role="admin", org_id="acme", ttl_seconds=600, now=now),
        issue_token(settings, role="superadmin", org_id=None, ttl_seconds=600, now=now),
        issue_token(settings, role="basic", org_id="acme", ttl_seconds=600, now=now),
        issue_token(settings, role="curator", org_id="globex", ttl_seconds=600, now=now),
        _signed(good | {"exp": str(now + 600)}),
        _signed(good | {"exp": 10**20}),
        _signed(good | {"exp": 1e308}),
        _signed(good | {"exp": [now + 600]}),
        _signed(good | {"exp": True}),
        _signed(good | {"iat": "yesterday"}),
        _signed(good | {"nbf": {"a": 1}}),
        _signed(good | {"sub": ["alice"]}),
        _signed(good | {"role": None, "org_id": 7}),
        f"{nested}.e30.c2ln",
        "not-a-jwt",
        "a.b.c",
        "",
    ]
    return [None, *(t.encode() for t in made)]


DIGITISH = st.sampled_from([
    "²", "٣", "١٢", "１２", "𝟕𝟑𝟎", "7_30", " 730", "+730", "730.0", "730.5", "1e3", "0x10",
    "", "-1", "-0", "nan", "inf", "9" * 40, "9" * 5000, "0" * 300 + "7", "730\x00", "\t12\n",
    "99999999", "9999999", "731", "730", "0", "٠",
])
NUMBERS = st.integers(-(10**40), 10**40).map(str)
VALUES = st.one_of(DIGITISH, NUMBERS, st.text(max_size=16),
                   st.from_regex(r"[0-9\u0660-\u0669\u00b2\uff10-\uff19 _+.eE-]{0,12}",
                                 fullmatch=True))
NAMES = st.one_of(
    st.sampled_from(["period_length", "metrics", "window", "end_date", "format",
                     "period%5Flength", "period_length[]", "PERIOD_LENGTH", "period_length "]),
    st.text(max_size=8),
)


@st.composite
def query_strings(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=80))  # anything at all
    pairs = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    encode = draw(st.sampled_from(["raw", "percent", "plus"]))
    parts = []
    for name, value in pairs:
        if encode == "raw":
            parts.append(f"{name}={value}".encode("utf-8", "surrogatepass"))
        elif encode == "percent":
            parts.append(f"{quote(name, safe='%')}={quote(value, safe='')}".encode())
        else:
            parts.append(f"{name}={value.replace(' ', '+')}".encode("utf-8", "surrogatepass"))
    return draw(st.sampled_from([b"&", b";", b"&&"])).join(parts)


SEGMENTS = st.one_of(
    st.sampled_from([b"acme", b"ws-1", b"globex", b"a%2Fb", b"%FF", b"%", b"..", b""]),
    st.binary(min_size=1, max_size=12).map(lambda b: quote_from_bytes(b, safe="").encode()),
    st.binary(min_size=1, max_size=12),
)


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["usage", "org", "settings", "odd"]))
    org = draw(st.one_of(st.just(b"acme"), SEGMENTS))
    ws = draw(st.one_of(st.just(b"ws-1"), SEGMENTS))
    if kind == "usage":
        return b"/api/v2/org/" + org + b"/workspace/" + ws + b"/metrics/usage"
    if kind == "org":
        return b"/api/v2/org/" + org + b"/metrics/usage"
    if kind == "settings":
        return b"/api/v2/org/" + org + b"/workspace/" + ws + b"/settings"
    return b"/api/" + draw(st.binary(max_size=30))


HEADER_NAMES = st.one_of(
    st.sampled_from([b"accept", b"x-request-id", b"content-type", b"content-length",
                     b"authorization", b"host", b"cookie"]),
    st.binary(min_size=1, max_size=12),
)


@st.composite
def requests(draw: st.DrawFn, tokens: list[bytes | None]) -> dict[str, Any]:
    headers = draw(st.lists(st.tuples(HEADER_NAMES, st.binary(max_size=60)), max_size=4))
    token = draw(st.sampled_from(tokens))
    if token is not None:
        scheme = draw(st.sampled_from([b"Bearer ", b"bearer ", b"Bearer  ", b"Basic "]))
        headers.append((b"authorization", scheme + token))
    return {
        "method": draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "PUT", "PATCH", "POST"])),
        "raw_path": draw(paths()),
        "query_string": draw(query_strings()),
        "headers": headers,
    }


# ---------------------------------------------------------------- calling the ASGI app


async def call(app: Any, request: dict[str, Any]) -> tuple[int, bytes]:
    """One request through the application as a server would hand it over; an exception that
    escapes the application is a 500, as the server would make it."""
    raw_path: bytes = request["raw_path"]
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": request["method"], "scheme": "http",
        "path": unquote(raw_path.decode("latin-1"), encoding="utf-8", errors="replace"),
        "raw_path": raw_path, "query_string": request["query_string"], "root_path": "",
        "headers": request["headers"], "client": ("198.51.100.7", 40000),
        "server": ("api", 80),
    }
    messages: list[dict[str, Any]] = []
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    try:
        await app(scope, receive, send)
    except Exception:  # noqa: BLE001 - the property is that nothing escapes
        return 500, b""
    starts = [m for m in messages if m["type"] == "http.response.start"]
    assert len(starts) == 1, messages
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return int(starts[0]["status"]), body


def taken(buckets: TokenBuckets) -> float:
    """Tokens taken from every bucket so far (the clock is frozen: nothing refills)."""
    return sum(buckets.burst - tokens for tokens, _ in buckets._buckets.values())


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[_Errors]:
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


# ---------------------------------------------------------------- the property


@pytest.fixture
def app(settings: Settings, store: SketchStore) -> Any:
    application = create_app(settings, store)
    application.state.rate_limits.clock = lambda: 0.0  # nothing refills: charges add up
    return application


@hyp_settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
@given(data=st.data())
@example(data=None)  # the request of the issue, first and by name
async def test_hostile_query_values_and_headers_never_5xx_and_every_request_is_charged(
    app: Any, settings: Settings, errors: _Errors, data: st.DataObject | None
) -> None:
    model = CostModel(settings.retention_days, settings.max_period_length)
    tokens = _tokens(settings)
    if data is None:
        batch = [{"method": "GET", "raw_path": USAGE.encode(), "headers": [],
                  "query_string": "period_length=²".encode()},
                 {"method": "GET", "raw_path": USAGE.encode(),
                  "query_string": b"period_length=%C2%B2",
                  "headers": [(b"authorization", b"Bearer " + (tokens[1] or b""))]}]
    else:
        batch = data.draw(st.lists(requests(tokens), min_size=1, max_size=3))
    buckets: TokenBuckets = app.state.rate_limits
    for request in batch:
        before = taken(buckets)
        status, body = await call(app, request)
        charged = taken(buckets) - before
        assert status < 500, (status, body[:300], request)
        assert charged >= 1.0 - 1e-9, (charged, request)
        path = request["raw_path"]
        if status == 200 and request["method"] == "GET" and path.endswith(b"/metrics/usage"):
            rows = len(json.loads(body)) if body.startswith(b"[") else body.count(b"\r\n") - 1
            served = {"type": "http", "path": USAGE,
                      "query_string": f"period_length={rows - 1}".encode()}
            assert charged == pytest.approx(model.cost(served)), (charged, rows, request)
    assert not errors.records, [r.getMessage() for r in errors.records]


PERIOD_VALUES = st.one_of(
    DIGITISH, st.integers(-5, 800).map(str),
    st.from_regex(r"[ \t]{0,2}[+]?[0-9_]{1,4}(\.0)?[ \t]{0,2}", fullmatch=True),
)


@st.composite
def period_queries(draw: st.DrawFn) -> bytes:
    values = draw(st.lists(PERIOD_VALUES, min_size=1, max_size=3))
    names = [draw(st.sampled_from(["period_length", "period%5Flength", "period%5flength"]))
             for _ in values]
    parts = [f"{n}={quote(v, safe='') if draw(st.booleans()) else v}" for n, v in zip(
        names, values, strict=True)]
    extra = draw(st.sampled_from(["", "window=rolling", "metrics=dau", "format=csv"]))
    return "&".join([*parts, extra] if extra else parts).encode("utf-8", "surrogatepass")


@hyp_settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(query=period_queries(), org_level=st.booleans())
@example(query=b"period_length=%20730", org_level=False)
@example(query=b"period_length=7_30&window=rolling", org_level=True)
@example(query=b"period_length=5&period_length=730.0", org_level=False)
async def test_a_served_request_is_charged_for_the_rows_it_served(
    app: Any, settings: Settings, errors: _Errors, query: bytes, org_level: bool
) -> None:
    """Whatever spelling of ``period_length`` the route accepts (``" 730"``, ``"+730"``,
    ``"7_30"``, ``"730.0"``, repeated: the last one counts), the limiter charged the rows the
    route then served: a cost model that reads the value differently lets a caller pay for 366
    rows and get 731."""
    model = CostModel(settings.retention_days, settings.max_period_length)
    token = issue_token(settings, role="admin", org_id="acme", ttl_seconds=600, now=time.time())
    buckets: TokenBuckets = app.state.rate_limits
    before = taken(buckets)
    status, body = await call(app, {
        "method": "GET", "raw_path": (ORG_USAGE if org_level else USAGE).encode(),
        "query_string": query, "headers": [(b"authorization", f"Bearer {token}".encode())],
    })
    charged = taken(buckets) - before
    assert status in (200, 422), (status, body[:300])
    if status == 200:
        rows = len(json.loads(body)) if body.startswith(b"[") else body.count(b"\r\n") - 1
        served = {"type": "http", "path": USAGE,
                  "query_string": f"period_length={rows - 1}".encode()}
        assert charged == pytest.approx(model.cost(served)), (charged, rows, query)
    else:
        assert charged >= 1.0
    assert not errors.records, [r.getMessage() for r in errors.records]
