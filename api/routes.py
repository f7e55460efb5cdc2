"""The usage endpoints (a workspace's, an org's). They parse, authorize and render; the answers
come from ``sketches.results``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Header, Query, Response

from api.auth import Principal
from api.deps import (
    AnswersDep,
    OrgDep,
    SettingsDep,
    WorkspaceDep,
    get_principal,
    invalid,
    metrics_reader,
    org_reader,
)
from api.schemas import ERROR_RESPONSES, UsageMetric
from sketches.config import Settings
from sketches.keys import Scope
from sketches.query import Metric, Window
from sketches.results import Answers, Series
from sketches.results import Query as AnswerQuery

# Authentication first: a caller without a valid token learns nothing, not even which input
# would be invalid (router dependencies run before the route's own).
router = APIRouter(dependencies=[Depends(get_principal)])

USAGE_PATH = "/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage"
ORG_USAGE_PATH = "/api/v2/org/{org_id}/metrics/usage"
MAX_METRIC_VALUES = 16
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# No row may start before this day: far older dates only overflow date arithmetic.
EARLIEST_DAY = date(1970, 1, 1)
TIMEZONE_HEADER = "X-Timezone"
CACHE_HEADER = "X-Cache"

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


def render_csv(rows: Series) -> bytes:
    def cell(v: int | None) -> str:
        return "" if v is None else str(v)

    lines = ["date,dau,wau,mau"]
    lines += [
        f"{d},{cell(a)},{cell(w)},{cell(m)}"
        for d, a, w, m in zip(rows.dates, rows.dau, rows.wau, rows.mau, strict=True)
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


COUNTING_HEADERS = {
    "hll": {"X-Sketch-Mode": "hll", "X-Standard-Error": "0.0081"},
    "exact": {"X-Sketch-Mode": "exact", "X-Standard-Error": "0"},
}
WEEK_START_HEADER = "X-Week-Start"


def render_json(rows: Series) -> bytes:
    return orjson.dumps([
        {"date": d, "dau": a, "wau": w, "mau": m}
        for d, a, w, m in zip(rows.dates, rows.dau, rows.wau, rows.mau, strict=True)
    ])


@dataclass(frozen=True)
class UsageParams:
    period_length: int
    metrics: frozenset[Metric]
    window: Window
    end_date: str | None
    csv: bool


async def usage_params(
    settings: SettingsDep,
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
        Query(description="last day, YYYY-MM-DD, in the scope's timezone; default today",
              max_length=10),
    ] = None,
    format: Annotated[
        Literal["json", "csv"] | None, Query(description="csv for a spreadsheet (or Accept)")
    ] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> UsageParams:
    """The parameters both usage endpoints share; the date rules need the scope's timezone and
    are checked once it is known."""
    if period_length > settings.max_period_length:
        raise invalid(
            ("query", "period_length"),
            f"Input should be less than or equal to {settings.max_period_length}",
            period_length,
            kind="less_than_equal",
        )
    return UsageParams(
        period_length, parse_metrics(metrics), window, end_date, wants_csv(format, accept)
    )


UsageParamsDep = Annotated[UsageParams, Depends(usage_params)]


async def serve_usage(
    scope: Scope, params: UsageParams, settings: Settings, answers: Answers
) -> Response:
    """One round trip reads the scope's settings, change stamps and stored result; the rows
    come from ``sketches.results``, which recomputes only what changed."""
    snap = await answers.snapshot(scope)
    config = snap.config
    today = datetime.now(config.tz).date()
    end = parse_end_date(params.end_date, today)
    if (end - EARLIEST_DAY).days < params.period_length:
        raise invalid(("query", "end_date"), f"rows must not start before {EARLIEST_DAY}",
                      params.end_date)
    query = AnswerQuery(end, params.period_length, params.metrics, params.window, today)
    render = render_csv if params.csv else render_json
    body, hit = await answers.answer(snap, query, render, "csv" if params.csv else "json")
    headers = {
        TIMEZONE_HEADER: config.timezone,
        WEEK_START_HEADER: config.week_start,
        **COUNTING_HEADERS[settings.sketch_mode],
        CACHE_HEADER: "hit" if hit else "miss",
    }
    media = "text/csv; charset=utf-8" if params.csv else "application/json"
    return Response(body, media_type=media, headers=headers)


def _usage_responses(scope: str) -> dict[int | str, dict[str, Any]]:
    text = {"type": "string"}
    return {
        **ERROR_RESPONSES,
        200: {
            "description": "One row per day, oldest first; `text/csv` when asked",
            "content": {"text/csv": {"example": "date,dau,wau,mau\r\n2026-11-24,45,120,450\r\n"}},
            "headers": {
                TIMEZONE_HEADER: {"description": f"the timezone the {scope}'s dates are in",
                                  "schema": text},
                WEEK_START_HEADER: {"description": "monday or sunday: the calendar week used",
                                    "schema": text},
                "X-Sketch-Mode": {"description": "hll (HyperLogLog) or exact", "schema": text},
                "X-Standard-Error": {"description": "relative standard error of each count "
                                     "(0.0081 for hll, 0 for exact)", "schema": text},
            },
        },
    }


@router.get(
    USAGE_PATH,
    response_model=list[UsageMetric],
    responses=_usage_responses("workspace"),
    summary="Daily, weekly and monthly active users of a workspace",
)
async def get_usage(
    ws: WorkspaceDep,
    _caller: Annotated[Principal, Depends(metrics_reader)],
    params: UsageParamsDep,
    settings: SettingsDep,
    answers: AnswersDep,
) -> Response:
    """Rows from ``end_date - period_length`` to ``end_date``, oldest first. A metric not asked
    for is null in every row; a day, week or month with no login is null, never 0. Dates are
    the workspace's local dates (header ``X-Timezone``; UTC unless the workspace sets one)."""
    return await serve_usage(ws, params, settings, answers)


@router.get(
    ORG_USAGE_PATH,
    response_model=list[UsageMetric],
    responses=_usage_responses("org"),
    summary="Daily, weekly and monthly active users of a whole org, each counted once",
)
async def get_org_usage(
    org: OrgDep,
    _caller: Annotated[Principal, Depends(org_reader)],
    params: UsageParamsDep,
    settings: SettingsDep,
    answers: AnswersDep,
) -> Response:
    """As the workspace endpoint, for every workspace of the org at once: a subject active in
    several workspaces counts once; another org's subjects never count; a login its workspace
    excludes does not count here either. Dates are the org's local dates (its own settings)."""
    return await serve_usage(org, params, settings, answers)
