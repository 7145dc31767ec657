"""Upload admission (service/uploads.py), part counting, long part headers, security headers and Retry-After,
in-process with the fake pipeline of test_service_app (short windows, so each runs in about a second)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tests.support.server import metric
from tests.test_service_app import DATA, FILES, FakePipeline, png, run

BOUNDARY = "trickle"
TRICKLE_HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def noise_png(size: tuple[int, int] = (256, 256)) -> bytes:
    """A PNG that does not compress: about 200 KB, more than a body's first 64 KiB."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


async def trickle(gap_s: float, *, first: bytes = b"", stop: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """A body as a trickler sends it: a part header (and ``first``), then a byte every ``gap_s``."""
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="reference"; filename="r.png"\r\n\r\n'.encode()
    if first:
        yield first
    while stop is None or not stop.is_set():
        await asyncio.sleep(gap_s)
        yield b"\0"


def test_a_trickled_body_gets_408_and_frees_its_place() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        service = app.state.service
        started = time.monotonic()
        response = await client.post("/predict", content=trickle(0.2), headers=TRICKLE_HEADERS)
        assert 0.4 <= time.monotonic() - started < 3
        assert response.status_code == 408 and response.json()["error"] == "request_timeout"
        assert response.json()["field"] == "body" and "bytes per second" in response.json()["message"]
        assert response.headers["connection"] == "close"
        assert service.pending.value == 0 and not service.uploads.holders
        text = (await client.get("/metrics")).text
        assert metric(text, "anydoor_requests_failed_total", reason="timeout") == 1
        assert (await client.post("/predict", files=FILES, data=DATA)).status_code == 200

    run(scenario, min_body_rate=100.0, body_rate_window_s=0.5)


def test_tricklers_hold_neither_slots_nor_places() -> None:
    """Twice as many tricklers as there are upload slots and queue places: a normal request is admitted and
    answered as fast as on an idle server, and /health-check stays READY."""

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        stop = asyncio.Event()
        tricklers = [asyncio.ensure_future(client.post("/predict", content=trickle(0.5, stop=stop),
                                                       headers=TRICKLE_HEADERS)) for _ in range(8)]
        await asyncio.sleep(0.3)
        service = app.state.service
        assert service.pending.value == 0 and not service.uploads.holders
        assert (await client.get("/health-check")).json()["status"] == "READY"
        files = {**FILES, "background": ("b.png", noise_png(), "image/png")}  # needs an upload slot
        started = time.monotonic()
        response = await client.post("/predict", files=files, data=DATA)
        assert response.status_code == 200 and time.monotonic() - started < 2
        assert not any(t.done() for t in tricklers)  # still connected: nothing was taken from them
        stop.set()
        await asyncio.gather(*tricklers)

    run(scenario, max_uploads=2, max_queue=4, min_body_rate=0.1, body_rate_window_s=30.0)


def test_a_slow_slot_holder_makes_room_for_a_waiting_upload() -> None:
    """One upload slot, held by a body that sent its first 64 KiB at once and then trickles: a second upload
    that needs the slot gets it within about a second, and the holder gets 408."""

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        holder = asyncio.ensure_future(client.post("/predict", content=trickle(0.2, first=b"\0" * 70_000),
                                                   headers=TRICKLE_HEADERS))
        service = app.state.service
        for _ in range(100):
            if service.uploads.holders:
                break
            await asyncio.sleep(0.02)
        assert len(service.uploads.holders) == 1
        files = {**FILES, "background": ("b.png", noise_png(), "image/png")}
        started = time.monotonic()
        response = await client.post("/predict", files=files, data=DATA)
        assert response.status_code == 200 and time.monotonic() - started < 3
        dropped = await holder
        assert dropped.status_code == 408 and dropped.json()["error"] == "request_timeout"

    run(scenario, max_uploads=1, min_body_rate=100.0, body_rate_window_s=30.0)


def test_form_fields_count_parts_together() -> None:
    """ANYDOOR_MAX_FORM_FIELDS counts fields and files together: 8 text fields and 6 files are 14 parts."""

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        files = [("reference", ("r.png", png(mode="RGBA"), "image/png")) for _ in range(5)]
        files.append(("background", ("b.png", png(), "image/png")))
        data = {**DATA, **{f"x{i}": "1" for i in range(6)}}
        response = await client.post("/predict", files=files, data=data)
        assert response.status_code == 413 and response.json()["error"] == "too_many_fields"
        assert "fields and files together" in response.json()["message"]
        ok = await client.post("/predict", files=FILES, data=DATA)  # 4 parts
        assert ok.status_code == 200

    run(scenario, max_form_fields=12)


def test_a_very_long_field_name_is_field_too_long() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        response = await client.post("/predict", files=FILES, data={**DATA, "x" * 9000: "1"})
        assert response.status_code == 413, response.text
        body = response.json()
        assert body["error"] == "field_too_long" and body["field"] == "body" and "field name" in body["message"]

    run(scenario)


def test_unknown_field_suggestions_are_case_and_token_aware() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        for name, expected in (("STEPS", "steps"), ("refine_mask", "refine_reference_mask"),
                               ("Guidance", "guidance_scale")):
            response = await client.post("/predict", files=FILES, data={**DATA, name: "1"})
            assert response.json()["error"] == "unknown_field"
            assert f"did you mean {expected!r}" in response.json()["message"], (name, response.json())

    run(scenario)


def test_pages_get_a_content_security_policy_and_every_answer_nosniff() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        for path in ("/", "/studio", "/docs", "/redoc"):
            response = await client.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
            policy = response.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy, path
            assert "http" not in policy  # nothing from another host
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["x-content-type-options"] == "nosniff"
        docs = await client.get("/docs")
        assert "'sha256-" in docs.headers["content-security-policy"]  # Swagger UI's inline start script
        assert "'unsafe-inline'" not in docs.headers["content-security-policy"].split("script-src")[1].split(";")[0]
        for path in ("/health/live", "/metrics", "/openapi.json", "/static/studio/studio.js", "/nowhere"):
            assert (await client.get(path)).headers["x-content-type-options"] == "nosniff", path
        predict = await client.post("/predict", files=FILES, data=DATA)
        assert predict.headers["x-content-type-options"] == "nosniff"

    run(scenario)


def test_retry_after_covers_a_long_job_in_front() -> None:
    """One long job running, the queue full: a client that retries after Retry-After is admitted (4 of 5 at
    least), where a hint from the warm-up's batch time (2 steps) would send it back while the job still runs."""
    pipe = FakePipeline(step_s=0.03)

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        admitted = []
        hints = []
        for _ in range(5):
            long = asyncio.ensure_future(client.post("/predict", files=FILES, data={**DATA, "steps": "50"}))
            service = app.state.service
            for _ in range(500):
                if service.worker._batch_started is not None:
                    break
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(client.post("/predict", files=FILES, data={**DATA, "steps": "1"}))
            for _ in range(500):
                if service.worker.queue_depth == 1:
                    break
                await asyncio.sleep(0.01)
            refused = await client.post("/predict", files=FILES, data=DATA)
            assert refused.status_code == 429
            hint = int(refused.headers["retry-after"])
            hints.append(hint)
            await asyncio.sleep(hint)
            retry = await client.post("/predict", files=FILES, data=DATA)
            admitted.append(retry.status_code == 200)
            await asyncio.gather(long, queued)
        assert sum(admitted) >= 4, (admitted, hints)
        assert max(hints) <= 4, hints  # the work ahead (about 1.5 s), rounded up: not minutes

    run(scenario, load=lambda: pipe, max_queue=1, max_batch=1)


def flat_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (200, 100, 50, 255)).save(buf, "PNG")
    return buf.getvalue()


def test_a_reference_count_mismatch_is_refused_before_any_upload_is_read(monkeypatch: Any) -> None:
    """8 references of 4096x4096 for 2 boxes: reference_count_mismatch from the part counts alone; no upload is
    read into memory and nothing is decoded (the RSS side of this is the slow test in test_service_limits)."""
    import service.api.predict as predict_module

    reads: list[str] = []
    real_read = predict_module._read_upload

    async def counting_read(name: str, upload: Any, limit: int) -> bytes:
        reads.append(name)
        return await real_read(name, upload, limit)

    monkeypatch.setattr(predict_module, "_read_upload", counting_read)
    pipe = FakePipeline()
    prepared: list[int] = []
    real_prepare = pipe.prepare
    monkeypatch.setattr(pipe, "prepare", lambda *a, **k: prepared.append(1) or real_prepare(*a, **k))
    big = flat_png(4096)

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        prepared.clear()  # the warm-up's
        files = [("reference", (f"r{i}.png", big, "image/png")) for i in range(8)]
        files.append(("background", ("b.png", png(), "image/png")))
        response = await client.post("/predict", files=files, data={"steps": "1", "box": ["1,1,20,20", "30,1,20,20"]})
        assert response.status_code == 422 and response.json()["error"] == "reference_count_mismatch"
        assert reads == [] and prepared == []
        assert (await client.post("/predict", files=FILES, data=DATA)).status_code == 200
        assert reads and prepared  # the check itself sees reads and decodes

    run(scenario, load=lambda: pipe)
