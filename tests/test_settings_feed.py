"""The settings feed (issue 17): a change reaches the consumer's cache at its next poll, scopes
without settings cost no read, a lost feed is read again, and no interleaving of writers and
the reader makes the cache miss a change. Each test has a redis-server of its own, so that
``INFO commandstats`` counts only its commands."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from api.app import create_app
from api.auth import issue_token
from consumer.settings_cache import SettingsCache
from sketches import scope_settings as wss
from sketches import settings_feed
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope, feed_member, org_scope, parse_feed_member
from sketches.scope_settings import OrgSettings, WorkspaceSettings
from sketches.store import SketchStore, run_pipeline
from tests.support.servers import RedisServer

WS = Scope("acme", "tokyo")
ZONES = ["UTC", "Asia/Tokyo", "Europe/Berlin", "America/Sao_Paulo"]


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def feed_settings(url: str, prefix: str = "t") -> Settings:
    return Settings(
        redis_url=url, kafka_bootstrap_servers="127.0.0.1:1", redis_key_prefix=prefix,
        sketch_mode="exact", jwt_secret="test-secret-at-least-32-bytes-long!!",
        rate_limit_per_minute=0, _env_file=None,
    )


@pytest.fixture
async def fstore(own_redis: RedisServer) -> AsyncIterator[SketchStore]:
    admin = own_redis.admin_client(timeout=2)
    admin.flushall()
    admin.close()
    async with open_store(feed_settings(own_redis.url)) as s:
        yield s


async def calls(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int], *names: str) -> dict[str, int]:
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}


SETTINGS_READS = ("get", "mget", "hmget", "hget")


async def tz_of(cache: SettingsCache, scope: Scope) -> str:
    return (await cache.resolve([scope]))[scope].timezone


# ------------------------------------------------------------------ encoding


ids = st.text(min_size=1, max_size=20)


@given(org=ids, ws=st.one_of(st.just(""), ids))
def test_feed_members_round_trip_any_ids_and_never_look_like_the_counter_or_mark(
    org: str, ws: str
) -> None:
    scope = Scope(org, ws)
    member = feed_member(scope)
    assert parse_feed_member(member) == scope
    assert member != settings_feed.COUNTER
    assert not member.startswith(settings_feed.MARK)


def test_an_org_and_its_workspaces_are_different_members() -> None:
    assert feed_member(org_scope("a:b")) != feed_member(Scope("a", "b"))
    assert parse_feed_member(feed_member(org_scope("a:b"))) == org_scope("a:b")


# ------------------------------------------------------------------ a change reaches the cache


async def test_save_and_compare_and_set_reach_the_cache_at_the_next_resolve(
    fstore: SketchStore,
) -> None:
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0)
    assert await tz_of(cache, WS) == "UTC"
    assert cache.complete
    await wss.save(fstore.client, fstore.keys, WS, WorkspaceSettings(timezone="Asia/Tokyo"))
    assert await tz_of(cache, WS) == "Asia/Tokyo"
    raw = await wss.read_raw(fstore.client, fstore.keys, WS)
    assert await wss.compare_and_set(fstore.client, fstore.keys, WS, raw,
                                     WorkspaceSettings(timezone="Europe/Berlin"))
    assert await tz_of(cache, WS) == "Europe/Berlin"
    # A compare-and-set that loses writes nothing and announces nothing.
    assert not await wss.compare_and_set(fstore.client, fstore.keys, WS, raw,
                                         WorkspaceSettings(timezone="UTC"))
    assert await tz_of(cache, WS) == "Europe/Berlin"


async def test_an_orgs_settings_reach_the_cache_too(fstore: SketchStore) -> None:
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0)
    org = org_scope("acme")
    assert (await cache.resolve([org, WS]))[org].timezone == "UTC"
    await wss.save(fstore.client, fstore.keys, org,
                   OrgSettings(timezone="Asia/Tokyo", week_start="sunday"))
    got = await cache.resolve([org, WS])
    assert (got[org].timezone, got[org].week_start) == ("Asia/Tokyo", "sunday")
    assert got[WS].timezone == "UTC"  # the org's settings are not its workspaces'


async def test_ttl_bounds_how_often_the_feed_is_read(fstore: SketchStore) -> None:
    await settings_feed.fill(fstore.client, fstore.keys)
    now = [0.0]
    cache = SettingsCache(fstore, "UTC", ttl_seconds=30, clock=lambda: now[0])
    assert await tz_of(cache, WS) == "UTC"
    await wss.save(fstore.client, fstore.keys, WS, WorkspaceSettings(timezone="Asia/Tokyo"))
    before = await calls(fstore.client)
    now[0] = 29.0
    assert await tz_of(cache, WS) == "UTC"
    assert delta(before, await calls(fstore.client), "zrangebyscore") == {"zrangebyscore": 0}
    now[0] = 30.0
    assert await tz_of(cache, WS) == "Asia/Tokyo"


def bearer(settings: Settings) -> dict[str, str]:
    token = issue_token(settings, role="admin", org_id="acme", ttl_seconds=600, now=time.time())
    return {"Authorization": f"Bearer {token}"}


async def test_put_and_patch_through_the_api_reach_the_cache(
    fstore: SketchStore, own_redis: RedisServer
) -> None:
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0)
    assert await tz_of(cache, WS) == "UTC"
    cfg = feed_settings(own_redis.url)
    url = "/api/v2/org/acme/workspace/tokyo/settings"
    app = create_app(cfg, fstore)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        put = await c.put(url, json={"timezone": "Asia/Tokyo"}, headers=bearer(cfg))
        assert put.status_code == 200, put.text
        assert await tz_of(cache, WS) == "Asia/Tokyo"
        patch = await c.patch(url, json={"timezone": "Europe/Berlin"}, headers=bearer(cfg))
        assert patch.status_code == 200, patch.text
        assert await tz_of(cache, WS) == "Europe/Berlin"
        # A write whose announcement was lost (here: removed by hand) is repaired by the same
        # PATCH again, which changes nothing but announces.
        await run_pipeline(fstore.client, [
            ("SET", fstore.keys.settings(WS), wss.encode(WorkspaceSettings(timezone="UTC")))])
        assert await tz_of(cache, WS) == "Europe/Berlin"  # not announced: not seen
        again = await c.patch(url, json={"timezone": "UTC"}, headers=bearer(cfg))
        assert again.status_code == 200, again.text
        assert await tz_of(cache, WS) == "UTC"


async def test_a_no_op_patch_of_a_scope_without_settings_does_not_grow_the_feed(
    fstore: SketchStore, own_redis: RedisServer
) -> None:
    cfg = feed_settings(own_redis.url)
    app = create_app(cfg, fstore)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        resp = await c.patch("/api/v2/org/acme/workspace/invented/settings",
                             json={"timezone": None}, headers=bearer(cfg))
        assert resp.status_code == 200, resp.text
    assert await fstore.client.exists(fstore.keys.settings_feed()) == 0


# ------------------------------------------------------------------ no read per scope


async def test_a_thousand_scopes_without_settings_cost_one_feed_read_and_no_settings_read(
    fstore: SketchStore,
) -> None:
    tuned = Scope("acme", "tuned")
    await wss.save(fstore.client, fstore.keys, tuned, WorkspaceSettings(timezone="Asia/Tokyo"))
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0)
    names = ("zrangebyscore", *SETTINGS_READS)
    for batch in range(3):
        unknown = [Scope(f"org{i % 37}", f"b{batch}-ws{i}") for i in range(1000)]
        before = await calls(fstore.client)
        got = await cache.resolve(unknown)
        after = await calls(fstore.client)
        assert delta(before, after, *names) == {"zrangebyscore": 1, "get": 0, "mget": 0,
                                                "hmget": 0, "hget": 0}
        assert {r.timezone for r in got.values()} == {"UTC"}
        assert len(got) == 1000
    # The one scope with settings is read once, then kept.
    before = await calls(fstore.client)
    assert await tz_of(cache, tuned) == "Asia/Tokyo"
    assert await tz_of(cache, tuned) == "Asia/Tokyo"
    assert delta(before, await calls(fstore.client), "get", "zrangebyscore") == {
        "get": 1, "zrangebyscore": 2}


async def test_an_incomplete_feed_reads_each_scope_once_until_filled(
    fstore: SketchStore,
) -> None:
    """Settings stored before the feed existed (an upgrade): the consumer cannot take a scope
    absent from the feed to have defaults, so it reads each one once (never again per interval)
    and fills the feed in the background; then it stops reading unknown scopes."""
    old = Scope("acme", "old")
    await fstore.client.set(fstore.keys.settings(old),
                            wss.encode(WorkspaceSettings(timezone="Asia/Tokyo")))
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0, fill=False)
    scopes = [old, *(Scope("acme", f"w{i}") for i in range(50))]
    before = await calls(fstore.client)
    got = await cache.resolve(scopes)
    assert got[old].timezone == "Asia/Tokyo"
    assert not cache.complete
    assert delta(before, await calls(fstore.client), "get") == {"get": 51}
    before = await calls(fstore.client)
    await cache.resolve(scopes)
    assert delta(before, await calls(fstore.client), "get") == {"get": 0}

    filling = SettingsCache(fstore, "UTC", ttl_seconds=0)
    assert (await filling.resolve([old]))[old].timezone == "Asia/Tokyo"
    task = filling._filling
    assert task is not None
    assert await task
    await filling.resolve([])
    assert filling.complete
    before = await calls(fstore.client)
    got = await filling.resolve(scopes)
    assert got[old].timezone == "Asia/Tokyo"
    assert delta(before, await calls(fstore.client), "get") == {"get": 1}  # only `old`


async def test_only_one_process_fills_at_a_time(fstore: SketchStore) -> None:
    await fstore.client.set(fstore.keys.settings_feed_lock(), "someone")
    assert not await settings_feed.fill(fstore.client, fstore.keys)
    assert (await settings_feed.read_all(fstore.client, fstore.keys)).mark is None
    await fstore.client.delete(fstore.keys.settings_feed_lock())
    assert await settings_feed.fill(fstore.client, fstore.keys)
    assert await fstore.client.exists(fstore.keys.settings_feed_lock()) == 0


async def test_fill_finds_only_this_prefixs_settings_and_odd_ids(
    fstore: SketchStore, own_redis: RedisServer
) -> None:
    odd = [Scope("a:b{c}", "x y/z*"), org_scope("[o]?"), Scope("é", "ws")]
    for scope in odd:
        await fstore.client.set(fstore.keys.settings(scope), b"{}")
    async with open_store(feed_settings(own_redis.url, prefix="other")) as other:
        await other.client.set(other.keys.settings(Scope("not", "mine")), b"{}")
        assert await settings_feed.fill(fstore.client, fstore.keys)
    read = await settings_feed.read_all(fstore.client, fstore.keys)
    assert set(read.changes) == set(odd)


# ------------------------------------------------------------------ reading the whole feed


async def whole(s: SketchStore) -> settings_feed.FeedRead:
    (reply,) = await run_pipeline(
        s.client, [("ZRANGEBYSCORE", s.keys.settings_feed(), "-inf", "+inf", "WITHSCORES")])
    return settings_feed.parse(reply)


@hyp_settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.lists(st.integers(1, 7), max_size=12), page=st.integers(1, 9),
       mark=st.booleans())
def test_a_paged_read_of_the_whole_feed_is_the_whole_feed(
    own_redis: RedisServer, groups: list[int], page: int, mark: bool
) -> None:
    """Announcements of several scopes at once share a number, so pages end inside a number."""

    async def run() -> None:
        async with open_store(feed_settings(own_redis.url, prefix=f"p{time.time_ns()}")) as s:
            n = 0
            for size in groups:
                await settings_feed.announce(
                    s.client, s.keys, [Scope("o", f"w{(n + k) % 20}") for k in range(size)])
                n += size
            if mark:
                await settings_feed.fill(s.client, s.keys)
            assert await settings_feed.read_all(s.client, s.keys, page=page) == await whole(s)

    asyncio.run(run())


async def test_a_paged_read_misses_no_scope_that_moves_while_it_pages(
    fstore: SketchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scope already read moves to the end between two pages: everything after it shifts one
    rank down. Paged by rank, the next page would skip a scope; paged by score it cannot."""
    scopes = [Scope("o", f"w{i}") for i in range(10)]
    for sc in scopes:
        await settings_feed.announce(fstore.client, fstore.keys, [sc])
    real = settings_feed.run_pipeline
    pages = [0]

    async def between_pages(client: Any, commands: Any) -> Any:
        result = await real(client, commands)
        pages[0] += 1
        if pages[0] == 1:
            await settings_feed.announce(fstore.client, fstore.keys, [scopes[0], scopes[1]])
        return result

    monkeypatch.setattr(settings_feed, "run_pipeline", between_pages)
    got = await settings_feed.read_all(fstore.client, fstore.keys, page=4)
    monkeypatch.undo()
    assert set(got.changes) == set(scopes)
    assert got == await whole(fstore)
    assert pages[0] > 2


# ------------------------------------------------------------------ a lost feed


async def test_a_flushed_redis_does_not_leave_stale_settings(fstore: SketchStore) -> None:
    await wss.save(fstore.client, fstore.keys, WS, WorkspaceSettings(timezone="Asia/Tokyo"))
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0, fill=False)
    assert await tz_of(cache, WS) == "Asia/Tokyo"
    await fstore.client.flushall()
    assert await tz_of(cache, WS) == "UTC"
    assert not cache.complete
    # Redis counts changes again from 1: the next one is seen.
    await wss.save(fstore.client, fstore.keys, WS, WorkspaceSettings(timezone="Europe/Berlin"))
    assert await tz_of(cache, WS) == "Europe/Berlin"


async def test_a_feed_lost_without_its_settings_falls_back_to_reading(
    fstore: SketchStore,
) -> None:
    """Only the feed is gone (a cluster node that lost it, or a DEL): settings are still
    there, so the consumer must read them, not take defaults."""
    await wss.save(fstore.client, fstore.keys, WS, WorkspaceSettings(timezone="Asia/Tokyo"))
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0, fill=False)
    other = Scope("acme", "other")
    assert (await cache.resolve([WS, other]))[WS].timezone == "Asia/Tokyo"
    await fstore.client.delete(fstore.keys.settings_feed())
    await fstore.client.set(fstore.keys.settings(other),
                            wss.encode(WorkspaceSettings(timezone="Europe/Berlin")))
    got = await cache.resolve([WS, other])
    assert (got[WS].timezone, got[other].timezone) == ("Asia/Tokyo", "Europe/Berlin")
    assert not cache.complete
    await settings_feed.fill(fstore.client, fstore.keys)
    got = await cache.resolve([WS, other])
    assert cache.complete
    assert (got[WS].timezone, got[other].timezone) == ("Asia/Tokyo", "Europe/Berlin")


async def test_a_counter_that_went_backwards_reloads_everything(fstore: SketchStore) -> None:
    """Redis restored from an older snapshot: same mark, lower counter. A change numbered at or
    below the old cursor must still be seen."""
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0, fill=False)
    for zone in ZONES[1:]:
        await wss.save(fstore.client, fstore.keys, WS, WorkspaceSettings(timezone=zone))
    assert await tz_of(cache, WS) == ZONES[-1]
    feed = fstore.keys.settings_feed()
    await fstore.client.zadd(feed, {settings_feed.COUNTER: 0})
    await fstore.client.zrem(feed, feed_member(WS))
    await fstore.client.set(fstore.keys.settings(WS), b"{\"timezone\": \"Asia/Tokyo\"}")
    await settings_feed.announce(fstore.client, fstore.keys, [WS])  # number 1, below cursor
    assert await tz_of(cache, WS) == "Asia/Tokyo"


# ------------------------------------------------------------------ interleavings

SCOPES = [WS, Scope("acme", "b"), org_scope("acme")]


def decoded_zone(raw: Any, scope: Scope) -> str:
    return wss.decode_scope(raw, scope, "UTC").timezone


def settings_of(scope: Scope, zone: str) -> bytes:
    model = OrgSettings if scope.is_org else WorkspaceSettings
    return wss.encode(model(timezone=zone))


Step = tuple[str, int, int]  # ("write", scope, zone) | ("announce", scope, 0) | ("read", 0, 0)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, len(SCOPES) - 1),
                  st.integers(0, len(ZONES) - 1)),
        st.tuples(st.just("announce"), st.integers(0, len(SCOPES) - 1), st.just(0)),
        st.tuples(st.just("read"), st.just(0), st.just(0)),
    ),
    max_size=25,
)


@hyp_settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=steps, complete=st.booleans())
def test_no_interleaving_of_writes_announcements_and_reads_misses_a_change(
    own_redis: RedisServer, script: list[Step], complete: bool
) -> None:
    """Writers split into their two steps (the settings write, later its announcement), in any
    order with the reader's polls and reads. Once every write is announced, one more resolve
    must show what Redis holds, for every scope."""

    async def run() -> None:
        async with open_store(feed_settings(own_redis.url, prefix=f"h{time.time_ns()}")) as s:
            if complete:
                await settings_feed.fill(s.client, s.keys)
            cache = SettingsCache(s, "UTC", ttl_seconds=0, fill=False)
            pending: list[int] = []
            for kind, i, z in script:
                if kind == "write":
                    await s.client.set(s.keys.settings(SCOPES[i]), settings_of(SCOPES[i], ZONES[z]))
                    pending.append(i)
                elif kind == "announce" and i in pending:
                    pending.remove(i)
                    await settings_feed.announce(s.client, s.keys, [SCOPES[i]])
                elif kind == "read":
                    await cache.resolve(SCOPES)
            await settings_feed.announce(s.client, s.keys, [SCOPES[i] for i in pending])
            got = await cache.resolve(SCOPES)
            stored = [decoded_zone(await s.client.get(s.keys.settings(sc)), sc) for sc in SCOPES]
            assert [got[sc].timezone for sc in SCOPES] == stored

    asyncio.run(run())


async def test_concurrent_writers_and_a_polling_reader_converge(fstore: SketchStore) -> None:
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0, fill=False)
    scopes = [Scope("acme", f"w{i}") for i in range(8)]
    done = asyncio.Event()

    async def writer(k: int) -> None:
        for n in range(30):
            scope = scopes[(k * 7 + n) % len(scopes)]
            await wss.save(fstore.client, fstore.keys, scope,
                           WorkspaceSettings(timezone=ZONES[(k + n) % len(ZONES)]))

    async def reader() -> None:
        while not done.is_set():
            await cache.resolve(scopes)
            await asyncio.sleep(0)

    polling = asyncio.create_task(reader())
    await asyncio.gather(*(writer(k) for k in range(4)))
    done.set()
    await polling
    got = await cache.resolve(scopes)
    stored = [decoded_zone(await fstore.client.get(fstore.keys.settings(sc)), sc)
              for sc in scopes]
    assert [got[sc].timezone for sc in scopes] == stored


# ------------------------------------------------------------------ memory bound


async def test_the_cache_keeps_at_most_max_entries_and_reads_an_evicted_scope_again(
    fstore: SketchStore,
) -> None:
    tuned = [Scope("acme", f"t{i}") for i in range(5)]
    for i, scope in enumerate(tuned):
        await wss.save(fstore.client, fstore.keys, scope,
                       WorkspaceSettings(timezone=ZONES[1 + i % 3]))
    await settings_feed.fill(fstore.client, fstore.keys)
    cache = SettingsCache(fstore, "UTC", ttl_seconds=0, max_entries=2)
    for scope in tuned:
        await cache.resolve([scope])
        assert len(cache._cache) <= 2
    before = await calls(fstore.client)
    got = await cache.resolve(tuned)
    assert [got[s].timezone for s in tuned] == [ZONES[1 + i % 3] for i in range(5)]
    assert delta(before, await calls(fstore.client), "get")["get"] >= 3
    assert len(cache._cache) == 2
