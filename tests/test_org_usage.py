"""The org endpoint end to end: logins through the real broker and consumer into a real Redis,
read over HTTP, against the oracle, in both sketch modes (and on the cluster: see
tests/cluster/test_cluster_org_usage.py).

An org's count is the number of distinct subjects with a login in any of its workspaces; the
same subject string in another org is another person; a login its workspace excludes is not
counted for the org either; days are the org's local dates.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest

from api.app import create_app
from api.auth import issue_token
from sketches import scope_settings as wss
from sketches.config import Settings
from sketches.keys import Scope, org_scope
from sketches.periods import utc_today
from sketches.scope_settings import OrgSettings, WorkspaceSettings
from sketches.store import SketchStore
from tests.support.compare import assert_rows_match
from tests.support.kafka import produce, running, wait_applied
from tests.support.oracle import Oracle
from usage_metrics.synth import SynthEvent

TODAY = utc_today()
ACME = [Scope("acme", w) for w in ("eng", "sales", "ops")]
GLOBEX = Scope("globex", "eng")
BOTS = "bot-*"


def traffic(seed: int = 5) -> list[SynthEvent]:
    """Members of acme drift between its workspaces (so most are active in several); globex
    has the very same subject strings; bots log into acme/ops, which excludes them."""
    rng = random.Random(seed)
    out = []
    for _ in range(900):
        d = TODAY - timedelta(days=rng.randrange(45))
        moment = datetime(d.year, d.month, d.day, rng.randrange(24), rng.randrange(60),
                          tzinfo=UTC)
        ws = rng.choice([*ACME, GLOBEX])
        subject = f"bot-{rng.randrange(5)}" if rng.random() < 0.1 else f"m{rng.randrange(60)}"
        out.append(SynthEvent(ws.org_id, ws.workspace_id, subject, moment))
    return out


def org_oracle(events: list[SynthEvent], org: str, tz: str) -> Oracle:
    def counted(e: SynthEvent) -> bool:
        excluded = e.workspace_id == "ops" and e.org_id == "acme" and e.subject.startswith("bot-")
        return e.org_id == org and not excluded

    return Oracle((org_scope(org), e.subject, e.timestamp.astimezone(ZoneInfo(tz)).date())
                  for e in events if counted(e))


@pytest.fixture
async def client(settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


def bearer(settings: Settings, role: str, org: str | None) -> dict[str, str]:
    token = issue_token(settings, role=role, org_id=org, ttl_seconds=600, now=time.time())
    return {"Authorization": f"Bearer {token}"}


async def test_org_rows_count_each_member_once_across_workspaces_and_never_another_orgs(
    settings: Settings, store: SketchStore, topics: tuple[str, str], sketch_mode: str,
    client: httpx.AsyncClient,
) -> None:
    topic, _ = topics
    await wss.save(store.client, store.keys, ACME[2],
                   WorkspaceSettings(timezone="UTC", excluded_subjects=[BOTS]))
    await wss.save(store.client, store.keys, org_scope("acme"),
                   OrgSettings(timezone="Asia/Tokyo"))
    events = traffic()
    ends = await produce(settings.kafka_bootstrap_servers, topic, [e.to_json() for e in events])
    async with running(settings, store):
        await wait_applied(store, topic, ends)

    for org, tz in (("acme", "Asia/Tokyo"), ("globex", "UTC")):
        want = org_oracle(events, org, tz)
        today = datetime.now(ZoneInfo(tz)).date()
        for window in ("calendar", "rolling"):
            resp = await client.get(
                f"/api/v2/org/{org}/metrics/usage",
                params={"period_length": 40, "window": window},
                headers=bearer(settings, "superadmin", None),
            )
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-timezone"] == tz
            assert resp.headers["x-sketch-mode"] == sketch_mode
            assert_rows_match(resp.json(), want.rows(org_scope(org), today, 40, window),
                              sketch_mode)

    # Deduplication is real: the org's 30 days hold fewer people than its workspaces' together.
    rolling = {"period_length": 0, "metrics": "mau", "window": "rolling"}
    acme = (await client.get("/api/v2/org/acme/metrics/usage", params=rolling,
                             headers=bearer(settings, "admin", "acme"))).json()[0]["mau"]
    parts = 0
    for ws in ACME:
        row = (await client.get(
            f"/api/v2/org/acme/workspace/{ws.workspace_id}/metrics/usage",
            params=rolling, headers=bearer(settings, "admin", "acme"))).json()[0]
        parts += row["mau"] or 0
    assert acme is not None
    assert acme < parts


@pytest.mark.parametrize(
    ("role", "org", "status"),
    [("superadmin", None, 200), ("admin", "acme", 200), ("controller", "acme", 200),
     ("curator", "acme", 200), ("basic", "acme", 403), ("admin", "globex", 403),
     ("curator", None, 403)],
)
async def test_org_usage_follows_the_org_rules_of_the_workspace_endpoint(
    settings: Settings, client: httpx.AsyncClient, role: str, org: str | None, status: int,
) -> None:
    resp = await client.get("/api/v2/org/acme/metrics/usage", params={"period_length": 3},
                            headers=bearer(settings, role, org))
    assert resp.status_code == status, resp.text
    if status == 200:
        assert [r["dau"] for r in resp.json()] == [None] * 4  # no data: nulls, not an error
    no_token = await client.get("/api/v2/org/acme/metrics/usage")
    assert no_token.status_code == 401


async def test_org_usage_validates_like_the_workspace_endpoint(
    settings: Settings, client: httpx.AsyncClient,
) -> None:
    headers = bearer(settings, "admin", "acme")
    for params in ({"period_length": 731}, {"metrics": "dau,nope"}, {"window": "weekly"},
                   {"end_date": (TODAY + timedelta(days=3)).isoformat()}):
        resp = await client.get("/api/v2/org/acme/metrics/usage", params=params, headers=headers)
        assert resp.status_code == 422, (params, resp.text)
