"""``GET /dashboard``: one page that charts the DAU, WAU, MAU and stickiness of a workspace or of
a whole org, with each headline's change against the previous period of the same length.

The page is static (HTML, JS, CSS and the vendored uPlot in ``api/static/``) and calls the usage
endpoints (workspace or org) from the browser with the caller's own token, so it needs no
server-side session and sees exactly what the API answers, errors and headers included (how the
numbers were counted, the week start, the timezone). Nothing is loaded from a CDN.

Assets are served from an allow-list built from the package's ``static`` folder when this module
is imported: a request can name only a file that ships with the package, never a path of its own.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGE = "dashboard.html"
ASSET_PREFIX = "/dashboard/static/"

# The page runs only its own scripts and talks only to this origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE
}


def _assets(root: Path) -> dict[str, Path]:
    """Every file under ``root`` by its relative POSIX path."""
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


ASSETS = _assets(STATIC_DIR)


def _media_type(path: Path) -> str:
    return _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or (
        "application/octet-stream"
    )


router = APIRouter(include_in_schema=False)


@router.get("/dashboard")
async def dashboard_page() -> FileResponse:
    page = ASSETS.get(PAGE)
    if page is None:
        raise HTTPException(404, "the dashboard is not installed with this package")
    return FileResponse(
        page,
        media_type=_TYPES[".html"],
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


@router.get(ASSET_PREFIX + "{name:path}")
async def dashboard_asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise HTTPException(404, "no such dashboard asset")
    return FileResponse(
        path,
        media_type=_media_type(path),
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )
