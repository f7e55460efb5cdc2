"""Redis's eviction policy and a full Redis (issue 15, "Eviction").

The decision is pure and tested as such, with a Hypothesis property; every path that talks to
Redis runs against a real ``redis-server`` of the test's own, started with the policy, the small
``maxmemory`` or the renamed ``CONFIG`` it needs. The processes' start-up and the consumer's
pause end to end are in ``tests/faults/test_eviction_startup.py`` and
``tests/faults/test_full_redis.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from api.app import create_app
from api.auth import issue_token
from consumer.pause import REDIS_OOM, Pause
from consumer.writer import BatchWriter
from sketches.config import Settings
from sketches.connection import open_store
from sketches.errors import StoreOutOfMemory, StoreUnavailable
from sketches.eviction import (
    EvictionRefused,
    NodeMemory,
    NodePolicy,
    Verdict,
    check_policy,
    decide,
    judge,
    oom_reason,
    read_memory,
    read_policies,
)
from sketches.keys import Scope
from sketches.periods import day_of, utc_today
from sketches.store import SketchStore
from tests.support.memory import fill, redis_server
from tests.support.servers import free_port
from usage_metrics.synth import SynthEvent

POLICIES = ["noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru",
            "volatile-lfu", "volatile-random", "volatile-ttl"]
EVICTING = [p for p in POLICIES if p != "noeviction"]
SECRET = "eviction-test-secret-at-least-32-bytes!"
TODAY = utc_today()


def settings_for(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "redis_url": url, "redis_key_prefix": f"ev-{uuid.uuid4().hex[:8]}",
        "sketch_mode": "exact", "jwt_secret": SECRET, "redis_retry_max_backoff_s": 0.2,
        "kafka_topic": "metrics",
    }
    values.update(overrides)
    return Settings(**values, _env_file=None)  # type: ignore[arg-type]


def gauge(name: str, labels: dict[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


# --------------------------------------------------------------------------- the decision


def test_noeviction_everywhere_is_ok() -> None:
    check = decide([NodePolicy("r:6379", "noeviction")], allow_eviction=False)
    assert check.verdict is Verdict.OK
    assert "noeviction" in check.message


@pytest.mark.parametrize("policy", EVICTING)
def test_an_evicting_policy_is_refused_naming_the_policy_the_fix_and_the_override(
    policy: str,
) -> None:
    check = decide([NodePolicy("redis.internal:6379", policy)], allow_eviction=False)
    assert check.verdict is Verdict.REFUSED
    for needed in (policy, "redis.internal:6379", "CONFIG SET maxmemory-policy noeviction",
                   "parameter group", "REDIS_ALLOW_EVICTION=true"):
        assert needed in check.message, (needed, check.message)


@pytest.mark.parametrize("policy", EVICTING)
def test_the_override_turns_the_refusal_into_a_warning(policy: str) -> None:
    check = decide([NodePolicy("r:1", policy)], allow_eviction=True)
    assert check.verdict is Verdict.ALLOWED
    assert policy in check.message
    assert "REDIS_ALLOW_EVICTION=true" in check.message


def test_the_override_changes_nothing_where_nothing_evicts() -> None:
    assert decide([NodePolicy("r:1", "noeviction")], allow_eviction=True).verdict is Verdict.OK
    unknown = decide([NodePolicy("r:1", refusal="unknown command")], allow_eviction=True)
    assert unknown.verdict is Verdict.UNKNOWN


def test_config_refused_is_unknown_and_says_to_make_sure() -> None:
    check = decide([NodePolicy("r:1", refusal="ResponseError: unknown command 'CONFIG'")],
                   allow_eviction=False)
    assert check.verdict is Verdict.UNKNOWN
    assert check.message.startswith("CONFIG is disabled here (as on some managed services): "
                                    "cannot check maxmemory-policy")
    assert "make sure it is noeviction" in check.message
    assert "unknown command 'CONFIG'" in check.message


def test_masters_that_differ_are_reported_node_by_node() -> None:
    nodes = [NodePolicy("a:1", "noeviction"), NodePolicy("b:2", "allkeys-lru"),
             NodePolicy("c:3", "volatile-ttl"), NodePolicy("d:4", refusal="NOPERM")]
    check = decide(nodes, allow_eviction=False)
    assert check.verdict is Verdict.REFUSED  # one evicting master is enough
    assert "allkeys-lru on b:2" in check.message
    assert "volatile-ttl on c:3" in check.message
    assert "a:1" not in check.message
    assert "d:4" not in check.message
    assert check.nodes == tuple(nodes)


def test_no_master_at_all_is_unknown_not_ok() -> None:
    assert decide([], allow_eviction=False).verdict is Verdict.UNKNOWN


node_policies = st.lists(
    st.tuples(st.sampled_from([*POLICIES, None]), st.booleans()), max_size=6
).map(lambda items: [
    NodePolicy(f"n{i}:7000", policy, None if policy else "NOPERM")
    for i, (policy, _) in enumerate(items)
])


@given(nodes=node_policies, allow=st.booleans())
def test_the_verdict_follows_the_worst_master(nodes: list[NodePolicy], allow: bool) -> None:
    check = decide(nodes, allow)
    evicting = [n for n in nodes if n.policy not in (None, "noeviction")]
    if evicting:
        assert check.verdict is (Verdict.ALLOWED if allow else Verdict.REFUSED)
        for n in evicting:
            assert f"{n.node}" in check.message
            assert str(n.policy) in check.message
    elif nodes and all(n.policy == "noeviction" for n in nodes):
        assert check.verdict is Verdict.OK
    else:
        assert check.verdict is Verdict.UNKNOWN
        for n in nodes:
            if n.policy is None:
                assert n.node in check.message


def test_judge_sets_the_gauge_and_raises_on_a_refusal() -> None:
    name = "usage_metrics_redis_eviction_allowed"
    judge([NodePolicy("r:1", "allkeys-lru")], allow_eviction=True)
    assert gauge(name) == 1
    judge([NodePolicy("r:1", "noeviction")], allow_eviction=True)
    assert gauge(name) == 0
    with pytest.raises(EvictionRefused) as refused:
        judge([NodePolicy("r:1", "volatile-lru")], allow_eviction=False)
    assert refused.value.check.verdict is Verdict.REFUSED
    assert str(refused.value) == refused.value.check.message
    assert gauge(name) == 0


def test_the_out_of_memory_reason_gives_the_full_masters_figures() -> None:
    reason = oom_reason([NodeMemory("a:1", used=5 << 20, maxmemory=4 << 20),
                         NodeMemory("b:2", used=1 << 20, maxmemory=4 << 20),
                         NodeMemory("c:3", used=1 << 20, maxmemory=0)])
    assert reason.startswith("Redis is out of memory (a:1: maxmemory 4.0 MiB, used 5.0 MiB): "
                             "ingestion paused, retrying")
    assert "b:2" not in reason
    assert "c:3" not in reason
    # Memory already freed (or the figures lag): every limited master, not none.
    near = oom_reason([NodeMemory("a:1", used=3 << 20, maxmemory=4 << 20)])
    assert "a:1: maxmemory 4.0 MiB, used 3.0 MiB" in near
    assert "maxmemory unknown: INFO refused" in oom_reason(None, "INFO refused")
    # Exactly at the limit is full (Redis refuses from there on).
    at = oom_reason([NodeMemory("a:1", used=4 << 20, maxmemory=4 << 20),
                     NodeMemory("b:2", used=1 << 20, maxmemory=4 << 20)])
    assert "a:1: maxmemory 4.0 MiB, used 4.0 MiB" in at
    assert "b:2" not in at
    assert "maxmemory unknown" in oom_reason([NodeMemory("c:3", used=1, maxmemory=0)])


# --------------------------------------------------------------------------- the pause


def test_a_pause_lasts_from_the_first_out_of_memory_to_the_next_success() -> None:
    series = ("usage_metrics_consumer_paused", {"reason": REDIS_OOM})
    pause = Pause()
    assert pause.reason is None
    assert gauge(*series) == 0
    pause.failed(StoreOutOfMemory("OutOfMemoryError: command not allowed"))
    pause.failed(StoreOutOfMemory("OutOfMemoryError: command not allowed"))
    assert pause.reason == REDIS_OOM
    assert pause.attempts == 2
    assert gauge(*series) == 1
    pause.resumed()
    assert pause.reason is None
    assert pause.attempts == 0
    assert gauge(*series) == 0
    # Redis away (or the broker) is no pause of this kind: /readyz sees those by itself.
    pause.failed(StoreOutOfMemory("OOM"))
    pause.failed(StoreUnavailable("ConnectionError: refused"))
    assert pause.reason is None
    assert gauge(*series) == 0
    pause.failed(StoreUnavailable("ConnectionError: refused"))
    assert pause.reason is None
    assert gauge(*series) == 0


# ---------------------------------------------------------------- real servers: the policy


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru", "volatile-lru"])
async def test_the_policy_is_read_from_a_real_redis(policy: str) -> None:
    with redis_server("--maxmemory", "8mb", "--maxmemory-policy", policy) as server:
        client = aioredis.Redis(port=server.port)
        try:
            nodes = await read_policies(client)
        finally:
            await client.aclose()
    assert nodes == [NodePolicy(f"localhost:{server.port}", policy)]


async def test_config_renamed_away_is_unknown_and_not_an_outage() -> None:
    with redis_server("--rename-command", "CONFIG", "") as server:
        client = aioredis.Redis(port=server.port)
        try:
            [node] = await read_policies(client)
            check = judge([node], allow_eviction=False)
        finally:
            await client.aclose()
    assert node.policy is None
    assert "unknown command" in str(node.refusal)
    assert check.verdict is Verdict.UNKNOWN


async def test_an_acl_user_without_config_is_unknown() -> None:
    with redis_server() as server:
        admin = aioredis.Redis(port=server.port)
        await admin.execute_command("ACL", "SETUSER", "metrics", "on", ">pw-of-the-test",
                                    "~*", "&*", "+@all", "-config")
        user = aioredis.Redis(port=server.port, username="metrics", password="pw-of-the-test")
        try:
            [node] = await read_policies(user)
        finally:
            await user.aclose()
            await admin.aclose()
    assert node.policy is None
    assert "no permissions" in str(node.refusal)
    assert "pw-of-the-test" not in str(node)


async def test_a_redis_that_answers_late_is_checked_once_it_answers() -> None:
    port = free_port()
    client = aioredis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await read_policies(client)
        checking = asyncio.create_task(check_policy(client, False, max_backoff=0.2))
        await asyncio.sleep(0.5)
        assert not checking.done(), "judged a Redis that never answered"
        with (redis_server("--maxmemory-policy", "allkeys-lfu", port=port),
              pytest.raises(EvictionRefused, match="allkeys-lfu")):
            await asyncio.wait_for(checking, 30)
        # Asked to stop while waiting: no verdict, no error.
        stop = asyncio.Event()
        waiting = asyncio.create_task(check_policy(client, False, max_backoff=0.2, stop=stop))
        await asyncio.sleep(0.3)
        stop.set()
        assert await asyncio.wait_for(waiting, 10) is None
    finally:
        await client.aclose()


async def test_memory_figures_come_from_info_memory() -> None:
    with redis_server("--maxmemory", "64mb") as server:
        client = aioredis.Redis(port=server.port)
        try:
            [node] = await read_memory(client)
            info = await client.info("memory")
        finally:
            await client.aclose()
    assert node.node == f"localhost:{server.port}"
    assert node.maxmemory == 64 << 20
    assert 0 < node.used < 16 << 20  # an empty server: a few MiB at most
    assert abs(node.used - int(info["used_memory"])) < 1 << 20


# ---------------------------------------------------------------- real servers: a full Redis


@pytest.fixture
async def full() -> AsyncIterator[tuple[Settings, SketchStore, aioredis.Redis]]:
    """A Redis of 8 MiB under noeviction, its store (exact mode) and an admin client."""
    with redis_server("--maxmemory", "8mb", "--maxmemory-policy", "noeviction") as server:
        settings = settings_for(server.url)
        admin = aioredis.Redis(port=server.port)
        try:
            async with open_store(settings) as store:
                yield settings, store, admin
        finally:
            await admin.aclose()


def long_subjects(n: int, tag: str) -> set[str]:
    return {f"{tag}-{i}-" + "s" * 240 for i in range(n)}


async def test_a_batch_refused_in_any_call_records_no_offset(
    full: tuple[Settings, SketchStore, aioredis.Redis],
) -> None:
    """Some calls of a batch succeed, one is refused (its own arguments push the nearly full
    Redis over maxmemory), and the offset record is a small SET that would still fit: it must
    not be written, or a consumer stopped before its retry resumes past the lost logins."""
    _, store, admin = full
    small, big = Scope("acme", "small"), Scope("acme", "big")
    days = {(small, TODAY): {"a", "b"}, (big, TODAY): long_subjects(1500, "big")}
    starts = {small: "monday", big: "monday"}
    record = store.keys.offsets("metrics", 0)
    store.members_per_call = 1500  # the small scope's call, then the big one's
    await fill(admin, leave=200_000)
    with pytest.raises(StoreOutOfMemory):
        await store.add_by_day(days, starts, [("SET", record, 99)])  # type: ignore[arg-type]
    assert await admin.scard(store.keys.sketch(small, day_of(TODAY))) == 2, "the first call ran"
    assert await admin.exists(store.keys.sketch(big, day_of(TODAY))) == 0
    assert await admin.get(record) is None, "offset recorded for a batch Redis refused"

    await admin.config_set("maxmemory", str(256 << 20))
    assert await store.add_by_day(days, starts, [("SET", record, 99)]) == []  # type: ignore[arg-type]
    assert await admin.get(record) == b"99"
    assert await admin.scard(store.keys.sketch(big, day_of(TODAY))) == 1500


def consumer_records(
    events: list[SynthEvent], topic: str = "metrics"
) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord(topic, 0, i, 0, 0, None, e.to_json(), None, 0, 0, [])
            for i, e in enumerate(events)]


async def test_the_writer_waits_for_a_full_redis_and_resumes_when_memory_is_freed(
    full: tuple[Settings, SketchStore, aioredis.Redis],
) -> None:
    settings, store, admin = full
    moment = datetime.now(UTC) - timedelta(minutes=1)
    events = [SynthEvent("acme", f"ws-{i % 3}", s, moment)
              for i, s in enumerate(sorted(long_subjects(900, "w")))]
    pause = Pause()
    writer = BatchWriter(settings, store, None, pause=pause)
    parsed = writer.parse(consumer_records(events))
    await fill(admin, leave=100_000)
    errors_before = gauge("usage_metrics_consumer_redis_errors_total") or 0
    writing = asyncio.create_task(writer.write(parsed, record_offsets=True))
    deadline = time.monotonic() + 30
    while pause.reason is None:
        assert not writing.done(), "the write finished on a full Redis"
        assert time.monotonic() < deadline, "never paused"
        await asyncio.sleep(0.05)
    assert pause.reason == REDIS_OOM
    assert gauge("usage_metrics_consumer_paused", {"reason": REDIS_OOM}) == 1
    await asyncio.sleep(0.5)  # a few more attempts
    assert not writing.done()
    assert pause.attempts >= 2
    assert (gauge("usage_metrics_consumer_redis_errors_total") or 0) >= errors_before + 2
    assert await store.applied_offsets([("metrics", 0)]) == [None]
    reason = oom_reason(await read_memory(store.client))
    port = admin.connection_pool.connection_kwargs["port"]
    assert reason.startswith(f"Redis is out of memory (127.0.0.1:{port}: maxmemory 8.0 MiB, used ")

    await admin.config_set("maxmemory", str(256 << 20))
    prepared = await asyncio.wait_for(writing, 30)
    assert prepared is not None
    assert prepared.logins == len(events)
    assert pause.reason is None
    assert gauge("usage_metrics_consumer_paused", {"reason": REDIS_OOM}) == 0
    assert await store.applied_offsets([("metrics", 0)]) == [len(events)]
    for i in range(3):
        key = store.keys.sketch(Scope("acme", f"ws-{i}"), day_of(moment.astimezone(UTC).date()))
        assert await admin.scard(key) == sum(1 for e in events if e.workspace_id == f"ws-{i}")


async def test_the_api_refuses_settings_changes_on_a_full_redis_and_keeps_reading(
    full: tuple[Settings, SketchStore, aioredis.Redis],
) -> None:
    settings, store, admin = full
    ws = Scope("acme", "eng")
    await store.add_by_day({(ws, TODAY): {"u1", "u2", "u3"}}, {ws: "monday"})
    await fill(admin, leave=20_000)
    app = create_app(settings, store)
    token = issue_token(settings, role="admin", org_id="acme", ttl_seconds=600, now=time.time())
    base = "/api/v2/org/acme/workspace/eng"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        for method in ("PUT", "PATCH"):
            put = await http.request(method, f"{base}/settings",
                                     json={"timezone": "Asia/Tokyo"})
            assert put.status_code == 503, put.text
            assert put.headers["Retry-After"] == "30"
            assert "out of memory" in put.json()["detail"]
            assert "Traceback" not in put.text
        got = await http.get(f"{base}/settings")
        assert got.status_code == 200
        assert got.json()["timezone"] == "UTC"
        usage = await http.get(f"{base}/metrics/usage", params={"period_length": 3})
        assert usage.status_code == 200, usage.text
        assert usage.json()[-1]["dau"] == 3
        ready = await http.get("/readyz")
        assert ready.status_code == 200  # reads are served: the API stays in rotation
    answers = getattr(app.state, "answers", None)
    if answers is not None:
        await answers.drain()


async def test_a_policy_config_get_does_not_know_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Some managed services answer ``CONFIG GET`` with nothing for a hidden parameter: that is
    no policy, not ``noeviction``. (A real Redis answers nothing for a name it does not have.)"""
    import sketches.eviction as eviction

    monkeypatch.setattr(eviction, "POLICY", "no-such-parameter")
    with redis_server() as server:
        client = aioredis.Redis(port=server.port)
        try:
            [node] = await read_policies(client)
        finally:
            await client.aclose()
    assert node.policy is None
    assert node.refusal == "CONFIG GET maxmemory-policy answered nothing"
    assert decide([node], allow_eviction=False).verdict is Verdict.UNKNOWN


async def test_the_api_refuses_late_when_redis_answers_late_with_an_evicting_policy() -> None:
    """Under any ASGI server: started while Redis was away, the API learns the policy once it
    answers; a refusal then makes /readyz say why and calls the server's stop hook."""
    port = free_port()
    settings = settings_for(f"redis://127.0.0.1:{port}/0")
    app = create_app(settings)
    stopped = asyncio.Event()
    app.state.stop_server = stopped.set
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"detail": "store unavailable"}
        with redis_server("--maxmemory-policy", "volatile-ttl", port=port):
            await asyncio.wait_for(stopped.wait(), 30)
            ready = await http.get("/readyz")
        assert ready.status_code == 503
        detail = ready.json()["detail"]
        assert detail.startswith("refusing to start: Redis at 127.0.0.1:")
        assert "maxmemory-policy volatile-ttl" in detail
