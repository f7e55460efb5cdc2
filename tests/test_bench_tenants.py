"""The building blocks of the benchmark's ``tenants`` section, in their smallest form, so that
the instrument cannot rot while the write path it measures is rewritten: the same logins at every
tenant count, the key counts and samples it checks the store against, how it sorts keys, where
Kafka's default partitioner puts a keyed record, what it reads from ``/proc`` and ``INFO``, and
one sweep run and one rebuild through the real processes on tiny topics."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from bench import report, tenants
from bench import tenantdata as td
from bench.config import BenchConfig, load_config
from sketches.keys import KeySpace, Scope
from sketches.periods import day_of, month_of, sunday_week_of, week_of
from tests.conftest import create_topics, unique
from tests.support.servers import RedisServer

NOW = datetime(2026, 11, 24, 0, 0, 30, tzinfo=UTC)  # the live minute straddles midnight


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """A redis-server of this module alone: the section flushes it and reads server-wide
    ``INFO`` figures, which the shared test Redis must never see."""
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.parametrize("shape", td.SHAPES)
def test_every_count_gets_the_same_messages_but_for_the_workspace(shape: td.Shape) -> None:
    p = td.plan(shape, 2_000, 300, 50, 0.1, seed=5)
    runs = {n: td.render(p, n, 4, NOW) for n in (7, 30, 300)}
    decoded = {n: [orjson.loads(v) for v in r.values] for n, r in runs.items()}
    for n, msgs in decoded.items():
        assert [len(v) for v in runs[n].values] == [len(v) for v in runs[300].values]
        for i, (m, fine) in enumerate(zip(msgs, p.fine.tolist(), strict=True)):
            ws = td.names(fine % n)
            assert (m["org_id"], m["workspace_id"]) == ws
            assert int(m["workspace_id"][3:]) // 10 == int(m["org_id"][4:])
            rest = {k: v for k, v in m.items() if k not in ("org_id", "workspace_id")}
            assert rest == {k: v for k, v in decoded[300][i].items()
                            if k not in ("org_id", "workspace_id")}
    stamps = [datetime.fromisoformat(m["timestamp"]) for m in decoded[7]]
    assert stamps == sorted(stamps)  # in time order, as they happen
    if shape == "live":
        assert NOW - timedelta(minutes=1) < stamps[0]
        assert stamps[-1] <= NOW
    else:
        assert (stamps[-1].date() - stamps[0].date()).days <= td.BACKFILL_DAYS - 1
    day = runs[7].day
    assert [date(1970, 1, 1) + timedelta(days=int(d)) for d in day] == [s.date() for s in stamps]
    assert p.logins == sum(m["metric_type"] == "login" for m in decoded[7])


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(20_000, 20_100), st.booleans()),
                max_size=60))
def test_expected_sketch_keys_counts_day_week_and_month_of_workspaces_and_orgs(
        rows: list[tuple[int, int, bool]]) -> None:
    ws = np.array([r[0] for r in rows], dtype=np.int64)
    day = np.array([r[1] for r in rows], dtype=np.int64)
    login = np.array([r[2] for r in rows], dtype=bool)
    keys = set()
    for w, d, is_login in rows:
        if not is_login:
            continue
        when = date(1970, 1, 1) + timedelta(days=d)
        for scope in (f"w{w}", f"o{w // td.WORKSPACES_PER_ORG}"):
            for period in (day_of(when), week_of(when), month_of(when)):
                keys.add((scope, period))
    assert td.expected_sketch_keys(ws, day, login) == len(keys)


def test_samples_take_one_day_workspaces_and_the_median_workspace() -> None:
    # ws 0: 9 logins over 3 days; ws 1, 2, 3: one day with 1, 4, 6 logins; ws 4: none.
    rows = ([(0, 1)] * 3 + [(0, 2)] * 3 + [(0, 3)] * 3 + [(1, 5)] + [(2, 5)] * 4
            + [(3, 7)] * 6)
    ws = np.array([r[0] for r in rows])
    day = np.array([r[1] for r in rows])
    s = td.samples(ws, day, np.ones(len(rows), dtype=bool), 5, k=1)
    assert s.one_day == [2]
    assert s.median == [2, 3] or s.median == [2]  # logins 1, 4, 6, 9: median 5
    assert s.days[2] == 1
    assert s.logins[2] == 4
    s = td.samples(ws, day, np.ones(len(rows), dtype=bool), 5, k=3)
    assert s.one_day == [1, 2, 3]
    assert 4 not in s.median


def test_key_kind_calls_every_period_key_a_sketch_and_the_rest_metadata() -> None:
    d = date(2026, 11, 24)
    for mode in ("hll", "exact"):
        ks = KeySpace("tn", mode)  # type: ignore[arg-type]
        for scope in (Scope("org:{a}", "ws/1 é"), Scope("org-1", "")):
            periods = [day_of(d), week_of(d), sunday_week_of(d), month_of(d)]
            for period in periods:
                key = ks.sketch(scope, period)
                assert td.key_kind(key) == td.SKETCH
                # A rebuild generation's sketch is still a sketch.
                assert td.key_kind(ks.building(scope, period, 12)) == td.SKETCH
            for key in (ks.meta(scope), ks.registry(scope, 7), ks.settings(scope),
                        ks.result(scope, "v1"), ks.result(scope, "d:w")):
                assert td.key_kind(key) == td.METADATA


def test_murmur2_is_kafkas_own() -> None:
    """Apache Kafka's ``UtilsTest.testMurmur2`` vectors (signed 32-bit in Java)."""
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}
    for data, java in cases.items():
        assert td.murmur2(data) == java & 0xFFFFFFFF


async def test_default_partition_is_where_a_keyed_producer_puts_the_record(
        kafka_bootstrap: str) -> None:
    """librdkafka's ``murmur2_random`` partitioner is the Java client's default; the rebuild's
    keyed topic must sit where such producers put each workspace."""
    from confluent_kafka import Producer

    topic = unique("keyed")
    await create_topics(kafka_bootstrap, topic, partitions=5)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random",
                         "log.connection.close": False})
    seen: dict[bytes, int] = {}

    def report(err: object, msg: object) -> None:
        assert err is None
        seen[msg.key()] = msg.partition()  # type: ignore[attr-defined]

    scopes = [td.names(i) for i in range(0, 60_000, 997)]
    for ws in scopes:
        producer.produce(topic, b"{}", td.workspace_key(ws), on_delivery=report)
    assert producer.flush(30) == 0
    assert len(seen) == len(scopes)
    assert len(set(seen.values())) > 1
    for key, partition in seen.items():
        assert td.default_partition(key, 5) == partition
    keys, parts = td.rebuild_keying(np.arange(0, 60_000, 997), 5, keyed=True, seed=1)
    assert [seen[k] for k in keys] == parts.tolist()  # type: ignore[index]


def test_process_cpu_seconds_grows_with_the_work_of_the_process() -> None:
    before = tenants.process_cpu_seconds(os.getpid())
    x = 0
    for i in range(20_000_000):  # bounded; 0.05 s of CPU takes about 1,000,000 rounds
        x += i * i
        if i % 1_000_000 == 0 and tenants.process_cpu_seconds(os.getpid()) > before + 0.05:
            break
    assert tenants.process_cpu_seconds(os.getpid()) > before + 0.05


def test_redis_readings_count_the_commands_run_between_them(private_redis: str) -> None:
    client = redis.Redis.from_url(private_redis)
    try:
        client.pfadd("reading-test:earlier", "m")  # counted before: only the delta may show
        before = tenants.redis_reading(client)
        pipe = client.pipeline(transaction=False)
        for i in range(2_000):
            pipe.pfadd(f"reading-test:{i % 7}", f"m{i}")
        pipe.execute()
        after = tenants.redis_reading(client)
    finally:
        client.close()
    delta = tenants.redis_delta(before, after, logins=1_000)
    rows = {r["command"]: r for r in delta["all"]}
    assert rows["pfadd"]["calls"] == 2_000
    assert rows["pfadd"]["calls_per_login"] == 2.0
    assert rows["pfadd"]["usec"] > 0
    assert delta["cpu_s"] >= 0
    assert delta["top"][0]["usec"] == max(r["usec"] for r in delta["all"])


def test_parse_env_takes_settings_and_refuses_anything_else() -> None:
    assert td.parse_env("") == {}
    assert td.parse_env("KAFKA_KEYED_BY=workspace, X_1=a=b") == {
        "KAFKA_KEYED_BY": "workspace", "X_1": "a=b"}
    for bad in ("novalue", "lower=1", "=1"):
        with pytest.raises(ValueError, match="NAME=value"):
            td.parse_env(bad)


def test_the_flags_of_the_section_are_read_and_checked() -> None:
    cfg, command = load_config(["--sections", "tenants", "--tenant-counts", "10,100",
                                "--tenant-shapes", "live", "--tenant-rebuild", "0"])
    assert cfg.tenant_counts == (10, 100)
    assert cfg.tenant_shapes == ("live",)
    assert not cfg.tenant_rebuild
    assert "--tenant-counts 10,100" in " ".join(command)
    quick, _ = load_config(["--quick"])
    assert quick.tenant_events < BenchConfig().tenant_events
    for argv in (["--tenant-shapes", "sideways"], ["--tenant-counts", "ten"],
                 ["--tenant-keyed-env", "oops"]):
        with pytest.raises(SystemExit):
            load_config(argv)


def test_one_sweep_run_through_the_real_consumer_and_api(
        kafka_bootstrap: str, private_redis: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Small batches (the processes take the environment), so that there is a window between
    # the first batch and lag 0 to measure over.
    monkeypatch.setenv("CONSUMER_MAX_BATCH", "400")
    cfg = tenants.smallest(BenchConfig())
    p = td.plan("live", cfg.tenant_events, 200, 50, cfg.other_share, cfg.seed)
    run = tenants.sweep_run(cfg, p, 200, kafka_bootstrap, private_redis, tmp_path,
                            topic=unique("tenants"))
    consume = run["consume"][0]
    assert consume["finished"]
    assert run["keys"]["ok"], run["keys"]
    assert consume["measured_logins"] > 0
    assert consume["rate"] > 0
    assert consume["consumer_cpu_s"] > 0
    assert consume["redis"]["cpu_us_per_login"] is not None
    assert any(r["calls"] > 0 and r["usec"] > 0 for r in consume["redis"]["top"])
    asked = {w["workspace"] for kind in ("one_day", "median")
             for w in run["memory"][kind]["workspaces"]}
    assert run["sample_queries"] == {"200": len(asked)}
    for kind in ("one_day", "median"):
        rows = run["memory"][kind]["workspaces"]
        assert rows
        assert all(r["sketch_keys"] == 3 and r["sketch_bytes"] > 0 for r in rows)  # d, w, m
        assert all(r["days"] == 1 for r in rows)
    totals = run["memory"]["totals"]
    assert totals["sketch_keys"] == run["topic"]["expected_sketch_keys"]
    assert totals["tags"] == run["topic"]["scopes"]
    assert run["used_memory_per_1000_scopes"] > 0
    # The report renders what the run recorded.
    section = {"counts": [200], "shapes": ["live"], "events": cfg.tenant_events,
               "partitions": cfg.partitions, "runs": [run]}
    table = report._tenants(section, {})
    assert f"| live | 200 | {run['topic']['scopes']:,} |" in table
    rows = {v["target"][:40]: v for v in report.tenant_verdicts({"tenants": section})}
    metadata = next(v for k, v in rows.items() if k.startswith("per-scope metadata"))
    worst = max(r["metadata_per_sketch"] for r in run["memory"]["one_day"]["workspaces"])
    assert metadata["pass"] == (worst <= 1.0)


def test_one_rebuild_beside_a_bare_read(
        kafka_bootstrap: str, private_redis: str, tmp_path: Path) -> None:
    cfg = tenants.smallest(BenchConfig())
    p = td.plan("backfill", cfg.tenant_events, 200, 50, cfg.other_share, cfg.seed)
    out = tenants.rebuild_stage(cfg, p, 200, kafka_bootstrap, private_redis, tmp_path,
                                topic=unique("rebuild"))
    assert out["startup"]["messages_read"] == 0
    for kind in ("unkeyed", "keyed"):
        row = out["topics"][kind]
        assert sum(row["per_partition"]) == cfg.tenant_events
        assert row["bare"]["messages"] == cfg.tenant_events
        read = row["rebuild"]["messages_read"]
        assert read is not None, row["rebuild"]["output"]
        assert 0 < read <= cfg.tenant_events
        assert row["rebuild"]["wall_s"] > 0
    keyed = out["topics"]["keyed"]
    assert keyed["records_in_that_partition"] == keyed["per_partition"][
        keyed["partition_holding"]]
