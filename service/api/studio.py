"""The studio: a single page to try the service in a browser, at ``GET /`` and ``GET /studio``.

Plain HTML, CSS and JavaScript under ``service/static/studio/`` (no build step, nothing loaded from another host),
served from ``/static/studio`` (mounted by :func:`service.app.create_app`). The page uses only the public API:
``GET /openapi.json`` (its parameter controls are generated from the ``/predict`` request schema), ``GET
/health/ready`` and ``POST /predict`` with ``Accept: text/event-stream``. It carries no data and no key: it asks
for the API key when the API answers 401 and keeps it in the tab's ``sessionStorage``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from service.security import page_headers, page_policy

STUDIO_ASSETS = Path(__file__).resolve().parents[1] / "static" / "studio"
STUDIO_ASSETS_URL = "/static/studio"
# index.html resolves its scripts, styles and API calls against this <base>; behind a proxy prefix
# (``uvicorn --root-path /api``) it becomes ``/api/``.
_BASE = '<base href="/">'

router = APIRouter()


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
