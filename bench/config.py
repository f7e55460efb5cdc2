"""Sizes of one benchmark run: the full run, ``--quick``, overrides from flags or ``BENCH_*``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class BenchConfig:
    # Ingestion: messages on the topic (a share of them other metric types), one consumer process.
    events: int = 2_000_000
    workspaces: int = 1_000
    ingest_days: int = 90
    other_share: float = 0.10
    partitions: int = 4
    largest_workspace: int = 20_000  # members of the largest workspace (Zipf, s = 1.1)
    ingest_repeats: int = 3
    compression: str = "none"

    # Queries: workspaces written straight through the store, 2 years + a 30-day window of days.
    query_workspaces: int = 100
    query_days: int = 760
    large_dau: tuple[int, ...] = (3_000, 10_000, 30_000)
    exact_days: int = 35  # the most recent days also written in exact mode (memory comparison)
    warm_requests: int = 300
    warm_seconds: float = 12.0  # a warm pass stops issuing requests after this long
    concurrency: tuple[int, ...] = (1, 16)
    period_lengths: tuple[int, ...] = (30, 365, 730)
    inproc_repeats: int = 5
    inproc_server_repeats: int = 3
    inproc_small_sample: int = 6
    stage_repeats: int = 5
    profile_seconds: float = 15.0
    probe_rounds: int = 3
    wait_quiet: float = 60.0  # seconds to wait at most for other processes to go quiet

    # The shapes users have (issue 10). History: ``backfill_workspaces`` workspaces (the dense
    # ones of ``live_dense_dau`` first, the rest 10-100 active users a day) with ``history_days``
    # days ending yesterday, through the real consumer. Live: a producer sends today's logins of
    # the densest at ``live_rate`` while one client queries it for ``live_seconds`` per window.
    backfill_workspaces: int = 30
    live_dense_dau: tuple[int, ...] = (3_000, 1_500, 800)
    history_days: int = 760
    live_rate: float = 1_000.0
    live_seconds: float = 20.0
    live_health_seconds: float = 3.0
    live_cost_rounds: int = 5
    live_tolerance: float = 0.03  # HLL answers vs exact counts of what the store held
    live_exact_days: int = 35  # history of the short exact-mode pass
    live_exact_seconds: float = 8.0
    # Ingestion of the live shape: timestamps within the last minute, Zipf workspace sizes.
    live_workspaces: int = 1_000
    live_events: int = 2_000_000

    # Tenants (issue 17): the same logins over each count of workspaces (10 an org), each shape,
    # through the real consumer; a live query and a rebuild among the largest count.
    tenant_counts: tuple[int, ...] = (1_000, 10_000, 100_000)
    tenant_events: int = 1_000_000
    tenant_shapes: tuple[str, ...] = ("live", "backfill")
    tenant_repeats: int = 1
    tenant_samples: int = 5  # workspaces measured per kind (one day of data; median)
    tenant_background_days: int = 3  # days of data of each neighbour of the live query
    tenant_repeat_seconds: float = 6.0  # the repeated request beside /healthz, per window
    tenant_query: bool = True
    tenant_rebuild: bool = True
    tenant_dense_dau: int = 3_000  # the live query's workspace (the densest of issue 10)
    # Settings (NAME=value,...) given to the rebuild of the topic keyed by workspace id: the one
    # that says producers key by workspace, so that it reads only the partitions that can hold it.
    tenant_keyed_env: str = "KAFKA_RECORD_KEY=workspace"

    # Accuracy: log-spaced cardinalities, independent sketches per cardinality.
    acc_min: int = 10
    acc_max: int = 1_000_000
    acc_per_decade: int = 4
    acc_trials: int = 5

    sections: tuple[str, ...] = ("ingest", "live_ingest", "query", "backfill_query", "live",
                                 "tenants", "accuracy")
    profile: bool = True
    quick: bool = False
    seed: int = 20_261_124
    output: str = "bench/results.json"
    keep_logs: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


QUICK = {
    "events": 200_000,
    "workspaces": 200,
    "largest_workspace": 4_000,
    "ingest_repeats": 1,
    "query_workspaces": 20,
    "period_lengths": (30, 730),
    "probe_rounds": 2,
    "wait_quiet": 0.0,
    "large_dau": (3_000, 8_000),
    "warm_requests": 40,
    "warm_seconds": 4.0,
    "inproc_repeats": 3,
    "inproc_server_repeats": 1,
    "inproc_small_sample": 3,
    "stage_repeats": 3,
    "profile_seconds": 6.0,
    "acc_per_decade": 2,
    "acc_trials": 2,
    "backfill_workspaces": 20,
    "live_dense_dau": (1_500, 500),
    "live_seconds": 8.0,
    "live_health_seconds": 2.0,
    "live_cost_rounds": 3,
    "live_exact_seconds": 4.0,
    "live_events": 500_000,
    "tenant_counts": (1_000, 100_000),
    "tenant_events": 200_000,
    "tenant_samples": 3,
    "tenant_dense_dau": 500,
    "tenant_background_days": 1,
    "tenant_repeat_seconds": 3.0,
}


def _tuple_of_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace(" ", "").split(",") if x)


def _tuple_of_str(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.replace(" ", "").split(",") if x)


def _truthy(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


_PARSERS: dict[str, Any] = {
    "events": int, "workspaces": int, "ingest_days": int, "other_share": float,
    "partitions": int, "largest_workspace": int, "ingest_repeats": int, "compression": str,
    "query_workspaces": int, "query_days": int, "large_dau": _tuple_of_ints,
    "exact_days": int, "warm_requests": int, "warm_seconds": float,
    "concurrency": _tuple_of_ints, "stage_repeats": int, "profile_seconds": float,
    "probe_rounds": int, "wait_quiet": float,
    "period_lengths": _tuple_of_ints, "inproc_repeats": int, "inproc_server_repeats": int,
    "inproc_small_sample": int, "acc_min": int, "acc_max": int, "acc_per_decade": int,
    "acc_trials": int, "sections": _tuple_of_str, "seed": int, "output": str,
    "backfill_workspaces": int, "live_dense_dau": _tuple_of_ints, "history_days": int,
    "live_rate": float, "live_seconds": float, "live_health_seconds": float,
    "live_cost_rounds": int, "live_tolerance": float, "live_exact_days": int,
    "live_exact_seconds": float, "live_workspaces": int, "live_events": int,
    "tenant_counts": _tuple_of_ints, "tenant_events": int, "tenant_shapes": _tuple_of_str,
    "tenant_repeats": int, "tenant_samples": int, "tenant_background_days": int,
    "tenant_repeat_seconds": float, "tenant_query": _truthy, "tenant_rebuild": _truthy,
    "tenant_dense_dau": int, "tenant_keyed_env": str,
}

SECTIONS = ("ingest", "live_ingest", "query", "backfill_query", "live", "tenants", "accuracy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="usage-metrics benchmark. Every size is also read from BENCH_<NAME> "
        "(e.g. BENCH_EVENTS=500000, BENCH_QUICK=1); flags win over the environment.",
    )
    p.add_argument("--quick", action="store_true", default=None,
                   help="a ~2-minute smoke run with smaller sizes")
    p.add_argument("--no-profile", dest="profile", action="store_false", default=None,
                   help="skip the py-spy profiles (extra, unmeasured runs)")
    p.add_argument("--keep-logs", action="store_true", default=None,
                   help="keep the servers' and processes' log directory")
    for name, parser in _PARSERS.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(BenchConfig, name, "")
        if parser is _truthy:
            text = f"1 or 0, default {int(default)}"
        elif parser in (int, float, str):
            text = f"default {default!r}"
        else:
            text = f"comma-separated, default {','.join(map(str, default))}"
        p.add_argument(flag, type=str, default=None, dest=name, help=text)
    return p


def load_config(argv: list[str] | None = None) -> tuple[BenchConfig, list[str]]:
    """The configuration and the command line that reproduces it."""
    args = build_parser().parse_args(argv)
    env = os.environ

    def pick(name: str) -> str | None:
        value = getattr(args, name, None)
        if value is not None:
            return str(value)
        return env.get("BENCH_" + name.upper())

    quick_raw = args.quick if args.quick is not None else _truthy(env.get("BENCH_QUICK", "0"))
    cfg = BenchConfig()
    if quick_raw:
        cfg = replace(cfg, quick=True, **QUICK)
    changes: dict[str, Any] = {}
    for name, parser in _PARSERS.items():
        raw = pick(name)
        if raw is not None:
            try:
                changes[name] = parser(raw)
            except ValueError:
                raise SystemExit(f"--{name.replace('_', '-')} (or BENCH_{name.upper()}): "
                                 f"cannot read {raw!r}") from None
    if args.profile is not None:
        changes["profile"] = args.profile
    elif "BENCH_PROFILE" in env:
        changes["profile"] = _truthy(env["BENCH_PROFILE"])
    if args.keep_logs is not None:
        changes["keep_logs"] = True
    elif "BENCH_KEEP_LOGS" in env:
        changes["keep_logs"] = _truthy(env["BENCH_KEEP_LOGS"])
    cfg = replace(cfg, **changes)
    unknown = set(cfg.sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    shapes = set(cfg.tenant_shapes) - {"live", "backfill"}
    if shapes:
        raise SystemExit(f"unknown tenant shapes {sorted(shapes)}; choose from live, backfill")
    if not cfg.tenant_counts or min(cfg.tenant_counts) < 1:
        raise SystemExit("--tenant-counts needs at least one count of 1 or more")
    from bench.tenantdata import parse_env

    try:
        parse_env(cfg.tenant_keyed_env)
    except ValueError as err:
        raise SystemExit(f"--tenant-keyed-env: {err}") from None
    command = ["python -m bench"]
    if cfg.quick:
        command.append("--quick")
    for name in _PARSERS:
        if name in changes:
            value = changes[name]
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            command.append(f"--{name.replace('_', '-')} {text}")
    if not cfg.profile:
        command.append("--no-profile")
    return cfg, command


def as_dict(cfg: BenchConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "extra"}
