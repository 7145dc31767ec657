"""The real Cog server (``python -m cog.server.http``, as a Cog image starts it) on the tiny reference model.

The server runs in the project root with ``COG_PREDICT_TYPE_STUB`` from ``cog.yaml``; its worker subprocess runs
``python``, so this environment's interpreter goes first on ``PATH``. Only the ``ANYDOOR_*`` settings given here
reach it (hermetic).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.support.server import CASE_A, free_port

ROOT = Path(__file__).resolve().parents[2]
COG_YAML = yaml.safe_load((ROOT / "cog.yaml").read_text())
START_TIMEOUT_S = 240


class CogServer:
    def __init__(self, port: int, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = proc

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def predict(self, **inputs: Any) -> dict[str, Any]:
        # Cog hands its one prediction slot back just after answering: a request sent at once can find it busy
        # ("At capacity"), which is Cog's behaviour, not the predictor's, so wait for READY first.
        self.wait_ready()
        request = urllib.request.Request(
            self.url + "/predictions",
            data=json.dumps({"input": inputs}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:  # a rejected request still has a JSON body
            return json.loads(exc.read())  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 30.0) -> str:
        # The slot is handed back shortly after the response, so BUSY may show for a moment.
        deadline = time.monotonic() + timeout
        while (status := self.get("/health-check")["status"]) != "READY" and time.monotonic() < deadline:
            time.sleep(0.1)
        return str(status)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-8000:]


@contextlib.contextmanager
def cog_server(tmp: Path, **extra_env: str) -> Iterator[CogServer]:
    """A Cog server on a free loopback port, READY (its setup done), stopped with SIGTERM afterwards."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ANYDOOR_")},
        "COG_PREDICT_TYPE_STUB": COG_YAML["predict"],
        "PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANYDOOR_WEIGHTS": str(CASE_A / "model.safetensors"),
        "ANYDOOR_CONFIG": str(CASE_A / "model.yaml"),
        "ANYDOOR_DEVICE": "cpu",
        "ANYDOOR_CACHE_DIR": str(tmp / "cache"),
        "ANYDOOR_WARMUP_STEPS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        **extra_env,
    }
    log = tmp / "cog.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    server = CogServer(port, log, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        status: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the Cog server exited with {proc.returncode}:\n{server.logs()}")
            try:
                status = server.get("/health-check")
                if status.get("status") in ("READY", "SETUP_FAILED", "DEFUNCT"):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        assert status is not None and status["status"] == "READY", f"{status}\n{server.logs()}"
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
