"""Per-workspace and per-org settings: the timezone days are counted in, the day weeks start on,
and (workspaces only) subjects left out.

Product-analytics tools keep one timezone per project and bucket events by its local date; this
does the same per workspace. A login counts on the local date of its timestamp in the
workspace's timezone *at ingestion*, so changing the timezone applies to logins ingested from
then on; ``usage-metrics rebuild`` re-buckets the retained history.

Settings live in Redis beside the workspace's sketches (same hash tag, one JSON string). The
consumer caches them for ``SETTINGS_CACHE_SECONDS`` so that a change is seen within a bounded time
without one extra read per event.

An org has settings of its own (timezone, week start) for its org-level sketches: its members are
counted on the org's local dates, whatever the zones of its workspaces. A login that its
workspace excludes is left out of the org's sketches too.

Excluded subjects are exact names or ``*``/``?`` glob patterns (``qa-*``), matched
case-sensitively: member ids are case-sensitive, and a pattern that silently matched more than it
says would drop real users.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sketches.keys import KeySpace, Workspace
from sketches.periods import WeekStart
from sketches.store import run_pipeline

MAX_EXCLUDED = 100
MAX_PATTERN = 256


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


@lru_cache(maxsize=1024)
def zone(name: str) -> tzinfo:
    """A tz database zone; raises ValueError for a name that is not one."""
    if name == "UTC":
        return UTC  # the fast path: no tz database lookups per event
    if name not in _zone_names():
        raise ValueError(f"unknown timezone {name!r} (use an IANA name such as Europe/Berlin)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"unknown timezone {name!r}") from err


class _ScopeSettingsBase(BaseModel):
    """What every scope sets: the zone its days are counted in and the day its weeks start."""

    model_config = ConfigDict(extra="forbid")

    timezone: str = Field(description="IANA timezone the scope's days are counted in")
    week_start: WeekStart = Field(
        default="monday",
        description="first day of a calendar week: monday (ISO) or sunday",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        zone(value)
        return value


class WorkspaceSettings(_ScopeSettingsBase):
    """The body of ``GET``/``PUT .../settings``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"timezone": "Asia/Tokyo", "excluded_subjects": ["qa-*", "bot-health"],
                        "week_start": "monday"}
        },
    )

    excluded_subjects: list[str] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDED,
        description="exact subjects or '*' glob patterns whose logins are not counted",
    )

    @field_validator("excluded_subjects")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        for v in values:
            if not v or len(v) > MAX_PATTERN:
                raise ValueError(f"each subject or pattern must have 1 to {MAX_PATTERN} characters")
        return values


class OrgSettings(_ScopeSettingsBase):
    """The body of ``GET``/``PUT /api/v2/org/{org_id}/settings``: how the org's own sketches
    count days and weeks."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"timezone": "Europe/Berlin", "week_start": "monday"}},
    )


ScopeSettings = WorkspaceSettings | OrgSettings


@dataclass(frozen=True)
class Resolved:
    """Settings ready for the hot path: the zone object and one compiled matcher."""

    timezone: str
    tz: tzinfo
    excluded: re.Pattern[str] | None = field(default=None)
    week_start: WeekStart = "monday"

    @property
    def variant(self) -> str:
        """What shapes a scope's stored results besides its sketches: its zone and week."""
        return f"{self.timezone}|{self.week_start}"

    def local_date(self, moment: datetime) -> date:
        return moment.astimezone(self.tz).date()

    def is_excluded(self, subject: str) -> bool:
        return self.excluded is not None and self.excluded.fullmatch(subject) is not None


def resolve(settings: ScopeSettings) -> Resolved:
    matcher = None
    if isinstance(settings, WorkspaceSettings) and settings.excluded_subjects:
        # fnmatch.translate gives an anchored regex per pattern; '[' is escaped first so that
        # only '*' and '?' are wildcards, as the API documents.
        parts = [
            fnmatch.translate(p.replace("[", "[[]")) for p in settings.excluded_subjects
        ]
        matcher = re.compile("|".join(f"(?:{p})" for p in parts), re.DOTALL)
    return Resolved(settings.timezone, zone(settings.timezone), matcher, settings.week_start)


def default_settings(timezone: str) -> WorkspaceSettings:
    return WorkspaceSettings(timezone=timezone, excluded_subjects=[])


def default_org_settings(timezone: str) -> OrgSettings:
    return OrgSettings(timezone=timezone)


S = TypeVar("S", WorkspaceSettings, OrgSettings)


def merge_patch(base: S, patch: Mapping[str, Any], defaults: S) -> S:
    """``base`` with a JSON merge patch (RFC 7396) of its flat fields applied.

    A member of ``patch`` replaces its field; a ``null`` member resets it to its default
    (merge-patch's "remove", and a removed setting is its default); a field left out keeps
    ``base``'s value. A ``PUT`` is this same patch over the defaults, so both verbs share one
    rule for missing and null fields. An unknown member or an invalid value raises pydantic's
    ``ValidationError`` (the models forbid extras), located at the member.
    """
    fallback = defaults.model_dump()
    data = base.model_dump()
    for name, value in patch.items():
        data[name] = fallback[name] if value is None and name in fallback else value
    return type(base).model_validate(data)


def encode(settings: ScopeSettings) -> bytes:
    return orjson.dumps(settings.model_dump())


def _decode(model: type[S], raw: bytes | str | None, default: S) -> S:
    """Stored settings, or the defaults when none are stored (or they no longer validate, e.g.
    a zone removed from the tz database: counting must go on, in the default zone)."""
    if raw is None:
        return default
    try:
        data: Any = orjson.loads(raw)
        return model.model_validate(data)
    except (orjson.JSONDecodeError, ValueError):
        return default


def decode(raw: bytes | str | None, default_timezone: str) -> WorkspaceSettings:
    return _decode(WorkspaceSettings, raw, default_settings(default_timezone))


def decode_org(raw: bytes | str | None, default_timezone: str) -> OrgSettings:
    return _decode(OrgSettings, raw, default_org_settings(default_timezone))


def decode_scope(raw: bytes | str | None, scope: Workspace, default_timezone: str) -> ScopeSettings:
    return decode_org(raw, default_timezone) if scope.is_org else decode(raw, default_timezone)


def settings_keys(keys: KeySpace, workspaces: Sequence[Workspace]) -> list[str]:
    return [keys.settings(ws) for ws in workspaces]


async def load_many(
    client: Any, keys: KeySpace, scopes: Sequence[Workspace], default_timezone: str
) -> list[ScopeSettings]:
    """Each scope's settings (a workspace's or an org's) in one round trip (defaults where none
    are stored)."""
    results = await run_pipeline(client, [("GET", k) for k in settings_keys(keys, scopes)])
    return [
        decode_scope(None if isinstance(r, BaseException) else r, scope, default_timezone)
        for scope, r in zip(scopes, results, strict=True)
    ]


async def save(client: Any, keys: KeySpace, ws: Workspace, settings: ScopeSettings) -> None:
    await run_pipeline(client, [("SET", keys.settings(ws), encode(settings))])
