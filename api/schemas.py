"""Response bodies, as the OpenAPI schema shows them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class UsageMetric(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"example": {"date": "2026-11-24", "dau": 45, "wau": 120, "mau": 450}}
    )

    date: str = Field(description="UTC day, YYYY-MM-DD", pattern=r"^\d{4}-\d{2}-\d{2}$")
    dau: int | None = Field(description="distinct subjects with a login that day; null if none")
    wau: int | None = Field(description="distinct subjects of the week (calendar: ISO week "
                            "holding the day, forward-filled; rolling: the 7 days ending that day)")
    mau: int | None = Field(description="distinct subjects of the month (calendar: the calendar "
                            "month holding the day, forward-filled; rolling: the 30 days ending "
                            "that day)")


class ErrorBody(BaseModel):
    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No token, or a token that does not verify",
          "content": {"application/json": {"example": {"detail": "missing bearer token"}}}},
    403: {"model": ErrorBody, "description": "The token's role or org may not read this",
          "content": {"application/json": {
              "example": {"detail": "role 'basic' lacks the permission workspace_metrics:read"}}}},
    503: {"model": ErrorBody, "description": "The store (Redis) is unreachable",
          "content": {"application/json": {"example": {"detail": "store unavailable"}}}},
}
