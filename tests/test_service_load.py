"""Load: 32 concurrent clients send 64 requests in total through ``benchmarks/load.py``; all must get 200.

The slowest test of the service (about a second per request on two idle CPU cores with the tiny model): the
requests are answered one after the other by the single worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.support.server import REPO, ServerProcess, metric, tiny_model_env


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess({**tiny_model_env(), "ANYDOOR_MAX_QUEUE": "64", "ANYDOOR_QUEUE_TIMEOUT_S": "600",
                        "ANYDOOR_WARMUP_STEPS": "1"}) as proc:
        proc.start()
        yield proc


@pytest.mark.slow
def test_load_32_clients_64_requests_all_answered(server: ServerProcess) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "load.py"), "--url", server.url, "--clients", "32",
         "--requests", "64", "--steps", "1", "--guidance-scale", "1", "--json"],
        capture_output=True, text=True, timeout=1200,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    print(json.dumps(report, indent=2))
    assert report["status_counts"] == {"200": 64}
    assert report["answered"] == 64 and report["lost"] == 0
    for key in ("latency_s", "queue_wait_s"):
        assert report[key]["p50"] <= report[key]["p95"] <= report[key]["max"]
    assert report["queue_wait_s"]["max"] > 0  # 32 at once against one worker: most of them waited
    with httpx.Client(base_url=server.url) as client:
        text = client.get("/metrics").text
    assert metric(text, "anydoor_http_request_duration_seconds_count", route="/predict", status="200") == 64
    assert metric(text, "anydoor_queue_depth") == 0 and metric(text, "anydoor_in_flight_requests") == 0
