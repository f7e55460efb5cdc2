"""``GET /docs``: Swagger UI, served from this process only.

FastAPI's default ``/docs`` and ``/redoc`` load their scripts from a CDN, on the origin of
``/dashboard``, whose token lives in ``sessionStorage``: any script a CDN hands out there could
read it. Here both defaults are off; ``/docs`` is a page of this module whose scripts and styles
come from the PyPI package ``fastapi-offline`` (Swagger UI 5, which reads FastAPI's OpenAPI 3.1;
``swagger-ui-bundle`` stops at Swagger UI 4, which cannot), through an allow-list of its files,
under a Content-Security-Policy as tight as the dashboard's: scripts and styles from this origin
only, requests to this origin only, no frames, no forms, no inline script (the page starts
Swagger UI from a file of its own). ``API_DOCS=false`` turns the page off; ``/openapi.json``
stays.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response

from api.dashboard import SECURITY_HEADERS  # the same tight CSP as the dashboard

log = logging.getLogger(__name__)

DOCS_PATH = "/docs"
ASSET_PREFIX = "/docs/static/"
ASSET_NAMES = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon.png")

_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".png": "image/png"}

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>usage-metrics API</title>
<link rel="icon" type="image/png" href="{prefix}favicon.png">
<link rel="stylesheet" href="{prefix}swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{prefix}swagger-ui-bundle.js"></script>
<script src="{prefix}init.js"></script>
</body>
</html>
"""

INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    deepLinking: true,
  });
});
"""


def _bundle() -> dict[str, Path] | None:
    try:
        import fastapi_offline
    except ImportError:
        return None
    root = Path(fastapi_offline.__file__).parent / "static"
    files = {name: root / name for name in ASSET_NAMES}
    return files if all(p.is_file() for p in files.values()) else None


def install(app: FastAPI, enabled: bool) -> None:
    """Serve ``/docs`` from the package when ``enabled`` (and the package is installed)."""
    if not enabled:
        return
    assets = _bundle()
    if assets is None:
        log.error("fastapi-offline is not installed: /docs is off (/openapi.json is served)")
        return
    router = APIRouter(include_in_schema=False)

    @router.get(DOCS_PATH)
    async def docs_page() -> HTMLResponse:
        return HTMLResponse(PAGE.format(prefix=ASSET_PREFIX),
                            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @router.get(ASSET_PREFIX + "init.js")
    async def docs_init() -> Response:
        return Response(INIT, media_type=_TYPES[".js"],
                        headers={"X-Content-Type-Options": "nosniff"})

    @router.get(ASSET_PREFIX + "{name}")
    async def docs_asset(name: str) -> FileResponse:
        path = assets.get(name)
        if path is None:
            raise HTTPException(404, "no such docs asset")
        return FileResponse(path, media_type=_TYPES[path.suffix],
                            headers={"X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "max-age=86400"})

    app.include_router(router)
