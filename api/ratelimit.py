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
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import Forbidden, TokenVerifier, Unauthenticated
from usage_metrics.config import Settings

LIMITED_PREFIX = "/api/"
MAX_CALLERS = 100_000

_AUTHORIZATION = b"authorization"


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

    def take(self, key: Hashable) -> float:
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
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate


def retry_after(seconds: float) -> int:
    """Whole seconds a client should wait (never 0: ``Retry-After: 0`` invites a busy loop)."""
    return max(1, math.ceil(seconds))


class RateLimitMiddleware:
    """Pure ASGI, so that a refused request costs no routing, no dependency and no Redis."""

    def __init__(
        self, app: ASGIApp, buckets: TokenBuckets, verifier: TokenVerifier,
        prefix: str = LIMITED_PREFIX,
    ) -> None:
        self.app = app
        self.buckets = buckets
        self.verifier = verifier
        self.prefix = prefix

    def caller(self, scope: Scope) -> Hashable:
        for name, value in scope.get("headers", ()):
            if name.lower() != _AUTHORIZATION:
                continue
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                try:
                    who = self.verifier.verify(token.strip())
                except (Unauthenticated, Forbidden):
                    break
                return ("token", who.subject, who.org_id)
            break
        client = scope.get("client")
        return ("ip", client[0] if client else "unknown")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(self.caller(scope))
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
    """Limit ``app``'s ``/api/`` routes as the settings say (nothing when disabled)."""
    if settings.rate_limit_per_minute <= 0 or settings.rate_limit_burst <= 0:
        return
    buckets = TokenBuckets(settings.rate_limit_per_minute, settings.rate_limit_burst)
    app.state.rate_limits = buckets
    app.add_middleware(RateLimitMiddleware, buckets=buckets, verifier=verifier)
    _document_429(app, LIMITED_PREFIX)
