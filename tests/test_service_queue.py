"""The GPU queue over real HTTP: overload (429) and client disconnects."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.server import (
    ServerProcess,
    case_a_files,
    metric,
    raw_predict,
    read_response,
    tiny_model_env,
    wait_for,
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess({**tiny_model_env(), "ANYDOOR_MAX_QUEUE": "2", "ANYDOOR_WARMUP_STEPS": "1"}) as proc:
        proc.start()
        yield proc


def metrics(client: httpx.Client) -> str:
    return client.get("/metrics").text


@pytest.mark.slow
def test_overload_answers_429_with_retry_after_and_counts_it(server: ServerProcess, client: httpx.Client) -> None:
    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=120.0) as own:
            return own.post("/predict", files=case_a_files(), data={"steps": "1", "guidance_scale": "1"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"] == "overloaded"
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert response.headers["content-type"] == "image/png"
    text = metrics(client)
    assert metric(text, "anydoor_http_request_duration_seconds_count", route="/predict",
                  status="429") == statuses.count(429)
    assert metric(text, "anydoor_http_request_duration_seconds_count", route="/predict",
                  status="200") == statuses.count(200)
    assert metric(text, "anydoor_requests_failed_total", reason="overloaded") == statuses.count(429)
    assert metric(text, "anydoor_queue_depth") == 0


@pytest.mark.slow
def test_disconnected_clients_leave_the_queue_and_stop_the_worker(server: ServerProcess,
                                                                  client: httpx.Client) -> None:
    steps = lambda: metric(metrics(client), "anydoor_denoising_steps_total")  # noqa: E731
    cancelled_before = metric(metrics(client), "anydoor_requests_failed_total", reason="cancelled")
    before = steps()
    running = raw_predict(server.url, case_a_files(), {"steps": "500"})  # minutes of work on a CPU
    wait_for(lambda: steps() > before)

    queued = raw_predict(server.url, case_a_files(), {"steps": "1"})
    wait_for(lambda: metric(metrics(client), "anydoor_queue_depth") == 1)
    queued.close()  # while waiting in the queue: taken out of it
    wait_for(lambda: metric(metrics(client), "anydoor_queue_depth") == 0, timeout=30)
    assert metric(metrics(client), "anydoor_running_jobs") == 1

    running.close()  # while generating: stopped before its next denoising step
    closed_at = steps()
    wait_for(lambda: metric(metrics(client), "anydoor_running_jobs") == 0, timeout=30)
    assert steps() - closed_at <= 2  # the step under way when the disconnect was noticed, and no more

    follow_up = raw_predict(server.url, case_a_files(), {"steps": "1"})
    status, headers, body = read_response(follow_up)
    follow_up.close()
    assert status == 200 and body.startswith(b"\x89PNG")
    text = metrics(client)
    assert metric(text, "anydoor_requests_failed_total", reason="cancelled") == cancelled_before + 2
    assert metric(text, "anydoor_queue_depth") == 0
    assert metric(text, "anydoor_in_flight_requests") == 0
    assert metric(text, "anydoor_running_jobs") == 0
