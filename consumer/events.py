"""Parsing and validating one Kafka message into a login, a filtered message or a bad message.

The rules are the contract's (section 1). The order matters: a message whose ``metric_type`` is a
string naming another type is *filtered* whatever else it holds, so a malformed non-login event
never reaches the dead-letter topic; everything else that cannot be counted is a ``BadMessage``
with a reason a person can act on.

A day is the date of the event's own timestamp (in UTC, or in the workspace's timezone when it
has one), never the arrival time, so a late or replayed event lands in the day, week and month
it happened in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

import msgspec
import orjson

from sketches.errors import BadMessage
from sketches.keys import MAX_ORG_ID, MAX_WORKSPACE_ID, Scope
from sketches.periods import utc_date

MAX_SUBJECT = 256
# Epoch numbers at or above this are milliseconds (1e12 s would be the year 33658).
EPOCH_MS_THRESHOLD = 1e12
FUTURE_TOLERANCE = timedelta(days=1)
MAX_NESTING = 1024
"""orjson's own nesting limit, the message's object included: deeper values are bad messages."""


class Login(NamedTuple):
    workspace: Scope
    subject: str
    # The event's own time; which local day it counts on depends on the workspace's timezone.
    moment: datetime

    @property
    def utc_day(self) -> date:
        return utc_date(self.moment)


@dataclass(frozen=True, slots=True)
class Rules:
    login_type: str
    retention_days: int
    max_bytes: int


def _text_field(obj: dict[str, Any], name: str, limit: int) -> str:
    if name not in obj:
        raise BadMessage(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise BadMessage(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value:
        raise BadMessage(f"field {name!r} is empty")
    if len(value) > limit:
        raise BadMessage(f"field {name!r} has {len(value)} characters, at most {limit} allowed")
    return value


def parse_timestamp(value: Any) -> datetime:
    """An aware datetime from ISO-8601 with a zone, or epoch seconds (milliseconds from 1e12)."""
    if isinstance(value, bool):
        raise BadMessage("field 'timestamp' must be an ISO-8601 string or epoch number, got bool")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise BadMessage("field 'timestamp' is not a finite number")
        if abs(seconds) >= EPOCH_MS_THRESHOLD:
            seconds /= 1000.0
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError) as err:
            raise BadMessage(f"field 'timestamp' {value!r} is out of range") from err
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as err:
            raise BadMessage(f"field 'timestamp' {value[:64]!r} is not ISO-8601") from err
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise BadMessage(
                f"field 'timestamp' {value[:64]!r} has no zone (add 'Z' or an offset)"
            )
        return moment
    raise BadMessage(
        f"field 'timestamp' must be an ISO-8601 string or epoch number, got {type(value).__name__}"
    )


def decode_object(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    if value is None:
        raise BadMessage("message has no value")
    if len(value) > max_bytes:
        raise BadMessage(f"value of {len(value)} bytes is over the limit of {max_bytes}")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as err:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage("value is not UTF-8") from err
        raise BadMessage(f"value is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise BadMessage(f"value is a JSON {type(obj).__name__}, not an object")
    return obj


class _Fast(msgspec.Struct, gc=False):
    """The shape of a well-formed login: decoded in one C call, with the timestamp parsed."""

    metric_type: str
    subject: str
    org_id: str
    workspace_id: str
    timestamp: datetime | float


_FAST_DECODER = msgspec.json.Decoder(_Fast)


class Parser:
    """Parses the records of one batch against one ``now``.

    Almost every message is a well-formed login, so ``parse`` first tries msgspec's typed decoder
    (several times faster than decoding to a dict and checking each field) and accepts its result
    only when every rule holds. Anything else, including every message that will be filtered or
    dead-lettered, goes through ``parse``'s careful path, which gives the same answer for what the
    fast path accepts and a reason for what it refuses. Scope ids are interned, so a batch
    makes one ``Scope`` per workspace, not one per event.
    """

    def __init__(self, rules: Rules, now: datetime) -> None:
        self.rules = rules
        self.now = now
        self.oldest = now - timedelta(days=rules.retention_days)
        self.latest = now + FUTURE_TOLERANCE
        self._workspaces: dict[tuple[str, str], Scope] = {}

    def workspace(self, org_id: str, workspace_id: str) -> Scope:
        key = (org_id, workspace_id)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._workspaces[key] = Scope(org_id, workspace_id)
        return ws

    def parse(self, value: bytes | None) -> Login | None:
        rules = self.rules
        if (
            value is not None
            and len(value) <= rules.max_bytes
            # msgspec recurses up to Python's recursion limit, which a process may raise, so
            # whether it skips an ignored field nested deeper than orjson's fixed limit depends
            # on the process: such values take the careful path, whose verdict does not.
            # (Brackets inside strings count too; that only sends a login the careful way.)
            and value.count(b"[") + value.count(b"{") <= MAX_NESTING
        ):
            try:
                ev = _FAST_DECODER.decode(value)
            except (msgspec.DecodeError, RecursionError):
                # msgspec recurses on the C stack up to Python's recursion limit, so ~1,000
                # levels of nesting (even in an ignored field) raise RecursionError, not
                # DecodeError; orjson has its own fixed limit (1,024) and gives the verdict.
                pass
            else:
                if ev.metric_type != rules.login_type:
                    return None
                moment = ev.timestamp
                if (
                    0 < len(ev.subject) <= MAX_SUBJECT
                    and 0 < len(ev.org_id) <= MAX_ORG_ID
                    and 0 < len(ev.workspace_id) <= MAX_WORKSPACE_ID
                    and isinstance(moment, datetime)
                    and moment.tzinfo is not None
                    and self.oldest <= moment <= self.latest
                ):
                    return Login(self.workspace(ev.org_id, ev.workspace_id), ev.subject, moment)
        login = parse(value, rules, self.now)
        if login is None:
            return None
        ws = login.workspace
        return Login(self.workspace(ws.org_id, ws.workspace_id), login.subject, login.moment)


def parse(value: bytes | None, rules: Rules, now: datetime) -> Login | None:
    """A login to count, ``None`` for a filtered metric type, or ``BadMessage``: the careful
    path, field by field, with a reason for every refusal."""
    obj = decode_object(value, rules.max_bytes)
    if "metric_type" not in obj:
        raise BadMessage("missing field 'metric_type'")
    metric_type = obj["metric_type"]
    if not isinstance(metric_type, str):
        raise BadMessage(
            f"field 'metric_type' must be a string, got {type(metric_type).__name__}"
        )
    if metric_type != rules.login_type:
        return None
    subject = _text_field(obj, "subject", MAX_SUBJECT)
    org_id = _text_field(obj, "org_id", MAX_ORG_ID)
    workspace_id = _text_field(obj, "workspace_id", MAX_WORKSPACE_ID)
    if "timestamp" not in obj:
        raise BadMessage("missing field 'timestamp'")
    moment = parse_timestamp(obj["timestamp"])
    if moment < now - timedelta(days=rules.retention_days):
        raise BadMessage(
            f"timestamp {moment.isoformat()} is older than the retention of "
            f"{rules.retention_days} days"
        )
    if moment > now + FUTURE_TOLERANCE:
        raise BadMessage(f"timestamp {moment.isoformat()} is more than 1 day in the future")
    return Login(Scope(org_id, workspace_id), subject, moment)
