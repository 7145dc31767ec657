"""A fake AnyDoor server for client tests: a real HTTP server on 127.0.0.1 that records every /predict form and
answers from a plan (429 with Retry-After, 500, 422, a proxy's 502 page), then with the documented JSON answer."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import http.server
import io
import json
import threading
import time
from typing import Any

from PIL import Image


class FakeServer:
    """A real HTTP server on 127.0.0.1 that records each /predict form and answers by the request's seed: a plan
    of statuses to answer first (429 with Retry-After: 1, 500, 422, 502; 0 closes without answering), then the
    documented JSON answer."""

    def __init__(self, plan: dict[str, list[int]]) -> None:
        self.plan = plan
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def do_POST(self) -> None:  # noqa: N802 - the base class's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
                parts: list[tuple[str, str | None, bytes]] = []
                for part in message.iter_parts():
                    payload = part.get_payload(decode=True)
                    assert isinstance(payload, bytes)
                    parts.append((str(part.get_param("name", header="content-disposition")), part.get_filename(),
                                  payload))
                texts = {name: data.decode() for name, filename, data in parts if filename is None}
                with fake.lock:
                    seed = texts.get("seed", "")
                    earlier = sum(1 for r in fake.requests if r["texts"].get("seed") == seed)
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "parts": parts,
                                          "texts": texts, "time": time.monotonic()})
                statuses = fake.plan.get(seed, [])
                status = statuses[earlier] if earlier < len(statuses) else 200
                if status == 0:  # the connection closed without an answer (a crash, a proxy's reset)
                    self.close_connection = True
                elif status == 200:
                    self.answer(200, fake.prediction(parts, texts))
                elif status == 502:  # a proxy's page, not the service's JSON
                    page = b"<html>bad gateway</html>"
                    self.send_response(502)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                else:
                    code = {429: "overloaded", 500: "internal_error", 422: "box_out_of_image"}[status]
                    self.answer(status, {"error": code, "field": "box" if status == 422 else None,
                                         "message": f"{code} (fake)", "request_id": "fake"},
                                {"Retry-After": "1"} if status == 429 else {})

            def answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    @staticmethod
    def prediction(parts: list[tuple[str, str | None, bytes]], texts: dict[str, str]) -> dict[str, Any]:

        background = next(data for name, _, data in parts if name == "background")
        with Image.open(io.BytesIO(background)) as image:
            width, height = image.size
        png = io.BytesIO()
        Image.new("RGB", (width, height), (0, 128, 0)).save(png, format="PNG")
        boxes = [[int(v) for v in value.decode().split(",")] for name, _, value in parts if name == "box"]
        if "placement" in texts:
            boxes = [[10 + 40 * i, 300, 30, 30] for i in range(json.loads(texts["placement"])["count"])]
        return {"image": base64.b64encode(png.getvalue()).decode(), "media_type": "image/png", "width": width,
                "height": height, "seed": int(texts.get("seed", 42)), "regions": len(boxes), "boxes": boxes,
                "demo": True, "request_id": "fake", "timings_ms": {"queue": 1.0, "sample": 2.0, "total": 5.0}}

    def __enter__(self) -> FakeServer:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
