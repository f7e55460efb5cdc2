"""A cap on request bodies: ``413`` over ``MAX_BODY_BYTES`` (64 KiB), before anything is parsed.

The only body the API takes is a workspace's settings (a zone and at most 100 patterns of at most
256 characters: under 30 KiB as JSON). Without a cap the settings route would read whatever a
caller streams into memory before validating it.

Pure ASGI, like the rate limiter. A declared ``Content-Length`` over the cap is refused at once;
a body without one (chunked) is read up to the cap and refused as soon as it goes over, so no
more than 64 KiB of it is ever held. Only a caller whose bearer token verifies gets the ``413``:
for any other the request goes on to the route, which answers 401 before it reads the body
(authentication comes first, whatever else is wrong with a request).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import TokenVerifier, caller_of

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


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, verifier: TokenVerifier, max_bytes: int = MAX_BODY_BYTES,
                 prefix: str = "/api/") -> None:
        self.app = app
        self.verifier = verifier
        self.max_bytes = max_bytes
        self.prefix = prefix

    def _authenticated(self, scope: Scope) -> bool:
        return caller_of(scope, self.verifier) is not None

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.max_bytes} bytes"}, status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") not in WITH_BODY
            or not str(scope.get("path", "")).startswith(self.prefix)
            or not self._authenticated(scope)
        ):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"),
                        None)
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False  # the server refuses a malformed length itself
            if too_large:
                await self._refuse(scope, receive, send)
                return
        # Read at most the cap, then hand the body on as one message.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        await self.app(scope, _replay([{"type": "http.request", "body": body,
                                        "more_body": False}], then=receive), send)


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


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
