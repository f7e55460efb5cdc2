"""The shapes users have (issue 10): workspaces right after two years of history were ingested,
and a dense workspace queried while it ingests today's logins.

Everything goes through the real processes, so that the same code measures whatever the service
does inside: the history is produced into Kafka (confluent-kafka, keyed by workspace) and read by
``usage-metrics consume`` (HLL, its own process) to lag 0; ``usage-metrics api`` (uvicorn, its
own process) answers over HTTP; the benchmark only reads what the consumer records (its applied
offsets, from Redis) and what Redis reports about itself (SLOWLOG, MEMORY USAGE).

- ``live_history`` (shared set-up): ``backfill_workspaces`` workspaces, the dense ones first,
  ``history_days`` days ending yesterday, in time order, through the consumer.
- ``backfill_query``: the first 730-day query of each workspace right after its history landed,
  one client, no cache able to answer: half of the workspaces (the densest among them) are asked
  the rolling window first, half the calendar window; then every day of every workspace gets one
  more login, and each is asked the other window first. The same request repeated at once is the
  baseline.
- ``live``: a producer process sends today's logins of the densest workspace at ``live_rate``;
  one client asks its 730-day query back to back, each window for ``live_seconds``, beside
  ``/healthz`` for scale. Each answer's today DAU is checked against an exact count of the
  distinct subjects the consumer had stored when the request began (its applied offset, read
  before the request) and could have stored when it ended (read after), with the HLL tolerance;
  a short pass in exact mode (its own topic, consumer and API) checks the same exactly. Then the
  Redis cost of single live queries (SLOWLOG, commands of the API's own connections only, so that
  the consumer's writes and script-internal entries are not counted), any command over 5 ms
  during the passes, and the memory of stored results beside the sketches they summarize.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import subprocess
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import redis

from api.auth import issue_token
from bench import livedata
from bench.config import BenchConfig
from bench.ingest import _create_topics, flush, make_producer, send
from bench.livedata import HistoryWorkspace
from bench.queries import _url
from bench.util import (
    REPO,
    child,
    child_env,
    free_port,
    python_cmd,
    say,
    stop_process,
    summary_ms,
    tcp_ports,
    wait_http,
)
from sketches.config import Settings
from sketches.keys import KeySpace, Scope
from sketches.periods import utc_today

LENGTH = 730
WINDOWS = ("rolling", "calendar")
PREFIX = "lv"
EXACT_PREFIX = "lx"
TOPIC = "bench-live-history"
EXACT_TOPIC = "bench-live-exact"
COMMAND_LIMIT_US = 5_000  # SLOWLOG threshold during the live passes: the 5 ms target


def _summary(seconds: list[float]) -> dict[str, Any]:
    out = summary_ms(seconds)
    ms = [s * 1000 for s in seconds]
    out["p95_ms"] = float(np.percentile(ms, 95)) if ms else float("nan")
    return out


@dataclass
class Service:
    """One consumer and one API process over one topic and key prefix."""

    mode: str
    topic: str
    prefix: str
    partitions: int
    produced: list[int]
    redis: redis.Redis
    base: str
    api: subprocess.Popen[bytes]
    consumer: subprocess.Popen[bytes]
    http: httpx.Client

    def offset_key(self, partition: int) -> str:
        return KeySpace(self.prefix, self.mode).offsets(self.topic, partition)  # type: ignore[arg-type]

    def applied(self) -> list[int]:
        raw = self.redis.mget([self.offset_key(p) for p in range(self.partitions)])
        return [int(v) if v is not None else 0 for v in raw]

    def wait_applied(self, expected: list[int], timeout: float = 900.0) -> dict[str, float]:
        """Poll the consumer's applied offsets until they reach ``expected``; the time from the
        first progress to the end and the rate over it, as ``bench.ingest`` takes it."""
        start = self.applied()
        launched = time.perf_counter()
        t_first: float | None = None
        first_done = sum(start)
        while True:
            now = time.perf_counter()
            if self.consumer.poll() is not None:
                raise RuntimeError(f"{self.mode} consumer exited ({self.consumer.returncode})")
            if now - launched > timeout:
                raise TimeoutError(f"consumer did not reach {expected} in {timeout}s")
            done = self.applied()
            if t_first is None and sum(done) > sum(start):
                t_first, first_done = now, sum(done)
            if all(d >= e for d, e in zip(done, expected, strict=True)):
                break
            time.sleep(0.01)
        seconds = now - (t_first or now)
        moved = sum(done) - first_done
        return {"seconds": seconds, "waited_s": now - launched,
                "rate": moved / seconds if seconds > 0 else float("nan")}

    def get(self, ws: Scope, window: str, length: int = LENGTH) -> tuple[float, httpx.Response]:
        url = _url(self.base, ws, length, window)
        t = time.perf_counter()
        resp = self.http.get(url)
        return time.perf_counter() - t, resp


@dataclass
class Stack:
    cfg: BenchConfig
    bootstrap: str
    redis_url: str
    logdir: Path
    secret: str
    spaces: list[HistoryWorkspace]
    first: date
    today: date
    producer: Any
    hll: Service
    stats: dict[str, Any] = field(default_factory=dict)
    first_after_backfill: dict[str, Any] | None = None

    @property
    def dense(self) -> HistoryWorkspace:
        return self.spaces[0]

    def produce(self, service: Service, values: list[bytes], keys: list[bytes],
                parts: list[int]) -> None:
        errors: list[str] = []
        send(self.producer, service.topic, values, keys, parts, errors)
        flush(self.producer, errors)
        for p in parts:
            service.produced[p] += 1


def _ok(resp: httpx.Response, rows: int = LENGTH + 1) -> bool:
    return resp.status_code == 200 and len(orjson.loads(resp.content)) == rows


def _start_service(
    stack_procs: contextlib.ExitStack,
    *,
    mode: str,
    topic: str,
    prefix: str,
    partitions: int,
    bootstrap: str,
    redis_url: str,
    secret: str,
    logdir: Path,
    produced: list[int],
    group: str,
) -> Service:
    consumer_env = child_env(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap, KAFKA_TOPIC=topic, KAFKA_DLQ_TOPIC=f"{topic}.dlq",
        KAFKA_GROUP_ID=group, REDIS_URL=redis_url, REDIS_KEY_PREFIX=prefix, SKETCH_MODE=mode,
        LOG_LEVEL="INFO",
    )
    consumer = stack_procs.enter_context(child(
        python_cmd("-m", "usage_metrics.cli", "consume"), consumer_env,
        logdir / f"consume-{prefix}.log"))
    port = free_port()
    # The per-caller rate limiter would answer a load test with 429: off, as for a trusted
    # dashboard backend (as in bench.queries).
    api_env = child_env(REDIS_URL=redis_url, JWT_SECRET=secret, REDIS_KEY_PREFIX=prefix,
                        SKETCH_MODE=mode, LOG_LEVEL="INFO", RATE_LIMIT_PER_MINUTE="0")
    api = stack_procs.enter_context(child(
        python_cmd("-m", "usage_metrics.cli", "api", "--host", "127.0.0.1", "--port", str(port)),
        api_env, logdir / f"api-{prefix}.log"))
    settings = Settings(jwt_secret=secret, _env_file=None)
    token = issue_token(settings, role="superadmin", org_id=None, ttl_seconds=4 * 3600,
                        now=time.time())
    http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=120)
    stack_procs.callback(http.close)
    client = redis.Redis.from_url(redis_url)
    stack_procs.callback(client.close)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/healthz")
    return Service(mode, topic, prefix, partitions, produced, client, base, api, consumer, http)


def _produce_history(
    stack_producer: Any, topic: str, spaces: list[HistoryWorkspace], first: date, days: int,
    partitions: int, seed: int,
) -> tuple[list[int], int, float]:
    produced = [0] * partitions
    total = 0
    started = time.perf_counter()
    errors: list[str] = []
    for values, keys, parts, _ in livedata.history(spaces, first, days, partitions, seed):
        send(stack_producer, topic, values, keys, parts, errors)
        for p in parts:
            produced[p] += 1
        total += len(values)
    flush(stack_producer, errors)
    return produced, total, time.perf_counter() - started


def prepare(
    cfg: BenchConfig, bootstrap: str, redis_url: str, logdir: Path, secret: str,
    procs: contextlib.ExitStack,
) -> Stack:
    """The shared set-up: history produced, consumed to lag 0 by a running consumer, and an API
    process warmed up on a workspace no figure uses."""
    today = utc_today()
    days = cfg.history_days
    first = today - timedelta(days=days)
    spaces = livedata.plan(cfg.backfill_workspaces, cfg.live_dense_dau, cfg.seed)
    asyncio.run(_create_topics(bootstrap, TOPIC, f"{TOPIC}.dlq", cfg.partitions))
    producer = make_producer(bootstrap, cfg.compression)
    say(f"live history: {len(spaces) - 1} workspaces (dense DAU "
        f"{', '.join(str(w.dau) for w in spaces if w.cls == 'dense')}), {days} days up to "
        f"yesterday; generating and producing")
    produced, total, took = _produce_history(producer, TOPIC, spaces, first, days,
                                             cfg.partitions, cfg.seed)
    say(f"live history: produced {total:,} logins in {took:.1f}s; consuming")
    hll = _start_service(procs, mode="hll", topic=TOPIC, prefix=PREFIX,
                         partitions=cfg.partitions, bootstrap=bootstrap, redis_url=redis_url,
                         secret=secret, logdir=logdir, produced=produced, group="bench-live")
    ingest = hll.wait_applied(produced)
    say(f"live history: consumer at lag 0 after {ingest['waited_s']:.1f}s "
        f"({ingest['rate']:,.0f} events/s from its first batch)")
    warm = next(w for w in spaces if w.cls == "warmup")
    for _ in range(3):
        for window in WINDOWS:
            hll.get(warm.ws, window)
    for _ in range(20):
        hll.http.get(f"{hll.base}/healthz")
    info = hll.redis.info("memory")
    stack = Stack(cfg, bootstrap, redis_url, logdir, secret, spaces, first, today, producer, hll)
    stack.stats = {
        "workspaces": len(spaces) - 1,
        "dense_dau": [w.dau for w in spaces if w.cls == "dense"],
        "small_dau": [w.dau for w in spaces if w.cls == "small"],
        "days": days,
        "first": first.isoformat(),
        "last": (today - timedelta(days=1)).isoformat(),
        "messages": total,
        "per_partition": produced,
        "produce_seconds": took,
        "consume": ingest,
        "used_memory": int(info["used_memory"]),
    }
    return stack


# ---------------------------------------------------------------------------------------------
# First queries after a backfill
# ---------------------------------------------------------------------------------------------


def backfill_query(stack: Stack) -> dict[str, Any]:
    cfg = stack.cfg
    svc = stack.hll
    measured = [w for w in stack.spaces if w.cls != "warmup"]
    rolling_first = {w.ws for w in measured[::2]}  # measured[0] is the densest
    order = list(measured)
    random.Random(cfg.seed).shuffle(order)
    samples: list[dict[str, Any]] = []
    errors = 0

    def one_round(number: int, pick: dict[Scope, str]) -> None:
        nonlocal errors
        for w in order:
            window = pick[w.ws]
            seconds, resp = svc.get(w.ws, window)
            repeat, again = svc.get(w.ws, window)
            good = _ok(resp) and _ok(again)
            errors += not good
            samples.append({
                "round": number, "workspace": w.ws.workspace_id, "class": w.cls,
                "dau": w.dau, "window": window, "seconds": seconds, "repeat_seconds": repeat,
                "x_cache": resp.headers.get("x-cache", "none"),
                "repeat_x_cache": again.headers.get("x-cache", "none"), "ok": good,
            })
            if (w is stack.dense and window == "rolling"
                    and stack.first_after_backfill is None):
                stack.first_after_backfill = {"ms": seconds * 1000, "round": number,
                                              "repeat_ms": repeat * 1000}

    one_round(1, {w.ws: "rolling" if w.ws in rolling_first else "calendar" for w in measured})
    say("backfill query, round 1: " + _round_line(samples, 1))
    # Every day of every workspace changes: one more login per day, through the consumer.
    values: list[bytes] = []
    keys: list[bytes] = []
    parts: list[int] = []
    for i in range(cfg.history_days):
        stamp = f"{(stack.first + timedelta(days=i)).isoformat()}T12:00:00Z"
        for w in measured:
            values.append(livedata.login_json("touch_1", w.ws, stamp))
            keys.append(livedata.message_key(w.ws))
            parts.append(livedata.partition_of(w.ws, cfg.partitions))
    stack.produce(svc, values, keys, parts)
    touch = svc.wait_applied(svc.produced)
    say(f"backfill query: {len(values):,} logins touched every day of every workspace "
        f"(lag 0 after {touch['waited_s']:.1f}s)")
    one_round(2, {w.ws: "calendar" if w.ws in rolling_first else "rolling" for w in measured})
    say("backfill query, round 2: " + _round_line(samples, 2))
    out: dict[str, Any] = {"workspaces": len(measured), "touch_messages": len(values),
                           "touch_consume": touch, "errors": errors, "samples": samples,
                           "windows": {}}
    for window in WINDOWS:
        mine = [s for s in samples if s["window"] == window]
        out["windows"][window] = {
            "first": _summary([s["seconds"] for s in mine]),
            "first_dense": _summary([s["seconds"] for s in mine if s["class"] == "dense"]),
            "first_small": _summary([s["seconds"] for s in mine if s["class"] == "small"]),
            "repeat": _summary([s["repeat_seconds"] for s in mine]),
            "x_cache": dict(Counter(s["x_cache"] for s in mine)),
            "repeat_x_cache": dict(Counter(s["repeat_x_cache"] for s in mine)),
        }
    return out


def _round_line(samples: list[dict[str, Any]], number: int) -> str:
    parts = []
    for window in WINDOWS:
        ms = [s["seconds"] * 1000 for s in samples if s["round"] == number
              and s["window"] == window]
        if ms:
            parts.append(f"{window} first queries n={len(ms)} median {statistics.median(ms):.1f}"
                         f" max {max(ms):.1f} ms")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Live queries
# ---------------------------------------------------------------------------------------------


class Truth:
    """Distinct subjects among the first n live messages (the producer's fixed sequence)."""

    def __init__(self, population: int, seed: int) -> None:
        self.population = population
        self.seed = seed
        self.prefix = np.zeros(1, dtype=np.int64)

    def distinct(self, n: int) -> int:
        if n >= len(self.prefix):
            size = max(n + 1, 2 * len(self.prefix), 65_536)
            self.prefix = livedata.distinct_prefix(
                livedata.live_codes(size, self.population, self.seed))
        return int(self.prefix[n])


@contextlib.contextmanager
def _live_producer(
    svc: Service, stack: Stack, ws: HistoryWorkspace, partition: int, result: dict[str, Any]
) -> Any:
    """``bench.liveprod`` for one workspace; its report lands in ``result`` when it stops."""
    cmd = python_cmd(
        "-m", "bench.liveprod", "--bootstrap", stack.bootstrap, "--topic", svc.topic,
        "--partition", str(partition), "--base-offset", str(svc.produced[partition]),
        "--org", ws.ws.org_id, "--workspace", ws.ws.workspace_id,
        "--population", str(ws.population), "--seed", str(stack.cfg.seed),
        "--rate", str(stack.cfg.live_rate))
    with (stack.logdir / "liveprod.log").open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=REPO,
                                env=child_env())
    assert proc.stdout is not None
    try:
        ready = proc.stdout.readline()
        if ready.strip() != b"ready":
            raise RuntimeError(f"live producer did not start: {ready!r}")
        yield proc
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        result.update(orjson.loads(out.strip().splitlines()[-1]))
        svc.produced[partition] += int(result["sent"])
    finally:
        stop_process(proc)


def _wait_offset(svc: Service, partition: int, target: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while svc.applied()[partition] < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the consumer did not apply offset {target} of partition "
                               f"{partition} within {timeout}s")
        time.sleep(0.02)


def _live_pass(
    svc: Service, ws: Scope, window: str, seconds: float, partition: int, base: int,
    truth: Truth, tolerance: float,
) -> dict[str, Any]:
    """Requests back to back for ``seconds``; each answer's today DAU between the distinct
    subjects of the messages applied before the request and of those applied after it.

    Latencies are also split by whether the consumer applied anything since the previous
    request began ("new data": the answer cannot be the previous one) or not, read from the
    applied offsets, so that the split means the same whatever caches the service has."""
    key = svc.offset_key(partition)
    url = _url(svc.base, ws, LENGTH, window)
    latencies: list[float] = []
    fresh: list[float] = []
    same: list[float] = []
    cache: Counter[str] = Counter()
    errors = skipped = checks = 0
    bad: list[dict[str, Any]] = []
    started_day = utc_today()
    applied_start = previous = int(svc.redis.get(key) or 0)
    t_start = time.perf_counter()
    stop_at = t_start + seconds
    while time.perf_counter() < stop_at:
        before = int(svc.redis.get(key) or 0)
        day = utc_today()
        t = time.perf_counter()
        resp = svc.http.get(url)
        elapsed = time.perf_counter() - t
        after = int(svc.redis.get(key) or 0)
        latencies.append(elapsed)
        (fresh if before > previous else same).append(elapsed)
        previous = before
        cache[resp.headers.get("x-cache", "none")] += 1
        if resp.status_code != 200:
            errors += 1
            continue
        rows = orjson.loads(resp.content)
        if len(rows) != LENGTH + 1:
            errors += 1
            continue
        if day != started_day or utc_today() != day or rows[-1]["date"] != day.isoformat():
            skipped += 1  # midnight (UTC) passed: yesterday's live logins are not today's
            continue
        lower = truth.distinct(max(0, before - base))
        upper = truth.distinct(max(0, after - base))
        checks += 1
        dau = rows[-1]["dau"]
        if not livedata.within(dau, lower, upper, tolerance):
            bad.append({"dau": dau, "lower": lower, "upper": upper})
    wall = time.perf_counter() - t_start
    applied_end = int(svc.redis.get(key) or 0)
    return {
        "window": window, "seconds": wall, **_summary(latencies),
        "new_data": _summary(fresh), "no_new_data": _summary(same),
        "x_cache": dict(cache), "errors": errors, "checks": checks, "skipped": skipped,
        "violations": len(bad), "violation_examples": bad[:5], "tolerance": tolerance,
        "applied_rate": (applied_end - applied_start) / wall if wall else float("nan"),
        "today_dau_at_end": truth.distinct(max(0, applied_end - base)),
    }


def _health_pass(svc: Service, seconds: float) -> dict[str, Any]:
    latencies = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        t = time.perf_counter()
        svc.http.get(f"{svc.base}/healthz")
        latencies.append(time.perf_counter() - t)
    return _summary(latencies)


def _port(entry: dict[str, Any]) -> int | None:
    addr = entry.get("client_address", b"")
    text = addr.decode() if isinstance(addr, bytes) else str(addr)
    tail = text.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _command(entry: dict[str, Any]) -> str:
    cmd = entry.get("command", b"")
    text = cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)
    return text.split(" ", 1)[0].upper()


def _slow_commands(svc: Service, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Commands over the 5 ms threshold during the passes, by whose connection ran them."""
    api, consumer = tcp_ports(svc.api.pid), tcp_ports(svc.consumer.pid)

    def who(e: dict[str, Any]) -> str:
        port = _port(e)
        if port in api:
            return "api"
        if port in consumer:
            return "consumer"
        return "script" if port == 0 else "other"

    mine = [e for e in entries if _command(e) not in ("SLOWLOG", "CONFIG")]
    longest = max(mine, key=lambda e: int(e["duration"])) if mine else None
    return {
        "threshold_ms": COMMAND_LIMIT_US / 1000,
        "count": len(mine),
        "by_client": dict(Counter(who(e) for e in mine)),
        "longest_ms": int(longest["duration"]) / 1000 if longest else 0.0,
        "longest_command": _command(longest) if longest else None,
        "longest_client": who(longest) if longest else None,
    }


def _redis_cost(svc: Service, ws: Scope, partition: int, rounds: int) -> dict[str, Any]:
    """SLOWLOG at threshold 0 around single live queries, each asked once the consumer has
    applied new logins since the previous one (so no answer can simply be the previous one).
    Only the API's own connections count, so the consumer's writes meanwhile and the entries a
    script's inner commands leave (client ``?:0``) are not counted; the script itself is, with
    its whole duration."""
    out: dict[str, Any] = {}
    r = svc.redis
    for window in WINDOWS:
        runs = []
        svc.get(ws, window)
        for _ in range(rounds):
            _wait_offset(svc, partition, svc.applied()[partition] + 1)
            r.config_set("slowlog-max-len", 1_000_000)
            r.config_set("slowlog-log-slower-than", 0)
            r.slowlog_reset()
            seconds, resp = svc.get(ws, window)
            entries = r.slowlog_get(1_000_000)
            r.config_set("slowlog-log-slower-than", COMMAND_LIMIT_US)
            r.slowlog_reset()
            api = tcp_ports(svc.api.pid)
            mine = [e for e in entries if _port(e) in api]
            durations = sorted(int(e["duration"]) for e in mine)
            longest = max(mine, key=lambda e: int(e["duration"])) if mine else None
            runs.append({
                "client_ms": seconds * 1000, "ok": _ok(resp),
                "x_cache": resp.headers.get("x-cache", "none"),
                "commands": len(durations),
                "redis_total_ms": sum(durations) / 1000,
                "longest_command_ms": durations[-1] / 1000 if durations else 0.0,
                "longest_command": _command(longest) if longest else None,
                "others_commands": len(entries) - len(mine),
            })
        totals = sorted(x["redis_total_ms"] for x in runs)
        out[window] = {
            "rounds": runs,
            "redis_total_ms_median": statistics.median(totals),
            "redis_total_ms_max": totals[-1],
            "longest_command_ms_max": max(x["longest_command_ms"] for x in runs),
            "commands_median": statistics.median(x["commands"] for x in runs),
            "x_cache": dict(Counter(x["x_cache"] for x in runs)),
        }
        say(f"live Redis cost, {window}: {out[window]['redis_total_ms_median']:.2f} ms in all "
            f"(median of {rounds}; {out[window]['commands_median']:.0f} commands), longest "
            f"command {out[window]['longest_command_ms_max']:.2f} ms")
    return out


def stored_memory(
    client: redis.Redis, prefix: str, mode: str, picks: dict[str, Scope]
) -> dict[str, Any]:
    """``MEMORY USAGE ... SAMPLES 0`` of every key under ``prefix``, per hash tag: sketches,
    stored results (the meta hash and results) and the rest; the named workspaces, and
    the tag whose stored results cost the most beside its sketches."""
    keys = [k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=10_000)]
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k, samples=0)
    sizes = [int(x or 0) for x in pipe.execute()]
    tags: dict[str, dict[str, Any]] = {}
    for k, size in zip(keys, sizes, strict=True):
        tag = livedata.hash_tag(k, prefix)
        if tag is None:
            continue
        kind = livedata.key_kind(k, f"{prefix}:{tag}:")
        row = tags.setdefault(tag, {livedata.SKETCH: [0, 0], livedata.STORED: [0, 0],
                                    livedata.OTHER: [0, 0]})
        row[kind][0] += 1
        row[kind][1] += size

    def describe(tag: str) -> dict[str, Any]:
        row = tags.get(tag, {})
        sk, st = row.get(livedata.SKETCH, [0, 0]), row.get(livedata.STORED, [0, 0])
        return {"tag": tag, "sketch_keys": sk[0], "sketch_bytes": sk[1], "stored_keys": st[0],
                "stored_bytes": st[1],
                "share": st[1] / sk[1] if sk[1] else (float("inf") if st[1] else None)}

    ks = KeySpace(prefix, mode)  # type: ignore[arg-type]
    named = {name: describe(ks.hash_tag(ws)) for name, ws in picks.items()}
    with_stored = [describe(t) for t, row in tags.items() if row[livedata.STORED][0]]
    worst = max(with_stored, key=lambda d: d["share"]) if with_stored else None
    return {"workspaces": named, "tags_with_stored": len(with_stored), "worst": worst,
            "stored_keys": sum(d["stored_keys"] for d in with_stored)}


def live(stack: Stack) -> dict[str, Any]:
    cfg = stack.cfg
    svc = stack.hll
    dense = stack.dense
    out: dict[str, Any] = {"workspace": dense.ws.workspace_id, "dau": dense.dau,
                           "rate": cfg.live_rate}
    if stack.first_after_backfill is None:
        seconds, resp = svc.get(dense.ws, "rolling")
        stack.first_after_backfill = {"ms": seconds * 1000, "round": 1, "ok": _ok(resp)}
    out["first_after_backfill"] = stack.first_after_backfill
    partition = livedata.partition_of(dense.ws, cfg.partitions)
    base = svc.produced[partition]
    truth = Truth(dense.population, cfg.seed)
    producer: dict[str, Any] = {}
    r = svc.redis
    with _live_producer(svc, stack, dense, partition, producer):
        _wait_offset(svc, partition, base + int(cfg.live_rate))
        say(f"live: producer at {cfg.live_rate:.0f} logins/s for {dense.ws.workspace_id}; "
            f"consumer keeping up")
        r.config_set("slowlog-max-len", 1_000_000)
        r.config_set("slowlog-log-slower-than", COMMAND_LIMIT_US)
        r.slowlog_reset()
        out["healthz"] = _health_pass(svc, cfg.live_health_seconds)
        out["passes"] = {}
        for window in WINDOWS:
            p = _live_pass(svc, dense.ws, window, cfg.live_seconds, partition, base, truth,
                           cfg.live_tolerance)
            out["passes"][window] = p
            say(f"live {window} {LENGTH}d: p50 {p['p50_ms']:.1f} ms, p95 {p['p95_ms']:.1f} ms, "
                f"n={p['n']} (after new data: {p['new_data']['n']}, p50 "
                f"{p['new_data']['p50_ms']:.1f} ms), X-Cache {p['x_cache']}, checks {p['checks']} "
                f"(violations {p['violations']}), consumer applied {p['applied_rate']:,.0f}/s")
        out["slow_commands"] = _slow_commands(svc, r.slowlog_get(1_000_000))
        out["redis_cost"] = _redis_cost(svc, dense.ws, partition, cfg.live_cost_rounds)
        r.config_set("slowlog-log-slower-than", 10_000)
        r.config_set("slowlog-max-len", 128)
        small = sorted((w for w in stack.spaces if w.cls == "small"), key=lambda w: w.dau)
        picks = {"dense": dense.ws}
        if small:
            pick = small[len(small) // 2]
            picks["small"] = pick.ws
            for window in WINDOWS:  # "after queries have been served" for it too
                svc.get(pick.ws, window)
        out["memory"] = stored_memory(r, svc.prefix, svc.mode, picks)
        out["memory"]["names"] = {k: v.workspace_id for k, v in picks.items()}
    out["producer"] = producer
    say(f"live: producer sent {producer.get('sent', 0):,} logins at "
        f"{producer.get('rate', 0):,.0f}/s, {producer.get('misplaced', '?')} out of place")
    try:
        out["exact"] = _exact_pass(stack)
    except Exception:  # noqa: BLE001 - the HLL figures above stand without the exact pass
        out["exact"] = {"error": traceback.format_exc(), "passes": {}}
        say(f"live exact pass FAILED:\n{out['exact']['error']}")
    return out


def _exact_pass(stack: Stack) -> dict[str, Any]:
    """The same live check in exact mode, where it is exact: its own topic with a short history
    of the densest workspace, its own consumer and API (exact mode), the same producer."""
    cfg = stack.cfg
    dense = stack.dense
    days = cfg.live_exact_days
    today = utc_today()
    asyncio.run(_create_topics(stack.bootstrap, EXACT_TOPIC, f"{EXACT_TOPIC}.dlq",
                               cfg.partitions))
    produced, total, _ = _produce_history(stack.producer, EXACT_TOPIC, [dense],
                                          today - timedelta(days=days), days, cfg.partitions,
                                          cfg.seed + 7)
    partition = livedata.partition_of(dense.ws, cfg.partitions)
    out: dict[str, Any] = {"history_days": days, "history_messages": total, "passes": {}}
    with contextlib.ExitStack() as procs:
        svc = _start_service(procs, mode="exact", topic=EXACT_TOPIC, prefix=EXACT_PREFIX,
                             partitions=cfg.partitions, bootstrap=stack.bootstrap,
                             redis_url=stack.redis_url, secret=stack.secret,
                             logdir=stack.logdir, produced=produced, group="bench-live-exact")
        svc.wait_applied(produced)
        for window in WINDOWS:
            svc.get(dense.ws, window)
        base = produced[partition]
        truth = Truth(dense.population, cfg.seed)
        producer: dict[str, Any] = {}
        with _live_producer(svc, stack, dense, partition, producer):
            _wait_offset(svc, partition, base + int(cfg.live_rate / 2))
            for window in WINDOWS:
                p = _live_pass(svc, dense.ws, window, cfg.live_exact_seconds, partition, base,
                               truth, 0.0)
                out["passes"][window] = p
                say(f"live exact {window}: {p['checks']} checks, {p['violations']} violations, "
                    f"p50 {p['p50_ms']:.1f} ms")
        out["producer"] = producer
    return out
