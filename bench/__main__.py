"""``python -m bench [--quick] [...]``: run the benchmark, print the table, write results.json."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import accuracy, ingest, live, live_ingest, queries, querydata, tenants
from bench.config import BenchConfig, as_dict, load_config
from bench.contention import WatchProcess, wait_quiet
from bench.report import markdown, profiles
from bench.util import REPO, machine, say
from sketches.periods import utc_today
from tests.support.servers import RedisServer, TansuBroker

WATCH: WatchProcess | None = None


def _section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    if WATCH is not None:
        WATCH.mark(name)
    started = time.perf_counter()
    try:
        value = fn()
    except Exception:  # noqa: BLE001 - one failed section must not lose the others' figures
        err = traceback.format_exc()
        say(f"section {name} FAILED:\n{err}")
        results[name] = {"error": err}
        return None
    if isinstance(value, dict):
        value.setdefault("section_seconds", time.perf_counter() - started)
    results[name] = value
    return value


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _live_sections(
    cfg: BenchConfig, results: dict[str, Any], logdir: Path, servers: list[Any]
) -> None:
    """History through the real consumer once, then the sections that query it; the consumer,
    API and producer processes live until the last of them is done."""
    broker = TansuBroker(log=logdir / "tansu-live.log").start()
    servers.append(broker)
    store = RedisServer(directory=_dir(logdir / "redis-live")).start()
    servers.append(store)
    secret = secrets.token_urlsafe(32)
    with contextlib.ExitStack() as procs:
        holder: dict[str, live.Stack] = {}

        def history() -> dict[str, Any]:
            holder["stack"] = live.prepare(cfg, broker.bootstrap, store.url, logdir, secret,
                                           procs)
            return holder["stack"].stats

        _section(results, "live_history", history)
        stack = holder.get("stack")
        if stack is not None:
            if "backfill_query" in cfg.sections:
                _section(results, "backfill_query", lambda: live.backfill_query(stack))
            if "live" in cfg.sections:
                _section(results, "live", lambda: live.live(stack))
    broker.stop()
    store.stop()


def main(argv: list[str] | None = None) -> int:
    global WATCH
    cfg, command = load_config(argv)
    if cfg.wait_quiet > 0:
        say(f"waiting up to {cfg.wait_quiet:.0f}s for other processes to go quiet")
        waited = wait_quiet(cfg.wait_quiet)
        say(f"waited {waited:.0f}s")
    started = time.perf_counter()
    today = utc_today()
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "command": " ".join(command),
        "config": as_dict(cfg),
        "machine": machine(),
        "today": today.isoformat(),
    }
    logdir = Path(tempfile.mkdtemp(prefix="um-bench-"))
    WATCH = WatchProcess(logdir / "section")
    say(f"logs in {logdir}; sections {', '.join(cfg.sections)}{' (quick)' if cfg.quick else ''}")
    servers: list[Any] = []
    try:
        if "ingest" in cfg.sections:
            broker = TansuBroker(log=logdir / "tansu.log").start()
            servers.append(broker)
            ingest_redis = RedisServer(directory=_dir(logdir / "redis-ingest")).start()
            servers.append(ingest_redis)
            _section(results, "ingest",
                     lambda: ingest.run(cfg, broker.bootstrap, ingest_redis.url, logdir, today))
            broker.stop()
            ingest_redis.stop()
        if "live_ingest" in cfg.sections:
            broker = TansuBroker(log=logdir / "tansu-live-ingest.log").start()
            servers.append(broker)
            live_redis = RedisServer(directory=_dir(logdir / "redis-live-ingest")).start()
            servers.append(live_redis)
            _section(results, "live_ingest",
                     lambda: live_ingest.run(cfg, broker.bootstrap, live_redis.url, logdir))
            broker.stop()
            live_redis.stop()
        if "query" in cfg.sections:
            query_redis = RedisServer(directory=_dir(logdir / "redis-query")).start()
            servers.append(query_redis)
            url = query_redis.url
            say("writing the query data set through the store")
            data = _section(results, "query_data",
                            lambda: asyncio.run(querydata.build(cfg, url, today)))
            if data is not None:
                results["query_data"] = querydata.describe(data)
                secret = secrets.token_urlsafe(32)
                _section(results, "http", lambda: asyncio.run(
                    queries.http_section(cfg, data, url, logdir, secret)))
                _section(results, "strategies", lambda: asyncio.run(
                    queries.strategies_section(cfg, data, url, today)))
                _section(results, "redis_cost", lambda: asyncio.run(
                    queries.redis_cost_section(cfg, data, url, today)))
                _section(results, "memory", lambda: asyncio.run(
                    queries.memory_section(cfg, data, url)))
        if {"live", "backfill_query"} & set(cfg.sections):
            _live_sections(cfg, results, logdir, servers)
        if "tenants" in cfg.sections:
            # Its own brokers and redis-servers, one per stage (bench.tenants.servers).
            _section(results, "tenants", lambda: tenants.run(
                cfg, logdir, mark=WATCH.mark if WATCH is not None else None))
        if "accuracy" in cfg.sections:
            if not any(isinstance(s, RedisServer) and s.proc and s.proc.poll() is None
                       for s in servers):
                servers.append(RedisServer(directory=_dir(logdir / "redis-acc")).start())
            acc_url = next(s.url for s in servers
                           if isinstance(s, RedisServer) and s.proc and s.proc.poll() is None)
            _section(results, "accuracy", lambda: accuracy.run(cfg, acc_url))
    finally:
        for server in reversed(servers):
            server.stop()
    results["seconds"] = time.perf_counter() - started
    WATCH.mark("report")
    results["contention"] = WATCH.stop()
    out = REPO / cfg.output if not Path(cfg.output).is_absolute() else Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS,
                                 default=str))
    table = markdown(results)
    sys.stdout.write(table + "\n")
    prof = profiles(results)
    if prof:
        sys.stdout.write("\n" + prof + "\n")
    sys.stdout.flush()
    say(f"results in {out}; done in {results['seconds'] / 60:.1f} min")
    if cfg.keep_logs:
        say(f"logs kept in {logdir}")
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
