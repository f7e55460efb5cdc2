"""The usage endpoint. It parses, authorizes and renders; the counting is ``sketches.query``."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Response
from fastapi.exceptions import RequestValidationError

from api.auth import READ_METRICS, Principal
from api.deps import CacheDep, PrincipalDep, SettingsDep, StoreDep, get_principal
from api.schemas import ErrorBody, UsageMetric
from sketches import workspace_settings as ws_settings
from sketches.keys import MAX_ORG_ID, MAX_WORKSPACE_ID, Workspace
from sketches.query import Metric, UsageRow, Window, usage
from sketches.store import SketchStore, run_pipeline
from sketches.workspace_settings import WorkspaceSettings
from usage_metrics.config import Settings

# Authentication first: a caller without a valid token learns nothing, not even which input
# would be invalid (router dependencies run before the route's own).
router = APIRouter(dependencies=[Depends(get_principal)])

USAGE_PATH = "/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage"
MAX_METRIC_VALUES = 16
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# No row may start before this day: far older dates only overflow date arithmetic.
EARLIEST_DAY = date(1970, 1, 1)
TIMEZONE_HEADER = "X-Timezone"
CACHE_HEADER = "X-Cache"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No token, or a token that does not verify",
          "content": {"application/json": {"example": {"detail": "missing bearer token"}}}},
    403: {"model": ErrorBody, "description": "The token's role or org may not read this",
          "content": {"application/json": {
              "example": {"detail": "role 'basic' lacks the permission workspace_metrics:read"}}}},
    503: {"model": ErrorBody, "description": "The store (Redis) is unreachable",
          "content": {"application/json": {"example": {"detail": "store unavailable"}}}},
}


def invalid(loc: tuple[str, ...], msg: str, value: Any, kind: str = "value_error") -> Exception:
    """A 422 with FastAPI's own error body, for rules a type annotation cannot state."""
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": value}])


def _path_id(name: str, raw: str, limit: int) -> str:
    # Path ids arrive still percent-encoded (see api.app.RawPathIds), so an id may hold "/".
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError as err:
        raise invalid(("path", name), "must be percent-encoded UTF-8", raw) from err
    if not 1 <= len(value) <= limit:
        raise invalid(("path", name), f"must have 1 to {limit} characters", value[:64])
    return value


def workspace_ref(
    org_id: Annotated[str, Path(description="Organization id (percent-encode '/' and '%')")],
    workspace_id: Annotated[str, Path(description="Workspace id")],
) -> Workspace:
    return Workspace(
        _path_id("org_id", org_id, MAX_ORG_ID),
        _path_id("workspace_id", workspace_id, MAX_WORKSPACE_ID),
    )


WorkspaceDep = Annotated[Workspace, Depends(workspace_ref)]


def metrics_reader(ws: WorkspaceDep, caller: PrincipalDep) -> Principal:
    caller.require(READ_METRICS, ws.org_id)
    return caller


def parse_metrics(values: list[str] | None) -> frozenset[Metric]:
    if not values:
        return frozenset(Metric)
    # Counted after splitting: "dau,dau,..." may not smuggle more values than repeats may.
    parts = [part for raw in values[: MAX_METRIC_VALUES + 1] for part in raw.split(",")]
    if len(values) > MAX_METRIC_VALUES or len(parts) > MAX_METRIC_VALUES:
        raise invalid(("query", "metrics"), f"at most {MAX_METRIC_VALUES} values", len(values))
    out: set[Metric] = set()
    for part in parts:
        name = part.strip().lower()
        if not name:
            continue
        try:
            out.add(Metric(name))
        except ValueError:
            raise invalid(
                ("query", "metrics"), "each value must be one of dau, wau, mau", part[:64],
                kind="enum",
            ) from None
    return frozenset(out) or frozenset(Metric)


def parse_end_date(value: str | None, today: date) -> date:
    if value is None:
        return today
    try:
        if not DATE_RE.match(value):
            raise ValueError(value)
        end = date.fromisoformat(value)
    except ValueError:
        raise invalid(("query", "end_date"), "must be a date YYYY-MM-DD", value) from None
    if end > today:
        raise invalid(("query", "end_date"), f"must not be after today ({today})", value)
    return end


def wants_csv(fmt: str | None, accept: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    return accept is not None and "text/csv" in accept and "application/json" not in accept


def render_csv(rows: list[UsageRow]) -> str:
    def cell(v: int | None) -> str:
        return "" if v is None else str(v)

    lines = ["date,dau,wau,mau"]
    lines += [f"{r.date.isoformat()},{cell(r.dau)},{cell(r.wau)},{cell(r.mau)}" for r in rows]
    return "\r\n".join(lines) + "\r\n"


async def config_and_version(
    store: SketchStore, settings: Settings, ws: Workspace
) -> tuple[WorkspaceSettings, bytes | None]:
    """The workspace's settings and its data version token, in one round trip."""
    raw, version = await run_pipeline(
        store.client, [("GET", store.keys.settings(ws)), ("GET", store.keys.version(ws))]
    )
    if isinstance(raw, BaseException):
        raw = None
    if isinstance(version, BaseException):
        version = None
    return ws_settings.decode(raw, settings.default_timezone), version


@router.get(
    USAGE_PATH,
    response_model=list[UsageMetric],
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "One row per day, oldest first; `text/csv` when asked",
            "content": {"text/csv": {"example": "date,dau,wau,mau\r\n2026-11-24,45,120,450\r\n"}},
            "headers": {TIMEZONE_HEADER: {"description": "the timezone the dates are in",
                                          "schema": {"type": "string"}}},
        },
    },
    summary="Daily, weekly and monthly active users of a workspace",
)
async def get_usage(
    ws: WorkspaceDep,
    _caller: Annotated[Principal, Depends(metrics_reader)],
    settings: SettingsDep,
    store: StoreDep,
    cache: CacheDep,
    period_length: Annotated[
        int, Query(ge=0, description="days before end_date to include (rows = this + 1)")
    ] = 365,
    metrics: Annotated[
        list[str] | None,
        Query(description="dau, wau, mau; repeated or comma-separated; empty means all"),
    ] = None,
    window: Annotated[Window, Query(description="calendar weeks/months, or rolling 7/30 days")] = (
        Window.CALENDAR
    ),
    end_date: Annotated[
        str | None,
        Query(description="last day, YYYY-MM-DD, in the workspace's timezone; default today",
              max_length=10),
    ] = None,
    format: Annotated[
        Literal["json", "csv"] | None, Query(description="csv for a spreadsheet (or Accept)")
    ] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Rows from ``end_date - period_length`` to ``end_date``, oldest first. A metric not asked
    for is null in every row; a day, week or month with no login is null, never 0. Dates are
    the workspace's local dates (header ``X-Timezone``; UTC unless the workspace sets one)."""
    if period_length > settings.max_period_length:
        raise invalid(
            ("query", "period_length"),
            f"Input should be less than or equal to {settings.max_period_length}",
            period_length,
            kind="less_than_equal",
        )
    wanted = parse_metrics(metrics)
    config, version = await config_and_version(store, settings, ws)
    today = datetime.now(ws_settings.zone(config.timezone)).date()
    end = parse_end_date(end_date, today)
    if (end - EARLIEST_DAY).days < period_length:
        raise invalid(("query", "end_date"), f"rows must not start before {EARLIEST_DAY}",
                      end_date)
    csv = wants_csv(format, accept)
    headers = {TIMEZONE_HEADER: config.timezone}
    media = "text/csv; charset=utf-8" if csv else "application/json"
    cache_key = (ws, config.timezone, today, end, period_length, wanted, window, csv)
    cached = cache.get(cache_key, version)
    if cached is not None:
        return Response(cached, media_type=media, headers={**headers, CACHE_HEADER: "hit"})
    rows = await usage(
        store,
        ws,
        end=end,
        period_length=period_length,
        metrics=wanted,
        window=window,
        horizon=today - timedelta(days=settings.retention_days),
    )
    if csv:
        body = render_csv(rows).encode()
    else:
        body = orjson.dumps(
            [{"date": r.date.isoformat(), "dau": r.dau, "wau": r.wau, "mau": r.mau} for r in rows]
        )
    cache.put(cache_key, version, body)
    return Response(body, media_type=media, headers={**headers, CACHE_HEADER: "miss"})
