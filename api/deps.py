"""Dependencies of the routes: settings, the store and the caller, injected per request from the
application's state (set up by the lifespan, or by a test), never from import-time globals.

Every dependency here and in the routes is ``async def`` although none awaits anything: FastAPI
runs a plain ``def`` dependency in its thread pool, and a usage request resolved about 28 of them,
a thread hop each, which cost more than the whole answer from stored results."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.auth import READ_METRICS, Principal, TokenVerifier, Unauthenticated, verify_once
from sketches.admission import Admission
from sketches.config import Settings
from sketches.keys import MAX_ORG_ID, MAX_WORKSPACE_ID, Scope, org_scope
from sketches.results import Answers
from sketches.store import SketchStore

_bearer = HTTPBearer(auto_error=False, description="A JWT: HS256 with JWT_SECRET, or RS256/ES256")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_store(request: Request) -> SketchStore:
    store: SketchStore = request.app.state.store
    return store


async def get_answers(request: Request) -> Answers:
    """The process's answers (stored results and response cache), made once for the store the
    application uses."""
    state = request.app.state
    answers: Answers | None = getattr(state, "answers", None)
    if answers is None or answers.store is not state.store:
        settings: Settings = state.settings
        answers = Answers(
            state.store,
            retention_days=settings.retention_days,
            default_timezone=settings.default_timezone,
            cache_entries=settings.result_cache_entries,
            admission=Admission.from_settings(settings),
        )
        state.answers = answers
    return answers


async def get_verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    verifier: Annotated[TokenVerifier, Depends(get_verifier)],
) -> Principal:
    if credentials is None:
        raise Unauthenticated("missing bearer token")
    return verify_once(request.scope, verifier, credentials.credentials)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[SketchStore, Depends(get_store)]
AnswersDep = Annotated[Answers, Depends(get_answers)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


# ---------------------------------------------------------------- the scope a route names


def invalid(loc: tuple[str, ...], msg: str, value: Any, kind: str = "value_error") -> Exception:
    """A 422 with FastAPI's own error body, for rules a type annotation cannot state."""
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": value}])


def _path_id(name: str, raw: str, limit: int) -> str:
    # Path ids arrive still percent-encoded (see api.app.RawPathIds), so an id may hold "/".
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError as err:
        raise invalid(("path", name), "must be percent-encoded UTF-8", raw) from err
    if not 1 <= len(value) <= limit:
        raise invalid(("path", name), f"must have 1 to {limit} characters", value[:64])
    return value


async def workspace_ref(
    org_id: Annotated[str, Path(description="Organization id (percent-encode '/' and '%')")],
    workspace_id: Annotated[str, Path(description="Scope id")],
) -> Scope:
    return Scope(
        _path_id("org_id", org_id, MAX_ORG_ID),
        _path_id("workspace_id", workspace_id, MAX_WORKSPACE_ID),
    )


WorkspaceDep = Annotated[Scope, Depends(workspace_ref)]


async def metrics_reader(ws: WorkspaceDep, caller: PrincipalDep) -> Principal:
    caller.require(READ_METRICS, ws.org_id)
    return caller


async def org_ref(
    org_id: Annotated[str, Path(description="Organization id (percent-encode '/' and '%')")],
) -> Scope:
    """The org's own scope (its sketches count each member once across its workspaces)."""
    return org_scope(_path_id("org_id", org_id, MAX_ORG_ID))


OrgDep = Annotated[Scope, Depends(org_ref)]


async def org_reader(org: OrgDep, caller: PrincipalDep) -> Principal:
    caller.require(READ_METRICS, org.org_id)
    return caller
