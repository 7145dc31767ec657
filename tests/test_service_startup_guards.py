"""The connection guards hold on every documented start command: ``anydoor serve`` (``python -m service``) and
the README's ``uvicorn service.app:create_app --factory``. Each drops a client that never reads its event stream,
and a start where the guards cannot be installed says so in the log."""

from __future__ import annotations

import io
import logging
import socket
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service import connections
from service.settings import Settings
from tests.support.server import CASE_A, UVICORN_COMMAND, ServerProcess, encode_multipart, metric, tiny_model_env

GUARDS = {"ANYDOOR_WARMUP_STEPS": "1", "ANYDOOR_IDLE_TIMEOUT_S": "1", "ANYDOOR_HEADER_TIMEOUT_S": "2",
          "ANYDOOR_BODY_TIMEOUT_S": "20"}


def _noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _unread_stream_is_dropped(server: ServerProcess) -> None:
    # A noise background keeps the result big (a 1600x1600 PNG, about 10 MB in the `result` event): far more than
    # the socket buffers hold, so the server's writes stall on a client that does not read.
    files = {"reference": ("r.png", (CASE_A / "reference.png").read_bytes(), "image/png"),
             "background": ("b.png", _noise_png(1600), "image/png")}
    request = encode_multipart(server.url, files, {"steps": "1", "guidance_scale": "1", "box": "100,100,300,300"},
                               {"Accept": "text/event-stream"})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(request)
        in_flight = lambda: metric(httpx.get(f"{server.url}/metrics").text, "anydoor_in_flight_requests")  # noqa: E731
        deadline = time.monotonic() + 30
        while in_flight() == 0:  # until the request is in
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        deadline = time.monotonic() + 90
        while in_flight() != 0:  # the stream's last event is written (to a paused transport)
            assert time.monotonic() < deadline, f"the request never ended\n{server.log()}"
            time.sleep(0.2)
        time.sleep(3)  # the unread-response timer (the idle gap, 1 s here), with a margin
        sock.settimeout(10)
        data = b""
        try:
            while chunk := sock.recv(1 << 20):
                data += chunk
        except ConnectionResetError:
            pass
        assert data.startswith(b"HTTP/1.1 200")
        assert not data.endswith(b"0\r\n\r\n")  # cut off: the chunked stream never ended
    finally:
        sock.close()


@pytest.mark.slow
@pytest.mark.parametrize("command", [None, UVICORN_COMMAND], ids=["anydoor-serve", "uvicorn-factory"])
def test_every_start_command_drops_a_client_that_never_reads(command: tuple[str, ...] | None) -> None:
    with ServerProcess({**tiny_model_env(), **GUARDS}, command=command) as server:
        server.start()
        _unread_stream_is_dropped(server)
        # The head deadline too: a connection that sends nothing is closed after 2 s.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""
            assert 1.5 < time.monotonic() - started < 6
        assert "connection guards are OFF" not in server.log()


# --- the pieces (fast) ----------------------------------------------------------------------------------------


def test_the_guards_are_installed_into_a_uvicorn_config() -> None:
    import uvicorn

    from service.app import create_app

    settings = Settings(demo=True, keep_alive_s=7)

    class Lifespan:  # what uvicorn's LifespanOn is to the app: its receive is a bound method with the config
        def __init__(self, config: uvicorn.Config) -> None:
            self.config = config

        async def receive(self) -> dict[str, Any]:
            return {"type": "lifespan.startup"}

    config = uvicorn.Config(create_app(settings), backlog=4096)
    config.load()
    assert connections.install_under_uvicorn(Lifespan(config).receive, settings) == "installed"
    assert issubclass(config.http_protocol_class, connections.GuardedH11Protocol)
    assert config.timeout_keep_alive == 7 and config.ws_protocol_class is None and config.backlog <= 2048
    assert connections.install_under_uvicorn(Lifespan(config).receive, settings) == "present"


def test_a_start_without_the_guards_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    async def receive() -> dict[str, Any]:  # another server's lifespan
        return {"type": "lifespan.startup"}

    guards = connections.ConnectionGuards(app, Settings(demo=True))
    with caplog.at_level(logging.INFO):
        asyncio.run(guards({"type": "lifespan"}, receive, None))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "connection guards are OFF: not running under uvicorn" in warnings[0].getMessage()
