"""Org settings (``/api/v2/org/{org_id}/settings``): defaults, PUT and PATCH, who may read and
write them in which org, the 422s, a dead store, and that they land where the consumer reads an
org's settings (``keys.settings(org_scope(org))``) and nowhere else."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from api.app import create_app
from api.auth import ROLE_PERMISSIONS, WRITE_ORG_SETTINGS, WRITE_SETTINGS, issue_token
from sketches import scope_settings as wss
from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import Scope, org_scope
from sketches.scope_settings import OrgSettings
from sketches.store import SketchStore
from tests.support.servers import free_port

ORG_URL = "/api/v2/org/{org}/settings"
ACME = ORG_URL.format(org="acme")
GLOBEX = ORG_URL.format(org="globex")
DEFAULT_ZONE = "America/Sao_Paulo"
DEFAULTS = {"timezone": DEFAULT_ZONE, "week_start": "monday"}


@pytest.fixture
def sketch_mode() -> str:
    return "exact"  # settings do not depend on the sketch mode: one run is enough


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    # A default zone that is not UTC, so that the default is told from a hard-coded one; no
    # rate limit, since the matrices send many requests as one caller.
    return settings.model_copy(update={"default_timezone": DEFAULT_ZONE,
                                       "rate_limit_per_minute": 0})


@pytest.fixture
async def api(api_settings: Settings, store: SketchStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings, store)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


def bearer(settings: Settings, role: str, org: str | None = "acme") -> dict[str, str]:
    token = issue_token(settings, role=role, org_id=org, ttl_seconds=600, now=time.time())
    return {"Authorization": f"Bearer {token}"}


async def stored(store: SketchStore, org: str = "acme") -> OrgSettings:
    (got,) = await wss.load_many(store.client, store.keys, [org_scope(org)], DEFAULT_ZONE)
    assert isinstance(got, OrgSettings)
    return got


async def test_defaults_put_and_patch(
    api: httpx.AsyncClient, api_settings: Settings, store: SketchStore
) -> None:
    admin = bearer(api_settings, "admin")
    got = await api.get(ACME, headers=bearer(api_settings, "curator"))
    assert got.status_code == 200, got.text
    assert got.json() == DEFAULTS

    put = await api.put(ACME, json={"week_start": "sunday"}, headers=admin)
    assert put.status_code == 200, put.text
    assert put.json() == {"timezone": DEFAULT_ZONE, "week_start": "sunday"}
    put = await api.put(ACME, json={"timezone": "Asia/Tokyo"}, headers=admin)
    assert put.json() == {"timezone": "Asia/Tokyo", "week_start": "monday"}  # replaced

    patched = await api.patch(ACME, json={"week_start": "sunday"}, headers=admin)
    assert patched.json() == {"timezone": "Asia/Tokyo", "week_start": "sunday"}
    patched = await api.patch(ACME, json={"timezone": "Europe/Berlin"}, headers=admin)
    assert patched.json() == {"timezone": "Europe/Berlin", "week_start": "sunday"}
    assert (await api.get(ACME, headers=admin)).json() == patched.json()
    # Where the consumer reads the org's settings from.
    assert (await stored(store)).model_dump() == patched.json()

    reset = await api.patch(ACME, json={"timezone": None}, headers=admin)
    assert reset.json() == {"timezone": DEFAULT_ZONE, "week_start": "sunday"}
    assert (await api.put(ACME, json={}, headers=admin)).json() == DEFAULTS


async def test_org_settings_are_apart_from_its_workspaces_and_other_orgs(
    api: httpx.AsyncClient, api_settings: Settings, store: SketchStore
) -> None:
    root = bearer(api_settings, "superadmin", None)
    ws_url = "/api/v2/org/acme/workspace/w1/settings"
    await api.put(ws_url, json={"timezone": "Asia/Tokyo", "week_start": "sunday"}, headers=root)
    await api.put(ACME, json={"timezone": "Europe/Berlin"}, headers=root)
    assert (await api.get(ACME, headers=root)).json() == {"timezone": "Europe/Berlin",
                                                         "week_start": "monday"}
    assert (await api.get(ws_url, headers=root)).json() == {
        "timezone": "Asia/Tokyo", "excluded_subjects": [], "week_start": "sunday"}
    assert (await api.get(GLOBEX, headers=root)).json() == DEFAULTS
    # An org id that holds "/" travels percent-encoded and is its own org, not a prefix.
    odd = await api.put(ORG_URL.format(org="acme%2Fx"), json={"week_start": "sunday"},
                        headers=root)
    assert odd.status_code == 200, odd.text
    assert (await stored(store, "acme/x")).week_start == "sunday"
    assert (await stored(store, "acme")).week_start == "monday"
    stray = await api.get("/api/v2/org/acme/x/settings", headers=root)
    assert stray.status_code == 404


# role, may read its own org, may write its own org
ROLE_TABLE = [
    ("superadmin", True, True),
    ("admin", True, True),
    ("controller", True, False),
    ("curator", True, False),
    ("basic", False, False),
]


@pytest.mark.parametrize(("role", "reads", "writes"), ROLE_TABLE)
async def test_who_may_read_and_write_which_org(
    api: httpx.AsyncClient, api_settings: Settings, store: SketchStore, role: str, reads: bool,
    writes: bool,
) -> None:
    headers = bearer(api_settings, role, "acme")
    is_root = role == "superadmin"
    for url, own in ((ACME, True), (GLOBEX, False)):
        may_read, may_write = (reads, writes) if own or is_root else (False, False)
        resp = await api.get(url, headers=headers)
        assert resp.status_code == (200 if may_read else 403), (role, url, resp.text)
        for method, body in (("PUT", {"week_start": "sunday"}),
                             ("PATCH", {"timezone": "Asia/Tokyo"})):
            resp = await api.request(method, url, json=body, headers=headers)
            assert resp.status_code == (200 if may_write else 403), (role, method, url, resp.text)
            if not may_write:
                assert set(resp.json()) == {"detail"}
        org = "acme" if own else "globex"
        want = {"timezone": "Asia/Tokyo", "week_start": "sunday"} if may_write else DEFAULTS
        assert (await stored(store, org)).model_dump() == want


async def test_a_token_without_an_org_reads_nothing_but_as_superadmin(
    api: httpx.AsyncClient, api_settings: Settings
) -> None:
    for role in ("admin", "controller"):
        resp = await api.get(ACME, headers=bearer(api_settings, role, None))
        assert resp.status_code == 403, resp.text
        assert "org_id" in resp.json()["detail"]
    assert (await api.get(ACME, headers=bearer(api_settings, "superadmin", None))).status_code == (
        200)


@pytest.mark.parametrize(
    ("extra", "may_write_org", "may_write_workspace"),
    [
        (frozenset({WRITE_SETTINGS}), True, True),
        (frozenset({WRITE_ORG_SETTINGS}), True, False),
    ],
    ids=["workspace-settings-write", "org-settings-write"],
)
async def test_either_write_permission_may_write_org_settings(
    api: httpx.AsyncClient, api_settings: Settings, monkeypatch: pytest.MonkeyPatch,
    extra: frozenset[str], may_write_org: bool, may_write_workspace: bool,
) -> None:
    """The role table decides: a role holding only one of the two write permissions (none does
    today; a deployment may add one) can write org settings with either of them."""
    monkeypatch.setitem(ROLE_PERMISSIONS, "writer", extra)
    headers = bearer(api_settings, "writer")
    org = await api.patch(ACME, json={"week_start": "sunday"}, headers=headers)
    assert org.status_code == (200 if may_write_org else 403), org.text
    ws = await api.patch("/api/v2/org/acme/workspace/w/settings", json={"week_start": "sunday"},
                         headers=headers)
    assert ws.status_code == (200 if may_write_workspace else 403), ws.text
    assert (await api.get(ACME, headers=headers)).status_code == 403  # no read permission


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b'{"excluded_subjects": []}', ["body", "excluded_subjects"]),  # a workspace field
        (b'{"bogus": null}', ["body", "bogus"]),
        (b'{"timezone": "Nowhere/City"}', ["body", "timezone"]),
        (b'{"timezone": ""}', ["body", "timezone"]),
        (b'{"week_start": "saturday"}', ["body", "week_start"]),
        (b"[]", ["body"]),
        (b"{not json", ["body"]),
        (b"\xff\xfe", ["body"]),
    ],
)
async def test_invalid_bodies_are_422_and_change_nothing(
    api: httpx.AsyncClient, api_settings: Settings, store: SketchStore, method: str, body: bytes,
    loc: list[Any],
) -> None:
    admin = bearer(api_settings, "admin")
    await api.put(ACME, json={"timezone": "Asia/Tokyo"}, headers=admin)
    resp = await api.request(method, ACME, content=body,
                             headers={**admin, "Content-Type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert loc in [e["loc"][: len(loc)] for e in resp.json()["detail"]], resp.json()
    assert (await stored(store)).timezone == "Asia/Tokyo"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH"])
async def test_without_a_valid_token_every_call_is_401_whatever_the_body(
    api: httpx.AsyncClient, method: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-jwt"}):
        resp = await api.request(method, ORG_URL.format(org="%FF"), content=b"{not json",
                                 headers={**headers, "Content-Type": "application/json"})
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH"])
@pytest.mark.parametrize("url", [ACME, "/api/v2/org/acme/workspace/w/settings"])
async def test_a_dead_store_is_503_after_auth_and_validation(
    api_settings: Settings, method: str, url: str
) -> None:
    dead = api_settings.model_copy(
        update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")})
    async with open_store(dead) as st:
        app = create_app(dead, st)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            admin = bearer(dead, "admin")
            body = None if method == "GET" else b'{"week_start": "sunday"}'
            resp = await c.request(method, url, content=body, headers=admin)
            assert resp.status_code == 503, resp.text
            assert set(resp.json()) == {"detail"}
            assert resp.headers["retry-after"].isdigit()
            if method != "GET":
                bad = await c.request(method, url, content=b'{"bogus": 1}', headers=admin)
                assert bad.status_code == 422, bad.text
            anonymous = await c.request(method, url, content=body)
            assert anonymous.status_code == 401


async def test_openapi_documents_every_settings_operation(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]
    for path in ("/api/v2/org/{org_id}/settings",
                 "/api/v2/org/{org_id}/workspace/{workspace_id}/settings"):
        for method in ("get", "put", "patch"):
            op = paths[path][method]
            for status in ("200", "401", "403", "422", "503"):
                assert status in op["responses"], (path, method, status)
        patch_body = paths[path]["patch"]["requestBody"]["content"]
        assert {"application/merge-patch+json", "application/json"} <= set(patch_body)
        put_schema = paths[path]["put"]["requestBody"]["content"]["application/json"]["schema"]
        assert "required" not in put_schema  # every field has a default
        assert put_schema["additionalProperties"] is False


def test_org_scope_is_not_a_workspace() -> None:
    assert org_scope("acme") != Scope("acme", "settings")
    assert org_scope("acme").is_org
