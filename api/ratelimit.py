"""Per-caller rate limiting of the ``/api/`` routes: a token bucket per caller.

- **Who is a caller.** A request whose bearer token verifies is the token's ``sub`` within its
  ``org_id``; any other request (no token, a token that does not verify) is its client's IP
  address, as the server sees the peer (``usage-metrics api`` runs uvicorn without proxy headers,
  so that address cannot be forged with ``X-Forwarded-For``). Unverified claims never pick a
  bucket: otherwise a caller could get a fresh bucket per request by writing a new ``sub``.
- **The bucket.** It holds up to ``RATE_LIMIT_BURST`` requests and refills at
  ``RATE_LIMIT_PER_MINUTE`` per minute. A request finding it empty is answered ``429`` with a JSON
  body (``{"detail": ...}``) and ``Retry-After``: the whole seconds until a request will pass.
  ``0`` in either setting turns the limiter off.
- **Per API process.** The buckets live in this process's memory: N API processes behind a load
  balancer let a caller through up to N times the rate. That is deliberate: a limiter that needs
  Redis would fail exactly when Redis is down and callers retry hardest. A fleet-wide limit
  belongs at the load balancer or gateway.
- **Bounded.** At most ``MAX_CALLERS`` buckets are kept; beyond that the least recently seen are
  dropped, which only ever forgives a caller, never blocks one that did nothing.

Health, readiness, metrics and dashboard files are never limited: probes must always answer.

**Charged by cost** (issue 11). A request takes as many tokens as its estimated cost, read from
the query string before anything else runs (``usage_cost``), in *units*: one unit is a 30-day
calendar query. The model counts what a request's rows cost to serve: one per row plus every
week and month back to the retention horizon (the forward fill; about 142 at 800 days). So a
730-day query costs 5.1 units, a 365-day one 2.9, a 30-day one 1 (every request at least 1),
whatever its window: both windows are served from stored per-day results
(``sketches.results``), where a rolling row costs what a calendar row does. (Before stored
results a rolling 730-day query recomputed 760 sketches and was charged 92 units.) A cost above
the burst takes the whole burst. Other ``/api/`` requests cost 1.

**Total, and charged first** (issue 16). The cost is read before authentication, from bytes any
client chooses, so it must never fail: ``?period_length=²`` (``str.isdigit`` is true, ``int()``
raises) once made every such request a 500 with two tracebacks, and no request was charged. The
model reads ``period_length`` exactly as the route will: the last of repeated values, through
the same pydantic validation (``" 730"``, ``"+730"``, ``"7_30"`` and ``"730.0"`` are all 730
there, so they are charged 730 days here). A value the route refuses (422) is charged the
default period; one above ``MAX_PERIOD_LENGTH`` is charged the maximum. Nothing in the limiter
runs before the charge that could raise.

**Bounded per process.** A token bucket bounds each caller's rate, not what all callers together
run at once. What is expensive now is not a shape of request but a *recompute*: the first
answer after a backfill or a rebuild reads every day's sketch (tens of megabytes for a large
workspace). ``sketches.admission`` lets at most ``API_MAX_EXPENSIVE_QUERIES`` such heavy
recomputes (more than ``HEAVY_READS`` sketch reads) run at once per process, shared fairly
between orgs, with a short bounded wait for a slot before a ``503`` with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from pydantic import Field, TypeAdapter, ValidationError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import TokenVerifier, caller_of
from sketches.config import Settings

LIMITED_PREFIX = "/api/"
MAX_CALLERS = 100_000

USAGE_PREFIX = "/api/v2/org/"
USAGE_SUFFIX = "/metrics/usage"
# The cost model (module docstring), in sketch counts; a unit is a 30-day calendar query.
DEFAULT_PERIOD_LENGTH = 365
PERIOD_LENGTH = "period_length"
# The route's own reading of the parameter (api.routes.usage_params: an int, at least 0).
_PERIOD_LENGTH: TypeAdapter[int] = TypeAdapter(Annotated[int, Field(ge=0)])


class TokenBuckets:
    """One token bucket per key. ``take`` answers 0 when the request may pass, else the seconds
    until it would."""

    def __init__(
        self,
        per_minute: int,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = MAX_CALLERS,
    ) -> None:
        if per_minute <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.max_callers = max_callers
        # key -> [tokens, time of the last refill]; least recently seen first.
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, cost: float = 1.0) -> float:
        """Take ``cost`` tokens (at most the burst: a dearer request needs a full bucket)."""
        cost = min(cost, self.burst)
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = [self.burst, now]
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= cost:
            bucket[0] -= cost
            return 0.0
        return (cost - bucket[0]) / self.rate


class CostModel:
    """The estimated cost of a request, in units of a 30-day calendar query (module docstring).
    Reads only the path and the query string: a request that would be refused as invalid is
    charged what it asks for, and is then answered 422 by the route."""

    def __init__(self, retention_days: int, max_period_length: int) -> None:
        self.max_rows = max_period_length + 1
        # Week and month keys back to the retention horizon, counted by every calendar query.
        self.fill = retention_days / 7 + retention_days / 30
        self.unit = self._calendar(31)

    def _calendar(self, rows: int) -> float:
        return rows + self.fill

    def cost(self, scope: Scope) -> float:
        path = str(scope.get("path", ""))
        if not (path.startswith(USAGE_PREFIX) and path.endswith(USAGE_SUFFIX)):
            return 1.0
        return max(1.0, self._calendar(self.rows(scope.get("query_string", b""))) / self.unit)

    def rows(self, query_string: object) -> int:
        """The rows the route would serve for this query string. The string is split as
        Starlette splits it for the route (latin-1, then ``parse_qsl`` keeping blank values), and
        a repeated parameter counts by its last value, as FastAPI reads a scalar parameter."""
        raw = query_string if isinstance(query_string, bytes) else b""
        value: str | None = None
        for name, got in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
            if name == PERIOD_LENGTH:
                value = got
        if value is None:
            return DEFAULT_PERIOD_LENGTH + 1
        try:
            days = _PERIOD_LENGTH.validate_python(value)
        except ValidationError:
            return DEFAULT_PERIOD_LENGTH + 1  # the route answers 422
        return min(days + 1, self.max_rows)  # above the maximum: 422 too, charged the most


def retry_after(seconds: float) -> int:
    """Whole seconds a client should wait (never 0: ``Retry-After: 0`` invites a busy loop)."""
    return max(1, math.ceil(seconds))


class RateLimitMiddleware:
    """Pure ASGI, so that a refused request costs no routing, no dependency and no Redis."""

    def __init__(
        self, app: ASGIApp, buckets: TokenBuckets, verifier: TokenVerifier,
        model: CostModel | None = None, prefix: str = LIMITED_PREFIX,
    ) -> None:
        self.app = app
        self.buckets = buckets
        self.verifier = verifier
        self.model = model
        self.prefix = prefix

    def caller(self, scope: Scope) -> Hashable:
        who = caller_of(scope, self.verifier)
        if who is not None:
            return ("token", who.subject, who.org_id)
        client = scope.get("client")
        return ("ip", client[0] if client else "unknown")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        cost = 1.0 if self.model is None else self.model.cost(scope)
        wait = self.buckets.take(self.caller(scope), cost)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        seconds = retry_after(wait)
        refusal = JSONResponse(
            {"detail": f"rate limit exceeded: retry in {seconds} s"},
            status_code=429,
            headers={"Retry-After": str(seconds)},
        )
        await refusal(scope, receive, send)


RESPONSE_429: dict[str, Any] = {
    "description": "Too many requests from this caller: wait Retry-After seconds",
    "headers": {
        "Retry-After": {
            "description": "seconds until a request will pass",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"detail": {"type": "string"}},
                "required": ["detail"],
            },
            "example": {"detail": "rate limit exceeded: retry in 2 s"},
        }
    },
}


def _document_429(app: FastAPI, prefix: str) -> None:
    """Add the 429 to every limited operation of the OpenAPI schema (the middleware is not a
    route, so FastAPI cannot know of it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith(prefix):
                continue
            for operation in operations.values():
                if isinstance(operation, dict) and "responses" in operation:
                    operation["responses"].setdefault("429", RESPONSE_429)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, settings: Settings, verifier: TokenVerifier) -> None:
    """Limit ``app``'s ``/api/`` routes with token buckets, unless the rate settings are 0 (the
    bound on heavy recomputes is ``sketches.results``'s)."""
    model = CostModel(settings.retention_days, settings.max_period_length)
    app.state.cost_model = model
    if settings.rate_limit_per_minute <= 0 or settings.rate_limit_burst <= 0:
        return
    buckets = TokenBuckets(settings.rate_limit_per_minute, settings.rate_limit_burst)
    app.state.rate_limits = buckets
    app.add_middleware(RateLimitMiddleware, buckets=buckets, verifier=verifier, model=model)
    _document_429(app, LIMITED_PREFIX)
