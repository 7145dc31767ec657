"""Webhook receivers for the tests, on 127.0.0.1: one that records every request, one that never answers."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class WebhookReceiver:
    """A loopback HTTP server that answers every POST with 200 and records it; a context manager."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[Received] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the base class's name
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver._cond:
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body))
                    receiver._cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def for_prediction(self, prediction_id: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.json.get("id") == prediction_id]

    def wait_for(self, condition: Callable[[list[Received]], bool], timeout: float = 120.0) -> list[Received]:
        """Wait until ``condition(received)`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition(list(self.received)):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for webhooks; got {[r.json.get('status') for r in self.received]}"
                self._cond.wait(min(left, 0.5))
            return list(self.received)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Blackhole:
    """A loopback port that accepts connections (the kernel's backlog) and never answers; a context manager."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
