"""The usage endpoint. It parses, authorizes and renders; the counting is ``sketches.query``."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import APIRouter, Depends, Path, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse

from api.auth import READ_METRICS, Principal
from api.deps import PrincipalDep, SettingsDep, StoreDep
from api.schemas import ErrorBody, UsageMetric
from sketches.keys import MAX_ORG_ID, MAX_WORKSPACE_ID, Workspace
from sketches.periods import utc_today
from sketches.query import Metric, Window, usage

router = APIRouter()

USAGE_PATH = "/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage"
MAX_METRIC_VALUES = 16

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
        raise invalid(("path", name), f"must have 1 to {limit} characters", value)
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
    if len(values) > MAX_METRIC_VALUES:
        raise invalid(("query", "metrics"), f"at most {MAX_METRIC_VALUES} values", len(values))
    out: set[Metric] = set()
    for raw in values:
        for part in raw.split(","):
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


def parse_end_date(value: str | None) -> date:
    today = utc_today()
    if value is None:
        return today
    try:
        end = date.fromisoformat(value)
    except ValueError:
        raise invalid(("query", "end_date"), "must be a date YYYY-MM-DD", value) from None
    if end > today:
        raise invalid(("query", "end_date"), f"must not be after today ({today})", value)
    return end


@router.get(
    USAGE_PATH,
    response_model=list[UsageMetric],
    responses=ERROR_RESPONSES,
    summary="Daily, weekly and monthly active users of a workspace",
)
async def get_usage(
    ws: WorkspaceDep,
    _caller: Annotated[Principal, Depends(metrics_reader)],
    settings: SettingsDep,
    store: StoreDep,
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
        str | None, Query(description="last day (UTC), YYYY-MM-DD; default today", max_length=10)
    ] = None,
) -> ORJSONResponse:
    """Rows from ``end_date - period_length`` to ``end_date``, oldest first. A metric not asked
    for is null in every row; a day, week or month with no login is null, never 0."""
    if period_length > settings.max_period_length:
        raise invalid(
            ("query", "period_length"),
            f"Input should be less than or equal to {settings.max_period_length}",
            period_length,
            kind="less_than_equal",
        )
    wanted = parse_metrics(metrics)
    end = parse_end_date(end_date)
    rows = await usage(
        store,
        ws,
        end=end,
        period_length=period_length,
        metrics=wanted,
        window=window,
        horizon=utc_today() - timedelta(days=settings.retention_days),
    )
    return ORJSONResponse(
        [{"date": r.date.isoformat(), "dau": r.dau, "wau": r.wau, "mau": r.mau} for r in rows]
    )
