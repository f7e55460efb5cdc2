"""What the API tells operators: Prometheus series and a request id on every response and log line.

``ObservabilityMiddleware`` (pure ASGI, so it neither buffers bodies nor loses context variables)
does both for each HTTP request:

- **Request id.** ``X-Request-ID`` is taken from the request when it looks like an id (1 to 128
  characters of ``A-Z a-z 0-9 . _ : + = / @ -``), else a fresh one is made; it goes back in the
  response's ``X-Request-ID`` and, through a context variable and a log record factory, onto every
  log record written while the request runs (``record.request_id``), which both formatters of
  ``usage_metrics.logs`` print. Do not also pass ``request_id`` with ``extra=``: the record already
  has it.
- **Series.** ``usage_metrics_api_requests_total`` and
  ``usage_metrics_api_request_duration_seconds`` by method, route template
  (``/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage``, never the ids themselves, so
  tenants cannot blow up the series count; ``unmatched`` for a path no route knows) and status;
  ``usage_metrics_api_redis_errors_total`` by route, counted when the API answers 503 because
  Redis is unreachable; ``usage_metrics_api_busy_total`` by route, counted when it answers 503
  because the heavy-recompute slots are taken (``QueryBusy``), which says nothing about Redis and
  once inflated its error count; and the requests in flight. A 503 says which it was through
  ``mark_refusal`` (the exception handlers call it), since a status alone cannot.

``serve_metrics`` serves the API's own registry (one per application, so tests can build many)
followed by prometheus-client's default registry (process, platform and garbage-collector series,
and the consumer's series when both run in one process, as in ``usage-metrics demo``) on a
listener of its own (``API_METRICS_PORT``, bound to ``API_METRICS_HOST``), never on the API's
port: the API port faces callers, and the series name routes, statuses and load that a caller
has no business reading (issue 16). Without ``API_METRICS_PORT`` nothing serves them.

Nothing here reads headers other than ``X-Request-ID``: tokens never reach a log or a label.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RAW = REQUEST_ID_HEADER.lower().encode("latin-1")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/@-]{1,128}")
UNMATCHED_ROUTE = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_request_id: ContextVar[str | None] = ContextVar("usage_metrics_request_id", default=None)

# Why a request was refused with 503, kept in its ASGI state by the exception handlers.
_REFUSAL = "usage_metrics.refusal"
STORE_UNAVAILABLE = "store_unavailable"
BUSY = "busy"


def mark_refusal(scope: MutableMapping[str, Any], cause: str) -> None:
    """Say why this request is answered 503 (``STORE_UNAVAILABLE`` or ``BUSY``), for the
    series: the middleware sees only the status."""
    scope.setdefault("state", {})[_REFUSAL] = cause


def _refusal(scope: Scope) -> str | None:
    state = scope.get("state")
    cause = state.get(_REFUSAL) if isinstance(state, dict) else None
    return cause if isinstance(cause, str) else None


def current_request_id() -> str | None:
    """The id of the request being served in this context, if any."""
    return _request_id.get()


def sane_request_id(value: str | None) -> str | None:
    """``value`` if it is safe to echo and log as an id, else ``None``."""
    if value is not None and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Puts the current request id on records that pass a handler or logger it is attached to.

    ``install_log_context`` covers every logger at once; this filter is for setups that prefer
    to opt in per handler.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _request_id.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return True


_factory_installed = False


def install_log_context() -> None:
    """Make every log record created during a request carry ``request_id`` (idempotent).

    A record factory rather than a filter, because filters on loggers do not see records that
    propagate from child loggers, and handlers are replaced by ``setup_logging`` and by pytest.
    """
    global _factory_installed
    if _factory_installed:
        return
    previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        rid = _request_id.get()
        if rid is not None:
            record.request_id = rid
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


class ApiMetrics:
    """The API's series, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        labels = ("method", "route", "status")
        self.requests = Counter(
            "usage_metrics_api_requests_total",
            "HTTP requests answered, by method, route template and status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "usage_metrics_api_request_duration_seconds",
            "Time from request to the end of the response, by method, route template and status",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "usage_metrics_api_redis_errors_total",
            "Requests answered 503 because Redis was unreachable, by route template",
            ("route",),
            registry=self.registry,
        )
        self.busy = Counter(
            "usage_metrics_api_busy_total",
            "Requests answered 503 because this process's heavy-recompute slots were taken "
            "(no Redis error), by route template",
            ("route",),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "usage_metrics_api_requests_in_flight",
            "HTTP requests being served",
            registry=self.registry,
        )

    def observe(
        self, method: str, route: str, status: int, seconds: float, refusal: str | None = None
    ) -> None:
        code = str(status)
        self.requests.labels(method, route, code).inc()
        self.latency.labels(method, route, code).observe(seconds)
        if status == 503 and refusal == STORE_UNAVAILABLE:
            self.redis_errors.labels(route).inc()
        elif status == 503 and refusal == BUSY:
            self.busy.labels(route).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(REGISTRY)


# ---------------------------------------------------------------- the metrics listener

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT_S = 5.0


async def serve_metrics(metrics: ApiMetrics, host: str, port: int) -> asyncio.Server:
    """``GET /metrics`` on ``host:port``, apart from the API (module docstring). A few lines of
    HTTP/1.1, like the consumer's health port: one request per connection, its head read whole
    (at most 8 KiB, 5 s) before the answer, so that closing never resets a scraper that is still
    sending headers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method = parts[0] if parts else ""
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path != "/metrics":
                status, ctype, body = "404 Not Found", "application/json", b'{"detail":"not found"}'
            elif method not in ("GET", "HEAD"):
                status, ctype = "405 Method Not Allowed", "application/json"
                body = b'{"detail":"method not allowed"}'
            else:
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # a client that went away or sent no valid head gets nothing
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD)


def route_template(scope: Scope) -> str:
    """The path template of the route that served ``scope``, never the concrete path."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


class ObservabilityMiddleware:
    """Request id, log context and Prometheus series for every HTTP request.

    Add it before ``RawPathIds`` in ``create_app`` (so that it sits inside it and sees the route
    that the router picked on the raw path).
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        install_log_context()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = sane_request_id(_header(scope, _REQUEST_ID_RAW)) or new_request_id()
        context = _request_id.set(rid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = rid
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # Left set on purpose: the catch-all 500 handler runs outside every middleware, in
            # this same task, and its log line must carry the id too. The server's per-request
            # task ends right after, and the next request sets its own id.
            raise
        else:
            _request_id.reset(context)
        finally:
            self.metrics.in_flight.dec()
            method = scope.get("method", "GET")
            self.metrics.observe(
                method if method in METHODS else "other", route_template(scope), status,
                time.perf_counter() - started, _refusal(scope),
            )
