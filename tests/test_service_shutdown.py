"""SIGTERM while a request runs: it completes (or, past the grace period, gets a clean error) and the process
exits 0. Each test starts its own server (``python -m service``, the same code as ``anydoor serve``)."""

from __future__ import annotations

import signal
import time

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

pytestmark = pytest.mark.slow  # each test starts and stops a real server


def running(server: ServerProcess) -> bool:
    return metric(httpx.get(f"{server.url}/metrics").text, "anydoor_running_jobs") == 1


def test_sigterm_drains_the_running_request_then_exits_0() -> None:
    env = {**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_SHUTDOWN_DELAY_S": "1.5",
           "ANYDOOR_SHUTDOWN_GRACE_S": "60"}
    with ServerProcess(env) as server:
        server.start()
        request = raw_predict(server.url, case_a_files(), {"steps": "4", "seed": "3"})
        wait_for(lambda: running(server))
        server.send_signal(signal.SIGTERM)

        # During the shutdown delay the listener is open: not ready, and new work is refused.
        wait_for(lambda: httpx.get(f"{server.url}/health/ready").status_code == 503, timeout=5)
        assert httpx.get(f"{server.url}/health/ready").json()["status"] == "draining"
        refused = httpx.post(f"{server.url}/predict", files=case_a_files(), data={"steps": "1"})
        assert refused.status_code == 503 and refused.json()["error"] == "draining"

        status, headers, body = read_response(request)  # the request under way completes
        request.close()
        assert status == 200 and headers["x-seed"] == "3" and body.startswith(b"\x89PNG")
        assert server.wait(timeout=60) == 0, server.log()
        log = server.log()
    assert "draining" in log and "GPU worker stopped" in log and "Traceback" not in log


def test_sigterm_past_the_grace_period_cancels_cleanly_and_exits_0() -> None:
    env = {**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_SHUTDOWN_GRACE_S": "1"}
    with ServerProcess(env) as server:
        server.start()
        request = raw_predict(server.url, case_a_files(), {"steps": "500"})  # minutes of work on a CPU
        wait_for(lambda: running(server))
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        status, headers, body = read_response(request)
        request.close()
        assert status == 503 and b'"error":"shutting_down"' in body
        assert time.monotonic() - started < 60  # the grace period and at most one denoising step
        assert server.wait(timeout=60) == 0, server.log()
        assert "Traceback" not in server.log()


def test_ctrl_c_drains_the_running_request_then_exits_0() -> None:
    """Ctrl-C (SIGINT) is a graceful shutdown like SIGTERM: the running request completes, the exit status is 0
    (not 130: uvicorn re-raises the signal after its shutdown, which would end in KeyboardInterrupt)."""
    env = {**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_SHUTDOWN_GRACE_S": "60"}
    with ServerProcess(env) as server:
        server.start()
        request = raw_predict(server.url, case_a_files(), {"steps": "4", "seed": "5"})
        wait_for(lambda: running(server))
        server.send_signal(signal.SIGINT)
        status, headers, body = read_response(request)
        request.close()
        assert status == 200 and headers["x-seed"] == "5" and body.startswith(b"\x89PNG")
        assert server.wait(timeout=60) == 0, server.log()
        log = server.log()
    assert "draining" in log and "GPU worker stopped" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
