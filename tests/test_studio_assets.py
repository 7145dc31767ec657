"""The studio's files as the fast tier sees them (no browser, no server process): the page loads one module
script, every module is served with a JavaScript media type whatever the host's MIME table says (a browser runs a
module script only with one), and the modules import nothing but each other."""

from __future__ import annotations

import asyncio
import mimetypes
import re

import httpx
import pytest
import starlette.responses

from service.api.studio import STUDIO_ASSETS
from service.app import create_app
from service.settings import Settings


def fetch_all(paths: list[str]) -> list[httpx.Response]:
    app = create_app(Settings(demo=True))  # no lifespan: static files and the page need no model

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://studio") as client:
            return [await client.get(path) for path in paths]

    return asyncio.run(go())


def test_the_modules_are_served_as_javascript_even_where_the_host_maps_js_to_text(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a host whose MIME table (/etc/mime.types, the Windows registry) maps .js to text/plain.
    def plain(url: str, strict: bool = True) -> tuple[str | None, str | None]:
        return ("text/plain", None) if str(url).endswith(".js") else mimetypes.guess_type(url, strict)

    monkeypatch.setattr(starlette.responses, "guess_type", plain)
    modules = sorted(path.name for path in STUDIO_ASSETS.glob("*.js"))
    page, css, *scripts = fetch_all(["/", "/static/studio/studio.css", *(f"/static/studio/{m}" for m in modules)])
    assert re.findall(r'<script[^>]*>', page.text) == ['<script type="module" src="static/studio/main.js">']
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    imported = {"main.js"}
    for name, script in zip(modules, scripts, strict=True):
        assert script.status_code == 200 and script.headers["content-type"] == "text/javascript; charset=utf-8"
        assert script.content == (STUDIO_ASSETS / name).read_bytes()
        specs = re.findall(r'^import [^;]* from "([^"]+)";$', script.text, re.MULTILINE)
        assert all(re.fullmatch(r"\./[a-z]+\.js", spec) for spec in specs), (name, specs)
        imported |= {spec[2:] for spec in specs}
        assert not re.search(r"https?://", script.text), name
    assert imported == set(modules)  # every module is reachable from main.js, and nothing else is imported
