"""Ingestion of the live shape: every event within the last minute, beside the bare consumer.

The backfill shape (``bench.ingest``) spreads each batch over many days, so a batch touches tens
of thousands of (workspace, day) keys; live traffic lands on today's keys only, so a batch of
20,000 events touches at most three keys per workspace. Same machinery as ``bench.ingest``: the
events are produced into a fresh topic (``live_events`` messages, ``other_share`` of them another
metric type, ``live_workspaces`` workspaces of Zipf sizes, keyed and partitioned by workspace,
timestamps now minus 0-60 s in time order), then ``python -m bench.bare`` and
``usage-metrics consume`` (HLL) each read the whole topic, alternately, ``ingest_repeats`` times.
"""

from __future__ import annotations

import random
import zlib
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from bench import ingest
from bench.config import BenchConfig
from bench.util import median, say
from sketches.periods import month_of, week_of
from usage_metrics.synth import workspace_sizes

WINDOW_MS = 60_000


def events(cfg: BenchConfig, now: datetime) -> ingest.Events:
    rng = np.random.default_rng(cfg.seed + 11)
    w, n = cfg.live_workspaces, cfg.live_events
    sizes = np.array(
        workspace_sizes(w, cfg.largest_workspace, random.Random(cfg.seed)), dtype=np.int64)
    ws = rng.choice(w, size=n, p=sizes / sizes.sum())
    age = np.sort(rng.integers(0, WINDOW_MS, size=n))[::-1]  # oldest first, as they happen
    member = (sizes[ws] * rng.random(n) ** 2).astype(np.int64)
    other = rng.random(n) < cfg.other_share

    moments = [now - timedelta(milliseconds=a) for a in range(WINDOW_MS)]
    stamp = [m.isoformat(timespec="milliseconds").replace("+00:00", "Z") for m in moments]
    names = [(f"org-{i // 10:03d}", f"ws-{i:04d}") for i in range(w)]
    tails = [f'","org_id":"{o}","workspace_id":"{x}","timestamp":"' for o, x in names]
    ws_keys = [f"{o}/{x}".encode() for o, x in names]
    ws_part = np.array([zlib.crc32(k) % cfg.partitions for k in ws_keys], dtype=np.int64)
    kind = ('{"metric_type":"login","subject":"member_',
            '{"metric_type":"page_view","subject":"member_')
    values = [
        f'{kind[o]}{m}{tails[x]}{stamp[a]}"}}'.encode()
        for o, m, x, a in zip(other.tolist(), member.tolist(), ws.tolist(), age.tolist(),
                              strict=True)
    ]
    keys = [ws_keys[x] for x in ws.tolist()]

    # Keys the store must hold: a minute may straddle midnight (UTC), so days come from the data.
    day_of_age = np.array([m.date().toordinal() for m in moments], dtype=np.int64)
    logins = ~other
    lw, ld = ws[logins], day_of_age[age[logins]]
    days = {d: date.fromordinal(int(d)) for d in np.unique(ld).tolist()}
    week_id = {d: week_of(x).label for d, x in days.items()}
    month_id = {d: month_of(x).label for d, x in days.items()}
    pairs = set(zip(lw.tolist(), ld.tolist(), strict=True))
    # ...and the same for each org's own sketches (workspace i belongs to org i // 10).
    org_pairs = {(x // 10, d) for x, d in pairs}
    expected = sum(
        len(p) + len({(x, week_id[d]) for x, d in p}) + len({(x, month_id[d]) for x, d in p})
        for p in (pairs, org_pairs)
    )
    meta = {"logins": int(logins.sum()), "expected_keys": expected, "sizes": sizes.tolist(),
            "top_share": float(np.bincount(ws, minlength=w).max() / n)}
    return values, keys, ws_part[ws], meta


def run(cfg: BenchConfig, bootstrap: str, redis_url: str, logdir: Path) -> dict[str, Any]:
    data = ingest.produce(cfg, bootstrap, datetime.now(UTC).date(), topic="bench-live-metrics",
                          events=lambda: events(cfg, datetime.now(UTC)))
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "hll": []}
    for r in range(cfg.ingest_repeats):
        res = ingest.run_bare(data, bootstrap)
        runs["bare"].append(res)
        say(f"live ingest run {r + 1}/{cfg.ingest_repeats}: bare {res['rate']:,.0f} msg/s")
        res = ingest.run_service(data, "hll", bootstrap, redis_url, f"live-hll{r}", logdir)
        runs["hll"].append(res)
        say(f"live ingest run {r + 1}/{cfg.ingest_repeats}: hll {res['rate']:,.0f} msg/s "
            f"(keys {res['keys']:,}/{res['expected_keys']:,})")
    result: dict[str, Any] = {
        "topic": {
            "messages": data.messages, "logins": data.logins,
            "partitions": len(data.per_partition), "per_partition": data.per_partition,
            "workspaces": cfg.live_workspaces, "window_seconds": WINDOW_MS / 1000,
            "largest_workspace_members": max(data.workspace_sizes),
            "top_workspace_share": data.top_workspace_share,
            "produce_rate": data.messages / data.produce_seconds,
            "expected_keys": data.expected_keys,
        },
        "runs": runs,
        "median_rate": {k: median([x["rate"] for x in v]) for k, v in runs.items()},
        "min_rate": {k: min(x["rate"] for x in v) for k, v in runs.items()},
        "max_rate": {k: max(x["rate"] for x in v) for k, v in runs.items()},
    }
    bare = result["median_rate"]["bare"]
    result["ratio_to_bare"] = {k: v / bare for k, v in result["median_rate"].items()}
    return result
