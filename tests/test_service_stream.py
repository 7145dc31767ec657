"""``POST /predict`` with ``Accept: text/event-stream``: progress events, then the result, through real HTTP."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.server import (
    ServerProcess,
    case_a_files,
    encode_multipart,
    metric,
    raw_predict,
    tiny_model_env,
    wait_for,
)

STREAM = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_MAX_BATCH": "1", "ANYDOOR_QUEUE_TIMEOUT_S": "8"}
    with ServerProcess(env) as server:
        server.start()
        yield server


def events_of(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in response.text.split("\n\n"):
        if not frame.strip():
            continue
        fields = dict(line.split(": ", 1) for line in frame.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def stream(client: httpx.Client, data: dict[str, str], files: Any = None) -> httpx.Response:
    return client.post("/predict", files=files or case_a_files(), data=data, headers=STREAM)


@pytest.mark.slow
def test_events_in_order_then_the_same_result_as_json(client: httpx.Client) -> None:
    data = {"steps": "3", "seed": "11"}
    response = stream(client, data)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response)
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "result" and names.count("result") == 1 and "error" not in names
    assert names.index("started") < names.index("progress")
    steps = [d["step"] for name, d in events if name == "progress"]
    assert steps == [1, 2, 3] and all(d["total"] == 3 for name, d in events if name == "progress")
    result = events[-1][1]
    plain = client.post("/predict", files=case_a_files(), data=data, headers={"Accept": "application/json"}).json()
    assert base64.b64decode(result["image"]) == base64.b64decode(plain["image"])  # the same PNG, byte for byte
    assert {k: result[k] for k in ("seed", "width", "height", "regions", "boxes")} == {
        k: plain[k] for k in ("seed", "width", "height", "regions", "boxes")}
    assert set(result["timings_ms"]) == set(plain["timings_ms"])


@pytest.mark.slow
def test_queue_positions_decrease_while_waiting(server: ServerProcess, client: httpx.Client) -> None:
    ahead = [raw_predict(server.url, case_a_files(), {"steps": "2"}) for _ in range(2)]
    try:
        wait_for(lambda: metric(client.get("/metrics").text, "anydoor_queue_depth") >= 1)
        events = events_of(stream(client, {"steps": "1"}))
    finally:
        for sock in ahead:
            sock.close()
    positions = [d["position"] for name, d in events if name == "queued"]
    assert len(positions) >= 2 and positions == sorted(positions, reverse=True) and positions[-1] == 1
    assert len(set(positions)) == len(positions)  # sent when the position changes, not repeated
    assert events[-1][0] == "result"


@pytest.mark.slow
def test_admission_and_validation_errors_keep_their_status(client: httpx.Client) -> None:
    bad = stream(client, {"steps": "0"})
    assert bad.status_code == 422 and bad.json()["error"] == "out_of_range"
    empty = stream(client, {"box": "1,1,1,1"}, files=case_a_files(mask=False))
    assert empty.status_code == 422 and empty.json()["field"] == "box"


@pytest.mark.slow
def test_a_failure_after_the_stream_started_is_an_error_event(server: ServerProcess, client: httpx.Client) -> None:
    """Queue timeout 8 s: a request behind a long one gets its queued events, then an error event (504's body)."""
    long = raw_predict(server.url, case_a_files(), {"steps": "1000"})
    try:
        wait_for(lambda: metric(client.get("/metrics").text, "anydoor_running_jobs") == 1)
        response = stream(client, {"steps": "1"})
    finally:
        long.close()
    assert response.status_code == 200
    events = events_of(response)
    assert events[0][0] == "queued" and events[-1][0] == "error"
    body = events[-1][1]
    assert body["error"] == "queue_timeout" and body["request_id"] == response.headers["x-request-id"]
    assert set(body) >= {"error", "field", "message", "request_id"}
    wait_for(lambda: metric(client.get("/metrics").text, "anydoor_running_jobs") == 0)


@pytest.mark.slow
def test_closing_the_stream_cancels_the_job(server: ServerProcess, client: httpx.Client) -> None:
    before = metric(client.get("/metrics").text, "anydoor_requests_failed_total", reason="cancelled")
    request = encode_multipart(server.url, case_a_files(), {"steps": "300"}, STREAM)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(request)
    received = b""
    while b"event: progress" not in received:
        received += sock.recv(65536)
    sock.close()  # the client goes away mid-generation
    started = time.monotonic()
    wait_for(lambda: metric(client.get("/metrics").text, "anydoor_running_jobs") == 0, timeout=30)
    assert time.monotonic() - started < 20  # stopped at a step, not after 300 of them
    steps = metric(client.get("/metrics").text, "anydoor_denoising_steps_total")
    time.sleep(1.0)
    assert metric(client.get("/metrics").text, "anydoor_denoising_steps_total") == steps  # nothing runs on
    assert metric(client.get("/metrics").text, "anydoor_requests_failed_total", reason="cancelled") > before


@pytest.mark.slow
def test_many_streams_at_once_all_end_with_one_result(client: httpx.Client, server: ServerProcess) -> None:
    results: list[list[str]] = []

    def one(seed: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results.append([n for n, _ in events_of(stream(c, {"steps": "1", "seed": str(seed)}))])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r[-1] == "result" and r.count("result") == 1 for r in results)
