"""The app in-process with a fake pipeline: failure paths a real model on a CPU cannot produce on demand.

The ASGI app runs with its lifespan (the GPU worker thread starts and stops) under ``httpx.ASGITransport``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model.errors import Cancelled, CheckpointError
from model.imaging.decode import load_image
from model.pipeline import GenerationInputs, GenerationParams, GenerationResult, Job
from service.api.predict import wants_json
from service.app import create_app
from service.settings import Settings
from tests.support.server import metric, server_timing

OOM_GUIDANCE = 13.0  # the fake pipeline runs out of GPU memory for this guidance scale
BUG_GUIDANCE = 14.0  # ... and fails with a bug for this one


class FakePipeline:
    is_demo = True
    weights_name = "fake"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s
        self.batches: list[int] = []

    def prepare(self, inputs: GenerationInputs, params: GenerationParams, *, limits: Any = None) -> Job:
        image = load_image(inputs.background, field="background")
        params = params.with_seed(7 if params.seed is None else params.seed)
        return Job(params, image, (None,), ((0, 0, 1, 1),), torch.zeros(1), 0.001)  # type: ignore[arg-type]

    def run(self, jobs: Sequence[Job], *, progress: Any = None, should_cancel: Any = None) -> list[GenerationResult]:
        self.batches.append(len(jobs))
        params = jobs[0].params
        if params.guidance_scale == OOM_GUIDANCE:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if params.guidance_scale == BUG_GUIDANCE:
            raise ZeroDivisionError("a bug")
        for step in range(params.steps):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled before step {step + 1}")
            time.sleep(self.step_s)
            if progress is not None:
                progress(step + 1, params.steps, 0)
        timings = {"preprocess": 0.001, "encode": 0.002, "sample": 0.003, "decode": 0.004, "postprocess": 0.005}
        return [GenerationResult(Image.fromarray(j.background), j.seed, timings, 1, True) for j in jobs]


def png(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


FILES = {"reference": ("r.png", png(mode="RGBA"), "image/png"), "background": ("b.png", png(), "image/png")}
DATA = {"steps": "2", "box": "4,4,20,20"}

Scenario = Callable[[httpx.AsyncClient, Any], Awaitable[None]]


def run(scenario: Scenario, *, pipe: FakePipeline | None = None, load: Callable[[], Any] | None = None,
        wait_ready: bool = True, **settings: Any) -> None:
    """Run ``scenario(client, app)`` against the app, inside its lifespan (once the model is ready); async
    predictions keep their store in memory unless ``job_store`` says otherwise."""
    pipe = pipe or FakePipeline()
    settings.setdefault("job_store", ":memory:")
    app = create_app(Settings(demo=True, **settings), load=load or (lambda: pipe))

    async def main() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                if wait_ready:
                    await wait_until(lambda: app.state.service.ready)
                await scenario(client, app)

    asyncio.run(main())


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_out_of_memory_fails_only_that_request() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        oom = await client.post("/predict", files=FILES, data={**DATA, "guidance_scale": str(OOM_GUIDANCE)})
        assert oom.status_code == 503 and oom.json()["error"] == "gpu_out_of_memory"
        assert oom.headers["retry-after"] == "1"
        bug = await client.post("/predict", files=FILES, data={**DATA, "guidance_scale": str(BUG_GUIDANCE)})
        assert bug.status_code == 500 and bug.json()["error"] == "internal_error"
        after = await client.post("/predict", files=FILES, data=DATA)
        assert after.status_code == 200  # the worker carries on
        text = (await client.get("/metrics")).text
        assert metric(text, "anydoor_requests_failed_total", reason="oom") == 1
        assert metric(text, "anydoor_requests_failed_total", reason="internal") == 1
        assert metric(text, "anydoor_running_jobs") == 0

    run(scenario)


def test_a_chunked_upload_is_cut_off_at_the_body_limit() -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="reference"; filename="r.png"\r\n\r\n'
        for _ in range(200):  # 12.5 MiB if it were all read
            sent += 65536
            yield b"\0" * 65536

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        response = await client.post("/predict", content=body(),
                                     headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large" and response.json()["field"] == "body"
        assert sent <= 5 * 1024 * 1024 + 65536  # 4 x 1 MiB + 1 MiB, then it stopped reading
        text = (await client.get("/metrics")).text
        assert metric(text, "anydoor_requests_failed_total", reason="validation") == 1

    run(scenario, max_upload_mb=1.0)


def test_demo_mode_labels_its_outputs() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        response = await client.post("/predict", files=FILES, data=DATA)
        assert response.status_code == 200 and response.headers["x-anydoor-demo"] == "true"
        assert "DEMO" in Image.open(io.BytesIO(response.content)).text["anydoor:model"]
        as_json = await client.post("/predict", files=FILES, data=DATA, headers={"Accept": "application/json"})
        assert as_json.json()["demo"] is True
        ready = (await client.get("/health/ready")).json()
        assert ready["model"]["demo"] is True

    run(scenario)


def test_not_ready_until_loaded_then_ready() -> None:
    release = threading.Event()

    def slow_load() -> FakePipeline:
        release.wait(10)
        return FakePipeline()

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        assert (await client.get("/health/live")).status_code == 200
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "starting"
        assert (await client.get("/health-check")).json()["status"] == "STARTING"
        refused = await client.post("/predict", files=FILES, data=DATA)
        assert refused.status_code == 503 and refused.json()["error"] == "not_ready"
        assert refused.headers["retry-after"] == "5"
        release.set()
        await wait_until(lambda: app.state.service.ready)
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.get("/health-check")).json()["status"] == "READY"
        assert (await client.post("/predict", files=FILES, data=DATA)).status_code == 200
        text = (await client.get("/metrics")).text
        assert metric(text, "anydoor_requests_failed_total", reason="unavailable") == 1
        # Refused by the gate before routing, and still counted under its route.
        assert metric(text, "anydoor_http_request_duration_seconds_count", route="/predict", status="503") == 1
        assert metric(text, "anydoor_http_request_duration_seconds_count", route="unmatched") == 0

    run(scenario, load=slow_load, wait_ready=False)


def test_setup_failure_is_reported() -> None:
    def broken() -> FakePipeline:
        raise CheckpointError("model.safetensors: missing key 'model.diffusion_model.out.2.weight'")

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        await wait_until(lambda: app.state.service.readiness() == "setup_failed")
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and "missing key" in ready.json()["error"]
        cog = (await client.get("/health-check")).json()
        assert cog["status"] == "SETUP_FAILED" and "missing key" in cog["setup"]["logs"]
        refused = await client.post("/predict", files=FILES, data=DATA)
        assert refused.status_code == 503 and refused.json()["error"] == "setup_failed"

    run(scenario, load=broken, wait_ready=False)


def test_draining_refuses_new_requests() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        app.state.service.begin_drain()
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert (await client.get("/health-check")).json()["status"] == "BUSY"
        refused = await client.post("/predict", files=FILES, data=DATA)
        assert refused.status_code == 503 and refused.json()["error"] == "draining"
        assert (await client.get("/health/live")).status_code == 200

    run(scenario)


def test_the_worker_takes_one_job_at_a_time_and_answers_each_request() -> None:
    pipe = FakePipeline(step_s=0.01)

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        responses = await asyncio.gather(*[
            client.post("/predict", files=FILES, data={**DATA, "seed": str(i)}) for i in range(6)
        ])
        assert [r.status_code for r in responses] == [200] * 6
        assert [r.headers["x-seed"] for r in responses] == [str(i) for i in range(6)]
        assert pipe.batches == [1] * 7  # the warm-up, then one job at a time

    run(scenario, load=lambda: pipe, max_queue=8, max_batch=1)


def test_the_worker_batches_compatible_queued_jobs_up_to_max_batch() -> None:
    pipe = FakePipeline(step_s=0.01)

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        responses = await asyncio.gather(*[
            client.post("/predict", files=FILES, data={**DATA, "seed": str(i)}) for i in range(6)
        ])
        assert [r.status_code for r in responses] == [200] * 6
        assert [r.headers["x-seed"] for r in responses] == [str(i) for i in range(6)]  # each its own result
        assert pipe.batches[0] == 1 and sum(pipe.batches[1:]) == 6  # the warm-up, then the six requests
        assert max(pipe.batches[1:]) == 3 and len(pipe.batches) <= 4  # batches of up to 3, not one by one
        metrics = (await client.get("/metrics")).text
        assert "anydoor_batch_size_count" in metrics

    run(scenario, load=lambda: pipe, max_queue=8, max_batch=3, max_batch_delay_ms=200)


def test_a_worker_bug_outside_the_pipeline_does_not_stop_the_service() -> None:
    class ShortPipeline(FakePipeline):
        def run(self, jobs: Sequence[Job], **kwargs: Any) -> list[GenerationResult]:
            results = super().run(jobs, **kwargs)
            return results[:1] if len(self.batches) == 2 else results  # the first real batch loses a result

    pipe = ShortPipeline()

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        first = await asyncio.gather(*[client.post("/predict", files=FILES, data=DATA) for _ in range(2)])
        assert sorted(r.status_code for r in first) in ([200, 200], [500, 500])
        after = await client.post("/predict", files=FILES, data=DATA)
        assert after.status_code == 200  # the worker thread is still alive

    run(scenario, load=lambda: pipe, max_queue=8, max_batch=2, max_batch_delay_ms=200)


def test_request_ids_are_echoed_only_when_plain() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        plain = await client.get("/health/live", headers={"X-Request-ID": "abc-123_x.y"})
        assert plain.headers["x-request-id"] == "abc-123_x.y"
        odd = await client.get("/health/live", headers={"X-Request-ID": "a b\tc" + "x" * 200})
        assert odd.headers["x-request-id"] != "a b\tc" + "x" * 200 and len(odd.headers["x-request-id"]) == 32

    run(scenario)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", False),
        ("*/*", False),
        ("image/png", False),
        ("application/json", True),
        ("application/json, */*;q=0.8", True),
        ("image/png, application/json", False),
        ("image/png;q=0.5, application/json", True),
        ("*/*, application/json;q=0.5", False),
        ("application/json;q=0", False),
    ],
)
def test_content_negotiation(accept: str, expected: bool) -> None:
    assert wants_json(accept) is expected


def test_warm_up_inputs_make_a_valid_request() -> None:
    from model.pipeline.warmup import warmup_request

    inputs, params = warmup_request(2)
    reference, background = inputs.reference, inputs.background
    assert isinstance(reference, np.ndarray) and isinstance(background, np.ndarray) and inputs.boxes
    assert params.steps == 2 and params.seed == 0
    assert reference.shape[2] == 4 and reference[..., 3].any() and not reference[..., 3].all()
    (x, y, w, h), = inputs.boxes
    assert x + w <= background.shape[1] and y + h <= background.shape[0]
    assert np.ptp(background) > 0


class CandidatePipeline(FakePipeline):
    """Candidates k = 0..n-1 with seed + k, scored so that the last is the best."""

    def prepare_candidates(self, inputs: GenerationInputs, params: GenerationParams, *,
                           limits: Any = None) -> list[Job]:
        first = self.prepare(inputs, params, limits=limits)
        return [self.prepare(inputs, params.with_seed(first.seed + k), limits=limits)
                for k in range(params.num_outputs)]

    def run(self, jobs: Sequence[Job], *, progress: Any = None, should_cancel: Any = None) -> list[GenerationResult]:
        from dataclasses import replace

        from model.pipeline.result import Scores

        return [replace(r, scores=Scores((r.seed / 100,), 30.0))
                for r in super().run(jobs, progress=progress, should_cancel=should_cancel)]


def test_an_image_answer_encodes_the_best_candidate_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """num_outputs=3: the JSON answer encodes all three, best first; an image answer (the best alone) encodes
    one image, not three."""
    encoded: list[int] = []
    real_encode = GenerationResult.encode

    def counting_encode(self: GenerationResult, *args: Any, **kwargs: Any) -> bytes:
        encoded.append(self.seed)
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(GenerationResult, "encode", counting_encode)

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        data = {**DATA, "seed": "10", "num_outputs": "3"}
        body = (await client.post("/predict", files=FILES, data=data, headers={"Accept": "application/json"})).json()
        assert [c["seed"] for c in body["candidates"]] == [12, 11, 10] and body["seed"] == 12
        assert sorted(encoded) == [10, 11, 12]
        encoded.clear()
        image = await client.post("/predict", files=FILES, data=data, headers={"Accept": "image/png"})
        assert image.status_code == 200 and image.headers["x-seed"] == "12"
        assert base64.b64decode(body["image"]) == image.content
        assert encoded == [12]

    run(scenario, pipe=CandidatePipeline())


def test_the_answers_image_encoding_is_its_own_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image encode (output_format) is timed as ``output``: postprocess keeps the pipeline's own time."""
    real_encode = GenerationResult.encode

    def slow_encode(self: GenerationResult, *args: Any, **kwargs: Any) -> bytes:
        time.sleep(0.2)
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(GenerationResult, "encode", slow_encode)

    async def scenario(client: httpx.AsyncClient, app: Any) -> None:
        body = (await client.post("/predict", files=FILES, data=DATA, headers={"Accept": "application/json"})).json()
        assert body["timings_ms"]["output"] >= 200 and body["timings_ms"]["postprocess"] == 5.0
        image = await client.post("/predict", files=FILES, data={**DATA, "output_format": "jpeg"})
        stages = server_timing(image.headers["server-timing"])
        assert stages["output"] >= 200 and list(stages)[-2:] == ["output", "total"]
        text = (await client.get("/metrics")).text
        assert metric(text, "anydoor_inference_stage_seconds_count", stage="output") == 2

    run(scenario)
