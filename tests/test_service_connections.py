"""Slow and idle clients, the connection cap and the open-files limit (service/connections.py), through real
servers (``python -m service`` with the tiny reference weights, short deadlines from the environment).

Times are asserted with wide margins: the machine may be a small shared CI runner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.slow_clients import measure
from service import connections
from service.settings import Settings, SettingsError
from tests.support.server import CASE_A, REPO, ServerProcess, case_a_files, free_port, tiny_model_env

pytestmark = pytest.mark.slow

DEADLINES = {"ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_HEADER_TIMEOUT_S": "1", "ANYDOOR_BODY_TIMEOUT_S": "3",
             "ANYDOOR_IDLE_TIMEOUT_S": "1"}
UPLOAD_HEAD = (b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               b"Content-Length: 100000\r\n\r\n")
REQUEST_TIMEOUT = b"HTTP/1.1 408 "


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess({**tiny_model_env(), **DEADLINES}) as proc:
        proc.start()
        yield proc


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[float, bytes]:
    """Read until the server closes ``sock``: (seconds it took, what it sent). A reset counts as closed."""
    sock.settimeout(timeout)
    started, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - started, data


def is_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def close_times(socks: list[socket.socket], timeout: float) -> list[float]:
    """Seconds from now until the server closed each of ``socks`` (``timeout`` for those it did not)."""
    started = time.monotonic()
    times = [timeout] * len(socks)
    with selectors.DefaultSelector() as selector:
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
        left = len(socks)
        while left and time.monotonic() - started < timeout:
            for key, _ in selector.select(timeout=0.05):
                try:
                    closed = key.fileobj.recv(65536) == b""  # type: ignore[union-attr]
                except ConnectionResetError:
                    closed = True
                if closed:
                    times[key.data] = time.monotonic() - started
                    selector.unregister(key.fileobj)
                    left -= 1
    return times


def health_ms(url: str) -> float:
    """A fresh connection's ``GET /health/live``, as a probe sends it: milliseconds to the whole answer."""
    started = time.monotonic()
    response = httpx.get(f"{url}/health/live", timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    return (time.monotonic() - started) * 1000


# --- deadlines ------------------------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(server: ServerProcess) -> None:
    took, data = until_closed(connect(server.url))
    assert 0.8 < took < 2.5 and data == b""


def test_half_a_request_head_gets_408_at_the_head_deadline(server: ServerProcess) -> None:
    sock = connect(server.url)
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n")
    took, data = until_closed(sock)
    assert 0.8 < took < 2.5 and data.startswith(REQUEST_TIMEOUT)


def test_the_head_deadline_counts_from_the_accept_not_from_the_last_byte(server: ServerProcess) -> None:
    sock = connect(server.url)
    started = time.monotonic()
    head = b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"x" * 100
    try:
        for i in range(len(head)):  # a byte every 0.1 s: 10 s for the whole head
            sock.sendall(head[i:i + 1])
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    until_closed(sock)
    assert 0.8 < time.monotonic() - started < 2.5


def test_a_stalled_body_gets_408_after_the_idle_gap(server: ServerProcess) -> None:
    sock = connect(server.url)
    sock.sendall(UPLOAD_HEAD + b"--b\r\n")
    took, data = until_closed(sock)
    assert 0.8 < took < 2.5 and data.startswith(REQUEST_TIMEOUT)


def test_a_trickled_body_is_closed_at_the_body_deadline(server: ServerProcess) -> None:
    sock = connect(server.url)
    sock.sendall(UPLOAD_HEAD)
    started = time.monotonic()
    data = b""
    try:
        while time.monotonic() - started < 10:  # a byte every 0.3 s: within the idle gap, never done
            sock.sendall(b"-")
            time.sleep(0.3)
            if is_closed(sock):
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    took = time.monotonic() - started
    _, data = until_closed(sock, timeout=2)
    assert 2.7 < took < 5.5
    assert data == b"" or data.startswith(REQUEST_TIMEOUT)  # the 408 may be lost to the reset of a late byte


def test_ordinary_requests_are_untouched(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:  # kept alive across requests
        assert client.get("/health/live").status_code == 200
        response = client.post("/predict", files=case_a_files(), data={"steps": "1", "seed": "1"})
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
        time.sleep(1.5)  # longer than the head deadline, shorter than the keep-alive timeout
        assert client.get("/health/live").status_code == 200


def test_health_stays_fast_while_150_slow_clients_are_held(server: ServerProcess) -> None:
    report = measure(server.url, clients=150, duration_s=3.0)
    print(report)
    assert report["probe_failures"] == 0 and report["probes"] > 20
    assert report["health_ms"]["max"] < 1000
    assert report["held"] >= 100  # each slow client is replaced as soon as the server closes it
    assert report["closed_by_deadline"] >= 100  # 1 s deadlines, 3 s of it
    assert len(re.findall("slow or excess connections", server.log())) <= 5  # one line per 10 s at most


# --- the connection cap ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped() -> Iterator[ServerProcess]:
    env = {**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_MAX_CONNECTIONS": "16",
           "ANYDOOR_HEADER_TIMEOUT_S": "5", "ANYDOOR_IDLE_TIMEOUT_S": "5", "ANYDOOR_BODY_TIMEOUT_S": "10"}
    with ServerProcess(env) as proc:
        proc.start()
        yield proc


def test_at_the_cap_an_idle_connection_makes_room_for_a_new_one(capped: ServerProcess) -> None:
    idle = [connect(capped.url) for _ in range(16)]
    time.sleep(0.5)  # older than connections.EVICT_AFTER_S
    try:
        assert health_ms(capped.url) < 1000
        response = httpx.get(f"{capped.url}/openapi.json", timeout=10)  # an ordinary route: a slot of its own
        assert response.status_code == 200
        assert 1 <= sum(map(is_closed, idle)) <= 2  # evicted: one for each request that found all slots taken
    finally:
        for sock in idle:
            sock.close()


def test_past_the_cap_health_checks_get_through_and_the_rest_is_refused_quickly(capped: ServerProcess) -> None:
    # Uploads that stall mid-body hold their slots (only waiting for a head gets a connection evicted).
    busy = [connect(capped.url) for _ in range(16)]
    for sock in busy:
        sock.sendall(UPLOAD_HEAD + b"--b\r\n")
    time.sleep(0.3)
    extra: list[socket.socket] = []
    try:
        assert health_ms(capped.url) < 1000  # a reserve slot
        over = httpx.get(f"{capped.url}/openapi.json", timeout=10)
        assert over.status_code == 429 and over.json()["error"] == "overloaded"
        assert over.headers["connection"] == "close" and over.headers["retry-after"] == "1"

        extra = [connect(capped.url) for _ in range(60)]  # past the reserve (8) and the fast lane (16)
        took = close_times(extra, timeout=5)
        assert max(took) < 2.0  # every one closed by the reserve's short head deadline, at the latest
        assert sum(t < 0.3 for t in took) >= 40  # the fast lane's after 0.1 s, and those refused at once
        assert health_ms(capped.url) < 1000  # the extras are gone: the reserve is free again
        assert not any(map(is_closed, busy))  # the uploads were left alone (their idle gap is 5 s)
    finally:
        for sock in busy + extra:
            sock.close()
    assert health_ms(capped.url) < 1000
    assert len(re.findall("slow or excess connections", capped.log())) <= 3  # counted, at most one line per 10 s


# --- the open-files limit -------------------------------------------------------------------------------------


FD_LIMIT = 160


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_at_a_low_open_files_limit_the_cap_fits_under_it_and_health_answers() -> None:
    env = {**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_HEADER_TIMEOUT_S": "2"}
    with ServerProcess(env, preexec_fn=_low_fd_limit) as proc:
        proc.start()
        found = re.search(rf"open-files limit \(RLIMIT_NOFILE\) is {FD_LIMIT}: at most (\d+) connections "
                          r"\(\+(\d+) for health checks\).*listen backlog of \d+", proc.log())
        assert found, proc.log()
        assert int(found[1]) + int(found[2]) + connections.FD_HEADROOM <= FD_LIMIT  # the fast lane is in the headroom
        assert proc.process is not None
        socks = []
        try:
            for _ in range(200):  # about twice what the server may hold at once, all together
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", int(proc.url.rsplit(":", 1)[1])))
                socks.append(sock)
            time.sleep(1.5)  # the listen backlog is short at this limit: some SYNs are retried after a second
            assert len(os.listdir(f"/proc/{proc.process.pid}/fd")) < FD_LIMIT - 32
            assert health_ms(proc.url) < 1000  # evicts one of the idle connections
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.2)
        assert health_ms(proc.url) < 1000
        log = proc.log()
    assert "Traceback" not in log and "Too many open files" not in log
    assert len(re.findall("slow or excess connections", log)) <= 2


_EMFILE_SERVER = """
import logging, resource, sys
import uvicorn
from service import connections

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
logging.basicConfig(level=logging.INFO)
# Not fitted to the limit on purpose: accept() itself runs out of descriptors.
limits = connections.ConnectionLimits(1.0, 3.0, 1.0, max_connections=1000, reserve=8)
config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", ws="none",
                        http=connections.protocol_class(limits))
connections.install_log_filters()
uvicorn.Server(config).run()
"""


def test_out_of_descriptors_at_accept_logs_one_line_and_recovers(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", _EMFILE_SERVER, str(port)], cwd=REPO, stdout=log_file,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
        socks = [connect(url) for _ in range(120)]  # the kernel's backlog takes what accept() cannot
        time.sleep(2.5)  # accept fails (EMFILE), asyncio retries each second; head deadlines free descriptors
        for sock in socks:
            sock.close()
        answered = False
        for _ in range(50):
            try:
                answered = httpx.get(f"{url}/health/live", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert answered, log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = log_path.read_text()
    lines = [line for line in log.splitlines() if "out of file descriptors" in line]
    assert 1 <= len(lines) <= 2, log
    assert "EMFILE" in lines[0]
    assert "Traceback" not in log and "Errno 24" not in log, log


# --- the pieces -----------------------------------------------------------------------------------------------


def test_the_cap_is_fitted_under_the_open_files_limit() -> None:
    assert connections.fit_to_fd_limit(256, 1_048_576, 10) == (256, 32, 2048)
    assert connections.fit_to_fd_limit(16, 1024, 10) == (16, 8, 1024 - 10 - 24 - 32)  # the reserve is at least 8
    cap, reserve, backlog = connections.fit_to_fd_limit(256, 256, 10)
    assert cap + reserve == 256 - 10 - connections.FD_HEADROOM and reserve == (256 - 10 - 64) // 9
    # What one accept() round may take: the headroom less the fast lane and the process's other files.
    assert backlog == connections.FD_HEADROOM - connections.FAST_LANE - connections.OTHER_FDS == 32
    assert connections.fit_to_fd_limit(256, 70, 10)[:2] == (1, 1)  # never below one connection


def test_asyncio_out_of_descriptors_errors_are_collapsed(caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tally = connections._Tally(connections._render_fd_errors)
    monkeypatch.setattr(connections, "fd_errors", tally)
    connections.install_log_filters()
    connections.install_log_filters()  # idempotent
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(50):  # what asyncio's accept loop reports, once a second at the limit
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
            # The retry each failure schedules, run after a shutdown closed the listener.
            loop.call_exception_handler({"message": "Exception in callback BaseSelectorEventLoop._start_serving()",
                                         "exception": ValueError("Invalid file descriptor: -1")})
            loop.call_exception_handler({"message": "something else", "exception": ValueError("kept")})
            tally.flush()  # the end of the interval
    finally:
        loop.close()
    ours = [r.getMessage() for r in caplog.records if r.name == connections.log.name]
    assert len(ours) == 2 and "EMFILE x1;" in ours[0] and "EMFILE x49, retry on a closed listener x1;" in ours[1]
    others = [r for r in caplog.records if r.name == "asyncio"]
    assert len(others) == 1 and "something else" in others[0].getMessage()


@pytest.mark.parametrize(
    ("variable", "value", "pattern"),
    [
        ("ANYDOOR_HEADER_TIMEOUT_S", "0", "ANYDOOR_HEADER_TIMEOUT_S: expected more than 0 and at most 300"),
        ("ANYDOOR_BODY_TIMEOUT_S", "7200", "ANYDOOR_BODY_TIMEOUT_S: expected more than 0 and at most 3600"),
        ("ANYDOOR_IDLE_TIMEOUT_S", "200", "ANYDOOR_IDLE_TIMEOUT_S: expected at most ANYDOOR_BODY_TIMEOUT_S"),
        ("ANYDOOR_KEEP_ALIVE_S", "-1", "ANYDOOR_KEEP_ALIVE_S: expected 0..300"),
        ("ANYDOOR_MAX_CONNECTIONS", "0", "ANYDOOR_MAX_CONNECTIONS: expected 1..1000000"),
        ("ANYDOOR_MAX_CONNECTIONS", "lots", "ANYDOOR_MAX_CONNECTIONS: cannot read"),
    ],
)
def test_bad_connection_settings_name_the_variable(variable: str, value: str, pattern: str) -> None:
    with pytest.raises(SettingsError, match=pattern):
        Settings.from_env({"ANYDOOR_WEIGHTS": str(CASE_A / "model.safetensors"), variable: value})


def test_connection_settings_defaults() -> None:
    s = Settings.from_env({"ANYDOOR_DEMO": "1"})
    assert (s.header_timeout_s, s.body_timeout_s, s.idle_timeout_s, s.keep_alive_s, s.max_connections) == (
        10.0, 120.0, 15.0, 5, 256)
