"""Tests that a mutation pass showed missing (docs/mutation.md): each pins a rule of the write
protocol, the rebuild's switch or the stored results that a changed line once broke without any
test noticing. Real Redis, both sketch modes, through the project's own code."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord
from pydantic import SecretStr

from consumer.batch import Parsed
from consumer.events import Parser, Rules
from consumer.recordfilter import (
    KEY_SAMPLE_EVERY,
    KeyedPartitions,
    RecordFilter,
    WrongRecordKey,
    workspace_key,
)
from consumer.selection import Selection
from sketches import settings_feed
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import KeySpace, Scope
from sketches.periods import day_of, month_of, periods_holding, week_of
from sketches.store import WRITE_SHA, SketchStore
from sketches.writes import ScopeWrite, calls, expire_at, group_by_scope, new_token
from tests.support.servers import RedisServer
from usage_metrics.synth import SynthEvent

WS = Scope("acme", "mutants")


def pinned_now(store: SketchStore) -> float:
    """One instant for the writes and the switch: a test that crosses UTC midnight must not see
    the horizon move between them."""
    now = time.time()
    store.clock = lambda: now  # type: ignore[method-assign]
    return now


async def scope_keys(client: aioredis.Redis, store: SketchStore, scope: Scope) -> set[bytes]:
    head = store.keys.workspace_prefix(scope)
    return {k async for k in client.scan_iter(match=head.replace("{", "\\{") + "*")}


async def test_the_switch_removes_live_sketches_at_both_edges_of_what_can_still_exist(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    """The switch names the live keys instead of scanning (``_live_candidates``): the oldest
    day whose key has not reached its deadline, and a day ahead of UTC (a zone at UTC+14), are
    among them, or an old-generation sketch would outlive the switch and be served with the new
    ones."""
    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    retention = store.retention_days
    oldest = today - timedelta(days=retention + 1)  # deadline: the next UTC midnight
    assert expire_at(day_of(oldest), retention) > now
    assert expire_at(day_of(oldest - timedelta(days=1)), retention) <= now
    ahead = today + timedelta(days=1)
    assert await store.add_by_day(
        {(WS, oldest): {"old"}, (WS, ahead): {"old"}, (WS, today): {"old"}}, {WS: "monday"}
    ) == []
    written = [p for d in (oldest, ahead) for p in periods_holding(d)]
    for p in written:
        assert await redis_client.exists(store.keys.sketch(WS, p)) == 1, p
    building = await store.begin_rebuild([WS])
    await store.add_by_day({(WS, today): {"new"}}, {WS: "monday"}, building=building)
    await store.finish_rebuild(building)
    assert await store.counts(WS, [day_of(oldest), day_of(ahead)]) == [0, 0]
    left = [p for p in written if await redis_client.exists(store.keys.sketch(WS, p))
            and p not in periods_holding(today)]
    assert left == []
    assert await store.counts(WS, [day_of(today)]) == [1]


async def test_a_scope_of_more_keys_than_one_unlink_is_deleted_whole(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    """``delete_workspace`` unlinks in chunks of 500 keys: every chunk, and the count it
    answers, must cover every key (a scope with 800 days of logins has ~950)."""
    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    await store.add_by_day({(WS, today - timedelta(days=i)): {"u"} for i in range(700)},
                           {WS: "monday"})
    await redis_client.set(store.keys.settings(WS), b"{}")
    before = await scope_keys(redis_client, store, WS)
    assert len(before) > 1000 - 200  # days, weeks, months and the meta: two chunks at least
    deleted = await store.delete_workspace(WS)
    assert deleted == len(before) - 1  # everything but the settings
    assert await scope_keys(redis_client, store, WS) == {store.keys.settings(WS).encode()}


async def test_a_cancelled_rebuild_of_more_keys_than_one_unlink_leaves_none(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    """``cancel_rebuild`` drops a generation in chunks of 500 names: none may be left behind
    (they would be renamed over the live sketches by nobody, but hold memory until they
    expire), and the live sketches stay as they were."""
    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    await store.add_by_day({(WS, today): {"live"}}, {WS: "monday"})
    live = await scope_keys(redis_client, store, WS)
    building = await store.begin_rebuild([WS])
    await store.add_by_day({(WS, today - timedelta(days=i)): {"u"} for i in range(700)},
                           {WS: "monday"}, building=building)
    registry = store.keys.registry(WS, building[WS])
    assert await redis_client.scard(registry) > 500
    await store.cancel_rebuild(building)
    assert await scope_keys(redis_client, store, WS) == live
    assert await redis_client.hget(store.keys.meta(WS), "b") is None
    assert await store.counts(WS, [day_of(today)]) == [1]


def test_parts_fill_each_call_up_to_the_limit_and_no_further() -> None:
    """Parts are packed greedily: keys that fit together share a part, a key of exactly the
    limit is one part (as the set it is), and one larger is cut into limit-sized pieces. More
    parts than needed would cost a script call, a counter value and a stamp each."""
    today = datetime.now(UTC).date()
    days = [day_of(today - timedelta(days=i)) for i in range(4)]

    def sizes(write: ScopeWrite, limit: int) -> list[list[int]]:
        return [[len(m) for m in part.sketches.values()] for part in write.parts(limit)]

    def write_of(*counts: int) -> ScopeWrite:
        return ScopeWrite(sketches={d: {f"{d.start}-{k}" for k in range(n)}
                                    for d, n in zip(days, counts, strict=False)}, days={today})

    assert sizes(write_of(2, 4), 6) == [[2, 4]]
    assert sizes(write_of(3, 3, 3), 6) == [[3, 3], [3]]
    assert sizes(write_of(6), 6) == [[6]]
    assert sizes(write_of(1, 6), 6) == [[1], [6]]
    assert sizes(write_of(13), 6) == [[6], [6], [1]]
    assert sizes(write_of(4, 13), 6) == [[4], [6], [6], [1]]


def test_scopes_share_a_call_up_to_exactly_the_limit() -> None:
    """``calls`` closes a call only when the next scope's members would pass the limit: two
    scopes whose members add up to it share one call, one more member opens a second."""
    keys = KeySpace("um", "hll")
    today = datetime.now(UTC).date()
    a, b = Scope("acme", "a"), Scope("acme", "b")

    def grouped(n: int) -> dict[Scope, ScopeWrite]:
        return {s: ScopeWrite(sketches={day_of(today): {f"m{k}" for k in range(size)}},
                              days={today}) for s, size in ((a, 4), (b, n))}

    def scopes_per_call(n: int) -> list[list[Scope]]:
        return [c.scopes for c in calls(WRITE_SHA, keys, grouped(n), retention_days=800,
                                        now=time.time(), token=new_token(), command="PFADD",
                                        limit=10)]

    assert scopes_per_call(6) == [[a, b]]
    assert scopes_per_call(7) == [[a], [b]]
    # On a cluster only scopes of one slot share a call (CROSSSLOT otherwise).
    slots = {a: 1, b: 2}
    per_slot = calls(WRITE_SHA, keys, grouped(1), retention_days=800, now=time.time(),
                     token=new_token(), command="PFADD", limit=10, slot_of=slots.__getitem__)
    assert [c.scopes for c in per_slot] == [[a], [b]]


# ------------------------------------------------------------------ grouping a batch per scope


def test_a_lone_week_after_a_day_and_an_empty_key_first_are_grouped_like_any_other() -> None:
    """``group_by_scope`` skips a key with no members and goes on with the rest of the batch,
    and stamps the first day of every week or month none of whose days is written, wherever
    it comes in the batch; a week whose last day is written needs no other stamp."""
    ws = Scope("acme", "grouped")
    d = datetime.now(UTC).date()
    lone = week_of(d - timedelta(days=14))
    grouped = group_by_scope({
        (ws, day_of(d - timedelta(days=1))): set(),  # nothing to add: not written at all
        (ws, day_of(d)): {"a"},
        (ws, lone): {"b"},
    })
    assert set(grouped[ws].sketches) == {day_of(d), lone}
    assert grouped[ws].days == {d, lone.start}
    last = week_of(d).end
    assert group_by_scope({(ws, day_of(last)): {"a"}, (ws, week_of(last)): {"a"},
                           (ws, month_of(last)): {"a"}})[ws].days == {last}


# ------------------------------------------------------------------ the keyed rebuild's checks

RULES = Rules(login_type="login", retention_days=800, max_bytes=65_536)
PARTITIONS = 8


def record(key: bytes | None, value: bytes | None, partition: int, offset: int = 0) -> Any:
    size = len(value) if value is not None else 0
    return ConsumerRecord("t", partition, offset, 0, 0, key, value, None, 0, size, [])


def login_value(ws: str, metric: str = "login") -> bytes:
    event = SynthEvent("acme", ws, "u1", datetime.now(UTC)).to_json()
    return event.replace(b'"login"', f'"{metric}"'.encode()) if metric != "login" else event


def test_one_skipped_record_in_each_sample_period_is_parsed() -> None:
    """The key check parses one skipped record in ``KEY_SAMPLE_EVERY``, starting with the
    first: enough to catch a producer that keys by something else, at a fraction of a parse."""
    keyed = KeyedPartitions(Selection.of([Scope("acme", "target")]), "login")
    picks = [keyed.sampled() for _ in range(3 * KEY_SAMPLE_EVERY)]
    assert picks.count(True) == 3
    assert picks[0] is True


def test_a_sampled_record_that_is_no_login_of_another_workspace_passes() -> None:
    """A skipped record that holds nothing (a tombstone), no JSON object, or another metric
    type with another workspace id says nothing about the producers' keys: it never fails the
    rebuild, while a login under another workspace's key does."""
    keyed = KeyedPartitions(Selection.of([Scope("acme", "target")]), "login")
    key = workspace_key("ws-1")
    for value in (None, b"[1, 2]", b'"text"', b"not json", login_value("ws-2", "page_view"),
                  login_value("ws-1")):
        keyed.check_value(record(key, value, 0))
    with pytest.raises(WrongRecordKey, match="holds workspace 'ws-2' under key"):
        keyed.check_value(record(key, login_value("ws-2"), 0))


def test_an_unkeyed_rebuild_reads_every_partition_and_a_keyed_one_only_the_homes() -> None:
    """``KAFKA_RECORD_KEY=none``: no partition can be ruled out (None: all of them)."""
    selection = Selection.of([Scope("acme", "target")])
    assert RecordFilter(selection, keyed=False, login_type="login").partitions(8) is None
    home = RecordFilter(selection, keyed=True, login_type="login").partitions(8)
    assert home is not None
    assert len(home) == 1


def test_a_workspace_key_is_the_ids_utf8_even_for_a_lone_surrogate() -> None:
    """An id read from the command line may hold a lone surrogate (undecodable bytes): its key
    is still computed (``surrogatepass``), never a crash of the rebuild."""
    assert workspace_key("ws-\u00e9") == "ws-\u00e9".encode()
    assert workspace_key("w\udcff") == b"w\xed\xb3\xbf"


def test_a_parsed_login_under_another_workspaces_key_fails_with_its_place() -> None:
    """A selected workspace's key holding another workspace's login is the proof that
    producers do not key by workspace: the rebuild fails with the record's place."""
    target = Scope("acme", "target")
    records = RecordFilter(Selection.of([target]), keyed=True, login_type="login")
    records.partitions(PARTITIONS)
    parser = Parser(RULES, datetime.now(UTC))
    good, bad = (record(workspace_key("target"), login_value(ws), 3, offset=41 + i)
                 for i, ws in enumerate(("target", "intruder")))
    logins = [parser.parse(r.value) for r in (good, bad)]
    records.check(Parsed(logins=[logins[0]], sources=[good]))  # type: ignore[list-item]
    with pytest.raises(WrongRecordKey, match="partition 3 offset 42 of t holds workspace "
                                             "'intruder' under key"):
        records.check(Parsed(logins=logins, sources=[good, bad]))  # type: ignore[arg-type]


# ------------------------------------------------------------------ the settings feed


def test_the_settings_pattern_escapes_every_glob_character_of_the_prefix() -> None:
    """``fill`` scans for this prefix's settings only: a prefix holding a glob character must
    not match another prefix's keys."""
    pattern = settings_feed.settings_pattern(KeySpace("a*b?[c]\\", "hll"))
    assert pattern == "a\\*b\\?\\[c\\]\\\\:{*}:settings"


def test_a_feed_without_its_counter_went_back_for_any_reader_that_had_seen_a_change() -> None:
    """No counter in the range read: the feed was lost. Only a reader that never saw a change
    (cursor 0) may take that as an empty feed."""
    empty = settings_feed.FeedRead()
    assert settings_feed.went_back(empty, 1)
    assert settings_feed.went_back(empty, 0.5)
    assert not settings_feed.went_back(empty, 0)
    assert settings_feed.went_back(settings_feed.FeedRead(counter=4), 5)
    assert not settings_feed.went_back(settings_feed.FeedRead(counter=5), 5)


async def test_every_script_call_that_fails_whole_is_reported_with_its_scope(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    """A call fails whole when a scope's bookkeeping holds something else: each such scope is
    reported on its own (the consumer dead-letters and logs per key), not folded into one."""
    store.members_per_call = 1  # one scope a call
    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    broken = [Scope("acme", "broken-1"), Scope("acme", "broken-2")]
    for scope in broken:
        await redis_client.set(store.keys.meta(scope), b"not a hash")
    failed = await store.add_by_day({(s, today): {"u"} for s in broken},
                                    dict.fromkeys(broken, "monday"))
    assert sorted(f.key for f in failed) == sorted(store.keys.workspace_prefix(s)
                                                   for s in broken)


# ------------------------------------------------------------------ stored results


async def test_a_new_day_recomputes_only_what_it_changed_not_the_whole_span(
    store: SketchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the day turns the stored result's span moves by one: the entries that overlap keep
    their values and stamps (``Stored.moved_to``), so the next request recomputes the new day
    and the periods it starts, not 731 entries of every column."""
    from sketches.query import ALL_METRICS, Window
    from sketches.results import Answers, Query

    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    await store.add_by_day({(WS, today - timedelta(days=i)): {f"u{i}"} for i in range(40)},
                           {WS: "monday"})
    answers = Answers(store, retention_days=store.retention_days, default_timezone="UTC",
                      cache_entries=0)
    recomputed: list[int] = []
    real = Answers._recompute

    async def counting(self: Answers, scope: Scope, stored: Any, todo: Any, config: Any) -> None:
        recomputed.append(max(int(v.size) for v in todo.values()))
        await real(self, scope, stored, todo, config)

    monkeypatch.setattr(Answers, "_recompute", counting)
    for day in (today, today + timedelta(days=1)):
        query = Query(day, 730, ALL_METRICS, Window.CALENDAR, day)
        await answers.answer(await answers.snapshot(WS), query, lambda s: repr(s).encode(), "r")
        await answers.drain()
    assert recomputed[0] > 700  # the first answer computes every entry
    assert recomputed[1] <= 31  # the next day: its own entries, at most a month's


async def test_the_scope_answered_last_keeps_its_span_when_the_bound_is_reached(
    store: SketchStore,
) -> None:
    """Each process remembers, per scope, the span it last answered over (what a repeated
    request checks before it is served from the cache), for at most ``cache_entries`` scopes:
    the oldest goes, never the one just answered."""
    from sketches.query import ALL_METRICS, Window
    from sketches.results import Answers, Query

    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    a, b = Scope("acme", "span-a"), Scope("acme", "span-b")
    await store.add_by_day({(a, today): {"u"}, (b, today): {"v"}}, {a: "monday", b: "monday"})
    answers = Answers(store, retention_days=store.retention_days, default_timezone="UTC",
                      cache_entries=1)
    query = Query(today, 730, ALL_METRICS, Window.CALENDAR, today)
    hits = []
    for scope in (a, b, b):
        _, hit = await answers.answer(await answers.snapshot(scope), query,
                                      lambda s: repr(s).encode(), "r")
        await answers.drain()
        hits.append(hit)
    assert hits == [False, False, True]


async def test_a_fill_of_more_settings_than_one_announcement_names_every_scope(
    store: SketchStore,
) -> None:
    """``fill`` announces the scopes it finds ``FILL_CHUNK`` at a time: a deployment with more
    scopes with settings than that must find every one in the feed."""
    scopes = [Scope("fill", f"w{i}") for i in range(settings_feed.FILL_CHUNK + 7)]
    for i in range(0, len(scopes), 100):
        await store.client.mset({store.keys.settings(s): b"{}" for s in scopes[i : i + 100]})
    assert await settings_feed.fill(store.client, store.keys)
    read = await settings_feed.read_all(store.client, store.keys)
    assert set(read.changes) == set(scopes)
    assert read.mark is not None


async def test_a_redis_that_lost_its_scripts_takes_the_batch_on_the_retry(
    settings: Settings,
) -> None:
    """A Redis that restarted (or a new master) has no script cache: the write loads the script
    and sends the same batch again, which then counts every member once. (A Redis of its own:
    ``SCRIPT FLUSH`` must not reach another test's calls.)"""
    server = RedisServer().start()
    try:
        own = settings.model_copy(update={"redis_url": SecretStr(server.url)})
        async with open_store(own) as store:
            now = pinned_now(store)
            today = datetime.fromtimestamp(now, UTC).date()
            for members in ({"a", "b"}, {"b", "c"}):
                await store.client.script_flush()
                assert await store.add_by_day({(WS, today): members}, {WS: "monday"}) == []
            assert await store.counts(WS, list(periods_holding(today))) == [3, 3, 3]
    finally:
        server.stop()


async def test_a_meta_without_a_deadline_still_gets_its_result_stored_for_the_retention(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    """A ``meta`` someone made persistent has no instant to tie the result to: the result is
    still stored, for the retention span, rather than not at all."""
    from sketches.query import ALL_METRICS, Window
    from sketches.results import Answers, Query

    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    await store.add_by_day({(WS, today): {"u"}}, {WS: "monday"})
    await redis_client.persist(store.keys.meta(WS))
    answers = Answers(store, retention_days=store.retention_days, default_timezone="UTC",
                      cache_entries=0)
    query = Query(today, 730, ALL_METRICS, Window.CALENDAR, today)
    await answers.answer(await answers.snapshot(WS), query, lambda s: repr(s).encode(), "r")
    await answers.drain()
    ttl_ms = await redis_client.pttl(store.keys.result(WS, "v1"))
    assert store.retention_days * 86_400_000 - 60_000 < ttl_ms <= store.retention_days * 86_400_000


def test_stamps_outside_the_span_are_ignored_on_both_sides() -> None:
    """``meta`` holds the stamps of every day written (a login dated ahead, a day older than
    the span): only the span's own days are read, the ones just outside included."""
    from sketches.results import stamps_from

    first = datetime.now(UTC).date()
    lo = first.toordinal()
    got = stamps_from({lo - 1: 7, lo: 1, lo + 2: 3, lo + 3: 9}, first, 3)
    assert got.tolist() == [1, 0, 3]


async def test_every_key_that_holds_something_else_is_reported(
    store: SketchStore, redis_client: aioredis.Redis
) -> None:
    """Each key the script could not write is reported on its own, with Redis's error: the
    consumer logs and dead-letters per key, and writes the rest of the batch."""
    now = pinned_now(store)
    today = datetime.fromtimestamp(now, UTC).date()
    days = [today, today - timedelta(days=1)]
    for d in days:
        await redis_client.set(store.keys.sketch(WS, day_of(d)), b"not a sketch")
    failed = await store.add_by_day({(WS, d): {"u"} for d in days}, {WS: "monday"})
    assert sorted(f.key for f in failed) == sorted(store.keys.sketch(WS, day_of(d))
                                                   for d in days)
    assert await store.counts(WS, [week_of(today)]) == [1]  # the rest of the batch is kept


async def test_a_settings_key_that_does_not_parse_is_skipped_not_the_end_of_the_fill(
    store: SketchStore,
) -> None:
    """``fill`` marks the feed complete when its scan ends: a key it cannot read as a scope's
    (a stray key matching the pattern) must be passed over, or the scopes the scan meets after
    it would be taken for scopes without settings."""
    scopes = [Scope("stray", f"w{i}") for i in range(40)]
    await store.client.mset({store.keys.settings(s): b"{}" for s in scopes})
    await store.client.set(f"{store.keys.prefix}:{{a:b:c}}:settings", b"{}")
    assert await settings_feed.fill(store.client, store.keys)
    read = await settings_feed.read_all(store.client, store.keys)
    assert set(read.changes) == set(scopes)
