"""Scope settings: local-date bucketing in any timezone, excluded subjects, the settings API,
the consumer seeing a change within its cache bound, and a rebuild that re-buckets history."""

from __future__ import annotations

import asyncio
import fnmatch
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from api.app import create_app
from api.auth import issue_token
from consumer.batch import bucket, parse_records
from consumer.events import Rules
from consumer.replay import ReplayStart, replay
from consumer.selection import Selection
from consumer.settings_cache import SettingsCache
from sketches import scope_settings as wss
from sketches.config import Settings
from sketches.keys import Scope
from sketches.periods import WEEK_STARTS, Granularity, day_of, month_of, sunday_week_of, week_of
from sketches.query import Window, usage
from sketches.scope_settings import (
    OrgSettings,
    Resolved,
    WorkspaceSettings,
    compare_and_set,
    read_raw,
    resolve,
)
from sketches.store import SketchStore
from tests.support.compare import assert_rows_match, rows_as_dicts
from tests.support.kafka import produce, wait_applied
from tests.support.oracle import Oracle
from tests.test_consumer import consumer_env, running
from usage_metrics.synth import SynthEvent

WS = Scope("acme", "tokyo")
RULES = Rules(login_type="login", retention_days=800, max_bytes=65536)
NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def record(value: bytes, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t", 0, offset, 0, 0, None, value, None, 0, len(value), [])


def login(subject: str, moment: str, ws: Scope = WS) -> bytes:
    return SynthEvent(ws.org_id, ws.workspace_id, subject, datetime.fromisoformat(moment)).to_json()


def local_days(timezone: str, moments: list[str]) -> dict[date, set[str]]:
    parsed = parse_records([record(login(f"u{i}", m), i) for i, m in enumerate(moments)],
                           RULES, NOW)
    cfg = with_org(resolve(WorkspaceSettings(timezone=timezone)))
    prepared = bucket(parsed, cfg)
    return {p.start: s for (ws, p), s in prepared.sketches.items()
            if ws == WS and p == day_of(p.start)}


def with_org(config: Resolved, org: Resolved | None = None) -> dict[Scope, Resolved]:
    """Bucketing needs the settings of each workspace and of its org (UTC unless given)."""
    return {WS: config, WS.org: org or resolve(OrgSettings(timezone="UTC"))}


@pytest.mark.parametrize(
    ("timezone", "moment", "local_day"),
    [
        ("UTC", "2026-11-24T23:59:59Z", date(2026, 11, 24)),
        ("Asia/Tokyo", "2026-11-24T14:59:59Z", date(2026, 11, 24)),  # 23:59:59 JST
        ("Asia/Tokyo", "2026-11-24T15:00:00Z", date(2026, 11, 25)),  # 00:00 JST
        ("Asia/Kolkata", "2026-11-24T18:29:59Z", date(2026, 11, 24)),  # +05:30
        ("Asia/Kolkata", "2026-11-24T18:30:00Z", date(2026, 11, 25)),
        ("Asia/Kathmandu", "2026-11-24T18:14:59Z", date(2026, 11, 24)),  # +05:45
        ("Asia/Kathmandu", "2026-11-24T18:15:00Z", date(2026, 11, 25)),
        ("Pacific/Kiritimati", "2026-11-24T09:59:59Z", date(2026, 11, 24)),  # +14
        ("Pacific/Kiritimati", "2026-11-24T10:00:00Z", date(2026, 11, 25)),
        ("Pacific/Pago_Pago", "2026-11-25T10:59:59Z", date(2026, 11, 24)),  # -11
        ("Pacific/Pago_Pago", "2026-11-25T11:00:00Z", date(2026, 11, 25)),
        # New York's DST ends 2026-11-01 at 02:00 EDT: midnight is 04:00Z before, 05:00Z after.
        ("America/New_York", "2026-11-01T03:59:59Z", date(2026, 10, 31)),
        ("America/New_York", "2026-11-01T04:00:00Z", date(2026, 11, 1)),
        ("America/New_York", "2026-11-02T04:59:59Z", date(2026, 11, 1)),  # 25-hour day
        ("America/New_York", "2026-11-02T05:00:00Z", date(2026, 11, 2)),
        # ...and starts 2026-03-08: that local day has 23 hours.
        ("America/New_York", "2026-03-08T04:59:59Z", date(2026, 3, 7)),
        ("America/New_York", "2026-03-09T03:59:59Z", date(2026, 3, 8)),
        ("America/New_York", "2026-03-09T04:00:00Z", date(2026, 3, 9)),
        ("Europe/Berlin", "2026-03-28T22:59:59Z", date(2026, 3, 28)),
        ("Europe/Berlin", "2026-03-28T23:00:00Z", date(2026, 3, 29)),
        ("Europe/Berlin", "2026-03-29T21:59:59Z", date(2026, 3, 29)),  # CEST from 01:00Z
        ("Europe/Berlin", "2026-03-29T22:00:00Z", date(2026, 3, 30)),
    ],
)
def test_a_login_counts_on_its_local_date(timezone: str, moment: str, local_day: date) -> None:
    assert set(local_days(timezone, [moment])) == {local_day}


def test_weeks_and_months_follow_local_dates() -> None:
    # 2026-12-31T20:00Z is already 2027-01-01 in Tokyo: January, and ISO week 2026-W53.
    later = datetime(2027, 1, 2, tzinfo=UTC)
    parsed = parse_records([record(login("a", "2026-12-31T20:00:00Z"))], RULES, later)
    got = bucket(parsed, with_org(resolve(WorkspaceSettings(timezone="Asia/Tokyo")))).sketches
    assert {key for key in got if key[0] == WS} == {
        (WS, day_of(date(2027, 1, 1))),
        (WS, week_of(date(2027, 1, 1))),
        (WS, month_of(date(2027, 1, 1))),
    }
    assert week_of(date(2027, 1, 1)).label == "2026-W53"
    # The org counts in its own zone (UTC here): still 2026-12-31, December.
    assert {key for key in got if key[0] == WS.org} == {
        (WS.org, day_of(date(2026, 12, 31))),
        (WS.org, week_of(date(2026, 12, 31))),
        (WS.org, month_of(date(2026, 12, 31))),
    }


def test_sunday_weeks_are_bucketed_by_each_scopes_own_week_start() -> None:
    # 2026-11-22 is a Sunday: the Sunday week starts that day, the ISO week on the 16th.
    parsed = parse_records([record(login("a", "2026-11-22T10:00:00Z"))], RULES, NOW)
    sunday = resolve(WorkspaceSettings(timezone="UTC", week_start="sunday"))
    got = bucket(parsed, with_org(sunday)).sketches
    assert (WS, sunday_week_of(date(2026, 11, 22))) in got
    assert sunday_week_of(date(2026, 11, 22)).start == date(2026, 11, 22)
    assert (WS.org, week_of(date(2026, 11, 22))) in got
    assert week_of(date(2026, 11, 22)).start == date(2026, 11, 16)
    assert not any(p.granularity is Granularity.WEEK for ws, p in got if ws == WS)


def test_an_excluded_login_counts_in_neither_its_workspace_nor_its_org() -> None:
    settings = WorkspaceSettings(timezone="UTC", excluded_subjects=["bot-*"])
    parsed = parse_records(
        [record(login(s, "2026-11-24T10:00:00Z"), i) for i, s in enumerate(["bot-1", "ann"])],
        RULES, NOW,
    )
    got = bucket(parsed, with_org(resolve(settings))).sketches
    assert got[(WS, day_of(date(2026, 11, 24)))] == {"ann"}
    assert got[(WS.org, day_of(date(2026, 11, 24)))] == {"ann"}


def test_excluded_subjects_exact_and_glob_are_counted_apart() -> None:
    settings = WorkspaceSettings(timezone="UTC", excluded_subjects=["qa-*", "bot-healthcheck",
                                                                    "x[1]"])
    subjects = ["qa-1", "qa-", "QA-2", "bot-healthcheck", "bot-healthcheck2", "alice", "x[1]",
                "x1"]
    parsed = parse_records(
        [record(login(s, "2026-11-24T10:00:00Z"), i) for i, s in enumerate(subjects)], RULES, NOW
    )
    prepared = bucket(parsed, with_org(resolve(settings)))
    assert prepared.excluded == 4
    assert prepared.logins == 4
    assert prepared.sketches[(WS, day_of(date(2026, 11, 24)))] == {
        "QA-2", "bot-healthcheck2", "alice", "x1"
    }


@pytest.mark.parametrize(
    "body",
    [
        {"timezone": "Mars/Olympus"},
        {"timezone": ""},
        {"timezone": "UTC", "excluded_subjects": [f"s{i}" for i in range(101)]},
        {"timezone": "UTC", "excluded_subjects": ["x" * 257]},
        {"timezone": "UTC", "excluded_subjects": [""]},
        {"timezone": "UTC", "unknown": 1},
        {"excluded_subjects": []},
    ],
)
def test_invalid_settings_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError is a ValueError
        WorkspaceSettings.model_validate(body)


@pytest.fixture
async def client(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


def bearer(settings: Settings, role: str, org: str | None = "acme") -> dict[str, str]:
    token = issue_token(settings, role=role, org_id=org, ttl_seconds=600, now=time.time())
    return {"Authorization": f"Bearer {token}"}


SETTINGS_URL = "/api/v2/org/acme/workspace/tokyo/settings"
USAGE_URL = "/api/v2/org/acme/workspace/tokyo/metrics/usage"


async def test_settings_api_reads_defaults_and_writes_with_permission(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    got = await client.get(SETTINGS_URL, headers=bearer(settings, "curator"))
    assert got.status_code == 200
    assert got.json() == {"timezone": "UTC", "excluded_subjects": [], "week_start": "monday"}
    body = {"timezone": "Asia/Tokyo", "excluded_subjects": ["qa-*"]}
    for role, status in [("basic", 403), ("curator", 403), ("controller", 403), ("admin", 200),
                         ("superadmin", 200)]:
        resp = await client.put(SETTINGS_URL, json=body, headers=bearer(settings, role))
        assert resp.status_code == status, (role, resp.text)
    other = await client.put("/api/v2/org/globex/workspace/w/settings", json=body,
                             headers=bearer(settings, "admin"))
    assert other.status_code == 403
    assert (await client.put(SETTINGS_URL, json=body)).status_code == 401
    bad = await client.put(SETTINGS_URL, json={"timezone": "Nowhere/City"},
                           headers=bearer(settings, "admin"))
    assert bad.status_code == 422
    assert "unknown timezone" in bad.text
    got = await client.get(SETTINGS_URL, headers=bearer(settings, "controller"))
    assert got.json() == {**body, "week_start": "monday"}


async def test_usage_dates_are_local_and_the_response_names_the_zone(
    client: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    await wss.save(store.client, store.keys, WS,
                   WorkspaceSettings(timezone="Pacific/Kiritimati"))
    resp = await client.get(USAGE_URL, params={"period_length": 0},
                            headers=bearer(settings, "admin"))
    assert resp.status_code == 200
    assert resp.headers["x-timezone"] == "Pacific/Kiritimati"
    local_today = datetime.now(ZoneInfo("Pacific/Kiritimati")).date()
    assert resp.json()[0]["date"] == local_today.isoformat()
    # The local today is a valid end_date even where it is already tomorrow in UTC.
    ok = await client.get(USAGE_URL, params={"end_date": local_today.isoformat()},
                          headers=bearer(settings, "admin"))
    assert ok.status_code == 200
    tomorrow = (local_today + timedelta(days=1)).isoformat()
    late = await client.get(USAGE_URL, params={"end_date": tomorrow},
                            headers=bearer(settings, "admin"))
    assert late.status_code == 422


async def test_csv_export_has_the_same_rows(
    client: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    d = datetime.now(UTC).date()
    await store.add({(WS, p): {"a", "b"} for p in (day_of(d), week_of(d), month_of(d))})
    params = {"period_length": 2, "end_date": d.isoformat()}
    as_json = (await client.get(USAGE_URL, params=params, headers=bearer(settings, "admin"))).json()
    for extra, headers in [({"format": "csv"}, {}), ({}, {"Accept": "text/csv"})]:
        resp = await client.get(USAGE_URL, params={**params, **extra},
                                headers={**bearer(settings, "admin"), **headers})
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/csv")
        lines = resp.text.strip().split("\r\n")
        assert lines[0] == "date,dau,wau,mau"
        cells = [ln.split(",") for ln in lines[1:]]
        assert [c[0] for c in cells] == [r["date"] for r in as_json]
        for c, r in zip(cells, as_json, strict=True):
            assert c[1:] == ["" if r[m] is None else str(r[m]) for m in ("dau", "wau", "mau")]


async def test_the_consumer_sees_a_settings_change_within_its_cache_bound(
    store: SketchStore,
) -> None:
    now = [0.0]
    cache = SettingsCache(store, "UTC", ttl_seconds=30, clock=lambda: now[0])
    assert (await cache.resolve([WS]))[WS].timezone == "UTC"
    await wss.save(store.client, store.keys, WS, WorkspaceSettings(timezone="Asia/Tokyo"))
    now[0] = 29.0
    assert (await cache.resolve([WS]))[WS].timezone == "UTC"  # still within the bound
    now[0] = 30.5
    assert (await cache.resolve([WS]))[WS].timezone == "Asia/Tokyo"


async def test_non_utc_workspace_end_to_end_and_rebuild_rebuckets_history(
    settings: Settings, store: SketchStore, topics: tuple[str, str], sketch_mode: str
) -> None:
    """Ingested in UTC, then the workspace moves to Tokyo: new logins count on Tokyo dates, and a
    rebuild re-buckets the old ones; another workspace is untouched."""
    topic, _ = topics
    other = Scope("acme", "berlin")
    today = datetime.now(UTC).date()
    moments = [datetime.combine(today - timedelta(days=d), datetime.min.time(), UTC)
               + timedelta(hours=h) for d in range(1, 12) for h in (1, 13, 16, 23)]
    events = [SynthEvent(ws.org_id, ws.workspace_id, f"u{i % 7}", m)
              for i, m in enumerate(moments) for ws in (WS, other)]
    ends = await produce(settings.kafka_bootstrap_servers, topic, [e.to_json() for e in events])
    await wss.save(store.client, store.keys, other,
                   WorkspaceSettings(timezone="Europe/Berlin", excluded_subjects=["u6"]))

    async with running(settings, store):
        await wait_applied(store, topic, ends)

    def oracle(ws: Scope, tz: str, excluded: frozenset[str] = frozenset()) -> Oracle:
        return Oracle((ws, e.subject, e.timestamp.astimezone(ZoneInfo(tz)).date())
                      for e in events if Scope(e.org_id, e.workspace_id) == ws
                      and e.subject not in excluded)

    async def check(ws: Scope, want: Oracle) -> None:
        for window in (Window.CALENDAR, Window.ROLLING):
            rows = await usage(store, ws, end=today, period_length=14, window=window,
                               horizon=today - timedelta(days=800))
            assert_rows_match(rows_as_dicts(rows), want.rows(ws, today, 14, window.value),
                              sketch_mode)

    await check(WS, oracle(WS, "UTC"))
    await check(other, oracle(other, "Europe/Berlin", frozenset({"u6"})))

    await wss.save(store.client, store.keys, WS, WorkspaceSettings(timezone="Asia/Tokyo"))
    rebuilt = subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", "rebuild", "--org", "acme",
         "--workspace", "tokyo"],
        env=consumer_env(settings), capture_output=True, timeout=120,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr.decode()[-2000:]
    assert f"{len(moments)} logins counted".encode() in rebuilt.stdout
    await check(WS, oracle(WS, "Asia/Tokyo"))
    await check(other, oracle(other, "Europe/Berlin", frozenset({"u6"})))

    # The org's own sketches (UTC, Monday weeks so far) move to Kathmandu and Sunday weeks with
    # `rebuild --org` alone: both workspaces' logins, the berlin exclusion kept, and neither
    # workspace touched.
    org = WS.org
    await wss.save(store.client, store.keys, org,
                   wss.OrgSettings(timezone="Asia/Kathmandu", week_start="sunday"))
    rebuilt = subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", "rebuild", "--org", "acme"],
        env=consumer_env(settings), capture_output=True, timeout=120,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr.decode()[-2000:]
    assert b"rebuilt org acme" in rebuilt.stdout
    want = Oracle((org, e.subject, e.timestamp.astimezone(ZoneInfo("Asia/Kathmandu")).date())
                  for e in events
                  if not (e.workspace_id == other.workspace_id and e.subject == "u6"))
    for window in (Window.CALENDAR, Window.ROLLING):
        rows = await usage(store, org, end=today, period_length=14, window=window,
                           horizon=today - timedelta(days=800), week_start="sunday")
        assert_rows_match(rows_as_dicts(rows),
                          want.rows(org, today, 14, window.value, week_start="sunday"),
                          sketch_mode)
    await check(WS, oracle(WS, "Asia/Tokyo"))
    await check(other, oracle(other, "Europe/Berlin", frozenset({"u6"})))


async def test_replay_only_one_workspace_leaves_the_others_alone(
    settings: Settings, store: SketchStore, topics: tuple[str, str]
) -> None:
    topic, _ = topics
    other = Scope("acme", "other")
    moment = datetime.now(UTC) - timedelta(hours=1)
    await produce(settings.kafka_bootstrap_servers, topic,
                  [SynthEvent(w.org_id, w.workspace_id, "u1", moment).to_json()
                   for w in (WS, other)])
    stats = await replay(settings, store, ReplayStart("beginning"), selection=Selection.of([WS]))
    assert stats.logins == 1
    d = moment.date()
    assert await store.counts(WS, [day_of(d)]) == [1]
    assert await store.counts(other, [day_of(d)]) == [0]


# ---------------------------------------------------------------- PUT defaults and PATCH

ZONES = ["UTC", "Asia/Tokyo", "Europe/Berlin", "America/New_York", "Asia/Kathmandu"]
ws_settings_values = st.fixed_dictionaries({
    "timezone": st.sampled_from(ZONES),
    "excluded_subjects": st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "week_start": st.sampled_from(WEEK_STARTS),
})


@given(ws_settings_values, ws_settings_values,
       st.sets(st.sampled_from(["timezone", "excluded_subjects", "week_start"])),
       st.sets(st.sampled_from(["timezone", "excluded_subjects", "week_start"])),
       st.sampled_from(ZONES))
def test_a_merge_patch_sets_given_fields_resets_nulls_and_keeps_the_rest(
    base: dict[str, Any], values: dict[str, Any], given_fields: set[str], nulls: set[str],
    default_zone: str,
) -> None:
    patch: dict[str, Any] = {f: values[f] for f in given_fields}
    patch.update({f: None for f in nulls})
    defaults = wss.default_settings(default_zone)
    got = wss.merge_patch(WorkspaceSettings(**base), patch, defaults).model_dump()
    for name in ("timezone", "excluded_subjects", "week_start"):
        if name in nulls:
            want = getattr(defaults, name)
        elif name in given_fields:
            want = values[name]
        else:
            want = base[name]
        assert got[name] == want, name
    # A PUT is the same patch over the defaults: what it leaves out is the default.
    put = wss.merge_patch(defaults, {f: values[f] for f in given_fields}, defaults)
    for name in ("timezone", "excluded_subjects", "week_start"):
        assert getattr(put, name) == (values[name] if name in given_fields
                                      else getattr(defaults, name))


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"bogus": 1}, ("bogus",)),
        ({"bogus": None}, ("bogus",)),  # a null does not make an unknown field acceptable
        ({"timezone": "Mars/Olympus"}, ("timezone",)),
        ({"week_start": "friday"}, ("week_start",)),
        ({"excluded_subjects": [""]}, ("excluded_subjects",)),
        ({"excluded_subjects": "qa-*"}, ("excluded_subjects",)),
    ],
)
def test_a_merge_patch_refuses_unknown_fields_and_invalid_values(
    patch: dict[str, Any], loc: tuple[str, ...]
) -> None:
    base = WorkspaceSettings(timezone="Asia/Tokyo", excluded_subjects=["x"])
    with pytest.raises(ValidationError) as err:
        wss.merge_patch(base, patch, wss.default_settings("UTC"))
    assert {e["loc"][: len(loc)] for e in err.value.errors()} == {loc}


@pytest.fixture
async def api(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a non-UTC ``DEFAULT_TIMEZONE`` (so that a default is told from a hard-coded
    UTC) and no rate limit (these tests send many requests as one caller)."""
    app = create_app(
        settings.model_copy(update={"default_timezone": "Europe/Berlin",
                                    "rate_limit_per_minute": 0}),
        store,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


async def stored(store: SketchStore, ws: Scope = WS) -> bytes | None:
    raw = await store.client.get(store.keys.settings(ws))
    return None if raw is None else bytes(raw)


@pytest.mark.parametrize("sketch_mode", ["exact"])  # settings do not depend on the mode
async def test_put_gives_fields_left_out_their_defaults(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    admin = bearer(settings, "admin")
    only_excluded = await api.put(SETTINGS_URL, json={"excluded_subjects": ["qa-*"]},
                                  headers=admin)
    assert only_excluded.status_code == 200, only_excluded.text
    assert only_excluded.json() == {"timezone": "Europe/Berlin", "excluded_subjects": ["qa-*"],
                                    "week_start": "monday"}
    assert (await api.get(SETTINGS_URL, headers=admin)).json() == only_excluded.json()
    # A PUT replaces: what it leaves out is the default again, not the previous value.
    resp = await api.put(SETTINGS_URL, json={"timezone": "Asia/Tokyo", "week_start": "sunday"},
                         headers=admin)
    assert resp.json() == {"timezone": "Asia/Tokyo", "excluded_subjects": [],
                           "week_start": "sunday"}
    nulls = await api.put(SETTINGS_URL, json={"timezone": None, "week_start": None},
                          headers=admin)
    assert nulls.json() == {"timezone": "Europe/Berlin", "excluded_subjects": [],
                            "week_start": "monday"}
    await api.put(SETTINGS_URL, json={"timezone": "Asia/Tokyo"}, headers=admin)
    empty = await api.put(SETTINGS_URL, json={}, headers=admin)
    assert empty.json() == {"timezone": "Europe/Berlin", "excluded_subjects": [],
                            "week_start": "monday"}
    assert (await api.get(SETTINGS_URL, headers=admin)).json() == empty.json()


@pytest.mark.parametrize("sketch_mode", ["exact"])
async def test_patch_changes_only_the_fields_it_names(
    api: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    admin = bearer(settings, "admin")
    # On a workspace without stored settings, a PATCH starts from the defaults.
    first = await api.patch(SETTINGS_URL, json={"week_start": "sunday"}, headers=admin)
    assert first.status_code == 200, first.text
    assert first.json() == {"timezone": "Europe/Berlin", "excluded_subjects": [],
                            "week_start": "sunday"}
    full = {"timezone": "Asia/Tokyo", "excluded_subjects": ["qa-*", "bot"],
            "week_start": "sunday"}
    await api.put(SETTINGS_URL, json=full, headers=admin)

    zone = await api.patch(SETTINGS_URL, json={"timezone": "Asia/Kolkata"}, headers=admin)
    assert zone.json() == {**full, "timezone": "Asia/Kolkata"}
    week = await api.patch(SETTINGS_URL, content=b'{"week_start": "monday"}',
                           headers={**admin, "Content-Type": "application/merge-patch+json"})
    assert week.json() == {**full, "timezone": "Asia/Kolkata", "week_start": "monday"}
    # null is merge-patch's "remove": the field goes back to its default.
    reset = await api.patch(SETTINGS_URL, json={"excluded_subjects": None, "timezone": None},
                            headers=admin)
    want = {"timezone": "Europe/Berlin", "excluded_subjects": [], "week_start": "monday"}
    assert reset.json() == want
    assert (await api.get(SETTINGS_URL, headers=admin)).json() == want
    before = await stored(store)
    same = await api.patch(SETTINGS_URL, json={}, headers=admin)
    assert same.json() == want
    assert await stored(store) == before


@pytest.mark.parametrize("sketch_mode", ["exact"])
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"bogus": 1}', ["body", "bogus"]),
        (b'{"bogus": null}', ["body", "bogus"]),
        (b'{"timezone": "Nowhere/City"}', ["body", "timezone"]),
        (b'{"week_start": "friday"}', ["body", "week_start"]),
        (b'{"week_start": 1}', ["body", "week_start"]),
        (b'{"excluded_subjects": [""]}', ["body", "excluded_subjects"]),
        (b'{"timezone": 5}', ["body", "timezone"]),
        (b"[]", ["body"]),
        (b"null", ["body"]),
        (b'"UTC"', ["body"]),
        (b"{not json", ["body"]),
        (b"", ["body"]),
    ],
)
async def test_invalid_bodies_are_422_and_change_nothing(
    api: httpx.AsyncClient, settings: Settings, store: SketchStore, method: str, body: bytes,
    loc: list[Any],
) -> None:
    admin = bearer(settings, "admin")
    await api.put(SETTINGS_URL, json={"timezone": "Asia/Tokyo"}, headers=admin)
    before = await stored(store)
    resp = await api.request(method, SETTINGS_URL, content=body,
                             headers={**admin, "Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert loc in [e["loc"][: len(loc)] for e in resp.json()["detail"]], resp.json()
    assert await stored(store) == before


@pytest.mark.parametrize("sketch_mode", ["exact"])
async def test_patch_needs_the_write_permission_and_a_token_first(
    api: httpx.AsyncClient, settings: Settings, store: SketchStore
) -> None:
    change = {"week_start": "sunday"}
    for role, status in [("basic", 403), ("curator", 403), ("controller", 403),
                         ("admin", 200), ("superadmin", 200)]:
        resp = await api.patch(SETTINGS_URL, json=change, headers=bearer(settings, role))
        assert resp.status_code == status, (role, resp.text)
    assert (await api.patch("/api/v2/org/globex/workspace/w/settings", json=change,
                            headers=bearer(settings, "admin"))).status_code == 403
    assert await stored(store, Scope("globex", "w")) is None
    # Without a token, even a body that would be a 422 is a 401.
    for body in (b'{"bogus": 1}', b"{not json"):
        resp = await api.patch(SETTINGS_URL, content=body)
        assert resp.status_code == 401, resp.text


@pytest.mark.parametrize("sketch_mode", ["exact"])
async def test_concurrent_patches_of_different_fields_all_survive(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Each PATCH reads, merges and writes; without the compare-and-set, the interleaved writes
    would each put back the others' old values."""
    admin = bearer(settings, "admin")
    for _ in range(3):
        await api.put(SETTINGS_URL, json={}, headers=admin)
        patches = [{"timezone": "Asia/Tokyo"}, {"week_start": "sunday"},
                   {"excluded_subjects": ["qa-*"]}]
        answers = await asyncio.gather(
            *(api.patch(SETTINGS_URL, json=p, headers=admin) for p in patches)
        )
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
        got = (await api.get(SETTINGS_URL, headers=admin)).json()
        assert got == {"timezone": "Asia/Tokyo", "excluded_subjects": ["qa-*"],
                       "week_start": "sunday"}


async def test_compare_and_set_writes_only_over_the_value_it_read(store: SketchStore) -> None:
    a, b = WorkspaceSettings(timezone="Asia/Tokyo"), WorkspaceSettings(timezone="UTC")
    assert await compare_and_set(store.client, store.keys, WS, None, a)
    # something is stored now
    assert not await compare_and_set(store.client, store.keys, WS, None, b)
    raw = await read_raw(store.client, store.keys, WS)
    assert raw is not None
    assert not await compare_and_set(store.client, store.keys, WS, raw + b" ", b)
    assert await stored(store) == wss.encode(a)
    assert await compare_and_set(store.client, store.keys, WS, raw, b)
    assert await stored(store) == wss.encode(b)


glob_text = st.text(alphabet="ab*?[]", max_size=10)
subject_text = st.text(alphabet="ab*?[]", max_size=12)


@given(patterns=st.lists(glob_text, min_size=1, max_size=6), subjects=st.lists(subject_text,
                                                                               max_size=8))
def test_the_excluder_agrees_with_fnmatch_on_every_shape(
    patterns: list[str], subjects: list[str]
) -> None:
    """Exact names, prefixes, suffixes, infixes and globs each take their own path; together
    they must say what one glob match per pattern says ('[' is no wildcard here)."""
    patterns = [p for p in patterns if p] or ["a"]
    excluder = wss.Excluder(patterns)
    for s in [*subjects, *patterns]:
        want = any(fnmatch.fnmatchcase(s, p.replace("[", "[[]")) for p in patterns)
        assert excluder(s) is want, (patterns, s)
        assert excluder(s) is want  # remembered, same verdict


def test_patterns_are_sorted_by_shape_and_only_globs_are_matched_as_globs() -> None:
    e = wss.Excluder(["bot", "qa-*", "*-ci", "*test*", "a*b", "x?", "*", "qa-*"])
    assert e.exact == {"bot"}
    assert (e.prefixes, e.suffixes, e.infixes) == (("qa-",), ("-ci",), ("test",))
    assert [g.pattern for g in e.globs] == ["a*b", "x?", "*"]


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        # Issue 11: these cost 3.4 ms per subject, every login of the workspace.
        ([("*" + "?" * 250 + "b*")] * 100, "wildcards"),
        ([f"*{'?' * 6}b{i}*" for i in range(21)], "at most 20 patterns"),
        (["*a?b?c?d?e?f?g?h*"], "9 wildcards"),
        ([f"*{'?' * 6}{i:02d}*" for i in range(9)], "at most 64 allowed"),
    ],
)
def test_patterns_that_would_cost_every_login_too_much_are_refused(
    patterns: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WorkspaceSettings(timezone="UTC", excluded_subjects=patterns)


def test_a_hundred_exact_names_prefixes_suffixes_and_infixes_are_fine() -> None:
    patterns = ([f"user-{i}" for i in range(25)] + [f"qa{i}-*" for i in range(25)]
                + [f"*-bot{i}" for i in range(25)] + [f"*test{i}*" for i in range(25)])
    settings = WorkspaceSettings(timezone="UTC", excluded_subjects=patterns)
    matcher = resolve(settings)
    assert matcher.is_excluded("user-7")
    assert matcher.is_excluded("qa3-alice")
    assert matcher.is_excluded("x-bot9")
    assert matcher.is_excluded("a-test24-b")
    assert not matcher.is_excluded("alice")
