"""/docs and /redoc work offline (their scripts and styles come from the service), and HEAD works wherever GET does.

The app runs in-process in demo mode, inside its lifespan, under ``httpx.ASGITransport``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from service.app import create_app
from service.settings import Settings
from tests.support.server import metric

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "service" / "static" / "docs"
# src=, href= and spec-url= attributes, and the url: of the SwaggerUIBundle call.
REFERENCE = re.compile(r"""(?:src|href|spec-url)="([^"]+)"|\burl: *'([^']+)'""")
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",)}

Scenario = Callable[[httpx.AsyncClient], Awaitable[None]]


def run(scenario: Scenario) -> None:
    app = create_app(Settings(demo=True, warmup_steps=1))

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                for _ in range(1200):  # the demo model loads and warms up in the background
                    if app.state.service.ready:
                        break
                    await asyncio.sleep(0.05)
                await scenario(client)

    asyncio.run(main())


def references(html: str) -> list[str]:
    return [a or b for a, b in REFERENCE.findall(html)]


def test_docs_pages_load_everything_from_the_service() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for page, schema_attr in (("/docs", "url"), ("/redoc", "spec-url")):
            response = await client.get(page)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            html = response.text
            assert "https://" not in html and "http://" not in html, page
            found = references(html)
            assert "/openapi.json" in found, (page, schema_attr, found)
            assets = [url for url in found if url != "/openapi.json"]
            assert any(url.endswith(".js") for url in assets), (page, assets)
            for url in assets:
                assert url.startswith("/static/docs/"), url
                asset = await client.get(url)
                assert asset.status_code == 200, url
                kind = asset.headers["content-type"].split(";")[0]
                assert kind in CONTENT_TYPES[Path(url).suffix], (url, kind)
                assert asset.content == (ASSETS / url.removeprefix("/static/docs/")).read_bytes()
        schema = await client.get("/openapi.json")
        assert schema.status_code == 200 and schema.json()["info"]["title"] == "AnyDoor Serve"

    run(scenario)


def test_vendored_assets_carry_their_licenses_and_stay_small() -> None:
    for name in ("swagger-ui/LICENSE", "redoc/LICENSE", "README.md"):
        assert (ASSETS / name).is_file(), name
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 5 * 1024 * 1024, total


def test_docs_routes_stay_out_of_the_schema() -> None:
    paths = create_app(Settings(demo=True)).openapi()["paths"]
    assert not {"/docs", "/redoc"} & set(paths)
    assert not any(p.startswith("/static") for p in paths)
    assert all("head" not in operations for operations in paths.values())  # HEAD adds no second operation


# --- HEAD ------------------------------------------------------------------------------------------------------

# Headers that may differ between two answers: a fresh id per request; /metrics counts the GET before the HEAD.
VARYING = {"x-request-id", "content-length", "date"}


def comparable(headers: httpx.Headers, path: str) -> dict[str, Any]:
    skip = VARYING if path == "/metrics" else VARYING - {"content-length"}
    return {k: v for k, v in headers.items() if k not in skip}


def test_head_answers_like_get_without_a_body() -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for path in ("/health/live", "/health/ready", "/health-check", "/metrics", "/docs", "/redoc",
                     "/openapi.json", "/static/docs/redoc/redoc.standalone.js"):
            get = await client.get(path)
            head = await client.head(path)
            assert get.status_code == 200 and head.status_code == get.status_code, path
            assert head.content == b"", path
            assert comparable(head.headers, path) == comparable(get.headers, path), path
            if path != "/metrics":
                assert int(head.headers["content-length"]) == len(get.content), path
            assert head.headers["x-request-id"]  # the request went through the whole middleware stack

        # The answer GET would get, error answers included: 405 on a POST-only route, 404 on no route.
        for path, status in (("/predict", 405), ("/no-such-route", 404)):
            get = await client.get(path)
            head = await client.head(path)
            assert get.status_code == head.status_code == status, path
            assert head.content == b"" and head.headers.get("allow") == get.headers.get("allow"), path

        # HEAD is counted as HEAD, under the route it matched.
        text = (await client.get("/metrics")).text
        assert metric(text, "anydoor_http_request_duration_seconds_count", route="/health/live", method="HEAD") == 1

    run(scenario)
