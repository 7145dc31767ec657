"""Opening the images of a prediction's ``input``: data URIs and http(s) URLs, with the upload limits.

:class:`RemoteFiles` is the ``open_file`` that :func:`model.spec.codecs.decode_request` calls for each image field
of a JSON request: a ``data:`` URI is decoded (its size checked before decoding), an ``http(s)`` URL is fetched
through the SSRF guard (:mod:`service.predictions.urlguard`: checked after DNS resolution and on every redirect)
within ``ANYDOOR_FETCH_TIMEOUT_S``, and either must fit ``ANYDOOR_MAX_UPLOAD_MB``, as an upload to ``/predict``
must. Local paths are not files of this service's clients and are refused. Blocking: call it on a thread.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import urllib.parse
from typing import Any

from model.errors import ErrorCode, InputError
from service.predictions.urlguard import TooLarge, UrlGuard, guarded_request


def too_large(field: str, size: int | None, limit: int) -> InputError:
    got = f"{size} bytes" if size is not None else "more"
    return InputError(field, ErrorCode.PAYLOAD_TOO_LARGE, f"the file is {got}; at most {limit} bytes are accepted")


def is_data_uri(value: Any) -> bool:
    return isinstance(value, str) and value[:5].lower() == "data:"


def decode_data_uri(field: str, value: str, limit: int) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URI, at most ``limit`` of them."""
    header, comma, payload = value[5:].partition(",")
    if not comma:
        raise InputError(field, ErrorCode.FETCH_FAILED, "a data URI needs a comma before its data")
    if header.lower().split(";")[-1] != "base64":
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        if len(payload) // 4 * 3 > limit + 3:
            raise too_large(field, len(payload) // 4 * 3, limit)
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(field, ErrorCode.FETCH_FAILED, "the data URI is not valid base64") from None
    if len(data) > limit:
        raise too_large(field, len(data), limit)
    return data


class RemoteFiles:
    """``open_file(field, value)`` for a JSON request on the service: data URIs and http(s) URLs to bytes."""

    def __init__(self, guard: UrlGuard, *, max_bytes: int, timeout_s: float) -> None:
        self.guard = guard
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def check(self, field: str, value: Any) -> None:
        """Cheap checks before a prediction is accepted: the value's form, a URL's host (resolved, guarded)."""
        if is_data_uri(value):
            header, comma, payload = value[5:].partition(",")
            if not comma:
                raise InputError(field, ErrorCode.FETCH_FAILED, "a data URI needs a comma before its data")
            if header.lower().endswith("base64") and len(payload) // 4 * 3 > self.max_bytes + 3:
                raise too_large(field, len(payload) // 4 * 3, self.max_bytes)
            return
        if isinstance(value, str) and value[:8].lower().startswith(("http://", "https://")):
            self.guard.check(value, field)
            return
        raise InputError(field, ErrorCode.INVALID_PARAMETER,
                         "must be a data URI (data:image/png;base64,...) or an http(s) URL")

    def __call__(self, field: str, value: Any) -> bytes:
        self.check(field, value)
        if is_data_uri(value):
            return decode_data_uri(field, value, self.max_bytes)
        try:
            answer = guarded_request(self.guard, "GET", value, field=field, timeout_s=self.timeout_s,
                                     max_bytes=self.max_bytes, headers={"Accept": "image/*"})
        except TooLarge:
            raise too_large(field, None, self.max_bytes) from None
        except (OSError, http.client.HTTPException) as exc:
            raise InputError(field, ErrorCode.FETCH_FAILED, f"cannot fetch {_short(value)}: "
                             f"{type(exc).__name__}: {exc}") from None
        if answer.status != 200:
            raise InputError(field, ErrorCode.FETCH_FAILED, f"fetching {_short(value)} answered HTTP {answer.status}")
        return answer.body


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
