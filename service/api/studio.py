"""The studio: a single page to try the service in a browser, at ``GET /`` and ``GET /studio``.

Plain HTML, CSS and JavaScript under ``service/static/studio/`` (no build step, nothing loaded from another host),
served from ``/static/studio`` by :class:`StudioFiles` (mounted by :func:`service.app.create_app`). The script is
native ES modules (``main.js`` imports ``api.js``, ``controls.js``, ``editors.js`` and ``gallery.js``), which a
browser runs only when served with a JavaScript media type: :class:`StudioFiles` sets it rather than trusting the
host's MIME table (some map ``.js`` to ``text/plain`` or to nothing). The page uses only the public API:
``GET /openapi.json`` (its parameter controls are generated from the ``/predict`` request schema), ``GET
/health/ready`` and ``POST /predict`` with ``Accept: text/event-stream``. It carries no data and no key: it asks
for the API key when the API answers 401 and keeps it in the tab's ``sessionStorage``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from service.security import page_headers, page_policy

STUDIO_ASSETS = Path(__file__).resolve().parents[1] / "static" / "studio"
STUDIO_ASSETS_URL = "/static/studio"
# index.html resolves its scripts, styles and API calls against this <base>; behind a proxy prefix
# (``uvicorn --root-path /api``) it becomes ``/api/``.
_BASE = '<base href="/">'

# Media types of the studio's files by suffix, independent of the host's MIME table.
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".html": "text/html; charset=utf-8"}

router = APIRouter()


class StudioFiles(StaticFiles):
    """The studio's static files, with the media types of :data:`MEDIA_TYPES` (module scripts need theirs)."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        media_type = MEDIA_TYPES.get(Path(full_path).suffix)
        if media_type:
            response.media_type = media_type
            response.headers["content-type"] = media_type
        return response


@router.get("/", include_in_schema=False)
@router.get("/studio", include_in_schema=False)
async def studio(request: Request) -> HTMLResponse:
    html = (STUDIO_ASSETS / "index.html").read_text(encoding="utf-8")
    root = str(request.scope.get("root_path", "")).rstrip("/")
    if root:
        html = html.replace(_BASE, f'<base href="{_escape(root)}/">', 1)
    return HTMLResponse(html, headers={"Cache-Control": "no-cache", **page_headers(page_policy(html))})


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
