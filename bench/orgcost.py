"""``python -m bench.orgcost``: what org sketches cost, ingestion time and memory, measured.

Org-level numbers come from sketches of their own, written at ingestion beside each workspace's
(one more day key per login, merged into its week and month). This measures what that adds: the
same traffic (workspaces of Zipf sizes grouped into orgs, members active in several workspaces
of their org) is bucketed and written through the consumer's own code path
(``consumer.batch.bucket`` + ``SketchStore.add_by_day``) into a private redis-server twice, once
with the org scopes and once with them filtered out, and the sketch memory of org tags is set
against the workspaces'. Baseline: the same write without org sketches, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from consumer.batch import bucket, parse_records
from consumer.events import Rules
from sketches.config import Settings
from sketches.connection import open_store
from sketches.scope_settings import OrgSettings, WorkspaceSettings, resolve
from tests.support.servers import RedisServer


def traffic(events: int, workspaces: int, orgs: int, days: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [max(5, int(3000 / (i + 1) ** 1.1)) for i in range(workspaces)]
    now = datetime.now(UTC)
    out = []
    for _ in range(events):
        w = rng.choices(range(workspaces), sizes)[0]
        org = w % orgs
        # members are the org's: the same member shows up in several of its workspaces
        member = f"m{rng.randrange(sizes[w] * 2)}"
        moment = now - timedelta(days=rng.randrange(days), seconds=rng.randrange(86400))
        out.append(orjson.dumps({
            "metric_type": "login", "subject": member, "org_id": f"org{org}",
            "workspace_id": f"ws{w}", "timestamp": moment.isoformat(),
        }))
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    values = traffic(args.events, args.workspaces, args.orgs, args.days, seed=7)
    records = [ConsumerRecord("t", 0, i, 0, 0, None, v, None, 0, len(v), [])
               for i, v in enumerate(values)]
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    rules = Rules("login", 800, 65536)
    utc_ws = resolve(WorkspaceSettings(timezone="UTC"))
    utc_org = resolve(OrgSettings(timezone="UTC"))
    server = RedisServer().start()
    result: dict[str, Any] = {}
    try:
        shapes = (("workspaces only (baseline)", False), ("with org sketches", True))
        for label, with_orgs in shapes:
            times = []
            for rep in range(args.repeats):
                s = Settings(redis_url=server.url, redis_key_prefix=f"oc{rep}{int(with_orgs)}",
                             _env_file=None)
                async with open_store(s) as store:
                    took = 0.0
                    for batch in batches:
                        parsed = parse_records(batch, rules, datetime.now(UTC))
                        configs = {sc: (utc_org if sc.is_org else utc_ws) for sc in parsed.scopes}
                        t0 = time.perf_counter()
                        prepared = bucket(parsed, configs)
                        days = prepared.days if with_orgs else {
                            k: v for k, v in prepared.days.items() if not k[0].is_org}
                        await store.add_by_day(days, prepared.week_starts)
                        took += time.perf_counter() - t0
                    times.append(took)
                    if rep == 0:
                        result[label] = {"memory": await memory(store.client, s.redis_key_prefix)}
            result[label]["seconds"] = statistics.median(times)
            result[label]["events_per_s"] = args.events / statistics.median(times)
    finally:
        server.stop()
    return result


async def memory(client: Any, prefix: str) -> dict[str, int]:
    """Bytes of sketch keys (d/w/s/m) under workspace tags and under org tags."""
    out = {"workspace": 0, "org": 0, "workspace_keys": 0, "org_keys": 0}
    async for raw in client.scan_iter(match=f"{prefix}:{{*", count=1000):
        key = raw.decode()
        kind = key.split("}:", 1)[1].split(":")
        if len(kind) < 3 or kind[1] not in ("d", "w", "s", "m"):
            continue
        tag = key[key.index("{") + 1 : key.index("}")]
        scope = "workspace" if ":" in tag else "org"
        out[scope] += int(await client.memory_usage(raw, samples=0) or 0)
        out[f"{scope}_keys"] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--workspaces", type=int, default=1000)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    res = asyncio.run(run(args))
    base, org = res["workspaces only (baseline)"], res["with org sketches"]
    print(f"org sketch cost, {args.events:,} logins, {args.workspaces} workspaces in "
          f"{args.orgs} orgs, {args.days} days, batches of {args.batch:,} (median of "
          f"{args.repeats}; bucket + write, in process, against a private redis-server)\n")
    print("| write | events/s | sketch keys | sketch memory |")
    print("|---|---:|---:|---:|")
    for label, r in res.items():
        m = r["memory"]
        keys = m["workspace_keys"] + m["org_keys"]
        print(f"| {label} | {r['events_per_s']:,.0f} | {keys:,} | "
              f"{(m['workspace'] + m['org']) / 2**20:.2f} MiB |")
    print(f"\nOrg sketches: +{(base['events_per_s'] / org['events_per_s'] - 1) * 100:.0f} % write "
          f"time per login; {org['memory']['org'] / 2**20:.2f} MiB of org keys beside "
          f"{org['memory']['workspace'] / 2**20:.2f} MiB of workspace keys "
          f"(+{org['memory']['org'] / max(1, org['memory']['workspace']) * 100:.0f} % memory).")


if __name__ == "__main__":
    main()
