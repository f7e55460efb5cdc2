"""The settings routes: a workspace's and an org's settings, read (``GET``), replaced (``PUT``) and
changed field by field (``PATCH``).

- ``PUT`` replaces the whole settings: a field left out (or ``null``) takes its default, so a
  client that only cares about excluded subjects need not know the deployment's default zone.
- ``PATCH`` is a JSON merge patch (RFC 7396) of the flat fields: a field left out keeps its
  stored value, ``null`` resets it to its default. It is applied as a compare-and-set on the
  stored JSON (one ``EVAL`` on the one key, so it also holds on a cluster), so two admins
  patching different fields at once both keep their change instead of the later one silently
  restoring the other's old value.
- Authentication comes first (a router dependency), and the body is read only after every
  dependency has passed: a caller without a valid token or permission learns nothing about which
  body would have been valid, nor whether it was too large (``api.bodylimit`` caps the body
  when it is read, so 401 and 403 come before 413).
- These routes read settings with one ``GET`` of their own. The usage route reads settings
  together with the data version token for its result cache, which settings do not need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError

from api.auth import WRITE_ORG_SETTINGS, WRITE_SETTINGS, Principal
from api.deps import (
    OrgDep,
    PrincipalDep,
    SettingsDep,
    StoreDep,
    WorkspaceDep,
    get_principal,
    metrics_reader,
    org_reader,
)
from api.schemas import ERROR_RESPONSES, ErrorBody
from sketches import scope_settings as ws_settings
from sketches import settings_feed
from sketches.keys import Scope
from sketches.scope_settings import OrgSettings, S, WorkspaceSettings
from sketches.store import SketchStore

router = APIRouter(dependencies=[Depends(get_principal)])

WORKSPACE_SETTINGS_PATH = "/api/v2/org/{org_id}/workspace/{workspace_id}/settings"
ORG_SETTINGS_PATH = "/api/v2/org/{org_id}/settings"
MERGE_PATCH_TYPE = "application/merge-patch+json"
# Compare-and-set rounds before a PATCH gives up with 409: losing five races in a row needs a
# storm of concurrent writers to one scope's settings, which a client should hear about.
PATCH_ATTEMPTS = 5

_JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])

WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    409: {"model": ErrorBody, "description": "Concurrent writes kept changing the settings "
                                             "while this PATCH was applied; send it again",
          "content": {"application/json": {
              "example": {"detail": "the settings kept changing concurrently; try again"}}}},
}


async def org_writer(org: OrgDep, caller: PrincipalDep) -> Principal:
    caller.require_any((WRITE_ORG_SETTINGS, WRITE_SETTINGS), org.org_id)
    return caller


async def workspace_writer(ws: WorkspaceDep, caller: PrincipalDep) -> Principal:
    caller.require(WRITE_SETTINGS, ws.org_id)
    return caller


# ---------------------------------------------------------------- bodies


def _body_error(err: ValidationError) -> RequestValidationError:
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])


async def read_patch(request: Request) -> dict[str, Any]:
    """The body as a JSON object (422 otherwise). Called inside the routes, after their
    dependencies, so that authentication and permission are decided first."""
    try:
        return _JSON_OBJECT.validate_json(await request.body())
    except ValidationError as err:
        raise _body_error(err) from None


def merged(base: S, patch: Mapping[str, Any], defaults: S) -> S:
    try:
        return ws_settings.merge_patch(base, patch, defaults)
    except ValidationError as err:
        raise _body_error(err) from None


async def put(store: SketchStore, scope: Scope, patch: Mapping[str, Any], defaults: S) -> S:
    new = merged(defaults, patch, defaults)
    await ws_settings.save(store.client, store.keys, scope, new)
    return new


async def patch(
    store: SketchStore,
    scope: Scope,
    changes: Mapping[str, Any],
    defaults: S,
    decode: Callable[[bytes | None], S],
) -> S:
    # The fields are independent, so a patch valid over the defaults is valid over any stored
    # value: checked first, an invalid body is a 422 without a store round trip (or a 503).
    merged(defaults, changes, defaults)
    # Bounded like PUT: settings of workspaces with no data are counted, but only once this
    # patch is known to write something; a patch that changes nothing takes no slot of the org's
    # MAX_SETTINGS_WITHOUT_DATA (issue 16).
    admitted = scope.is_org
    for _ in range(PATCH_ATTEMPTS):
        raw = await ws_settings.read_raw(store.client, store.keys, scope)
        current = decode(raw)
        new = merged(current, changes, defaults)
        if new == current:
            if raw is not None:
                # Nothing to write, but announced again: a write whose announcement failed
                # (a 503 between the two) is repaired by sending the PATCH again. Only stored
                # settings: the feed must not grow with ids that have none.
                await settings_feed.announce(store.client, store.keys, [scope])
            return current  # nothing to write (and defaults stay defaults, not pinned)
        if not admitted:
            await ws_settings.admit(store.client, store.keys, scope)
            admitted = True
        if await ws_settings.compare_and_set(store.client, store.keys, scope, raw, new):
            return new
    raise HTTPException(409, "the settings kept changing concurrently; try again")


def body_schema(model: type[BaseModel], *, nullable: bool) -> dict[str, Any]:
    """The request body schema of PUT (every field optional) or PATCH (and nullable), from the
    model itself so that the documented rules cannot drift from the enforced ones."""
    schema = model.model_json_schema()
    schema.pop("required", None)
    schema["title"] = f"{model.__name__}{'Patch' if nullable else 'Put'}"
    if nullable:
        schema["properties"] = {
            name: {"anyOf": [prop, {"type": "null"}], "description": prop.get("description", "")}
            for name, prop in schema["properties"].items()
        }
        schema["example"] = {"week_start": "sunday"}
    return schema


def request_body(model: type[BaseModel], *, nullable: bool) -> dict[str, Any]:
    schema = body_schema(model, nullable=nullable)
    types = [MERGE_PATCH_TYPE, "application/json"] if nullable else ["application/json"]
    return {"requestBody": {"required": True,
                            "content": {t: {"schema": schema} for t in types}}}


PUT_NOTE = "A field left out (or null) takes its default. "
PATCH_NOTE = (
    "A JSON merge patch (RFC 7396): fields left out keep their value, null resets a field to "
    "its default; unknown fields are a 422. "
)
WORKSPACE_WRITE_NOTE = (
    "Needs `workspace_settings:write` (superadmin, admin). The consumer applies a change "
    "within `SETTINGS_CACHE_SECONDS`, to logins ingested from then on; "
    "`usage-metrics rebuild --org O --workspace W` re-buckets the retained history."
)
ORG_WRITE_NOTE = (
    "Needs `org_settings:write` or `workspace_settings:write` (superadmin, admin). The consumer "
    "applies a change within `SETTINGS_CACHE_SECONDS`, to logins ingested from then on; "
    "`usage-metrics rebuild --org O` re-buckets the org's retained history."
)


# ---------------------------------------------------------------- workspace settings


def _workspace_defaults(default_timezone: str) -> WorkspaceSettings:
    return ws_settings.default_settings(default_timezone)


def _workspace_decoder(default_timezone: str) -> Callable[[bytes | None], WorkspaceSettings]:
    return lambda raw: ws_settings.decode(raw, default_timezone)


@router.get(
    WORKSPACE_SETTINGS_PATH,
    response_model=WorkspaceSettings,
    responses=ERROR_RESPONSES,
    summary="The workspace's timezone, week start and excluded subjects",
)
async def get_workspace_settings(
    ws: WorkspaceDep,
    _caller: Annotated[Principal, Depends(metrics_reader)],
    settings: SettingsDep,
    store: StoreDep,
) -> WorkspaceSettings:
    raw = await ws_settings.read_raw(store.client, store.keys, ws)
    return ws_settings.decode(raw, settings.default_timezone)


@router.put(
    WORKSPACE_SETTINGS_PATH,
    response_model=WorkspaceSettings,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body(WorkspaceSettings, nullable=False),
    summary="Replace the workspace's settings",
    description=PUT_NOTE + WORKSPACE_WRITE_NOTE,
)
async def put_workspace_settings(
    ws: WorkspaceDep,
    _caller: Annotated[Principal, Depends(workspace_writer)],
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
) -> WorkspaceSettings:
    body = await read_patch(request)
    return await put(store, ws, body, _workspace_defaults(settings.default_timezone))


@router.patch(
    WORKSPACE_SETTINGS_PATH,
    response_model=WorkspaceSettings,
    responses=WRITE_RESPONSES,
    openapi_extra=request_body(WorkspaceSettings, nullable=True),
    summary="Change some of the workspace's settings",
    description=PATCH_NOTE + WORKSPACE_WRITE_NOTE,
)
async def patch_workspace_settings(
    ws: WorkspaceDep,
    _caller: Annotated[Principal, Depends(workspace_writer)],
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
) -> WorkspaceSettings:
    body = await read_patch(request)
    tz = settings.default_timezone
    return await patch(store, ws, body, _workspace_defaults(tz), _workspace_decoder(tz))


# ---------------------------------------------------------------- org settings


def _org_decoder(default_timezone: str) -> Callable[[bytes | None], OrgSettings]:
    return lambda raw: ws_settings.decode_org(raw, default_timezone)


@router.get(
    ORG_SETTINGS_PATH,
    response_model=OrgSettings,
    responses=ERROR_RESPONSES,
    summary="The org's timezone and week start (for its org-level numbers)",
    description="Needs `workspace_metrics:read`, under the same org rules as the usage endpoint.",
)
async def get_org_settings(
    org: OrgDep,
    _caller: Annotated[Principal, Depends(org_reader)],
    settings: SettingsDep,
    store: StoreDep,
) -> OrgSettings:
    raw = await ws_settings.read_raw(store.client, store.keys, org)
    return ws_settings.decode_org(raw, settings.default_timezone)


@router.put(
    ORG_SETTINGS_PATH,
    response_model=OrgSettings,
    responses=ERROR_RESPONSES,
    openapi_extra=request_body(OrgSettings, nullable=False),
    summary="Replace the org's settings",
    description=PUT_NOTE + ORG_WRITE_NOTE,
)
async def put_org_settings(
    org: OrgDep,
    _caller: Annotated[Principal, Depends(org_writer)],
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
) -> OrgSettings:
    body = await read_patch(request)
    return await put(store, org, body, ws_settings.default_org_settings(settings.default_timezone))


@router.patch(
    ORG_SETTINGS_PATH,
    response_model=OrgSettings,
    responses=WRITE_RESPONSES,
    openapi_extra=request_body(OrgSettings, nullable=True),
    summary="Change some of the org's settings",
    description=PATCH_NOTE + ORG_WRITE_NOTE,
)
async def patch_org_settings(
    org: OrgDep,
    _caller: Annotated[Principal, Depends(org_writer)],
    settings: SettingsDep,
    store: StoreDep,
    request: Request,
) -> OrgSettings:
    body = await read_patch(request)
    tz = settings.default_timezone
    return await patch(store, org, body, ws_settings.default_org_settings(tz), _org_decoder(tz))

