from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: threads that wait passively instead of spinning. On a small shared CPU
# (CI has 2 cores) spinning workers of the test process and of the servers it starts starve each other (~5x).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The service's default job store lives in the cache directory: tests get a fresh one, never the user's ~/.cache.
os.environ.setdefault("ANYDOOR_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="anydoor-tests-cache-"))

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
CASES = ("case_a", "case_c")


def rel_l2(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    """Relative L2 error, the reference README's measure for tokens, eps, latents and decodes."""
    a = torch.as_tensor(np.asarray(actual, dtype=np.float64) if isinstance(actual, np.ndarray) else actual.double())
    e = torch.as_tensor(
        np.asarray(expected, dtype=np.float64) if isinstance(expected, np.ndarray) else expected.double()
    )
    return float((a - e).norm() / e.norm())


class Case:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = REFERENCE / name
        self.settings = json.loads((self.dir / "case.json").read_text())
        self.expected = dict(np.load(self.dir / "expected.npz"))
        self.weights = self.dir / "model.safetensors"
        self.config_path = self.dir / "model.yaml"


@pytest.fixture(scope="session", params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[httpx.Client]:
    """An HTTP client for the module's own ``server`` fixture (a started service.testing.ServerProcess)."""
    with httpx.Client(base_url=server.url, timeout=120.0) as c:
        yield c


class _QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def case_a_http() -> Iterator[str]:
    """A static HTTP server on 127.0.0.1 serving the case_a fixture files; yields its base URL."""
    handler = functools.partial(_QuietFileHandler, directory=str(REFERENCE / "case_a"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


SERVER_FIXTURES = ("server", "servers", "cog_server")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers are marked explicitly (``@pytest.mark.slow``, a module's ``pytestmark``); a test that uses a real
    server fixture without the mark is a collection error, so the fast tier never starts a server by accident.
    A ``gpu`` test is skipped where CUDA is missing."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    unmarked = [item.nodeid for item in items if item.get_closest_marker("slow") is None
                and set(SERVER_FIXTURES) & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("tests that start a real server must be marked slow: " + ", ".join(unmarked))
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)
