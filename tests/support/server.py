"""Helpers to run the real service in a subprocess and talk to it: used by the tests and the benchmarks.

:class:`ServerProcess` starts ``python -m service`` on a free 127.0.0.1 port and waits for readiness, recording
the ``/health/ready`` statuses it saw on the way. :func:`raw_predict` sends a /predict request over a plain socket,
for tests that must control the connection (disconnect mid-generation, a body that never ends).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
CASE_A = REPO / "tests" / "fixtures" / "reference" / "case_a"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``condition`` every 50 ms until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def tiny_model_env() -> dict[str, str]:
    """Settings for the tiny reference weights of the test fixtures, on the CPU.

    OpenMP threads that spin while they wait make torch many times slower on a CPU shared with other processes
    (a CI runner running tests in parallel); passive waiting costs nothing when the CPU is idle.
    """
    return {"ANYDOOR_WEIGHTS": str(CASE_A / "model.safetensors"), "ANYDOOR_CONFIG": str(CASE_A / "model.yaml"),
            "ANYDOOR_DEVICE": "cpu", "OMP_WAIT_POLICY": "PASSIVE",
            # Async predictions in memory unless a test gives a store: servers started side by side share nothing.
            "ANYDOOR_JOB_STORE": ":memory:"}


# The README's other start command: uvicorn's factory, every setting from the environment.
UVICORN_COMMAND = (sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory")


class ServerProcess:
    """``python -m service`` (or ``command``) in a subprocess, listening on 127.0.0.1:``port``; a context
    manager."""

    def __init__(self, env: Mapping[str, str], *, args: tuple[str, ...] = (), port: int | None = None,
                 preexec_fn: Callable[[], None] | None = None, command: tuple[str, ...] | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {**os.environ, **env}
        self._env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self._env.setdefault("ANYDOOR_LOG_LEVEL", "info")
        self._args = args
        # The start command, without --host and --port (default: python -m service, i.e. anydoor serve).
        self._command = command or (sys.executable, "-m", "service")
        self._preexec_fn = preexec_fn  # run in the child before exec: e.g. a lower resource limit
        self._log = tempfile.NamedTemporaryFile(prefix="anydoor-serve-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_statuses: list[int] = []  # /health/ready answers seen while starting, repeats collapsed
        self.cog_statuses: list[str] = []  # /health-check statuses seen while starting, repeats collapsed

    def start(self, timeout: float = 120.0) -> ServerProcess:
        cmd = [*self._command, "--host", "127.0.0.1", "--port", str(self.port), *self._args]
        self.process = subprocess.Popen(cmd, env=self._env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        preexec_fn=self._preexec_fn)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.returncode is not None:
                    raise RuntimeError(f"the server exited with {self.returncode}:\n{self.log()}")
                try:
                    ready = client.get("/health/ready").status_code
                    cog = client.get("/health-check").json()["status"]
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                if not self.ready_statuses or self.ready_statuses[-1] != ready:
                    self.ready_statuses.append(ready)
                if not self.cog_statuses or self.cog_statuses[-1] != cog:
                    self.cog_statuses.append(cog)
                if ready == 200:
                    return
                time.sleep(0.02)
        raise TimeoutError(f"the server was not ready after {timeout} s:\n{self.log()}")

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


# --- requests -------------------------------------------------------------------------------------------------


def case_a_files(*, mask: bool = True) -> dict[str, tuple[str, bytes, str]]:
    files = {
        "reference": ("reference.png", (CASE_A / "reference.png").read_bytes(), "image/png"),
        "background": ("background.png", (CASE_A / "background.png").read_bytes(), "image/png"),
    }
    if mask:
        files["background_mask"] = ("background_mask.png", (CASE_A / "background_mask.png").read_bytes(), "image/png")
    return files


def encode_multipart(
    url: str, files: Mapping[str, Any], data: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> bytes:
    """The bytes of a complete ``POST /predict`` HTTP/1.1 request, as httpx would send them."""
    request = httpx.Request("POST", f"{url}/predict", files=dict(files), data=dict(data), headers=dict(headers or {}))
    body = request.read()
    head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
    return f"POST /predict HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


def raw_predict(url: str, files: Mapping[str, Any], data: Mapping[str, Any],
                headers: Mapping[str, str] | None = None) -> socket.socket:
    """Send a whole /predict request over a new socket and return the socket (read the answer, or close it)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(encode_multipart(url, files, data, headers))
    return sock


def read_response(sock: socket.socket, timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length from ``sock``: status, headers (lower-case), body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


# --- metrics --------------------------------------------------------------------------------------------------


def metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if there is none)."""
    return sum(value for sample, found, value in metric_samples(text)
               if sample == name and all(found.get(k) == v for k, v in labels.items()))


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing`` as {name: milliseconds}."""
    out = {}
    for item in header.split(","):
        name, _, rest = item.strip().partition(";")
        out[name] = float(rest.split("dur=")[1].split(";")[0]) if "dur=" in rest else 0.0
    return out
