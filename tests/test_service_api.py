"""The HTTP API over real HTTP: one uvicorn server per module on 127.0.0.1, serving the tiny reference weights."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model.diffusion.samplers import SAMPLERS
from tests.support.server import (
    CASE_A,
    ServerProcess,
    case_a_files,
    metric,
    raw_predict,
    read_response,
    server_timing,
    tiny_model_env,
    wait_for,
)

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STAGES = ["queue", "preprocess", "encode", "sample", "decode", "postprocess", "score", "output", "total"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {
        **tiny_model_env(),
        "ANYDOOR_API_KEY": API_KEY,
        "ANYDOOR_MAX_UPLOAD_MB": "1",
        "ANYDOOR_MAX_PIXELS": "1000000",
        "ANYDOOR_QUEUE_TIMEOUT_S": "2",
        "ANYDOOR_MAX_QUEUE": "4",
        "ANYDOOR_WARMUP_STEPS": "3",
    }
    with ServerProcess(env) as proc:
        proc.start()
        yield proc


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def predict(client: httpx.Client, files: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
            headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post("/predict", files=files if files is not None else case_a_files(),
                       data={"steps": "2", **(data or {})}, headers={**AUTH, **(headers or {})})


def assert_error(response: httpx.Response, status: int, code: str, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code, body
    assert body["field"] == field, body
    if field is not None:
        assert field in body["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# --- start-up and health ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_readiness_is_503_until_warm_up_passed_then_200(server: ServerProcess, client: httpx.Client) -> None:
    assert server.ready_statuses[0] == 503 and server.ready_statuses[-1] == 200, server.ready_statuses
    assert server.cog_statuses[0] == "STARTING" and server.cog_statuses[-1] == "READY", server.cog_statuses
    assert "warm-up generation (3 steps) passed" in server.log()
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["model"] == {"weights": "model.safetensors", "device": "cpu", "dtype": "fp32",
                                     "demo": False, "mask_refiner": False}
    assert client.get("/health/live").json() == {"status": "alive"}
    cog = client.get("/health-check").json()
    assert cog["status"] == "READY" and cog["setup"]["status"] == "succeeded"


# --- success ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_png_with_headers_same_seed_same_bytes_and_json_variant(client: httpx.Client) -> None:
    background = Image.open(io.BytesIO(case_a_files()["background"][1]))
    first = predict(client, data={"seed": "1234"}, headers={"X-Request-ID": "client-id-1"})
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-request-id"] == "client-id-1"
    assert first.headers["x-seed"] == "1234"
    assert "x-anydoor-demo" not in first.headers
    timing = server_timing(first.headers["server-timing"])
    assert list(timing) == STAGES
    assert all(value >= 0 for value in timing.values())
    assert timing["sample"] > 0 and timing["total"] >= timing["sample"] + timing["decode"]
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "PNG" and image.size == background.size and image.mode == "RGB"
    assert image.text["anydoor:seed"] == "1234"

    second = predict(client, data={"seed": "1234"})
    assert second.status_code == 200
    assert second.headers["x-request-id"] != "client-id-1"  # a fresh id when the client sends none
    assert second.content == first.content

    as_json = predict(client, data={"seed": "1234"}, headers={"Accept": "application/json"})
    assert as_json.status_code == 200
    assert as_json.headers["content-type"] == "application/json"
    body = as_json.json()
    assert base64.b64decode(body["image"]) == first.content
    assert body["seed"] == 1234 and body["media_type"] == "image/png"
    assert (body["width"], body["height"]) == background.size
    assert body["regions"] == 1 and body["demo"] is False
    assert body["request_id"] == as_json.headers["x-request-id"]
    assert list(body["timings_ms"]) == STAGES
    assert as_json.headers["x-seed"] == "1234" and "server-timing" in as_json.headers
    scores = body["scores"]
    assert len(scores["region_identity"]) == 1 and -1 <= scores["identity"] <= 1
    assert scores["identity"] == pytest.approx(scores["region_identity"][0], abs=1e-6)
    # The background PSNR, recomputed here from what was sent and what came back, outside the mask's region.
    result = np.asarray(image.convert("RGB"), dtype=np.float64)
    sent = np.asarray(background.convert("RGB"), dtype=np.float64)
    outside = np.asarray(Image.open(CASE_A / "background_mask.png").convert("L")) <= 128
    mse = ((result - sent)[outside] ** 2).mean()
    assert scores["background_psnr"] == pytest.approx(10 * np.log10(255**2 / mse), abs=0.01)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "media", "pil"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
def test_output_format_sets_the_type_and_keeps_the_seed(client: httpx.Client, fmt: str, media: str, pil: str) -> None:
    from model.pipeline.result import read_metadata

    response = predict(client, data={"seed": "77", "output_format": fmt, "output_quality": "70"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media
    image = Image.open(io.BytesIO(response.content))
    assert image.format == pil and read_metadata(image)["anydoor:seed"] == "77"
    as_json = predict(client, data={"seed": "77", "output_format": fmt, "output_quality": "70"},
                      headers={"Accept": "application/json"})
    body = as_json.json()
    assert body["media_type"] == media and base64.b64decode(body["image"]) == response.content
    refused = predict(client, data={"output_format": "gif"})
    assert_error(refused, 422, "invalid_parameter", "output_format")


@pytest.mark.slow
def test_candidates_are_ranked_and_each_reproducible(client: httpx.Client) -> None:
    response = predict(client, data={"seed": "50", "num_outputs": "3"}, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    body = response.json()
    candidates = body["candidates"]
    assert sorted(c["seed"] for c in candidates) == [50, 51, 52]
    identity = [c["scores"]["identity"] for c in candidates]
    assert identity == sorted(identity, reverse=True) and all(-1 <= v <= 1 for v in identity)
    assert all(c["scores"]["background_psnr"] > 0 for c in candidates)
    assert body["image"] == candidates[0]["image"] and body["seed"] == candidates[0]["seed"]
    assert response.headers["x-seed"] == str(candidates[0]["seed"])
    best = predict(client, data={"seed": "50", "num_outputs": "3"})  # an image answer: the best one
    assert best.headers["x-seed"] == str(candidates[0]["seed"])
    second = candidates[1]
    single = predict(client, data={"seed": str(second["seed"])})
    assert single.status_code == 200 and "candidates" not in single.headers
    a = np.asarray(Image.open(io.BytesIO(single.content)), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(second["image"]))), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    one = predict(client, data={"seed": "50"}, headers={"Accept": "application/json"}).json()
    assert one["candidates"] is None
    assert_error(predict(client, data={"num_outputs": "9"}), 422, "out_of_range", "num_outputs")


@pytest.mark.slow
def test_boxes_and_a_random_seed(client: httpx.Client) -> None:
    files = case_a_files(mask=False)
    response = client.post("/predict", files=files, headers={**AUTH, "Accept": "application/json"},
                           data={"steps": "1", "box": ["40,60,160,200", "380,100,150,180"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["regions"] == 2
    assert 0 <= body["seed"] < 2**63 and response.headers["x-seed"] == str(body["seed"])
    original = np.asarray(Image.open(io.BytesIO(files["background"][1])).convert("RGB"))
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))))
    assert out.shape == original.shape
    # Outside the (slightly expanded) boxes the background is kept byte for byte.
    assert np.array_equal(out[:, 560:], original[:, 560:]) and np.array_equal(out[320:], original[320:])
    assert not np.array_equal(out[60:260, 40:200], original[60:260, 40:200])


@pytest.mark.slow
def test_dpm_solver_sampler(client: httpx.Client) -> None:
    data = {"steps": "2", "seed": "9"}
    ddim = client.post("/predict", files=case_a_files(), headers=AUTH, data=data)
    dpm = client.post("/predict", files=case_a_files(), headers=AUTH, data={**data, "sampler": "dpmpp_2m"})
    assert ddim.status_code == dpm.status_code == 200, dpm.text
    assert Image.open(io.BytesIO(dpm.content)).size == (640, 480)
    assert ddim.content != dpm.content


# --- rejections -----------------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    data = case_a_files()["background"][1]
    return data[: len(data) // 2]


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header announces width x height pixels (10 G): rejected before any decoding."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(
        b"IEND", b"")


def _with(**replacements: bytes) -> dict[str, Any]:
    files: dict[str, Any] = case_a_files()
    for name, data in replacements.items():
        files[name] = (f"{name}.png", data, "image/png")
    return files


_BLACK_MASK = png_bytes(Image.new("L", (640, 480), 0))
_SMALL_MASK = png_bytes(Image.new("L", (320, 240), 255))
_BIG_IMAGE = png_bytes(Image.new("RGB", (1200, 1000), (90, 120, 150)))  # 1.2 MP > ANYDOOR_MAX_PIXELS
_NOISE = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
_OVERSIZED = png_bytes(Image.fromarray(_NOISE))  # ~1.4 MiB > ANYDOOR_MAX_UPLOAD_MB, < the body limit

REJECTIONS = {
    "not_an_image": (_with(reference=b"this is not an image"), {}, 422, "not_an_image", "reference"),
    "truncated": (_with(background=_truncated_png()), {}, 422, "truncated_image", "background"),
    "too_many_pixels": (_with(background=_BIG_IMAGE), {}, 422, "too_many_pixels", "background"),
    "decompression_bomb": (_with(reference=_bomb_png()), {}, 422, "too_many_pixels", "reference"),
    "upload_over_limit": (_with(background_mask=_OVERSIZED), {}, 413, "payload_too_large", "background_mask"),
    "empty_mask": (_with(background_mask=_BLACK_MASK), {}, 422, "empty_mask", "background_mask"),
    "mask_size_differs": (_with(background_mask=_SMALL_MASK), {}, 422, "size_mismatch", "background_mask"),
    "steps_out_of_range": (case_a_files(), {"steps": "0"}, 422, "out_of_range", "steps"),
    "guidance_out_of_range": (case_a_files(), {"guidance_scale": "31"}, 422, "out_of_range", "guidance_scale"),
    "control_not_a_number": (case_a_files(), {"control_strength": "strong"}, 422, "invalid_parameter",
                             "control_strength"),
    "seed_negative": (case_a_files(), {"seed": "-1"}, 422, "out_of_range", "seed"),
    "unknown_sampler": (case_a_files(), {"sampler": "euler"}, 422, "invalid_parameter", "sampler"),
    "missing_background": ({"reference": case_a_files()["reference"]}, {"box": "1,1,50,50"}, 422, "missing_field",
                           "background"),
    "bad_box": (case_a_files(mask=False), {"box": "10,10,100"}, 422, "invalid_box", "box"),
    "box_outside": (case_a_files(mask=False), {"box": "600,400,100,100"}, 422, "box_out_of_image", "box"),
    "mask_and_box": (case_a_files(), {"box": "10,10,100,100"}, 422, "conflicting_target", "background_mask"),
    "no_target": (case_a_files(mask=False), {}, 422, "missing_target", "background_mask"),
    "unknown_field": (case_a_files(), {"num_steps": "1"}, 422, "unknown_field", "num_steps"),
    "empty_value": (case_a_files(), {"steps": ""}, 422, "invalid_parameter", "steps"),
    "underscored_number": (case_a_files(), {"steps": "1_0"}, 422, "invalid_parameter", "steps"),
    "file_as_text": (case_a_files(), {"reference_mask": "x"}, 422, "invalid_parameter", "reference_mask"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REJECTIONS, ids=list(REJECTIONS))
def test_rejections_name_the_field(client: httpx.Client, case: str) -> None:
    files, data, status, code, field = REJECTIONS[case]
    assert_error(predict(client, files=files, data=data), status, code, field)


@pytest.mark.slow
def test_the_whole_body_is_limited_by_content_length_before_reading(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                     + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000000\r\n\r\n")
        status, headers, body = read_response(sock, timeout=10)
    assert status == 413 and b'"payload_too_large"' in body and b'"field":"body"' in body


@pytest.mark.slow
def test_api_key_is_required_for_predict_only(client: httpx.Client) -> None:
    no_key = client.post("/predict", files=case_a_files(), data={"steps": "1"})
    assert_error(no_key, 401, "unauthorized", "Authorization")
    assert no_key.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/predict", files=case_a_files(), data={"steps": "1"},
                        headers={"Authorization": f"Bearer {API_KEY}x"})
    assert_error(wrong, 401, "unauthorized", "Authorization")
    for path in ("/health/live", "/health/ready", "/health-check", "/metrics"):
        assert client.get(path).status_code == 200, path


@pytest.mark.slow
def test_queue_timeout_gives_504_and_a_closed_client_frees_the_worker(server: ServerProcess,
                                                                       client: httpx.Client) -> None:
    steps_before = metric(client.get("/metrics").text, "anydoor_denoising_steps_total")
    slow = raw_predict(server.url, case_a_files(), {"steps": "200"}, AUTH)  # minutes of work on a CPU
    try:
        wait_for(lambda: metric(client.get("/metrics").text, "anydoor_denoising_steps_total") > steps_before)
        started = time.monotonic()
        waiting = predict(client, data={"steps": "1"})
        assert_error(waiting, 504, "queue_timeout", None)
        assert 1.9 < time.monotonic() - started < 15
    finally:
        slow.close()
    wait_for(lambda: metric(client.get("/metrics").text, "anydoor_running_jobs") == 0)
    assert predict(client, data={"steps": "1"}).status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "anydoor_requests_failed_total", reason="timeout") == 1
    assert metric(text, "anydoor_requests_failed_total", reason="cancelled") == 1


# --- metrics and schema ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_metrics_count_requests_failures_and_stages(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert metric(text, "anydoor_http_request_duration_seconds_count", route="/predict", status="200") >= 4
    assert metric(text, "anydoor_http_request_duration_seconds_count", route="/predict", status="422") >= 10
    assert metric(text, "anydoor_requests_failed_total", reason="validation") >= len(REJECTIONS)
    assert metric(text, "anydoor_requests_failed_total", reason="unauthorized") >= 2
    assert metric(text, "anydoor_requests_failed_total", reason="oom") == 0
    for stage in ("preprocess", "encode", "sample", "decode", "postprocess", "score", "output"):
        assert metric(text, "anydoor_inference_stage_seconds_count", stage=stage) >= 4, stage
    assert metric(text, "anydoor_inference_duration_seconds_count") >= 4
    assert metric(text, "anydoor_queue_wait_seconds_count") >= 4
    assert metric(text, "anydoor_denoising_steps_total") >= 7
    assert metric(text, "anydoor_queue_depth") == 0
    assert metric(text, "anydoor_in_flight_requests") == 0
    assert metric(text, "anydoor_ready") == 1
    assert metric(text, "anydoor_model_info", weights="model.safetensors", device="cpu", dtype="fp32") == 1


@pytest.mark.slow
def test_openapi_describes_the_predict_api(client: httpx.Client) -> None:
    assert_error(client.get("/openapi.json"), 401, "unauthorized", "Authorization")  # only health/metrics are open
    schema = client.get("/openapi.json", headers=AUTH).json()
    operation = schema["paths"]["/predict"]["post"]
    body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"reference", "reference_mask", "background", "background_mask", "box", "steps", "guidance_scale",
            "control_strength", "shape_control", "seed", "sampler"} <= set(body["properties"])
    assert set(body["properties"]["sampler"]["enum"]) == set(SAMPLERS)
    assert set(body["required"]) == {"reference", "background"}
    assert body["properties"]["steps"]["minimum"] == 1 and body["properties"]["steps"]["maximum"] == 1000
    ok = operation["responses"]["200"]
    assert set(ok["content"]) == {"image/png", "image/jpeg", "image/webp", "application/json", "text/event-stream"}
    assert {"X-Request-ID", "X-Seed", "Server-Timing"} <= set(ok["headers"])
    assert {"401", "413", "422", "429", "503", "504"} <= set(operation["responses"])
    assert "PredictResponse" in schema["components"]["schemas"]
    assert {"/health/live", "/health/ready", "/health-check", "/metrics"} <= set(schema["paths"])


@pytest.mark.slow
def test_unknown_routes_answer_json(client: httpx.Client) -> None:
    assert_error(client.get("/nope"), 401, "unauthorized", "Authorization")  # no route list for strangers
    assert_error(client.get("/nope", headers=AUTH), 404, "not_found", None)
    assert_error(client.get("/predict", headers=AUTH), 405, "method_not_allowed", None)


@pytest.mark.slow
def test_requests_are_served_concurrently_with_health_checks(server: ServerProcess, client: httpx.Client) -> None:
    """Generation runs on the worker thread: the event loop answers health checks meanwhile."""
    result: dict[str, int] = {}

    def run() -> None:
        result["status"] = predict(client, data={"steps": "3"}).status_code

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: metric(client.get("/metrics").text, "anydoor_running_jobs") == 1)
    assert metric(client.get("/metrics").text, "anydoor_in_flight_requests") == 1
    started = time.monotonic()
    assert client.get("/health/live").status_code == 200
    assert time.monotonic() - started < 0.5
    thread.join()
    assert result["status"] == 200


@pytest.mark.slow
def test_one_reference_per_box_and_placement_over_http(client: httpx.Client) -> None:
    ref = case_a_files()["reference"]
    files = [("reference", ref), ("reference", ref), ("background", case_a_files()["background"])]
    ok = client.post("/predict", files=files, data={"steps": "1", "box": ["10,10,80,80", "300,200,90,90"]},
                     headers={**AUTH, "Accept": "application/json"})
    assert ok.status_code == 200 and ok.json()["regions"] == 2
    assert ok.json()["boxes"] == [[10, 10, 80, 80], [300, 200, 90, 90]]
    assert ok.headers["x-boxes"] == "10,10,80,80;300,200,90,90"
    three = client.post("/predict", files=files + [("reference", ref)], data={"steps": "1", "box": "10,10,80,80"},
                        headers=AUTH)
    assert_error(three, 422, "reference_count_mismatch", "reference")

    area = np.zeros((480, 640), np.uint8)
    area[200:, :] = 255
    buf = io.BytesIO()
    Image.fromarray(area).save(buf, format="PNG")
    placed = client.post(
        "/predict", headers={**AUTH, "Accept": "application/json"},
        files={**{k: v for k, v in case_a_files(mask=False).items()}, "placement_area": ("a.png", buf.getvalue(),
                                                                                         "image/png")},
        data={"steps": "1", "seed": "4", "placement": '{"count": 2, "min_size": 40, "max_size": 80, "min_gap": 5}'})
    assert placed.status_code == 200, placed.text
    boxes = placed.json()["boxes"]
    assert len(boxes) == 2 and all(y >= 200 for _, y, _, _ in boxes)
    bad = client.post("/predict", headers=AUTH, files=case_a_files(mask=False),
                      data={"steps": "1", "placement": '{"count": 2, "min_size": 40, "max_size": 80, "x": 1}'})
    assert_error(bad, 422, bad.json()["error"], "placement")
