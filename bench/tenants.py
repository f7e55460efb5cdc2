"""The ``tenants`` section (issue 17): what the same logins cost when spread over 1,000, 10,000
and 100,000 workspaces, measured on the real processes only.

Everything goes through ``usage-metrics consume``, ``usage-metrics api`` and
``usage-metrics rebuild`` over Kafka and HTTP; the benchmark reads only what the consumer records
(its applied offsets, from Redis), what the processes say about themselves (``/proc/<pid>/stat``,
the rebuild's closing line) and what Redis says about itself (``INFO cpu``, ``INFO
commandstats``, ``INFO memory``, ``MEMORY USAGE``). So the same code measures the write path
before and after it is rewritten.

- Sweep: for each shape (live: timestamps within the last minute; backfill: 90 days) and each
  tenant count, the very same messages (``bench.tenantdata``) are produced into a fresh topic on
  a fresh broker and read by ``python -m bench.bare`` (the ceiling) and by one
  ``usage-metrics consume`` into a fresh redis-server. Between its first batch and lag 0 (the
  window ``bench.ingest`` takes its rate over) the consumer's CPU time (``/proc``), Redis's CPU
  time (``INFO cpu``) and Redis's per-command time (``INFO commandstats``) are read, per login.
  Then an API process answers one 730-day query for each sampled workspace (so that whatever it
  stores per scope exists), and ``MEMORY USAGE ... SAMPLES 0`` of every key sorts each scope's
  bytes into sketches and metadata (``bench.tenantdata.key_kind``).
- Query: the issue-10 live query (``bench.live``'s passes and producer) on the densest
  workspace with two years of history while the store also holds the largest count of other
  workspaces with a day or a few of data each, all written through the consumer; then the same
  730-day request repeated with no new data, interleaved with ``/healthz``.
- Rebuild: ``usage-metrics rebuild`` of one workspace among the largest count, on a topic whose
  producers do not key by workspace and on one keyed by workspace id with Kafka's default
  partitioner (rebuilt with ``--tenant-keyed-env``, by default ``KAFKA_RECORD_KEY=workspace``,
  so that it reads only the partition that can hold the workspace), each beside
  ``python -m bench.bare`` on the same topic; the rebuild's fixed cost (start-up, connections,
  beginning and switching the new generation) is measured on an empty topic and taken off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from api.auth import issue_token
from bench import live, livedata
from bench import tenantdata as td
from bench.config import BenchConfig
from bench.ingest import TopicData, _create_topics, flush, make_producer, run_bare, send
from bench.profiling import pyspy, summarize
from bench.queries import _url
from bench.util import REPO, child, child_env, free_port, python_cmd, say, stop_process, wait_http
from sketches.config import Settings
from sketches.keys import KeySpace, Scope
from sketches.periods import utc_today
from tests.support.servers import RedisServer, TansuBroker

_TICK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.02  # how often the applied offsets are read: ~50 MGETs a second, < 1 % of Redis
PREFIX = "tn"
QUERY_PREFIX = "tq"
QUERY_TOPIC = "bench-tenants-query"
LENGTH = 730
TOP_COMMANDS = 6
Mark = Callable[[str], None]


def _f(x: float | None, digits: int = 0) -> str:
    """A figure for a progress line: ``?`` where a tiny run has none (one batch: no rate)."""
    if x is None or x != x:
        return "?"
    return f"{x:,.{digits}f}"


# ---------------------------------------------------------------------------------------------
# What the processes and Redis say about themselves
# ---------------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    rest = raw[raw.rfind(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / _TICK


@dataclass(frozen=True)
class RedisReading:
    cpu: float  # used_cpu_sys + used_cpu_user, seconds
    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)


def redis_reading(client: redis.Redis) -> RedisReading:
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    commands = {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items() if isinstance(v, dict)
    }
    return RedisReading(float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), commands)


def redis_delta(before: RedisReading, after: RedisReading, logins: int) -> dict[str, Any]:
    """Redis's CPU and its costliest commands between two readings, also per login."""
    rows: list[dict[str, Any]] = []
    for name, (calls, usec) in after.commands.items():
        c0, u0 = before.commands.get(name, (0, 0))
        if usec - u0 > 0 or calls - c0 > 0:
            rows.append({"command": name, "calls": calls - c0, "usec": usec - u0,
                         "calls_per_login": (calls - c0) / logins if logins else None,
                         "usec_per_login": (usec - u0) / logins if logins else None})
    rows.sort(key=lambda r: r["usec"], reverse=True)
    cpu = after.cpu - before.cpu
    return {"cpu_s": cpu, "cpu_us_per_login": cpu * 1e6 / logins if logins else None,
            "commands_usec": sum(r["usec"] for r in rows), "top": rows[:TOP_COMMANDS],
            "all": rows}


# ---------------------------------------------------------------------------------------------
# One consumer run, measured
# ---------------------------------------------------------------------------------------------


def consume_measured(
    *, topic: str, dlq: str, per_partition: list[int], logins: int, messages: int,
    bootstrap: str, redis_url: str, prefix: str, group: str, logdir: Path,
    timeout: float = 1800.0, profile_to: Path | None = None, profile_seconds: float = 0.0,
) -> dict[str, Any]:
    """``usage-metrics consume`` from its first batch to lag 0 (or, when profiled, for
    ``profile_seconds`` after its first batch): rate, its CPU and Redis's over that window."""
    client = redis.Redis.from_url(redis_url)
    offset_keys = [KeySpace(prefix, "hll").offsets(topic, p) for p in range(len(per_partition))]
    env = child_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_TOPIC=topic, KAFKA_DLQ_TOPIC=dlq,
        KAFKA_GROUP_ID=group, REDIS_URL=redis_url, REDIS_KEY_PREFIX=prefix, SKETCH_MODE="hll",
        LOG_LEVEL="INFO",
    )
    memory_before = int(client.info("memory")["used_memory"])
    polls = 0
    t_first: float | None = None
    first_done = total = 0
    cpu0 = cpu1 = 0.0
    r0 = r1 = None
    launched = time.perf_counter()
    log = logdir / f"consume-{group}.log"
    try:
        with child(python_cmd("-m", "usage_metrics.cli", "consume"), env, log) as proc, \
                contextlib.ExitStack() as spy:
            while True:
                now = time.perf_counter()
                if now - launched > timeout:
                    raise TimeoutError(f"the consumer did not reach lag 0 in {timeout}s")
                if proc.poll() is not None:
                    raise RuntimeError(f"the consumer exited ({proc.returncode}); see {log}")
                done = [int(v) if v is not None else 0 for v in client.mget(offset_keys)]
                polls += 1
                applied = sum(done)
                if applied and t_first is None:
                    t_first, first_done = now, applied
                    cpu0, r0 = process_cpu_seconds(proc.pid), redis_reading(client)
                    if profile_to is not None:
                        spy.enter_context(pyspy(proc.pid, profile_to, logdir / "py-spy.log"))
                finished = all(d >= e for d, e in zip(done, per_partition, strict=True))
                profiled = bool(profile_seconds) and t_first is not None \
                    and now - t_first >= profile_seconds
                if finished or profiled:
                    t_end, total = now, applied
                    cpu1, r1 = process_cpu_seconds(proc.pid), redis_reading(client)
                    break
                time.sleep(POLL_S)
        memory_after = int(client.info("memory")["used_memory"])
    finally:
        client.close()
    if t_first is None or r0 is None or r1 is None:
        raise RuntimeError("the consumer never applied a batch")
    seconds = t_end - t_first
    measured = total - first_done
    measured_logins = round(measured * logins / messages) if messages else 0
    return {
        "messages": total, "measured_messages": measured, "measured_logins": measured_logins,
        "seconds": seconds, "rate": measured / seconds if seconds > 0 else float("nan"),
        "startup_to_first_batch_s": t_first - launched,
        "consumer_cpu_s": cpu1 - cpu0,
        "consumer_cpu_us_per_login": (cpu1 - cpu0) * 1e6 / measured_logins
        if measured_logins else None,
        "redis": redis_delta(r0, r1, measured_logins),
        "observer_polls": polls,
        "used_memory_before": memory_before, "used_memory_after": memory_after,
        "finished": total >= sum(per_partition),
    }


# ---------------------------------------------------------------------------------------------
# The API, asked once per sampled workspace; memory per scope
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def api_process(redis_url: str, prefix: str, logdir: Path, name: str
                ) -> Iterator[tuple[str, httpx.Client]]:
    """``usage-metrics api`` on a free port, with a superadmin client; the per-caller rate
    limiter off, as for a trusted dashboard backend (as in ``bench.live``)."""
    secret = os.urandom(24).hex()
    port = free_port()
    env = child_env(REDIS_URL=redis_url, JWT_SECRET=secret, REDIS_KEY_PREFIX=prefix,
                    SKETCH_MODE="hll", LOG_LEVEL="INFO", RATE_LIMIT_PER_MINUTE="0")
    settings = Settings(jwt_secret=secret, _env_file=None)
    token = issue_token(settings, role="superadmin", org_id=None, ttl_seconds=4 * 3600,
                        now=time.time())
    cmd = python_cmd("-m", "usage_metrics.cli", "api", "--host", "127.0.0.1", "--port", str(port))
    with child(cmd, env, logdir / f"api-{name}.log"), \
            httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", timeout=60)
        yield base, http


def ask_once(base: str, http: httpx.Client, scopes: list[Scope]) -> dict[str, int]:
    """One 730-day request per workspace, so that whatever the API keeps per scope exists."""
    codes: dict[str, int] = {}
    for ws in scopes:
        code = http.get(_url(base, ws, LENGTH, "rolling")).status_code
        codes[str(code)] = codes.get(str(code), 0) + 1
    return codes


MEMORY_TAGS = 20_000  # hash tags whose keys get a MEMORY USAGE for the per-scope averages


def scope_memory(client: redis.Redis, prefix: str, tags: set[str],
                 sample_tags: int = MEMORY_TAGS) -> dict[str, Any]:
    """``MEMORY USAGE ... SAMPLES 0`` per hash tag: the named tags' sketch and metadata keys and
    bytes, and over every tag the key counts (all of them) and the bytes per scope (every tag,
    or an even sample of ``sample_tags`` of them where there are more)."""
    by_tag: dict[str, list[str]] = {}
    untagged = 0
    for raw in client.scan_iter(match=f"{prefix}:*", count=10_000):
        key = raw.decode()
        tag = livedata.hash_tag(key, prefix)
        if tag is None:
            untagged += 1
        else:
            by_tag.setdefault(tag, []).append(key)
    ordered = sorted(by_tag)
    step = max(1, -(-len(ordered) // sample_tags))
    measured = set(ordered[::step]) | (tags & set(by_tag))
    keys = [k for t in sorted(measured) for k in by_tag[t]]
    sizes: list[int] = []
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(keys), 10_000):
        for k in keys[i:i + 10_000]:
            pipe.memory_usage(k, samples=0)
        sizes.extend(int(x or 0) for x in pipe.execute())
    size_of = dict(zip(keys, sizes, strict=True))
    named: dict[str, dict[str, Any]] = {}
    for t in tags:
        row: dict[str, Any] = {"sketch_keys": 0, "sketch_bytes": 0, "metadata_keys": 0,
                               "metadata_bytes": 0, "metadata": {}}
        for key in by_tag.get(t, []):
            kind = td.key_kind(key)
            row[f"{kind}_keys"] += 1
            row[f"{kind}_bytes"] += size_of[key]
            if kind == td.METADATA:
                row["metadata"][key[len(prefix) + len(t) + 2:]] = size_of[key]
        named[t] = row
    sampled = [(t, td.key_kind(k), size_of[k]) for t in ordered[::step] for k in by_tag[t]]
    totals = td.summarize_keys(sampled)
    counts = {td.SKETCH: 0, td.METADATA: 0}
    for t in ordered:
        for k in by_tag[t]:
            counts[td.key_kind(k)] += 1
    return {"tags": named, "totals": {
        "tags": len(ordered), "sampled_tags": totals["tags"], "untagged_keys": untagged,
        "sketch_keys": counts[td.SKETCH], "metadata_keys": counts[td.METADATA],
        "sketch_bytes_per_scope": td.ratio(totals[td.SKETCH]["bytes"], totals["tags"]),
        "metadata_bytes_per_scope": td.ratio(totals[td.METADATA]["bytes"], totals["tags"]),
    }}


def _sample_rows(kind: list[int], sample: td.Sample, mem: dict[str, Any],
                 ks: KeySpace) -> dict[str, Any]:
    rows = []
    for i in kind:
        ws = td.names(i)
        m = mem["tags"][ks.hash_tag(ws)]
        rows.append({"workspace": ws.workspace_id, "logins": sample.logins[i],
                     "days": sample.days[i], **m,
                     "metadata_per_sketch": td.ratio(m["metadata_bytes"], m["sketch_bytes"])})
    return {
        "workspaces": rows,
        "median_sketch_bytes": td.median_of([r["sketch_bytes"] for r in rows]),
        "median_metadata_bytes": td.median_of([r["metadata_bytes"] for r in rows]),
        "median_metadata_per_sketch": td.median_of(
            [r["metadata_per_sketch"] for r in rows if r["metadata_per_sketch"] is not None]),
        "max_metadata_per_sketch": max(
            (r["metadata_per_sketch"] for r in rows if r["metadata_per_sketch"] is not None),
            default=None),
    }


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------


def produce_topic(bootstrap: str, topic: str, partitions: int, values: list[bytes],
                  keys: list[bytes | None], parts: list[int], compression: str) -> float:
    """A fresh topic (and its dead-letter topic) holding ``values``; seconds it took."""
    asyncio.run(_create_topics(bootstrap, topic, f"{topic}.dlq", partitions))
    producer = make_producer(bootstrap, compression)
    errors: list[str] = []
    t0 = time.perf_counter()
    send(producer, topic, values, keys, parts, errors)  # type: ignore[arg-type]
    flush(producer, errors)
    return time.perf_counter() - t0


def sweep_run(
    cfg: BenchConfig, plan: td.Plan, count: int, bootstrap: str, redis_url: str, logdir: Path,
    *, topic: str | None = None, profile: bool = False,
) -> dict[str, Any]:
    """One tenant count of one shape: bare read, measured consumer run(s), sampled memory."""
    name = topic or f"bench-tenants-{plan.shape}-{count}"
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    msgs = td.render(plan, count, cfg.partitions, now)
    generated = time.perf_counter() - t0
    logins = ~plan.other
    parts = td.per_partition(msgs.parts, cfg.partitions)
    produced_s = produce_topic(bootstrap, name, cfg.partitions, msgs.values,
                               list(msgs.keys), msgs.parts.tolist(), cfg.compression)
    ws_n, org_n = td.scopes_with_data(msgs.workspace, logins)
    expected = td.expected_sketch_keys(msgs.workspace, msgs.day, logins)
    sample = td.samples(msgs.workspace, msgs.day, logins, count, cfg.tenant_samples)
    del msgs
    say(f"tenants {plan.shape} {count:,}: {plan.messages:,} messages produced in "
        f"{produced_s:.1f}s; {ws_n:,} workspaces and {org_n:,} orgs with data")
    data = TopicData(name=name, dlq=f"{name}.dlq", per_partition=parts,
                     messages=plan.messages, logins=plan.logins, expected_keys=expected,
                     bytes=0, produce_seconds=produced_s, generate_seconds=generated,
                     workspace_sizes=[], top_workspace_share=0.0)
    out: dict[str, Any] = {
        "shape": plan.shape, "count": count,
        "topic": {"name": name, "messages": plan.messages, "logins": plan.logins,
                  "per_partition": parts, "workspaces_with_data": ws_n, "orgs_with_data": org_n,
                  "scopes": ws_n + org_n, "produce_seconds": produced_s,
                  "expected_sketch_keys": expected},
        "bare": [], "consume": [],
    }
    client = redis.Redis.from_url(redis_url)
    try:
        for r in range(cfg.tenant_repeats):
            client.flushall()
            bare = run_bare(data, bootstrap)
            out["bare"].append(bare)
            res = consume_measured(
                topic=name, dlq=data.dlq, per_partition=parts, logins=plan.logins,
                messages=plan.messages, bootstrap=bootstrap, redis_url=redis_url,
                prefix=PREFIX, group=f"{name}-{r}", logdir=logdir)
            out["consume"].append(res)
            say(f"tenants {plan.shape} {count:,} run {r + 1}: bare {_f(bare['rate'])}/s, "
                f"consumer {_f(res['rate'])}/s, its CPU "
                f"{_f(res['consumer_cpu_us_per_login'], 1)} us/login, Redis "
                f"{_f(res['redis']['cpu_us_per_login'], 1)} us/login")
        last = out["consume"][-1]
        out["used_memory_per_1000_scopes"] = (
            (last["used_memory_after"] - last["used_memory_before"]) / (ws_n + org_n) * 1000)
        ks = KeySpace(PREFIX, "hll")
        chosen = sorted(set(sample.one_day) | set(sample.median))
        with api_process(redis_url, PREFIX, logdir, f"{plan.shape}-{count}") as (base, http):
            out["sample_queries"] = ask_once(base, http, [td.names(i) for i in chosen])
        mem = scope_memory(client, PREFIX, {ks.hash_tag(td.names(i)) for i in chosen})
        totals = mem["totals"]
        out["keys"] = {"sketch": totals["sketch_keys"], "expected_sketch": expected,
                       "metadata": totals["metadata_keys"],
                       "ok": totals["sketch_keys"] == expected}
        out["memory"] = {
            "one_day": _sample_rows(sample.one_day, sample, mem, ks),
            "median": _sample_rows(sample.median, sample, mem, ks),
            "totals": totals,
        }
        if profile:
            raw = logdir / f"profile-consume-tenants-{plan.shape}-{count}.txt"
            say(f"tenants: profiling one extra (unmeasured) consumer run at {count:,} "
                f"workspaces with py-spy")
            extra = consume_measured(
                topic=name, dlq=data.dlq, per_partition=parts, logins=plan.logins,
                messages=plan.messages, bootstrap=bootstrap, redis_url=redis_url,
                prefix=PREFIX + "p", group=f"{name}-profile", logdir=logdir,
                profile_to=raw, profile_seconds=cfg.profile_seconds)
            out["profile"] = {"summary": summarize(raw), "run_rate": extra["rate"]}
    finally:
        client.close()
    bare_rates = [b["rate"] for b in out["bare"]]
    rates = [c["rate"] for c in out["consume"]]
    out["bare_rate"] = float(np.median(bare_rates))
    out["rate"] = float(np.median(rates))
    out["ratio_to_bare"] = td.ratio(out["rate"], out["bare_rate"])
    out["consumer_cpu_us_per_login"] = td.median_of(
        [c["consumer_cpu_us_per_login"] for c in out["consume"]])
    out["redis_cpu_us_per_login"] = td.median_of(
        [c["redis"]["cpu_us_per_login"] for c in out["consume"]])
    return out


# ---------------------------------------------------------------------------------------------
# The live query among many workspaces
# ---------------------------------------------------------------------------------------------


def _interleaved(svc: live.Service, ws: Scope, window: str, seconds: float) -> dict[str, Any]:
    """The same 730-day request and ``/healthz`` in turns, with no new data meanwhile."""
    url = _url(svc.base, ws, LENGTH, window)
    health = f"{svc.base}/healthz"
    svc.http.get(url)
    svc.http.get(health)
    q: list[float] = []
    h: list[float] = []
    cache: dict[str, int] = {}
    errors = 0
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        t = time.perf_counter()
        svc.http.get(health)
        h.append(time.perf_counter() - t)
        t = time.perf_counter()
        resp = svc.http.get(url)
        q.append(time.perf_counter() - t)
        errors += resp.status_code != 200
        x = resp.headers.get("x-cache", "none")
        cache[x] = cache.get(x, 0) + 1
    query, healthz = live._summary(q), live._summary(h)
    return {"window": window, "query": query, "healthz": healthz, "x_cache": cache,
            "errors": errors, "ratio_p50": td.ratio(query["p50_ms"], healthz["p50_ms"])}


def query_stage(cfg: BenchConfig, count: int, bootstrap: str, redis_url: str, logdir: Path,
                procs: contextlib.ExitStack) -> dict[str, Any]:
    now = datetime.now(UTC)
    today = utc_today()
    days = cfg.history_days
    first = today - timedelta(days=days)
    spaces = livedata.plan(1, (cfg.tenant_dense_dau,), cfg.seed)  # the dense one, a warm-up
    dense = spaces[0]
    asyncio.run(_create_topics(bootstrap, QUERY_TOPIC, f"{QUERY_TOPIC}.dlq", cfg.partitions))
    producer = make_producer(bootstrap, cfg.compression)
    values, scopes = td.background(count, cfg.tenant_background_days, now, cfg.seed)
    keys = [livedata.message_key(s) for s in scopes]
    parts = [livedata.partition_of(s, cfg.partitions) for s in scopes]
    errors: list[str] = []
    t0 = time.perf_counter()
    send(producer, QUERY_TOPIC, values, keys, parts, errors)
    flush(producer, errors)
    produced = td.per_partition(np.asarray(parts, dtype=np.int64), cfg.partitions)
    say(f"tenants query: {len(values):,} logins of {count:,} workspaces produced; now "
        f"{days} days of {dense.ws.workspace_id}")
    history, history_n, _ = live._produce_history(producer, QUERY_TOPIC, spaces, first, days,
                                                  cfg.partitions, cfg.seed)
    produced = [a + b for a, b in zip(produced, history, strict=True)]
    produce_s = time.perf_counter() - t0
    secret = os.urandom(24).hex()
    svc = live._start_service(procs, mode="hll", topic=QUERY_TOPIC, prefix=QUERY_PREFIX,
                              partitions=cfg.partitions, bootstrap=bootstrap,
                              redis_url=redis_url, secret=secret, logdir=logdir,
                              produced=produced, group="bench-tenants-query")
    ingest = svc.wait_applied(produced, timeout=3600)
    say(f"tenants query: consumer at lag 0 after {ingest['waited_s']:.1f}s "
        f"({ingest['rate']:,.0f} events/s from its first batch)")
    warm = spaces[-1]
    for _ in range(3):
        for window in live.WINDOWS:
            svc.get(warm.ws, window)
    for _ in range(20):
        svc.http.get(f"{svc.base}/healthz")
    stack = live.Stack(cfg, bootstrap, redis_url, logdir, secret, spaces, first, today,
                       producer, svc)
    out: dict[str, Any] = {
        "workspaces": count, "background_logins": len(values),
        "background_days": cfg.tenant_background_days, "workspace": dense.ws.workspace_id,
        "dau": dense.dau, "history_days": days, "history_logins": history_n,
        "produce_seconds": produce_s, "consume": ingest, "rate": cfg.live_rate,
        "used_memory": int(svc.redis.info("memory")["used_memory"]),
    }
    partition = livedata.partition_of(dense.ws, cfg.partitions)
    base = svc.produced[partition]
    truth = live.Truth(dense.population, cfg.seed)
    producer_stats: dict[str, Any] = {}
    with live._live_producer(svc, stack, dense, partition, producer_stats):
        live._wait_offset(svc, partition, base + int(cfg.live_rate))
        out["healthz"] = live._health_pass(svc, cfg.live_health_seconds)
        out["passes"] = {}
        for window in live.WINDOWS:
            p = live._live_pass(svc, dense.ws, window, cfg.live_seconds, partition, base, truth,
                                cfg.live_tolerance)
            out["passes"][window] = p
            say(f"tenants live {window} among {count:,}: p50 {p['p50_ms']:.1f} ms, p95 "
                f"{p['p95_ms']:.1f} ms, n={p['n']}, X-Cache {p['x_cache']}, violations "
                f"{p['violations']}")
    out["producer"] = producer_stats
    svc.wait_applied(svc.produced, timeout=600)
    out["repeat"] = {w: _interleaved(svc, dense.ws, w, cfg.tenant_repeat_seconds)
                     for w in live.WINDOWS}
    for w, r in out["repeat"].items():
        say(f"tenants repeated {w} request: p50 {_f(r['query']['p50_ms'], 2)} ms, /healthz p50 "
            f"{_f(r['healthz']['p50_ms'], 2)} ms (x{_f(r['ratio_p50'], 1)})")
    return out


# ---------------------------------------------------------------------------------------------
# The rebuild of one workspace among many
# ---------------------------------------------------------------------------------------------

_REBUILT = re.compile(r"from ([\d,]+) messages")


def rebuild_once(bootstrap: str, topic: str, redis_url: str, ws: Scope, logdir: Path,
                 timeout: float = 1800.0, extra_env: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """``usage-metrics rebuild --org O --workspace W`` from launch to exit, and how many
    messages it says it read."""
    env = child_env(KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_TOPIC=topic,
                    KAFKA_DLQ_TOPIC=f"{topic}.dlq", REDIS_URL=redis_url, REDIS_KEY_PREFIX=PREFIX,
                    SKETCH_MODE="hll", LOG_LEVEL="INFO", COLUMNS="120", **(extra_env or {}))
    cmd = python_cmd("-m", "usage_metrics.cli", "rebuild", "--org", ws.org_id,
                     "--workspace", ws.workspace_id)
    t0 = time.perf_counter()
    with (logdir / f"rebuild-{topic}.log").open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, cwd=REPO)
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            stop_process(proc)
    wall = time.perf_counter() - t0
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"rebuild exited {proc.returncode}: {text[-1000:]}")
    found = _REBUILT.findall(text)
    return {"wall_s": wall, "messages_read": int(found[-1].replace(",", "")) if found else None,
            "output": text.strip().splitlines()[-1] if text.strip() else ""}


def _db(url: str, number: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{number}"


def rebuild_stage(cfg: BenchConfig, plan: td.Plan, count: int, bootstrap: str, redis_url: str,
                  logdir: Path, topic: str = "bench-tenants-rebuild") -> dict[str, Any]:
    """Run where the sweep left the same logins at ``count`` workspaces in the store, so that
    whatever the rebuild does to find and set aside the workspace's keys meets a full store."""
    now = datetime.now(UTC)
    msgs = td.render(plan, count, cfg.partitions, now)
    logins = ~plan.other
    sample = td.samples(msgs.workspace, msgs.day, logins, count, 1)
    target_index = sample.median[0]
    target = td.names(target_index)
    client = redis.Redis.from_url(redis_url)
    try:
        store_keys = int(client.dbsize())
    finally:
        client.close()
    empty = f"{topic}-empty"
    asyncio.run(_create_topics(bootstrap, empty, f"{empty}.dlq", cfg.partitions))
    # The fixed cost: the same command on an empty topic, once over an empty database (start-up
    # and connections) and once over the full store (plus finding the workspace's keys there).
    startup = rebuild_once(bootstrap, empty, _db(redis_url, 1), target, logdir)
    fixed = rebuild_once(bootstrap, empty, redis_url, target, logdir)
    say(f"tenants rebuild: on an empty topic {startup['wall_s']:.2f}s over an empty database, "
        f"{fixed['wall_s']:.2f}s over the store's {store_keys:,} keys")
    out: dict[str, Any] = {
        "workspaces": count, "messages": plan.messages, "workspace": target.workspace_id,
        "workspace_logins": sample.logins[target_index], "store_keys": store_keys,
        "startup": startup, "fixed": fixed, "topics": {},
        "keying": "key = workspace id, Kafka's default partitioner (murmur2, as the Java client "
                  "and librdkafka's murmur2_random)",
        "keyed_env": sorted(td.parse_env(cfg.tenant_keyed_env)),
    }
    for keyed in (False, True):
        kind = "keyed" if keyed else "unkeyed"
        name = f"{topic}-{kind}"
        keys, parts = td.rebuild_keying(msgs.workspace, cfg.partitions, keyed, cfg.seed)
        produce_topic(bootstrap, name, cfg.partitions, msgs.values, keys, parts.tolist(),
                      cfg.compression)
        per_part = td.per_partition(parts, cfg.partitions)
        holding = td.default_partition(td.workspace_key(target), cfg.partitions)
        data = TopicData(name=name, dlq=f"{name}.dlq", per_partition=per_part,
                         messages=plan.messages, logins=plan.logins, expected_keys=0, bytes=0,
                         produce_seconds=0.0, generate_seconds=0.0, workspace_sizes=[],
                         top_workspace_share=0.0)
        bare = run_bare(data, bootstrap)
        extra = td.parse_env(cfg.tenant_keyed_env) if keyed else {}
        rb = rebuild_once(bootstrap, name, redis_url, target, logdir, extra_env=extra)
        net = rb["wall_s"] - fixed["wall_s"]
        rate = plan.messages / net if net > 0 else float("nan")
        row = {
            "per_partition": per_part, "bare": bare, "rebuild": rb,
            "rate_wall": plan.messages / rb["wall_s"], "rate": rate,
            "ratio_to_bare": td.ratio(rate, bare["rate"]),
            "partition_holding": holding if keyed else None,
            "records_in_that_partition": per_part[holding] if keyed else None,
        }
        out["topics"][kind] = row
        say(f"tenants rebuild ({kind} topic): {rb['wall_s']:.1f}s for {plan.messages:,} "
            f"records, {_f(rate)} records/s net of the fixed cost, bare read "
            f"{_f(bare['rate'])}/s (x{_f(row['ratio_to_bare'], 2)}); it read "
            f"{rb['messages_read']} messages")
    return out


# ---------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------


def _guard(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One stage that fails must not lose the others' figures."""
    started = time.perf_counter()
    try:
        value = fn()
    except Exception:  # noqa: BLE001 - recorded in the results and printed in the table
        err = traceback.format_exc()
        say(f"{name} FAILED:\n{err}")
        return {"error": err}
    value.setdefault("stage_seconds", time.perf_counter() - started)
    return value


@contextlib.contextmanager
def servers(logdir: Path, name: str) -> Iterator[tuple[str, str]]:
    """A fresh broker and a fresh redis-server (topics live in the broker's memory: a fresh
    one per stage gives that memory back)."""
    broker = TansuBroker(log=logdir / f"tansu-{name}.log")
    store = RedisServer(directory=logdir / f"redis-{name}")
    store.directory.mkdir(parents=True, exist_ok=True)
    try:
        broker.start()
        store.start()
        yield broker.bootstrap, store.url
    finally:
        broker.stop()
        store.stop()


def _stage(out: dict[str, Any], key: str | None, name: str, mark: Mark | None,
           fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if mark is not None:
        mark(name)
    result = _guard(name, fn)
    if key is not None:
        out[key] = result
    return result


def run(cfg: BenchConfig, logdir: Path, mark: Mark | None = None) -> dict[str, Any]:
    counts = sorted(set(cfg.tenant_counts))
    largest = counts[-1]
    shapes = [s for s in td.SHAPES if s in cfg.tenant_shapes]
    out: dict[str, Any] = {"counts": counts, "shapes": shapes, "events": cfg.tenant_events,
                           "partitions": cfg.partitions, "runs": []}
    plans = {s: td.plan(s, cfg.tenant_events, largest, cfg.largest_workspace, cfg.other_share,
                        cfg.seed) for s in shapes}
    # The rebuild runs where the sweep's largest count left its store (backfill if swept).
    rebuild_shape = "backfill" if "backfill" in shapes else (shapes[-1] if shapes else None)
    for shape in shapes:
        for count in counts:
            name = f"tenants {shape} {count:,}"
            # The profile is an extra run of a minute or more: full runs only.
            profile = cfg.profile and not cfg.quick and shape == "live" and count == largest
            rebuild_here = cfg.tenant_rebuild and shape == rebuild_shape and count == largest

            def one(shape: td.Shape = shape, count: int = count, profile: bool = profile,
                    rebuild_here: bool = rebuild_here, name: str = name) -> dict[str, Any]:
                with servers(logdir, f"tenants-{shape}-{count}") as (bootstrap, url):
                    result = _guard(name, lambda: sweep_run(
                        cfg, plans[shape], count, bootstrap, url, logdir, profile=profile))
                    if rebuild_here:
                        _stage(out, "rebuild", "tenants rebuild", mark, lambda: rebuild_stage(
                            cfg, plans[shape], count, bootstrap, url, logdir))
                return result

            result = _stage(out, None, name, mark, one)
            result.setdefault("shape", shape)
            result.setdefault("count", count)
            out["runs"].append(result)
    if cfg.tenant_query:
        def query() -> dict[str, Any]:
            with servers(logdir, "tenants-query") as (bootstrap, url), \
                    contextlib.ExitStack() as procs:
                return query_stage(cfg, largest, bootstrap, url, logdir, procs)

        _stage(out, "query", "tenants query", mark, query)
    return out


def smallest(cfg: BenchConfig) -> BenchConfig:
    """The section's smallest form (the test's): two tiny counts, a few thousand messages."""
    return replace(cfg, tenant_counts=(20, 200), tenant_events=3_000, tenant_samples=2,
                   tenant_repeats=1, partitions=2, profile=False)
