"""The FastAPI application: a factory, its lifespan, and how failures become status codes.

``create_app(settings)`` builds everything from settings when it starts; a test may pass its own
``store`` instead. Failures map to the contract's statuses with a JSON body and never a traceback:
auth to 401/403, a dead Redis to 503 (with ``Retry-After``), a full Redis to 503 for writes only
(reads go on), a damaged key to a 500 that names the workspace's problem and not the stack.

At start the lifespan checks Redis's ``maxmemory-policy`` (``sketches.eviction``) and refuses to
start on an evicting Redis, with that reason as the one error line (``CleanStartupRefusal``). A
Redis that does not answer yet is checked in the background once it does, and the API answers
503 meanwhile as it always has; a refusal found then makes ``/readyz`` say why and calls
``app.state.stop_server`` (``usage-metrics api`` sets it, and exits with the refusal's status).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard, docs, observability, ratelimit, settings_routes
from api.auth import Forbidden, TokenVerifier, Unauthenticated
from api.bodylimit import BodyLimitMiddleware, document_413
from api.routes import router
from sketches import hll
from sketches.config import Settings
from sketches.connection import open_store
from sketches.errors import CorruptSketch, QueryBusy, StoreOutOfMemory, StoreUnavailable
from sketches.eviction import EvictionRefused, check_policy, judge, read_policies
from sketches.scope_settings import TooManySettingsWithoutData
from sketches.store import SketchStore

log = logging.getLogger(__name__)

ID_ROUTES_PREFIX = b"/api/v2/org/"
BUSY_RETRY_AFTER_S = 1
# A full Redis frees memory when an operator acts, not in seconds.
OUT_OF_MEMORY_RETRY_AFTER_S = 30
# How long the lifespan waits for Redis's first answer before it checks in the background.
FIRST_POLICY_CHECK_S = 5.0


class RawPathIds:
    """Route ids on the raw, still percent-encoded path.

    Starlette routes on the decoded path, where ``a%2Fb`` has become ``a/b`` and no longer fits
    one path segment. Ids may contain anything, ``/`` included, so for the id routes the path is
    matched as it came on the wire and each id is decoded exactly once, by ``api.routes``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path")
            if raw and raw.startswith(ID_ROUTES_PREFIX):
                scope = dict(scope)
                scope["path"] = raw.split(b"?", 1)[0].decode("latin-1")
        await self.app(scope, receive, send)


class CleanStartupRefusal:
    """A lifespan that refuses to start for a reason of ours (``EvictionRefused``) ends with
    that reason as the server's one error line. Starlette would send its traceback as the
    failure message, and uvicorn logs it whole."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent below, once the reason is known
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_failure)
        except EvictionRefused as err:
            await send({"type": "lifespan.startup.failed", "message": str(err)})
            return
        except BaseException:
            for message in held:
                await send(message)
            raise
        for message in held:
            await send(message)


async def _check_eviction(app: FastAPI, settings: Settings) -> asyncio.Task[None] | None:
    """Refuse an evicting Redis now (``EvictionRefused``), or, if Redis does not answer within
    ``FIRST_POLICY_CHECK_S``, check once it does (the returned task) while the API answers 503
    as it always did without Redis."""
    client = app.state.store.client
    try:
        nodes = await asyncio.wait_for(read_policies(client), FIRST_POLICY_CHECK_S)
    except (StoreUnavailable, TimeoutError) as err:
        log.warning("Redis does not answer yet (%s): its maxmemory-policy is checked once it "
                    "does", str(err) or f"no answer within {FIRST_POLICY_CHECK_S:.0f} s")
        return asyncio.create_task(_check_later(app, settings))
    try:
        judge(nodes, settings.redis_allow_eviction)
    except EvictionRefused as err:
        app.state.eviction_refusal = str(err)
        raise
    return None


async def _check_later(app: FastAPI, settings: Settings) -> None:
    try:
        await check_policy(app.state.store.client, settings.redis_allow_eviction,
                           max_backoff=settings.redis_retry_max_backoff_s,
                           where=settings.redis_url_redacted())
    except EvictionRefused as err:
        app.state.eviction_refusal = str(err)
        log.error("%s", err)
        stop = getattr(app.state, "stop_server", None)
        if stop is not None:
            stop()


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


def _detail(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


RESPONSE_409: dict[str, Any] = {
    "description": "The org already has settings for as many workspaces without data as it "
                   "may (sketches.scope_settings.MAX_SETTINGS_WITHOUT_DATA)",
    "content": {"application/json": {
        "schema": {"type": "object", "properties": {"detail": {"type": "string"}},
                   "required": ["detail"]},
    }},
}


def _document_409(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            put = operations.get("put") if path.endswith("/settings") else None
            if isinstance(put, dict):
                put.setdefault("responses", {}).setdefault("409", RESPONSE_409)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None, store: SketchStore | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Compile (or load from numba's cache) the HLL kernel in the background: the first
        # rolling query must not pay seconds for it, and readiness must not wait for it.
        warm = asyncio.create_task(asyncio.to_thread(hll.warm_up))
        async with AsyncExitStack() as stack:
            if store is None:
                app.state.store = await stack.enter_async_context(open_store(settings))
            else:
                app.state.store = store
            if settings.api_metrics_port is not None:
                host, port = settings.api_metrics_host, settings.api_metrics_port
                try:
                    server = await observability.serve_metrics(app.state.api_metrics, host, port)
                except OSError as err:
                    # The API still answers; the operator reads why its series are missing.
                    log.error("cannot serve /metrics on API_METRICS_HOST:API_METRICS_PORT "
                              "%s:%d (%s); the API runs without its metrics listener",
                              host, port, err.strerror or err)
                else:
                    app.state.metrics_server = server
                    stack.push_async_callback(_close_server, server)
            later = await _check_eviction(app, settings)
            try:
                yield
            finally:
                if later is not None:
                    later.cancel()
                    await asyncio.gather(later, return_exceptions=True)
            answers = getattr(app.state, "answers", None)
            if answers is not None:
                await answers.drain()
        await warm

    app = FastAPI(
        title="usage-metrics",
        version="0.1.0",
        summary="Daily, weekly and monthly active users per workspace, live from Kafka logins",
        lifespan=lifespan,
        # Both would load scripts from a CDN on the dashboard's origin: api.docs serves /docs.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.verifier = TokenVerifier(settings)
    if store is not None:
        app.state.store = store
    if app.state.verifier.algorithm is None:
        log.warning("no JWT_SECRET or JWT_PUBLIC_KEY set: every request will be refused (401)")

    @app.exception_handler(Unauthenticated)
    async def _unauthenticated(request: Request, exc: Unauthenticated) -> JSONResponse:
        return _detail(401, str(exc), {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        return _detail(403, str(exc))

    @app.exception_handler(StoreOutOfMemory)
    async def _full(request: Request, exc: StoreOutOfMemory) -> JSONResponse:
        # Only writes meet it (settings): reads go on being served from what Redis holds.
        log.warning("Redis is out of memory, a write was refused: %s", exc)
        return _detail(503, "Redis is out of memory (maxmemory): this change cannot be stored "
                            f"now; reading still works. Retry in {OUT_OF_MEMORY_RETRY_AFTER_S} s",
                       {"Retry-After": str(OUT_OF_MEMORY_RETRY_AFTER_S)})

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("store unavailable: %s", exc)
        observability.mark_refusal(request.scope, observability.STORE_UNAVAILABLE)
        return _detail(503, "store unavailable, try again shortly", {"Retry-After": "5"})

    @app.exception_handler(QueryBusy)
    async def _busy(request: Request, exc: QueryBusy) -> JSONResponse:
        observability.mark_refusal(request.scope, observability.BUSY)
        return _detail(503, f"{exc}: retry in {BUSY_RETRY_AFTER_S} s",
                       {"Retry-After": str(BUSY_RETRY_AFTER_S)})

    @app.exception_handler(CorruptSketch)
    async def _corrupt(request: Request, exc: CorruptSketch) -> JSONResponse:
        log.error("corrupt sketch served as 500: %s", exc)
        return _detail(500, "stored data of this workspace is unreadable; operators see the key "
                            "in the logs")

    @app.exception_handler(TooManySettingsWithoutData)
    async def _settings_limit(request: Request, exc: TooManySettingsWithoutData) -> JSONResponse:
        return _detail(409, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error, reference %s", ref)
        return _detail(500, f"internal error, reference {ref}")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False, response_model=None)
    async def readyz(request: Request) -> Any:
        refusal = getattr(request.app.state, "eviction_refusal", None)
        if refusal is not None:
            return _detail(503, refusal)
        try:
            await request.app.state.store.ping()
        except StoreUnavailable as err:
            log.warning("readiness check failed: %s", err)
            observability.mark_refusal(request.scope, observability.STORE_UNAVAILABLE)
            return _detail(503, "store unavailable")
        return {"status": "ready"}

    app.include_router(router)
    app.include_router(settings_routes.router)
    app.include_router(dashboard.router)
    docs.install(app, settings.api_docs)
    api_metrics = observability.ApiMetrics()
    app.state.api_metrics = api_metrics  # served by the lifespan's own listener, not here
    # Innermost: only requests the rate limiter let through have their body read.
    app.add_middleware(BodyLimitMiddleware)
    document_413(app)
    _document_409(app)
    # Inside the observability middleware, so that a 429 gets a request id and is counted.
    ratelimit.install(app, settings, app.state.verifier)
    app.add_middleware(observability.ObservabilityMiddleware, metrics=api_metrics)
    app.add_middleware(RawPathIds)
    app.add_middleware(CleanStartupRefusal)
    return app
