"""Hostile callers: schemathesis against the running server, and tenant isolation (OWASP API1).

Schemathesis reads ``/openapi.json`` from a real ``usage-metrics api`` process and throws
schema-valid and schema-invalid requests at every operation, once per role and once without a
token. Checked on every response: no server error, status, content type, headers and body as the
schema documents them, auth not ignored; without a token, 401 every time. Not checked:

- ``positive_data_acceptance``: some rules are the server's, not the schema's (``period_length``
  up to the configured ``MAX_PERIOD_LENGTH``, ``end_date`` not after today, IANA timezone
  names), so a schema-valid request may rightly get a 422.
- ``negative_data_rejection``: in a query string many schema-invalid values become valid ones
  (an array of one integer is sent as that integer, ``0.0`` reads as 0), so "accepted" there is
  no defect. The negative cases still run, under every other check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from api.app import create_app
from api.auth import ROLES, issue_token
from sketches.config import Settings
from sketches.keys import Scope
from sketches.periods import periods_holding
from tests.faults.helpers import TODAY, Procs, fault_settings

USAGE = "/api/v2/org/{org}/workspace/{ws}/metrics/usage"
SETTINGS_PATH = "/api/v2/org/{org}/workspace/{ws}/settings"
EXAMPLES = 60  # per role; modest, for time
DAY = TODAY - timedelta(days=1)

# Tenants whose ids could collide in Redis keys if ids were joined naively: each gets its own
# number of users, so a leaked number is recognisable.
TENANTS: dict[Scope, int] = {
    Scope("acme", "ws"): 3,
    Scope("globex", "ws"): 5,
    Scope("a:b", "c"): 2,
    Scope("a", "b:c"): 7,
    Scope("{x}", "y"): 4,
    Scope("{x", "}y"): 6,
    Scope("x}", "{y"): 11,
    Scope("p/q", "r"): 8,
    Scope("p", "q/r"): 9,
    Scope("p%2Fq", "r"): 10,
    Scope("s", "t:u"): 12,
    Scope("s:t", "u"): 13,
}

log = logging.getLogger(__name__)


def seed(settings: Settings) -> None:
    keys = settings.keyspace
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        for ws, n in TENANTS.items():
            members = [f"{ws.org_id}|{ws.workspace_id}|{i}" for i in range(n)]
            for period in periods_holding(DAY):
                client.sadd(keys.sketch(ws, period), *members)
    finally:
        client.close()


def token(settings: Settings, role: str, org: str | None) -> str:
    return issue_token(settings, role=role, org_id=org, ttl_seconds=3600, now=time.time(),
                       subject=f"{role}@{org}")


def path_of(ws: Scope, template: str = USAGE) -> str:
    return template.format(org=quote(ws.org_id, safe=""), ws=quote(ws.workspace_id, safe=""))


@pytest.fixture(scope="module")
def hostile_api(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, str]]:
    settings = fault_settings(redis_url, "127.0.0.1:1")
    seed(settings)
    procs = Procs(Path(tmp_path_factory.mktemp("hostile")))
    try:
        _, base = procs.api(settings, RATE_LIMIT_PER_MINUTE="0")
        yield settings, base
    finally:
        procs.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("role", [*ROLES, None], ids=[*ROLES, "no-token"])
def test_schemathesis_per_role_no_server_error_nothing_outside_the_schema(
    hostile_api: tuple[Settings, str], role: str | None
) -> None:
    settings, base = hostile_api
    org = None if role in (None, "superadmin") else "acme"
    headers = {} if role is None else {"Authorization": f"Bearer {token(settings, role, org)}"}
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    # Half the cases aim at the caller's own org (where the interesting answers are), half at
    # whatever org schemathesis makes up.
    # The token is fixed (never dropped or mangled by negative generation), so every case is
    # this role's; the no-token run leaves the header to schemathesis.
    own = {"org_id": org or "acme"}
    fixed: dict[str, Any] = {"headers": headers} if headers else {}
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE, path_parameters=own, **fixed),
        schema.as_strategy(GenerationMode.NEGATIVE, path_parameters=own, **fixed),
        schema.as_strategy(GenerationMode.POSITIVE, **fixed),
        schema.as_strategy(GenerationMode.NEGATIVE, **fixed),
    )
    seen: dict[int, int] = {}

    @hsettings(max_examples=EXAMPLES, deadline=None, database=None,
               phases=[Phase.explicit, Phase.generate],
               suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def hostile(case: Any) -> None:
        response = case.call(headers=headers, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:300])
        if role is None:
            assert response.status_code == 401, (case.path, response.status_code)
            assert response.headers.get("www-authenticate") == ["Bearer"]
        case.validate_response(response, headers=headers,
                               excluded_checks=[positive_data_acceptance,
                                                negative_data_rejection])

    hostile()
    log.info(f"{role}: statuses {dict(sorted(seen.items()))}")


ROLE_TABLE = [
    # role, may read its own org, may read another org
    ("superadmin", True, True),
    ("admin", True, False),
    ("controller", True, False),
    ("curator", True, False),
    ("basic", False, False),
]


@pytest.fixture
async def tenant_client(xsettings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    seed(xsettings)
    app = create_app(xsettings.model_copy(update={"rate_limit_per_minute": 0}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


def users_in(rows: list[dict[str, Any]]) -> set[int]:
    return {v for r in rows for v in (r["dau"], r["wau"], r["mau"]) if v is not None}


@pytest.mark.parametrize(("role", "own_ok", "other_ok"), ROLE_TABLE)
async def test_tenant_isolation_every_role_by_own_and_other_org(
    tenant_client: httpx.AsyncClient, xsettings: Settings, role: str, own_ok: bool,
    other_ok: bool,
) -> None:
    mine, theirs = Scope("acme", "ws"), Scope("globex", "ws")
    org = None if role == "superadmin" else mine.org_id
    headers = {"Authorization": f"Bearer {token(xsettings, role, org)}"}
    params: dict[str, str | int] = {"end_date": DAY.isoformat(), "period_length": 0}
    for ws, allowed in ((mine, own_ok), (theirs, other_ok)):
        resp = await tenant_client.get(path_of(ws), params=params, headers=headers)
        if allowed:
            assert resp.status_code == 200, resp.text
            assert users_in(resp.json()) == {TENANTS[ws]}, (ws, resp.json())
        else:
            assert resp.status_code == 403, resp.text
            assert set(resp.json()) == {"detail"}
            assert str(TENANTS[ws]) not in resp.text
        settings_resp = await tenant_client.get(path_of(ws, SETTINGS_PATH), headers=headers)
        assert (settings_resp.status_code == 200) == allowed, settings_resp.text


async def test_ids_crafted_to_collide_never_show_another_tenants_numbers(
    tenant_client: httpx.AsyncClient, xsettings: Settings,
) -> None:
    params: dict[str, str | int] = {"end_date": DAY.isoformat(), "period_length": 0}
    root = {"Authorization": f"Bearer {token(xsettings, 'superadmin', None)}"}
    for ws, n in TENANTS.items():
        # The superadmin sees each tenant's own number, whatever its id looks like.
        resp = await tenant_client.get(path_of(ws), params=params, headers=root)
        assert resp.status_code == 200, (ws, resp.text)
        assert users_in(resp.json()) == {n}, (ws, resp.json())
        # An admin of this org reads its own workspace and no look-alike of another org.
        admin = {"Authorization": f"Bearer {token(xsettings, 'admin', ws.org_id)}"}
        resp = await tenant_client.get(path_of(ws), params=params, headers=admin)
        assert resp.status_code == 200, (ws, resp.text)
        assert users_in(resp.json()) == {n}
        for other, m in TENANTS.items():
            if other.org_id == ws.org_id:
                continue
            resp = await tenant_client.get(path_of(other), params=params, headers=admin)
            assert resp.status_code == 403, (ws, other, resp.text)
            assert str(m) not in resp.text

    # Percent-encoding by hand: %2F is a slash inside one id, %252F a literal "%2F".

    async def root_get(target: str) -> httpx.Response:
        return await tenant_client.get(target, params=params, headers=root)

    slash = await root_get("/api/v2/org/p%2Fq/workspace/r/metrics/usage")
    assert users_in(slash.json()) == {TENANTS[Scope("p/q", "r")]}
    literal = await root_get("/api/v2/org/p%252Fq/workspace/r/metrics/usage")
    assert users_in(literal.json()) == {TENANTS[Scope("p%2Fq", "r")]}
    split = await root_get("/api/v2/org/p/workspace/q%2Fr/metrics/usage")
    assert users_in(split.json()) == {TENANTS[Scope("p", "q/r")]}
    # An unencoded slash does not reach the route at all (it is not an id).
    stray = await root_get("/api/v2/org/p/q/workspace/r/metrics/usage")
    assert stray.status_code == 404

    # A token of org "a" cannot reach org "a:b" by encoding the colon, nor "acme" via a prefix.
    a_admin = {"Authorization": f"Bearer {token(xsettings, 'admin', 'a')}"}
    for target in ("/api/v2/org/a%3Ab/workspace/c/metrics/usage",
                   "/api/v2/org/a%2F..%2Facme/workspace/ws/metrics/usage",
                   "/api/v2/org/acme/workspace/ws/metrics/usage"):
        resp = await tenant_client.get(target, params=params, headers=a_admin)
        assert resp.status_code == 403, (target, resp.text)


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("GET", "/api/v2/org/" + "a" * 200 + "/workspace/b/metrics/usage", None),
        ("GET", "/api/v2/org/%FF/workspace/b/metrics/usage", None),
        ("GET", "/api/v2/org/a/workspace/b/metrics/usage?period_length=abc&window=x", None),
        ("GET", "/api/v2/org/a/workspace/b/settings", None),
        ("PUT", "/api/v2/org/a/workspace/b/settings", b"{not json"),
        ("PUT", "/api/v2/org/a/workspace/b/settings", b"\xff\xfe"),
        ("PUT", "/api/v2/org/a/workspace/b/settings", b'{"timezone": "Nowhere/Land"}'),
    ],
    ids=["long-id", "bad-encoding", "bad-query", "settings", "bad-json", "not-utf8",
         "bad-zone"],
)
async def test_without_a_token_every_call_is_401_whatever_else_is_wrong(
    tenant_client: httpx.AsyncClient, method: str, target: str, body: bytes | None
) -> None:
    """Authentication comes first: a caller without a token learns nothing from the API, not
    even which of its inputs would have been rejected."""
    resp = await tenant_client.request(method, target, content=body,
                                       headers={"Content-Type": "application/json"})
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
