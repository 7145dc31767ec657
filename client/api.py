"""``AnyDoorClient``: ``POST /predict`` from Python, encoded by the request spec's own codecs."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.errors import AnyDoorError
from client.pool import ServerPool
from client.transport import RETRY_AFTER_CAP_S, Answer, backoff, check_url, encode_multipart, request, retry_after
from model.errors import ErrorCode, InputError
from model.spec.codecs import encode_form
from model.spec.files import LocalFiles
from model.spec.inputs import FILE_FIELDS, REPEATABLE_FILES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Result:
    """A /predict answer: the image and what came with it."""

    png: bytes  # the image: a PNG unless the request's output_format asked for jpeg or webp (see media_type)
    width: int
    height: int
    seed: int
    regions: int
    boxes: list[tuple[int, int, int, int]]
    timings_ms: dict[str, float]
    demo: bool = False
    request_id: str | None = None
    server: str = ""  # the base URL that answered
    attempts: int = 1  # requests sent for it (1 + retries)
    media_type: str = "image/png"
    scores: dict[str, Any] | None = None  # identity, region_identity, background_psnr
    # With num_outputs > 1: every candidate best first, each {"image": bytes, "seed": int, "scores": {...}}.
    candidates: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def image(self) -> Any:
        """The PNG as a PIL image (needs Pillow)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.png))

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_bytes(self.png)


def read_answer(body: bytes) -> dict[str, Any]:
    """The documented JSON answer's fields, checked (ValueError, KeyError or TypeError if it is not that)."""
    data = json.loads(body)
    media_type = str(data.get("media_type", "image/png"))
    png = _image(data["image"], media_type)
    boxes = []
    for box in data["boxes"]:
        if not isinstance(box, list) or len(box) != 4:
            raise ValueError(f"a box is not [x, y, w, h]: {box!r}")
        boxes.append((int(box[0]), int(box[1]), int(box[2]), int(box[3])))
    timings = {str(name): float(ms) for name, ms in (data.get("timings_ms") or {}).items()}
    return {"png": png, "width": int(data["width"]), "height": int(data["height"]), "seed": int(data["seed"]),
            "regions": int(data.get("regions", len(boxes))), "boxes": boxes, "timings_ms": timings,
            "demo": bool(data.get("demo", False)), "request_id": data.get("request_id"), "media_type": media_type,
            "scores": data.get("scores") if isinstance(data.get("scores"), dict) else None,
            "candidates": [{"image": _image(c["image"], media_type), "seed": int(c["seed"]), "scores": c.get("scores")}
                           for c in data.get("candidates") or []],
            "raw": data}


SIGNATURES = {"image/png": (PNG_SIGNATURE,), "image/jpeg": (b"\xff\xd8\xff",), "image/webp": (b"RIFF",)}


def _image(text: str, media_type: str) -> bytes:
    """A base64 image of the answer, checked against its media type's signature."""
    data = base64.b64decode(text, validate=True)
    if media_type not in SIGNATURES or not data.startswith(SIGNATURES[media_type]):
        raise ValueError(f"the image is not a {media_type.split('/')[-1].upper()}")
    return data


class AnyDoorClient:
    """A client of one or several AnyDoor servers; thread-safe, standard library only.

    ``base_url`` is one URL or a list: each request goes to the server with the fewest of this client's requests
    in flight. A request that finds no server (refused, reset, timed out), an overloaded or draining one (429 /
    503, after its ``Retry-After``) or a server fault (5xx) is sent again, up to ``retries`` times, with jittered
    exponential backoff; anything else the server refuses raises :class:`AnyDoorError` at once."""

    def __init__(self, base_url: str | Sequence[str], api_key: str | None = None, *, timeout: float = 600.0,
                 retries: int = 4, backoff_base_s: float = 0.5, max_retry_after_s: float = RETRY_AFTER_CAP_S
                 ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.pool = ServerPool([check_url(url) for url in urls])
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff_base_s = backoff_base_s
        self.max_retry_after_s = max_retry_after_s
        self._closed = threading.Event()

    @property
    def urls(self) -> list[str]:
        return self.pool.urls

    def close(self) -> None:
        """Stop: requests waiting to be retried give up at once (``unreachable``)."""
        self._closed.set()

    def __enter__(self) -> AnyDoorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the request ------------------------------------------------------------------------------------------

    @staticmethod
    def _file(name: str, index: int, value: Any) -> tuple[str, bytes]:
        """A file value as ``(filename, bytes)``: a path, bytes, a PIL image (sent as PNG) or such a pair."""
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes | bytearray):
            return str(value[0]), bytes(value[1])
        if isinstance(value, bytes | bytearray | memoryview):
            return f"{name}{index or ''}.png", bytes(value)
        if isinstance(value, str | os.PathLike):
            return Path(value).name, LocalFiles()(name, value)
        if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image, without importing PIL
            out = io.BytesIO()
            value.save(out, format="PNG")
            return f"{name}{index or ''}.png", out.getvalue()
        raise InputError(name, ErrorCode.INVALID_PARAMETER,
                         f"must be a path, bytes or a PIL image, got {type(value).__name__}")

    def form(self, values: Mapping[str, Any]) -> list[tuple[str, str | tuple[str, bytes]]]:
        """The /predict form items of a request given as ``predict``'s keywords (InputError if one is bad)."""
        prepared: dict[str, Any] = {}
        for name, value in values.items():
            if value is None:
                continue
            if name in FILE_FIELDS:
                many = isinstance(value, list | tuple) and not (
                    isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes | bytearray))
                files = [self._file(name, i, v) for i, v in enumerate(value if many else [value])]
                prepared[name] = files if name in REPEATABLE_FILES else files[0]
            else:
                prepared[name] = value
        return encode_form(prepared)

    def predict(self, *, reference: Any, background: Any, reference_mask: Any = None, box: Any = None,
                background_mask: Any = None, placement: Any = None, placement_area: Any = None,
                **params: Any) -> Result:
        """One prediction. Images are paths, bytes, PIL images or ``(filename, bytes)`` pairs (``reference`` and
        ``reference_mask`` may be lists: one per region); ``box`` is ``"x,y,w,h"``, ``[x, y, w, h]`` or a list of
        them; ``placement`` a :class:`~model.spec.placement.Placement`, a dict or its JSON text; ``params`` are
        the /predict parameters by name (``steps=20, seed=1``). Raises :class:`AnyDoorError`."""
        values = {"reference": reference, "reference_mask": reference_mask, "background": background,
                  "background_mask": background_mask, "box": box, "placement": placement,
                  "placement_area": placement_area, **params}
        try:
            items = self.form(values)
        except InputError as exc:
            raise AnyDoorError(exc.code, exc.message, field=exc.field) from None
        return self.send(items)

    def send(self, items: Sequence[tuple[str, str | tuple[str, bytes]]]) -> Result:
        """Send already encoded form items (see :meth:`form`) until they succeed, fail for good or run out of
        retries."""
        body, content_type = encode_multipart(items)
        headers = {"Content-Type": content_type, "Accept": "application/json", "Content-Length": str(len(body))}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: AnyDoorError | None = None
        for attempt in range(self.retries + 1):
            index = self.pool.acquire()
            try:
                answer = request("POST", self.pool.urls[index], "/predict", body, headers, self.timeout)
            finally:
                self.pool.release(index)
            url = self.pool.urls[index]
            try:
                return self._result(answer, url, attempt + 1)
            except AnyDoorError as exc:
                exc.attempts = attempt + 1
                if not exc.transient:
                    raise
                last = exc
            if attempt == self.retries:
                break
            if last.retry_after_s is not None:
                delay = min(last.retry_after_s, self.max_retry_after_s) * (1 + 0.1 * random.random())
            else:
                delay = backoff(attempt, self.backoff_base_s)
            if self._closed.wait(delay):
                break
        assert last is not None
        last.message = f"{last.message} (gave up after {last.attempts} attempts)"
        last.args = (f"{last.field}: {last.message}" if last.field else last.message,)
        raise last

    def _result(self, answer: Answer, url: str, attempts: int) -> Result:
        if answer.status == 0:
            raise AnyDoorError(ErrorCode.UNREACHABLE, f"{url}: {answer.error}", server=url)
        if answer.status != 200:
            wait = retry_after(answer.headers.get("retry-after")) if answer.status in (429, 503) else None
            raise AnyDoorError.from_body(answer.status, answer.body, server=url, retry_after_s=wait)
        try:
            fields = read_answer(answer.body)
        except (ValueError, KeyError, TypeError) as exc:
            raise AnyDoorError(ErrorCode.BAD_RESPONSE, f"{url} answered 200 with an unreadable body: {exc}",
                               status=200, server=url) from None
        return Result(**fields, server=url, attempts=attempts)

    # --- the other routes ----------------------------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether any server answers at all (``/health/live``, whatever its status): False only when none can be
        reached, the one case in which sending more requests is pointless."""
        return any(request("GET", url, "/health/live", None, {}, min(self.timeout, 10.0)).status != 0
                   for url in self.urls)

    def ready(self) -> bool:
        """Whether every server answers ``/health/ready`` with 200."""
        return all(request("GET", url, "/health/ready", None, {}, min(self.timeout, 10.0)).status == 200
                   for url in self.urls)
