"""Per-workspace and per-org settings: the timezone days are counted in, the day weeks start on,
and (workspaces only) subjects left out.

Product-analytics tools keep one timezone per project and bucket events by its local date; this
does the same per workspace. A login counts on the local date of its timestamp in the
workspace's timezone *at ingestion*, so changing the timezone applies to logins ingested from
then on; ``usage-metrics rebuild`` re-buckets the retained history.

Settings live in Redis beside the workspace's sketches (same hash tag, one JSON string). Every
write is followed by an announcement in the settings feed (``sketches.settings_feed``); the
consumer reads the feed at most every ``SETTINGS_CACHE_SECONDS`` and re-reads only the scopes it
names, so a change is seen within that bound without one extra read per event or per scope.

An org has settings of its own (timezone, week start) for its org-level sketches: its members are
counted on the org's local dates, whatever the zones of its workspaces. A login that its
workspace excludes is left out of the org's sketches too.

Excluded subjects are exact names or ``*``/``?`` glob patterns (``qa-*``), matched
case-sensitively: member ids are case-sensitive, and a pattern that silently matched more than it
says would drop real users.

Matching runs for every login of the workspace, in the consumer that serves every tenant, so its
cost is bounded (issue 11: 100 patterns ``*???...?b*`` once cost 4.3 ms per subject, one
regular expression with 100 backtracking branches). ``Excluder`` sorts the patterns by shape:
exact names are one set lookup; ``lit*``, ``*lit`` and ``*lit*`` are C string searches
(``startswith``/``endswith`` over a tuple, ``in``); only the rest are globs, matched segment by
segment (the first and last anchored, each middle one at its leftmost place, which is optimal
for ``*``), never by backtracking. The validator bounds what is left: at most ``MAX_GLOBS``
globs of at most ``MAX_WILDCARDS`` wildcards each, and at most ``MAX_UNANCHORED_WILD`` characters
in the floating segments that hold a ``?`` (each is searched in O(subject x segment)). Results are
remembered per subject for as long as the consumer keeps the settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sketches import settings_feed
from sketches.errors import UsageMetricsError
from sketches.keys import KeySpace, Scope
from sketches.periods import WeekStart
from sketches.store import run_pipeline

MAX_EXCLUDED = 100
MAX_PATTERN = 256
# Bounds of the patterns that are neither exact, ``lit*``, ``*lit`` nor ``*lit*`` (see above).
MAX_GLOBS = 20
MAX_WILDCARDS = 8
MAX_UNANCHORED_WILD = 64
# Subjects whose verdict one resolved settings object remembers.
MEMO_SUBJECTS = 50_000
# Workspaces without data that one org may hold settings for (``save``).
MAX_SETTINGS_WITHOUT_DATA = 100


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
        globs = [Glob(v) for v in dict.fromkeys(values) if _shape(v) == "glob"]
        if len(globs) > MAX_GLOBS:
            raise ValueError(
                f"at most {MAX_GLOBS} patterns other than exact subjects, 'prefix*', '*suffix' "
                "and '*infix*'"
            )
        for g in globs:
            if g.wildcards > MAX_WILDCARDS:
                raise ValueError(f"pattern {g.pattern[:64]!r} has {g.wildcards} wildcards, "
                                 f"at most {MAX_WILDCARDS} allowed")
        floating = sum(g.floating_wild for g in globs)
        if floating > MAX_UNANCHORED_WILD:
            raise ValueError(
                f"the segments between '*'s that hold a '?' have {floating} characters in all, "
                f"at most {MAX_UNANCHORED_WILD} allowed"
            )
        return values


class OrgSettings(_ScopeSettingsBase):
    """The body of ``GET``/``PUT /api/v2/org/{org_id}/settings``: how the org's own sketches
    count days and weeks."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"timezone": "Europe/Berlin", "week_start": "monday"}},
    )


ScopeSettings = WorkspaceSettings | OrgSettings


def _shape(pattern: str) -> str:
    """``exact``, ``prefix`` (``lit*``), ``suffix`` (``*lit``), ``infix`` (``*lit*``) or
    ``glob`` (anything else with a wildcard)."""
    if "?" not in pattern:
        core = pattern.strip("*")
        if "*" not in core:
            starts, ends = pattern.startswith("*"), pattern.endswith("*")
            if not starts and not ends:
                return "exact"
            if core and not starts:
                return "prefix"
            if core and not ends:
                return "suffix"
            if core:
                return "infix"
    return "glob"


def _segment(text: str) -> re.Pattern[str]:
    """A segment without '*': '?' is any one character, everything else itself."""
    return re.compile("".join("." if c == "?" else re.escape(c) for c in text), re.DOTALL)


class Glob:
    """One ``*``/``?`` pattern, matched without backtracking: the segments between stars are
    fixed-length, so the first must sit at the start, the last at the end, and each middle one
    at its leftmost place after the one before (any later place leaves less room for the rest).
    Literal middle segments are found with ``str.find``; only those holding a ``?`` need a
    regular-expression search, O(subject x segment) at worst."""

    __slots__ = ("_end", "_head", "_mids", "_start", "_tail", "fixed", "minimum", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        parts = pattern.split("*")
        self.fixed = _segment(pattern) if len(parts) == 1 else None
        head, tail = parts[0], parts[-1]
        self._start, self._end = len(head), len(tail)
        self._head = _segment(head) if head and len(parts) > 1 else None
        self._tail = _segment(tail) if tail and len(parts) > 1 else None
        mids = [m for m in parts[1:-1] if m]
        self._mids = tuple((m, _segment(m) if "?" in m else None) for m in mids)
        self.minimum = len(pattern) - pattern.count("*")

    @property
    def wildcards(self) -> int:
        return self.pattern.count("*") + self.pattern.count("?")

    @property
    def floating_wild(self) -> int:
        return sum(len(m) for m, rx in self._mids if rx is not None)

    def match(self, subject: str) -> bool:
        n = len(subject)
        if self.fixed is not None:
            return n == self.minimum and self.fixed.fullmatch(subject) is not None
        if n < self.minimum:
            return False
        end = n - self._end
        if self._head is not None and self._head.fullmatch(subject, 0, self._start) is None:
            return False
        if self._tail is not None and self._tail.fullmatch(subject, end, n) is None:
            return False
        pos = self._start
        for literal, rx in self._mids:
            if rx is None:
                at = subject.find(literal, pos, end)
                if at < 0:
                    return False
                pos = at + len(literal)
            else:
                found = rx.search(subject, pos, end)
                if found is None:
                    return False
                pos = found.end()
        return True


class Excluder:
    """Every excluded subject and pattern of one workspace, sorted by shape (module docstring),
    with the verdicts it has given remembered."""

    def __init__(self, patterns: Sequence[str]) -> None:
        unique = list(dict.fromkeys(patterns))
        by: dict[str, list[str]] = {"exact": [], "prefix": [], "suffix": [], "infix": [],
                                    "glob": []}
        for p in unique:
            by[_shape(p)].append(p)
        self.exact = frozenset(by["exact"])
        self.prefixes = tuple(p.rstrip("*") for p in by["prefix"])
        self.suffixes = tuple(p.lstrip("*") for p in by["suffix"])
        self.infixes = tuple(p.strip("*") for p in by["infix"])
        self.globs = tuple(Glob(p) for p in by["glob"])
        self._memo: dict[str, bool] = {}

    def __call__(self, subject: str) -> bool:
        known = self._memo.get(subject)
        if known is not None:
            return known
        verdict = (
            subject in self.exact
            or (bool(self.prefixes) and subject.startswith(self.prefixes))
            or (bool(self.suffixes) and subject.endswith(self.suffixes))
            or any(infix in subject for infix in self.infixes)
            or any(g.match(subject) for g in self.globs)
        )
        if len(self._memo) >= MEMO_SUBJECTS:
            self._memo.clear()
        self._memo[subject] = verdict
        return verdict


@dataclass(frozen=True)
class Resolved:
    """Settings ready for the hot path: the zone object and one matcher."""

    timezone: str
    tz: tzinfo
    excluded: Excluder | None = field(default=None)
    week_start: WeekStart = "monday"

    @property
    def variant(self) -> str:
        """What shapes a scope's stored results besides its sketches: its zone and week."""
        return f"{self.timezone}|{self.week_start}"

    def is_excluded(self, subject: str) -> bool:
        return self.excluded is not None and self.excluded(subject)


def resolve(settings: ScopeSettings) -> Resolved:
    # Only '*' and '?' are wildcards, as the API documents ('[' is itself).
    matcher = None
    if isinstance(settings, WorkspaceSettings) and settings.excluded_subjects:
        matcher = Excluder(settings.excluded_subjects)
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


def decode_scope(raw: bytes | str | None, scope: Scope, default_timezone: str) -> ScopeSettings:
    return decode_org(raw, default_timezone) if scope.is_org else decode(raw, default_timezone)


def settings_keys(keys: KeySpace, workspaces: Sequence[Scope]) -> list[str]:
    return [keys.settings(ws) for ws in workspaces]


async def load_many(
    client: Any, keys: KeySpace, scopes: Sequence[Scope], default_timezone: str
) -> list[ScopeSettings]:
    """Each scope's settings (a workspace's or an org's) in one round trip (defaults where none
    are stored)."""
    results = await run_pipeline(client, [("GET", k) for k in settings_keys(keys, scopes)])
    return [
        decode_scope(None if isinstance(r, BaseException) else r, scope, default_timezone)
        for scope, r in zip(scopes, results, strict=True)
    ]


class TooManySettingsWithoutData(UsageMetricsError):
    """An org already has settings for ``MAX_SETTINGS_WITHOUT_DATA`` workspaces with no data."""


# Adds the workspace to its org's set unless the set is full; 1 if it is (now) a member.
_ADMIT = (
    "if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end "
    "if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end "
    "redis.call('SADD', KEYS[1], ARGV[1]) return 1"
)


async def admit(client: Any, keys: KeySpace, ws: Scope) -> None:
    """Settings of a workspace that has data are bounded by the data. Any other workspace id is
    only an admin's say-so: each org may hold settings for at most MAX_SETTINGS_WITHOUT_DATA of
    them, so that one admin cannot fill Redis with settings of invented workspaces. A member
    whose workspace has since received data no longer counts (pruned when the set is full)."""
    [has_data] = await run_pipeline(client, [("HEXISTS", keys.meta(ws), "n")])
    if has_data:
        return
    index = keys.settings_without_data(ws.org_id)
    admit = ("EVAL", _ADMIT, 1, index, ws.workspace_id, MAX_SETTINGS_WITHOUT_DATA)
    [admitted] = await run_pipeline(client, [admit])
    if admitted:
        return
    [members] = await run_pipeline(client, [("SMEMBERS", index)])
    names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members or ())
    exists = await run_pipeline(
        client, [("HEXISTS", keys.meta(Scope(ws.org_id, n)), "n") for n in names]
    )
    grown = [n for n, e in zip(names, exists, strict=True) if e]
    if grown:
        await run_pipeline(client, [("SREM", index, *grown)])
        [admitted] = await run_pipeline(client, [admit])
        if admitted:
            return
    raise TooManySettingsWithoutData(
        f"org {ws.org_id[:64]!r} already has settings for {MAX_SETTINGS_WITHOUT_DATA} "
        "workspaces that have no data yet"
    )


async def save(client: Any, keys: KeySpace, ws: Scope, settings: ScopeSettings) -> None:
    if not ws.is_org:  # an org's own settings are one key per org, bounded by the orgs
        await admit(client, keys, ws)
    await run_pipeline(client, [("SET", keys.settings(ws), encode(settings))])
    await settings_feed.announce(client, keys, [ws])


# KEYS[1] the settings key; ARGV: "1" if a value was read (else "0"), the value read, the new one.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
return 1
"""


async def read_raw(client: Any, keys: KeySpace, scope: Scope) -> bytes | None:
    """The stored JSON of a scope's settings, or None when none is stored."""
    (raw,) = await run_pipeline(client, [("GET", keys.settings(scope))])
    if isinstance(raw, BaseException):
        return None  # as the usage route does: an unreadable value means the defaults
    return bytes(raw) if raw is not None else None


async def compare_and_set(
    client: Any, keys: KeySpace, scope: Scope, expected: bytes | None, settings: ScopeSettings
) -> bool:
    """Store ``settings`` if the stored value is still ``expected``; False if it changed."""
    (done,) = await run_pipeline(client, [(
        "EVAL", _COMPARE_AND_SET, 1, keys.settings(scope),
        "0" if expected is None else "1", expected or b"", encode(settings),
    )])
    if done != 1:
        return False
    await settings_feed.announce(client, keys, [scope])
    return True
