"""Queries: HTTP latency through real uvicorn, the rolling-window strategies side by side
in-process, what one query costs Redis, and memory per workspace-day.

- HTTP: ``usage-metrics api`` as its own process (settings from the environment, default rolling
  strategy), an httpx async load generator with 1 and 16 concurrent clients. *Cold* is the first
  request for each workspace after every sketch's cached cardinality was marked stale (the state
  the consumer leaves a sketch in after ``PFADD``); *warm* is the same requests repeated.
- Strategies: the API has no setting for the rolling strategy, so ``sketches.query.usage`` is
  called in this process with two stores on one Redis: ``HllStore(..., rolling="client")`` (the
  default: GET each day once, merge with numpy) and ``rolling="server"`` (the baseline: one
  multi-key ``PFCOUNT`` per row over its 7 or 30 day keys). Both must return identical rows.
- Redis cost: ``SLOWLOG`` with ``slowlog-log-slower-than 0`` reset around one query (the longest
  command and the sum of all), and separately a bystander process PINGing back to back through
  the query (the longest wait another client saw).
- Memory: ``MEMORY USAGE ... SAMPLES 0`` of day, week and month keys in both modes, same members.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import orjson
from redis.asyncio import Redis

from api.auth import issue_token
from bench.config import BenchConfig
from bench.profiling import pyspy, summarize
from bench.querydata import (
    RETENTION_DAYS,
    QueryData,
    QueryWorkspace,
    invalidate_caches,
    new_versions,
)
from bench.util import REPO, child, child_env, free_port, median, pct, python_cmd, say, summary_ms
from bench.util import wait_http as _wait_http
from sketches.config import Settings
from sketches.keys import KeySpace, Scope
from sketches.periods import Granularity, date_range, day_of, month_of, periods_between
from sketches.query import Metric, Window, usage
from sketches.store import HllStore

WINDOWS = ("calendar", "rolling")


def _url(base: str, ws: Scope, period_length: int, window: str) -> str:
    return (f"{base}/api/v2/org/{quote(ws.org_id, safe='')}/workspace/"
            f"{quote(ws.workspace_id, safe='')}/metrics/usage"
            f"?period_length={period_length}&window={window}")


async def _load(
    client: httpx.AsyncClient,
    jobs: Sequence[tuple[str, str]],
    concurrency: int,
    rows: int,
    budget_s: float | None = None,
    cache: Counter[str] | None = None,
) -> tuple[list[tuple[str, float]], int, float]:
    """Run the requests with ``concurrency`` workers, issuing none after ``budget_s``;
    (class, seconds) of each, errors, wall time. ``cache`` counts the X-Cache answers."""
    out: list[tuple[str, float]] = []
    errors = 0
    todo = iter(jobs)
    stop_at = time.perf_counter() + budget_s if budget_s else float("inf")

    async def worker() -> None:
        nonlocal errors
        for cls, url in todo:
            if time.perf_counter() > stop_at:
                return
            t = time.perf_counter()
            resp = await client.get(url)
            elapsed = time.perf_counter() - t
            out.append((cls, elapsed))
            if cache is not None:
                cache[resp.headers.get("x-cache", "none")] += 1
                if resp.status_code != 200:
                    cache[f"status {resp.status_code}"] += 1
            if resp.status_code != 200 or len(orjson.loads(resp.content)) != rows:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, errors, time.perf_counter() - started


def _by_class(samples: list[tuple[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"all": summary_ms([s for _, s in samples])}
    for cls in ("small", "large"):
        part = [s for c, s in samples if c == cls]
        if part:
            out[cls] = summary_ms(part)
    return out


async def http_section(
    cfg: BenchConfig, data: QueryData, redis_url: str, logdir: Path, secret: str
) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The per-caller rate limiter (api.ratelimit) would answer most of a load test with 429:
    # it is switched off, as it would be for a trusted dashboard backend.
    env = child_env(REDIS_URL=redis_url, JWT_SECRET=secret, REDIS_KEY_PREFIX=data.prefix,
                    SKETCH_MODE="hll", LOG_LEVEL="INFO", RATE_LIMIT_PER_MINUTE="0")
    settings = Settings(jwt_secret=secret, _env_file=None)  # type: ignore[call-arg]
    token = issue_token(settings, role="superadmin", org_id=None, ttl_seconds=4 * 3600,
                        now=time.time())
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(cfg.seed)
    spaces = data.workspaces
    redis = Redis.from_url(redis_url)
    result: dict[str, Any] = {"cells": [], "profiles": {}}
    cmd = python_cmd("-m", "usage_metrics.cli", "api", "--host", "127.0.0.1", "--port", str(port))
    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 4,
                          max_keepalive_connections=max(cfg.concurrency) + 4)
    try:
        with child(cmd, env, logdir / "api.log") as proc:
            await asyncio.to_thread(_wait_http, f"{base}/healthz")
            async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
                small = next(q for q in spaces if q.cls == "small")
                first = []
                for _ in range(2):
                    await new_versions(redis, data.prefix, [small])  # no result-cache hit
                    t = time.perf_counter()
                    resp = await client.get(_url(base, small.ws, 730, "rolling"))
                    first.append((time.perf_counter() - t) * 1000)
                    resp.raise_for_status()
                result["first_request_after_start_ms"] = first[0]
                result["second_request_ms"] = first[1]
                say(f"API up on :{port}; first request {first[0]:.1f} ms, then {first[1]:.1f} ms")
                for window in WINDOWS:
                    for length in cfg.period_lengths:
                        for conc in cfg.concurrency:
                            cell = await _cell(client, redis, data, base, window, length, conc,
                                               cfg.warm_requests, cfg.warm_seconds, rng)
                            result["cells"].append(cell)
                            say(f"HTTP {window:8s} {length:3d}d c={conc:2d}: cold p50/p99 "
                                f"{cell['cold']['all']['p50_ms']:.1f}/"
                                f"{cell['cold']['all']['p99_ms']:.1f} ms, uncached p50/p99 "
                                f"{cell['warm']['all']['p50_ms']:.1f}/"
                                f"{cell['warm']['all']['p99_ms']:.1f} ms "
                                f"({cell['warm_rps']:.0f} req/s), cached p50/p99 "
                                f"{cell['cached']['all']['p50_ms']:.1f}/"
                                f"{cell['cached']['all']['p99_ms']:.1f} ms, "
                                f"X-Cache {cell['x_cache']}, errors {cell['errors']}")
                if cfg.profile:
                    large = [q for q in spaces if q.cls == "large"]
                    length = max(cfg.period_lengths)
                    for window in WINDOWS:
                        raw = logdir / f"profile-api-{window}-{length}-large.txt"
                        jobs = [(q.cls, _url(base, q.ws, length, window)) for q in large] * 12
                        say(f"profiling the API (py-spy) on {len(jobs)} {window} {length}-day "
                            f"queries of the large workspaces (unmeasured)")
                        with pyspy(proc.pid, raw, logdir / "py-spy.log"):
                            for job in jobs:  # a new version each time: the compute path
                                await new_versions(redis, data.prefix, large)
                                await _load(client, [job], 1, length + 1)
                        result["profiles"][f"api_{window}_{length}_large"] = summarize(raw)
    finally:
        await redis.aclose()
    return result


async def _cell(
    client: httpx.AsyncClient,
    redis: Redis,
    data: QueryData,
    base: str,
    window: str,
    length: int,
    conc: int,
    warm_requests: int,
    warm_seconds: float,
    rng: random.Random,
) -> dict[str, Any]:
    """Three passes over the workspaces, in the order a dashboard meets them:

    - cold: right after a consumer batch wrote every workspace (new version tokens, so the API's
      result cache misses, and every sketch's cached cardinality stale), one request each;
    - uncached: after further batches (new tokens, so the result cache misses, but the sketches of
      past days keep their cached cardinality), rounds of one request per workspace;
    - cached: the same questions again with no new data (result cache hits, where the API has a
      result cache).
    """
    spaces = list(data.workspaces)
    rows = length + 1
    caches: dict[str, Counter[str]] = {"cold": Counter(), "uncached": Counter(),
                                       "cached": Counter()}

    def jobs() -> list[tuple[str, str]]:
        rng.shuffle(spaces)
        return [(q.cls, _url(base, q.ws, length, window)) for q in spaces]

    await invalidate_caches(redis, data.prefix)
    await new_versions(redis, data.prefix, spaces)
    cold, errors, _ = await _load(client, jobs(), conc, rows, cache=caches["cold"])

    uncached: list[tuple[str, float]] = []
    wall = 0.0
    stop_at = time.perf_counter() + warm_seconds
    while len(uncached) < warm_requests and time.perf_counter() < stop_at:
        await new_versions(redis, data.prefix, spaces)
        got, errs, took = await _load(client, jobs(), conc, rows,
                                      stop_at - time.perf_counter(), caches["uncached"])
        uncached += got
        errors += errs
        wall += took

    await _load(client, jobs(), conc, rows)  # one unmeasured round fills the result cache
    cached_jobs = [j for _ in range(max(1, warm_requests // len(spaces) + 1)) for j in jobs()]
    cached, errs, cached_wall = await _load(client, cached_jobs[:warm_requests], conc, rows,
                                            warm_seconds, caches["cached"])
    errors += errs
    return {
        "window": window,
        "period_length": length,
        "concurrency": conc,
        "cold": _by_class(cold),
        "warm": _by_class(uncached),
        "cached": _by_class(cached),
        "warm_rps": len(uncached) / wall if wall else float("nan"),
        "cached_rps": len(cached) / cached_wall if cached_wall else float("nan"),
        "x_cache": {k: dict(v) for k, v in caches.items()},
        "errors": errors,
    }


# ---------------------------------------------------------------------------------------------
# The two rolling strategies, in-process
# ---------------------------------------------------------------------------------------------


def _sample(cfg: BenchConfig, data: QueryData) -> list[QueryWorkspace]:
    small = [q for q in data.workspaces if q.cls == "small"][: cfg.inproc_small_sample]
    return small + [q for q in data.workspaces if q.cls == "large"]


def _both_strategies(data: QueryData, redis_url: str) -> tuple[Redis, dict[str, HllStore]]:
    """One client and the two rolling strategies over the same keys: the default client merge
    and its baseline, one multi-key PFCOUNT per row."""
    client = Redis.from_url(redis_url)
    keys = KeySpace(data.prefix, "hll")
    return client, {
        "client": HllStore(client, keys, RETENTION_DAYS, rolling="client"),
        "server": HllStore(client, keys, RETENTION_DAYS, rolling="server"),
    }


async def strategies_section(
    cfg: BenchConfig, data: QueryData, redis_url: str, today: date
) -> dict[str, Any]:
    client, stores = _both_strategies(data, redis_url)
    horizon = today - timedelta(days=RETENTION_DAYS)
    variants = {"all": frozenset(Metric), "wau_mau": frozenset({Metric.WAU, Metric.MAU})}
    rows_out: list[dict[str, Any]] = []
    mismatches: list[str] = []
    try:
        longest = max(cfg.period_lengths)
        for length in cfg.period_lengths:
            for vname, metrics in variants.items():
                if vname != "all" and length != longest:
                    continue
                times: dict[tuple[str, str], list[float]] = {}
                for q in _sample(cfg, data):
                    answers = {}
                    for strategy, store in stores.items():
                        reps = (cfg.inproc_repeats if strategy == "client"
                                else cfg.inproc_server_repeats)
                        got = None
                        for r in range(reps + 1):  # the first call warms up and is not counted
                            t = time.perf_counter()
                            got = await usage(store, q.ws, end=today, period_length=length,
                                              metrics=metrics, window=Window.ROLLING,
                                              horizon=horizon)
                            if r:
                                times.setdefault((strategy, q.cls), []).append(
                                    time.perf_counter() - t)
                        answers[strategy] = got
                    if answers["client"] != answers["server"]:
                        mismatches.append(f"{q.ws.workspace_id} {length}d {vname}")
                for cls in ("small", "large"):
                    c, s = times.get(("client", cls)), times.get(("server", cls))
                    if not c or not s:
                        continue
                    row = {
                        "period_length": length, "metrics": vname, "class": cls,
                        "client": summary_ms(c), "server": summary_ms(s),
                        "speedup_p50": median(s) / median(c),
                        "speedup_p99": pct(s, 99) / pct(c, 99),
                    }
                    rows_out.append(row)
                    say(f"in-process rolling {length:3d}d {vname:7s} {cls}: client p50 "
                        f"{row['client']['p50_ms']:.1f} ms, server p50 "
                        f"{row['server']['p50_ms']:.1f} ms, x{row['speedup_p50']:.1f}")
        stage_rows = await _stages(cfg, data, stores["client"], today, longest)
    finally:
        await client.aclose()
    return {"rows": rows_out, "mismatches": mismatches,
            "identical_rows": not mismatches, "stages": stage_rows}


async def _stages(
    cfg: BenchConfig, data: QueryData, store: HllStore, today: date, length: int
) -> dict[str, Any]:
    """Where a rolling query's time goes: the steps of ``HllStore.rolling_counts`` and
    ``sketches.query.usage`` timed one by one (median of ``stage_repeats``), for the median-size
    small workspace and the largest one."""
    from sketches import hll

    small = sorted((q for q in data.workspaces if q.cls == "small"),
                   key=lambda q: data.mean_dau[q.ws])
    large = [q for q in data.workspaces if q.cls == "large"]
    picks = ([small[len(small) // 2]] if small else []) + (
        [max(large, key=lambda q: q.target_dau)] if large else [])
    horizon = today - timedelta(days=RETENTION_DAYS)
    start = today - timedelta(days=length)
    out: dict[str, Any] = {"period_length": length, "workspaces": {}}
    histograms = getattr(hll, "_histograms", None)
    for q in picks:
        timings: dict[str, list[float]] = {}

        def note(name: str, t0: float, timings: dict[str, list[float]] = timings) -> float:
            now = time.perf_counter()
            timings.setdefault(name, []).append((now - t0) * 1000)
            return now

        for _ in range(cfg.stage_repeats + 1):
            t = time.perf_counter()
            await usage(store, q.ws, end=today, period_length=length, window=Window.ROLLING,
                        horizon=horizon)
            t = note("usage(window=rolling), whole", t)
            await store.counts(q.ws, [day_of(d) for d in date_range(start, today)])
            t = note("dau: PFCOUNT pipeline, one per day", t)
            for width in (7, 30):
                days = date_range(start - timedelta(days=width - 1), today)
                values = await store.day_values(q.ws, days)
                t = note(f"{width}-day: GET pipeline ({len(days)} keys)", t)
                regs = hll.decode_many(values)
                t = note(f"{width}-day: decode_many", t)
                merged = hll.rolling_max(regs, width)[width - 1:]
                t = note(f"{width}-day: rolling_max", t)
                hll.estimate_many(merged)
                t = note(f"{width}-day: estimate_many", t)
                if histograms is not None:
                    histograms(merged)
                    t = note(f"{width}-day:   of which _histograms", t)
        # the first round warms up and is dropped
        out["workspaces"][q.ws.workspace_id] = {
            "class": q.cls,
            "mean_dau": data.mean_dau[q.ws],
            "bytes_per_query": None,
            "stages_ms": {k: median(v[1:]) for k, v in timings.items()},
        }
        values = await store.day_values(q.ws, date_range(start - timedelta(days=29), today))
        out["workspaces"][q.ws.workspace_id]["bytes_per_query"] = sum(
            len(v) for v in values if v) + sum(
            len(v) for v in (await store.day_values(
                q.ws, date_range(start - timedelta(days=6), today))) if v)
    return out


# ---------------------------------------------------------------------------------------------
# Redis cost of one query
# ---------------------------------------------------------------------------------------------


async def _invalidate_workspace(client: Redis, keys: KeySpace, ws: Scope) -> None:
    # Sketches only (d, w, s, m): not the scope's seq hash, stamps or stored result.
    pattern = keys.workspace_prefix(ws).replace("[", "\\[").replace("]", "\\]") + "hll:[dwsm]:*"
    pipe = client.pipeline(transaction=False)
    async for key in client.scan_iter(match=pattern, count=5000):
        pipe.setrange(key, 15, b"\x80")
    await pipe.execute()


async def redis_cost_section(
    cfg: BenchConfig, data: QueryData, redis_url: str, today: date
) -> dict[str, Any]:
    client, stores = _both_strategies(data, redis_url)
    horizon = today - timedelta(days=RETENTION_DAYS)
    length = max(cfg.period_lengths)
    large = [q for q in data.workspaces if q.cls == "large"]
    target = max(large, key=lambda q: q.target_dau) if large else data.workspaces[0]
    kinds = [
        ("calendar, cold caches", Window.CALENDAR, "client", True),
        ("calendar, warm caches", Window.CALENDAR, "client", False),
        ("rolling, client merge (default)", Window.ROLLING, "client", False),
        ("rolling, server PFCOUNT (baseline)", Window.ROLLING, "server", False),
    ]
    out: dict[str, Any] = {"workspace": target.ws.workspace_id, "period_length": length,
                           "queries": []}

    async def query(window: Window, strategy: str) -> float:
        t = time.perf_counter()
        await usage(stores[strategy], target.ws, end=today, period_length=length,
                    window=window, horizon=horizon)
        return time.perf_counter() - t

    try:
        out["idle_probe"] = await _probe(redis_url, None, cfg.probe_rounds)
        for name, window, strategy, cold in kinds:
            await query(window, strategy)  # warm the process (imports, tables)
            rounds = []
            for _ in range(cfg.probe_rounds):
                if cold:
                    await _invalidate_workspace(client, stores["client"].keys, target.ws)
                await client.config_set("slowlog-max-len", 1_000_000)
                await client.config_set("slowlog-log-slower-than", 0)
                await client.slowlog_reset()
                seconds = await query(window, strategy)
                entries = await client.slowlog_get(1_000_000)
                await client.config_set("slowlog-log-slower-than", 10_000)
                await client.slowlog_reset()
                mine = [e for e in entries
                        if not _command_name(e).upper().startswith(("SLOWLOG", "CONFIG"))]
                durations = sorted(int(e["duration"]) for e in mine)
                longest = max(mine, key=lambda e: int(e["duration"])) if mine else None
                rounds.append({
                    "client_seconds": seconds,
                    "commands": len(durations),
                    "redis_total_ms": sum(durations) / 1000,
                    "longest_command_ms": durations[-1] / 1000 if durations else 0.0,
                    "second_longest_ms": durations[-2] / 1000 if len(durations) > 1 else 0.0,
                    "longest_command": _command_name(longest) if longest else None,
                    "longest_command_keys": _command_keys(longest) if longest else 0,
                })
            # Median round by the longest command: a single round can catch Redis descheduled
            # by the OS for milliseconds mid-command when the machine is busy.
            rounds.sort(key=lambda r: r["longest_command_ms"])
            mid = rounds[len(rounds) // 2]
            probe = await _probe(
                redis_url, lambda w=window, s=strategy: query(w, s), cfg.probe_rounds,
                prepare=(
                    (lambda: _invalidate_workspace(client, stores["client"].keys, target.ws))
                    if cold else None
                ),
            )
            row = {
                "query": name,
                **mid,
                "redis_total_ms": median([r["redis_total_ms"] for r in rounds]),
                "client_seconds": median([r["client_seconds"] for r in rounds]),
                "longest_command_ms_max": rounds[-1]["longest_command_ms"],
                "slowlog_rounds": rounds,
                "probe": probe,
            }
            out["queries"].append(row)
            say(f"Redis cost {name}: {row['commands']} commands, {row['redis_total_ms']:.1f} ms "
                f"in Redis, longest command {row['longest_command_ms']:.2f} ms, "
                f"bystander PING max {probe['max_ms']:.2f} ms "
                f"(median of rounds {probe['median_max_ms']:.2f})")
    finally:
        await client.aclose()
    return out


def _command_name(entry: dict[str, Any]) -> str:
    cmd = entry.get("command", b"")
    text = cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)
    return text.split(" ", 1)[0]


def _command_keys(entry: dict[str, Any]) -> int:
    cmd = entry.get("command", b"")
    text = cmd.decode(errors="replace") if isinstance(cmd, bytes) else str(cmd)
    return max(0, len(text.split(" ")) - 1)


async def _probe(
    redis_url: str, action: Any, rounds: int = 3, prepare: Any = None
) -> dict[str, Any]:
    """Run ``action`` (or sleep 1 s) ``rounds`` times, each while a fresh bystander process
    PINGs Redis back to back; the longest waits of the rounds and their median."""
    runs = []
    for _ in range(rounds):
        if prepare is not None:
            await prepare()
        runs.append(await _probe_once(redis_url, action))
    waits = sorted(r["max_ms"] for r in runs)
    return {"max_ms": waits[-1], "median_max_ms": waits[len(waits) // 2],
            "rounds": runs}


async def _probe_once(redis_url: str, action: Any) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *python_cmd("-m", "bench.probe", redis_url), cwd=str(REPO),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(),
    )
    assert proc.stdout is not None
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        if ready.strip() != b"ready":
            raise RuntimeError(f"probe did not start: {ready!r}")
        await asyncio.sleep(0.3)
        if action is None:
            await asyncio.sleep(1.0)
        else:
            await action()
        await asyncio.sleep(0.1)
        proc.terminate()
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        await proc.wait()
        result: dict[str, Any] = orjson.loads(line)
        return result
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------------------------------
# Memory per workspace-day
# ---------------------------------------------------------------------------------------------


async def memory_section(cfg: BenchConfig, data: QueryData, redis_url: str) -> dict[str, Any]:
    client = Redis.from_url(redis_url)
    first, last = data.exact_first, data.last
    days = date_range(first, last)
    weeks = [p for p in periods_between(Granularity.WEEK, first, last)
             if p.start >= first and p.end <= last]
    month = month_of(first) if first.day == 1 else month_of(first).next()
    rows: list[dict[str, Any]] = []
    try:
        for q in _sample(cfg, data):
            row: dict[str, Any] = {"workspace": q.ws.workspace_id, "class": q.cls,
                                   "mean_dau": data.mean_dau[q.ws]}
            for mode in ("hll", "exact"):
                ks = KeySpace(data.prefix, mode)  # type: ignore[arg-type]
                day_keys = [ks.sketch(q.ws, day_of(d)) for d in days]
                week_keys = [ks.sketch(q.ws, w) for w in weeks]
                month_key = ks.sketch(q.ws, month)
                pipe = client.pipeline(transaction=False)
                for k in [*day_keys, *week_keys, month_key]:
                    pipe.memory_usage(k, samples=0)
                sizes = [int(x or 0) for x in await pipe.execute()]
                day_sizes = [s for s in sizes[: len(day_keys)] if s]
                week_sizes = [s for s in sizes[len(day_keys): -1] if s]
                month_size = sizes[-1]
                per_day = float(np.median(day_sizes)) if day_sizes else 0.0
                per_week = float(np.median(week_sizes)) if week_sizes else 0.0
                month_days = (month.end - month.start).days + 1
                row[mode] = {
                    "day_key_median": per_day,
                    "week_key_median": per_week,
                    "month_key": month_size,
                    "per_workspace_day": per_day + per_week / 7 + month_size / month_days,
                }
                if mode == "hll":
                    encs = await _encodings(client, day_keys)
                    row[mode]["dense_day_share"] = encs
            rows.append(row)
    finally:
        await client.aclose()
    return {"range": [first.isoformat(), last.isoformat()], "month": month.label, "rows": rows}


async def _encodings(client: Redis, keys: list[str]) -> float:
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.getrange(k, 4, 4)
    enc = [e for e in await pipe.execute() if e]
    return sum(1 for e in enc if e == b"\x00") / len(enc) if enc else 0.0
