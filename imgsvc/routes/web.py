"""The web page (GET /) and the usage dashboard (GET /usage), with their static files.

Plain files from `imgsvc/web/`, no build step. Only the files that ship there are served, by
exact name (no path is ever joined from the request), with a Content-Security-Policy that
allows scripts and styles from this origin only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from imgsvc.errors import NotFound

router = APIRouter(include_in_schema=False)
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".md": "text/plain; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _static_files(root: Path) -> dict[str, Path]:
    """Every servable file under `root` by its relative name, e.g. `vendor/chart.umd.min.js`."""
    if not root.is_dir():
        return {}
    return {
        path.relative_to(root).as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in MEDIA_TYPES and path.suffix != ".html"
    }


STATIC_FILES = _static_files(WEB_DIR)


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> FileResponse:
    """The page: API key, images in, an operation, the result and its price."""
    return _file(WEB_DIR / "index.html")


@router.api_route("/usage", methods=["GET", "HEAD"])
async def usage_page() -> FileResponse:
    """The usage dashboard: credits per day and operation, recent calls, CSV, sub-keys."""
    return _file(WEB_DIR / "usage.html")


@router.api_route("/static/{name:path}", methods=["GET", "HEAD"])
async def static_file(name: str) -> FileResponse:
    path = STATIC_FILES.get(name)
    if path is None:
        raise NotFound(f"no static file {name[:80]!r}")
    return _file(path)
