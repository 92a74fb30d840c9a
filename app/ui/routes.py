"""The dashboard: a static single-page app (plain HTML, CSS and ES modules shipped in this package) at `/`.

The page and its assets are public; every data call the page makes goes to the /v1 API with the key the user enters,
so nothing here reads data or checks keys. Nothing is loaded from outside the server (the CSP says so)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PREFIX = "/ui"

# Only this server's own files; inline style attributes are used for bar widths, never inline scripts.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def install_ui(app: FastAPI) -> None:
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="ui-assets")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        # no-cache: revalidated on each visit, so a new version's shell is never paired with stale modules.
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html",
            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY},
        )
