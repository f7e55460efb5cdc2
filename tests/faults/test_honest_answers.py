"""End to end through the real processes (``usage-metrics consume`` and ``usage-metrics api``,
exact mode, so "wrong" means wrong): readers hammer a workspace's and its org's usage while the
consumer applies batches of 30,000 new members of that workspace. Once the consumer has committed
a batch, every answer asked after that holds every member, exactly, cache hit or not (issue 15:
the old design kept serving 10,001 of 30,001 with ``X-Cache: hit``)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from api.auth import issue_token
from sketches.config import Settings
from tests.faults.helpers import Procs, make_topics, wait_until
from tests.support.kafka import committed, produce
from usage_metrics.synth import SynthEvent

ORG, WS = "acme", "hot"
ROUNDS = 3
PER_ROUND = 30_000
READERS = 4
PATHS = (f"/api/v2/org/{ORG}/workspace/{WS}/metrics/usage", f"/api/v2/org/{ORG}/metrics/usage")


@pytest.mark.slow
async def test_every_answer_after_a_commit_holds_every_member(
    xsettings: Settings, procs: Procs
) -> None:
    settings = xsettings
    await make_topics(settings, partitions=1)
    procs.consumer(settings)
    _, base = procs.api(settings, RATE_LIMIT_PER_MINUTE="0")
    token = issue_token(settings, role="superadmin", org_id=None, ttl_seconds=3600,
                        now=time.time())
    now = datetime.now(UTC) - timedelta(minutes=1)
    today = now.date().isoformat()
    params = {"period_length": 30, "end_date": today}
    # (time the request was sent, path, today's DAU, X-Cache)
    answers: list[tuple[float, str, int | None, str]] = []
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as client:

        async def reader(i: int) -> None:
            while not stop.is_set():
                path = PATHS[i % 2]
                sent = time.monotonic()
                resp = await client.get(path, params=params)
                if resp.status_code == 503:  # Redis busy is an honest answer too
                    continue
                assert resp.status_code == 200, resp.text[:300]
                row = next(r for r in resp.json() if r["date"] == today)
                answers.append((sent, path, row["dau"], resp.headers.get("x-cache", "")))

        await wait_until(lambda: _ready(client), "the API answers", timeout=60)
        readers = [asyncio.create_task(reader(i)) for i in range(READERS)]
        commits: list[tuple[float, int]] = []
        try:
            for r in range(1, ROUNDS + 1):
                events = [SynthEvent(ORG, WS, f"r{r}-m{i}", now).to_json()
                          for i in range(PER_ROUND)]
                ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                     events)

                async def applied(ends: dict[int, int] = ends) -> bool:
                    got = await committed(settings.kafka_bootstrap_servers,
                                          settings.kafka_group_id, settings.kafka_topic,
                                          sorted(ends))
                    return all(got[p] is not None and got[p] >= o for p, o in ends.items())

                await wait_until(applied, f"round {r} committed", timeout=240)
                commits.append((time.monotonic(), r * PER_ROUND))
                await asyncio.sleep(0.5)  # the readers keep asking after the commit
        finally:
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)

    assert len(answers) > 50
    hits_after_commit = 0
    for at, want in commits:
        later = [a for a in answers if a[0] >= at]
        assert later, "no answer was asked after a commit"
        for sent, path, dau, cache in later:
            newer = [w for t, w in commits if t <= sent]
            assert dau is not None, (path, want, cache)
            assert dau >= max(newer), (path, dau, want, cache)
            hits_after_commit += cache == "hit"
    assert hits_after_commit > 0, "the response cache never served: the test proves little"


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.HTTPError:
        return False
