"""Ingestion: events/s of one consumer process from the first batch to lag 0, beside the ceiling
of a bare aiokafka + orjson reader of the same topic.

The topic holds ``events`` messages (``other_share`` of them another metric type) over
``workspaces`` workspaces of Zipf sizes and ``ingest_days`` days, in time order, keyed and
partitioned by workspace. They are produced with confluent-kafka's producer, which librdkafka
makes several times faster than aiokafka's (Tansu accepts librdkafka producers; only its consumer
groups hang, see the shared notes).

The service runs as ``usage-metrics consume`` (its own process, settings from the environment,
one HLL run and one exact run per repeat, each into a flushed redis-server). Its progress is read
from the outside: the offsets it records in Redis in the same pipeline as each batch. Tansu's
``end_offsets`` is wrong for multi-record batches (shared notes), so the end is the count we
produced into each partition (the topic is fresh, so offsets run from 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from bench.config import BenchConfig
from bench.profiling import pyspy, summarize
from bench.util import REPO, child, child_env, median, python_cmd, say
from sketches.keys import KeySpace
from usage_metrics.synth import WEEKDAY_FACTOR, workspace_sizes


@dataclass
class TopicData:
    name: str
    dlq: str
    per_partition: list[int]
    messages: int
    logins: int
    expected_keys: int
    bytes: int
    produce_seconds: float
    generate_seconds: float
    workspace_sizes: list[int]
    top_workspace_share: float


def _events(
    cfg: BenchConfig, today: date
) -> tuple[list[bytes], list[bytes], np.ndarray, dict[str, Any]]:
    """Values, keys, partitions (time-ordered) and what the store must end up holding."""
    rng = np.random.default_rng(cfg.seed)
    sizes = np.array(
        workspace_sizes(cfg.workspaces, cfg.largest_workspace, random.Random(cfg.seed)),
        dtype=np.int64,
    )
    n, days, w = cfg.events, cfg.ingest_days, cfg.workspaces
    first = today - timedelta(days=days - 1)
    day_dates = [first + timedelta(days=d) for d in range(days)]
    weights = np.array([
        WEEKDAY_FACTOR[d.weekday()] * (0.6 + 0.4 * (i + 1) / days)
        for i, d in enumerate(day_dates)
    ])
    ws = rng.choice(w, size=n, p=sizes / sizes.sum())
    day = rng.choice(days, size=n, p=weights / weights.sum())
    sec = rng.integers(7 * 3600, 20 * 3600, size=n)
    order = np.lexsort((sec, day))
    ws, day, sec = ws[order], day[order], sec[order]
    # Engaged members (low indices) log in more often than the rest.
    member = (sizes[ws] * rng.random(n) ** 2).astype(np.int64)
    other = rng.random(n) < cfg.other_share

    names = [(f"org-{i // 10:03d}", f"ws-{i:04d}") for i in range(w)]
    tails = [f'","org_id":"{o}","workspace_id":"{x}","timestamp":"' for o, x in names]
    ws_keys = [f"{o}/{x}".encode() for o, x in names]
    ws_part = np.array([zlib.crc32(k) % cfg.partitions for k in ws_keys], dtype=np.int64)
    day_text = [d.isoformat() for d in day_dates]
    clock = [f"T{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}Z" for s in range(86_400)]
    kind = ('{"metric_type":"login","subject":"member_',
            '{"metric_type":"page_view","subject":"member_')
    values = [
        f'{kind[o]}{m}{tails[x]}{day_text[d]}{clock[s]}"}}'.encode()
        for o, m, x, d, s in zip(
            other.tolist(), member.tolist(), ws.tolist(), day.tolist(), sec.tolist(), strict=True
        )
    ]
    keys = [ws_keys[x] for x in ws.tolist()]
    parts = ws_part[ws]

    # Keys the store must hold afterwards: one per (workspace, day | ISO week | month) with a
    # login, and as many for each org's own sketches (workspace i belongs to org i // 10).
    week_of = np.array([(d - timedelta(days=d.weekday())).toordinal() for d in day_dates])
    month_of = np.array([d.year * 12 + d.month for d in day_dates])
    logins = ~other
    lw, ld = ws[logins], day[logins]
    expected = sum(
        np.unique(scope * days + ld).size
        + np.unique(scope * 10_000_000 + week_of[ld]).size
        + np.unique(scope * 100_000 + month_of[ld]).size
        for scope in (lw, lw // 10)
    )
    meta = {
        "logins": int(logins.sum()),
        "expected_keys": int(expected),
        "sizes": sizes.tolist(),
        "top_share": float(np.bincount(ws, minlength=w).max() / n),
    }
    return values, keys, parts, meta


async def _create_topics(bootstrap: str, topic: str, dlq: str, partitions: int) -> None:
    from aiokafka.admin import NewTopic

    from consumer.kafka import make_admin_client
    from sketches.config import Settings

    admin = make_admin_client(Settings(kafka_bootstrap_servers=bootstrap, _env_file=None))  # type: ignore[call-arg]
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(topic, num_partitions=partitions, replication_factor=1),
            NewTopic(dlq, num_partitions=1, replication_factor=1),
        ])
    finally:
        await admin.close()


def make_producer(bootstrap: str, compression: str) -> Any:
    """A confluent-kafka producer tuned for bulk loads (librdkafka produces several times faster
    than aiokafka; Tansu accepts it, see the shared notes)."""
    from confluent_kafka import Producer

    return Producer({
        "bootstrap.servers": bootstrap,
        "log.connection.close": False,
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "compression.type": compression,
        "enable.idempotence": False,
        "acks": "all",
        "delivery.report.only.error": True,
    })


def send(
    producer: Any, topic: str, values: list[bytes], keys: list[bytes], parts: list[int],
    errors: list[str],
) -> None:
    """Queue every message on its partition, waiting for room when librdkafka's queue is full;
    delivery errors land in ``errors`` (the caller flushes and checks)."""

    def on_error(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    produce_one = producer.produce
    for i, (value, key, part) in enumerate(zip(values, keys, parts, strict=True)):
        while True:
            try:
                produce_one(topic, value, key, partition=part, on_delivery=on_error)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 20_000 == 0:
            producer.poll(0)


def flush(producer: Any, errors: list[str]) -> None:
    from confluent_kafka import KafkaException

    left = producer.flush(120)
    if left or errors:
        raise KafkaException(f"{left} messages unsent, {len(errors)} errors: {errors[:3]}")


Events = tuple[list[bytes], list[bytes], np.ndarray, dict[str, Any]]


def produce(
    cfg: BenchConfig,
    bootstrap: str,
    today: date,
    topic: str = "bench-metrics",
    events: Callable[[], Events] | None = None,
) -> TopicData:
    """Generate the events (the backfill shape unless ``events`` says otherwise) and produce
    them into a new topic."""
    started = time.perf_counter()
    values, keys, parts, meta = events() if events is not None else _events(cfg, today)
    generated = time.perf_counter() - started
    say(f"generated {len(values):,} events in {generated:.1f}s; producing")
    dlq = f"{topic}.dlq"
    asyncio.run(_create_topics(bootstrap, topic, dlq, cfg.partitions))
    producer = make_producer(bootstrap, cfg.compression)
    errors: list[str] = []
    t0 = time.perf_counter()
    send(producer, topic, values, keys, parts.tolist(), errors)
    flush(producer, errors)
    produced = time.perf_counter() - t0
    per_partition = np.bincount(parts, minlength=cfg.partitions).tolist()
    say(f"produced {len(values):,} messages in {produced:.1f}s "
        f"({len(values) / produced:,.0f}/s), per partition {per_partition}")
    return TopicData(
        name=topic, dlq=dlq, per_partition=per_partition, messages=len(values),
        logins=meta["logins"], expected_keys=meta["expected_keys"],
        bytes=sum(len(v) for v in values), produce_seconds=produced, generate_seconds=generated,
        workspace_sizes=meta["sizes"], top_workspace_share=meta["top_share"],
    )


def run_bare(data: TopicData, bootstrap: str) -> dict[str, Any]:
    out = subprocess.run(
        python_cmd("-m", "bench.bare", "--bootstrap", bootstrap, "--topic", data.name,
                   "--expect", ",".join(map(str, data.per_partition))),
        capture_output=True, text=True, timeout=900, env=child_env(), check=False, cwd=REPO,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bare consumer failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = orjson.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_service(
    data: TopicData,
    mode: str,
    bootstrap: str,
    redis_url: str,
    run_id: str,
    logdir: Path,
    profile_to: Path | None = None,
    profile_seconds: float | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """One ``usage-metrics consume`` process from an empty store to lag 0 (or, when profiled,
    for ``profile_seconds`` of steady state)."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    prefix = f"ing-{run_id}"
    keys = KeySpace(prefix, mode)  # type: ignore[arg-type]
    offset_keys = [keys.offsets(data.name, p) for p in range(len(data.per_partition))]
    env = child_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_TOPIC=data.name, KAFKA_DLQ_TOPIC=data.dlq,
        KAFKA_GROUP_ID=f"bench-{run_id}", REDIS_URL=redis_url, REDIS_KEY_PREFIX=prefix,
        SKETCH_MODE=mode, LOG_LEVEL="INFO",
    )
    total = 0
    t_first: float | None = None
    first_done = 0
    log = logdir / f"consume-{run_id}.log"
    launched = time.perf_counter()
    with child(python_cmd("-m", "usage_metrics.cli", "consume"), env, log) as proc, \
            contextlib.ExitStack() as spy:
        while True:
            now = time.perf_counter()
            if now - launched > timeout:
                raise TimeoutError(f"{mode} consumer did not reach lag 0 in {timeout}s")
            if proc.poll() is not None:
                raise RuntimeError(f"{mode} consumer exited early ({proc.returncode}); see {log}")
            raw = client.mget(offset_keys)
            done = [int(v) if v is not None else 0 for v in raw]
            applied = sum(done)
            if applied and t_first is None:
                t_first, first_done = now, applied
                if profile_to is not None:  # the steady state only, not imports and group join
                    spy.enter_context(pyspy(proc.pid, profile_to, logdir / "py-spy.log"))
            if all(d >= e for d, e in zip(done, data.per_partition, strict=True)):
                t_end, total = now, applied
                break
            if t_first is not None and profile_seconds and now - t_first > profile_seconds:
                t_end, total = now, applied
                break
            time.sleep(0.005)
    assert t_first is not None
    info = client.info("memory")
    kind = "hll" if mode == "hll" else "set"
    dbsize = sum(1 for _ in client.scan_iter(match=f"{prefix}:*:{kind}:[dwm]:*", count=10_000))
    client.close()
    seconds = t_end - t_first
    expected_keys = data.expected_keys
    return {
        "mode": mode,
        "messages": total,
        "measured_messages": total - first_done,
        "seconds": seconds,
        "rate": (total - first_done) / seconds if seconds > 0 else float("nan"),
        "startup_to_first_batch_s": t_first - launched,
        "keys": dbsize,
        "expected_keys": expected_keys,
        "keys_ok": dbsize == expected_keys or total < data.messages,
        "used_memory": int(info["used_memory"]),
    }


def run(
    cfg: BenchConfig, bootstrap: str, redis_url: str, logdir: Path, today: date
) -> dict[str, Any]:
    data = produce(cfg, bootstrap, today)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "hll": [], "exact": []}
    for r in range(cfg.ingest_repeats):
        res = run_bare(data, bootstrap)
        runs["bare"].append(res)
        say(f"ingest run {r + 1}/{cfg.ingest_repeats}: bare {res['rate']:,.0f} msg/s")
        for mode in ("hll", "exact"):
            res = run_service(data, mode, bootstrap, redis_url, f"{mode}{r}", logdir)
            runs[mode].append(res)
            say(f"ingest run {r + 1}/{cfg.ingest_repeats}: {mode} {res['rate']:,.0f} msg/s "
                f"(keys {res['keys']:,}/{res['expected_keys']:,})")
    result: dict[str, Any] = {
        "topic": {
            "messages": data.messages, "logins": data.logins, "partitions": len(data.per_partition),
            "per_partition": data.per_partition, "bytes": data.bytes,
            "workspaces": cfg.workspaces, "days": cfg.ingest_days,
            "largest_workspace_members": max(data.workspace_sizes),
            "top_workspace_share": data.top_workspace_share,
            "produce_seconds": data.produce_seconds,
            "produce_rate": data.messages / data.produce_seconds,
            "compression": cfg.compression,
        },
        "runs": runs,
        "median_rate": {k: median([x["rate"] for x in v]) for k, v in runs.items()},
        "min_rate": {k: min(x["rate"] for x in v) for k, v in runs.items()},
        "max_rate": {k: max(x["rate"] for x in v) for k, v in runs.items()},
    }
    bare = result["median_rate"]["bare"]
    result["ratio_to_bare"] = {k: v / bare for k, v in result["median_rate"].items()}
    if cfg.profile:
        raw = logdir / "profile-consume-hll.txt"
        say("profiling one extra (unmeasured) HLL ingestion run with py-spy")
        extra = run_service(data, "hll", bootstrap, redis_url, "hll-profile", logdir, raw,
                            cfg.profile_seconds)
        result["profile"] = {"hll": summarize(raw), "run_rate": extra["rate"]}
    return result
