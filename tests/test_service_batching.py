"""Dynamic batching: concurrent compatible requests run as one batch and each gets the image it gets alone."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from model.pipeline.run import AnyDoorPipeline
from tests.support.server import CASE_A, ServerProcess, case_a_files, metric, tiny_model_env

REQUESTS = [
    {"seed": 11, "guidance_scale": 4.5, "control_strength": 1.0},
    {"seed": 12, "guidance_scale": 1.0, "control_strength": 0.5},
    {"seed": 13, "guidance_scale": 2.0, "control_strength": 0.0},
    {"seed": 14, "guidance_scale": 7.0, "control_strength": 1.5},
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # A long batch delay makes the batch deterministic: the first job waits for the three others to arrive.
    env = {**tiny_model_env(), "ANYDOOR_MAX_BATCH": "4", "ANYDOOR_MAX_BATCH_DELAY_MS": "1000",
           "ANYDOOR_MAX_QUEUE": "8"}
    with ServerProcess(env).start() as proc:
        yield proc


def _predict(url: str, params: dict[str, object]) -> httpx.Response:
    data = {"steps": "2", **{k: str(v) for k, v in params.items()}}
    return httpx.post(f"{url}/predict", files=case_a_files(), data=data, timeout=300)


@pytest.mark.slow
def test_concurrent_requests_share_one_batch_and_match_solo_images(server: ServerProcess) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        responses = list(pool.map(lambda p: _predict(server.url, p), REQUESTS))
    assert [r.status_code for r in responses] == [200] * len(REQUESTS)
    after = httpx.get(f"{server.url}/metrics").text
    batches = metric(after, "anydoor_batch_size_count") - metric(before, "anydoor_batch_size_count")
    jobs = metric(after, "anydoor_batch_size_sum") - metric(before, "anydoor_batch_size_sum")
    assert (batches, jobs) == (1, len(REQUESTS))

    pipe = AnyDoorPipeline.from_pretrained(CASE_A / "model.safetensors", CASE_A / "model.yaml", device="cpu")
    for params, response in zip(REQUESTS, responses, strict=True):
        assert response.headers["x-seed"] == str(params["seed"])
        served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)
        alone = pipe(CASE_A / "reference.png", CASE_A / "background.png",
                     background_mask=CASE_A / "background_mask.png", steps=2, **params)  # type: ignore[arg-type]
        assert np.abs(served - np.asarray(alone.image, dtype=np.int16)).max() <= 1, params


@pytest.mark.slow
def test_requests_with_other_step_counts_are_not_batched_together(server: ServerProcess) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    params = [{"seed": 1, "steps": 2}, {"seed": 2, "steps": 3}]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(
            lambda p: httpx.post(f"{server.url}/predict", files=case_a_files(),
                                 data={k: str(v) for k, v in p.items()}, timeout=300), params))
    assert [r.status_code for r in responses] == [200, 200]
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "anydoor_batch_size_count") - metric(before, "anydoor_batch_size_count") == 2
