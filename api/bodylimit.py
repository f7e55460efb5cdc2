"""A cap on request bodies: ``413`` over ``MAX_BODY_BYTES`` (64 KiB), and never more than that held.

The only body the API takes is a workspace's settings (a zone and at most 100 patterns of at most
256 characters: under 30 KiB as JSON). Without a cap the settings route would read whatever a
caller streams into memory before validating it.

Pure ASGI, like the rate limiter, but it decides nothing up front: it hands the application a
``receive`` that counts the bytes as the route reads them and raises ``BodyTooLarge`` (an HTTP
``413``) on the first read when the declared ``Content-Length`` is over the cap, or as soon as a
body without one (chunked) goes over it. So the route's own order holds whatever the body: it
reads the body only after authentication (401) and permission (403) have passed, and a caller
that may not write learns nothing from the size of what it sent. (Until issue 16 the middleware
refused a large body for any caller whose token verified, so a ``basic`` caller got 413 where
the permission says 403.) A body the route never reads costs nothing: the server discards it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024
WITH_BODY = frozenset({"POST", "PUT", "PATCH"})

RESPONSE_413: dict[str, Any] = {
    "description": f"The body is larger than {MAX_BODY_BYTES} bytes",
    "content": {"application/json": {
        "schema": {"type": "object", "properties": {"detail": {"type": "string"}},
                   "required": ["detail"]},
        "example": {"detail": f"request body over {MAX_BODY_BYTES} bytes"},
    }},
}


class BodyTooLarge(HTTPException):
    """An ``HTTPException``, so that FastAPI answers it as it is (``413`` with a JSON detail)
    even where it reads a body itself, where any other exception would become a 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over {max_bytes} bytes",
                         headers={"Connection": "close"})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


def capped(receive: Receive, max_bytes: int, declared: int | None) -> Receive:
    """``receive`` that raises ``BodyTooLarge`` instead of handing on more than ``max_bytes``."""
    seen = 0

    async def read() -> Message:
        nonlocal seen
        if declared is not None and declared > max_bytes:
            raise BodyTooLarge(max_bytes)
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise BodyTooLarge(max_bytes)
        return message

    return read


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES,
                 prefix: str = "/api/") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") not in WITH_BODY
            or not str(scope.get("path", "")).startswith(self.prefix)
        ):
            await self.app(scope, receive, send)
            return
        await self.app(scope, capped(receive, self.max_bytes, _declared_length(scope)), send)


def document_413(app: FastAPI) -> None:
    """Add the 413 to every operation with a request body under ``/api/`` (the middleware is no
    route, so FastAPI cannot know of it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith("/api/"):
                continue
            for method, operation in operations.items():
                if method.upper() in WITH_BODY and isinstance(operation, dict):
                    operation.setdefault("responses", {}).setdefault("413", RESPONSE_413)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
