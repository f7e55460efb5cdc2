"""The API result cache: repeated questions are served from memory, a late event shows at once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.keys import Scope
from sketches.results import CacheEntry, ResultCache, Snapshot
from sketches.store import SketchStore
from tests.support.kafka import merge_ends, produce, wait_applied
from tests.test_consumer import running
from usage_metrics.synth import SynthEvent


def _snap(version: tuple[str, int] | None, present: int | None = 2,
          span: str = "s") -> Snapshot:
    epoch, seq = version if version is not None else (None, None)
    return Snapshot(Scope("o", "w"), None, None, epoch, seq,  # type: ignore[arg-type]
                    span_id=span, present=present)


def _entry(version: tuple[str, int], body: bytes, present: int = 2) -> CacheEntry:
    return CacheEntry(version, "s", present, body)


def test_lru_bound_and_versions() -> None:
    v1, v2 = ("e", 1), ("e", 2)
    cache = ResultCache(max_entries=2)
    cache.put("a", _entry(v1, b"A"))
    cache.put("b", _entry(v1, b"B"))
    assert cache.get("a", _snap(v1)) == b"A"
    cache.put("c", _entry(v1, b"C"))  # evicts b, the least recently used
    assert cache.get("b", _snap(v1)) is None
    assert cache.get("a", _snap(v2)) is None  # another counter: never served
    assert cache.get("a", _snap(("f", 1))) is None  # another epoch (a rebuild): never served
    assert cache.get("c", _snap(v1)) == b"C"
    assert cache.get("n", _snap(None)) is None  # a scope never written: no version
    assert ResultCache(0).get("a", _snap(v1)) is None


def test_a_key_that_vanished_is_a_miss_under_the_same_version() -> None:
    cache = ResultCache(max_entries=4)
    cache.put("a", _entry(("e", 1), b"A", present=2))
    assert cache.get("a", _snap(("e", 1), present=2)) == b"A"
    assert cache.get("a", _snap(("e", 1), present=1)) is None  # a sketch went
    assert cache.get("a", _snap(("e", 1), present=None)) is None  # presence not read
    assert cache.get("a", _snap(("e", 1), span="other")) is None  # another span's keys


async def test_repeated_queries_hit_and_a_late_event_shows_at_once(
    settings: Settings, store: SketchStore, topics: tuple[str, str]
) -> None:
    topic, _ = topics
    now = datetime.now(UTC)
    old_day = now - timedelta(days=20)
    events = [SynthEvent("acme", "cached", f"u{i}", now - timedelta(days=i % 5)) for i in range(30)]
    ends = await produce(settings.kafka_bootstrap_servers, topic, [e.to_json() for e in events])
    app = create_app(settings, store)
    token = issue_token(settings, role="admin", org_id="acme", ttl_seconds=600, now=time.time())
    url = "/api/v2/org/acme/workspace/cached/metrics/usage"
    params = {"period_length": 30, "window": "rolling"}
    async with (
        running(settings, store),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                          headers={"Authorization": f"Bearer {token}"}) as client,
    ):
        await wait_applied(store, topic, ends)
        first = await client.get(url, params=params)
        again = await client.get(url, params=params)
        assert first.headers["x-cache"] == "miss"
        assert again.headers["x-cache"] == "hit"
        assert again.json() == first.json()
        row = next(r for r in first.json() if r["date"] == old_day.date().isoformat())
        assert row["dau"] is None

        late = SynthEvent("acme", "cached", "late-user", old_day)
        ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers, topic,
                                              [late.to_json()]))
        await wait_applied(store, topic, ends)
        after = await client.get(url, params=params)
        assert after.headers["x-cache"] == "miss"
        row = next(r for r in after.json() if r["date"] == old_day.date().isoformat())
        assert row["dau"] == 1
        assert row["mau"] is not None
