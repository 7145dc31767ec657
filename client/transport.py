"""HTTP for the client, standard library only: a multipart body, one POST, ``Retry-After`` and jittered backoff."""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import mimetypes
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

BACKOFF_BASE_S, BACKOFF_CAP_S, RETRY_AFTER_CAP_S = 0.5, 30.0, 300.0


def _quote(text: str) -> str:
    # The HTML standard's escaping of names in multipart/form-data: quote, CR and LF percent-encoded.
    return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def encode_multipart(parts: Sequence[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type: text fields ``(name, text)`` and files
    ``(name, (filename, bytes))``, in order, repeated names allowed."""
    while True:
        boundary = f"anydoor-{secrets.token_hex(16)}"
        if not any(boundary.encode() in (v[1] if isinstance(v, tuple) else v.encode()) for _, v in parts):
            break
    chunks: list[bytes] = []
    for name, value in parts:
        if isinstance(value, str):
            head = f'Content-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'
            chunks += [f"--{boundary}\r\n{head}".encode(), value.encode("utf-8"), b"\r\n"]
        else:
            filename, data = value
            kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            head = (f'Content-Disposition: form-data; name="{_quote(name)}"; filename="{_quote(filename)}"\r\n'
                    f"Content-Type: {kind}\r\n\r\n")
            chunks += [f"--{boundary}\r\n{head}".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


@dataclass
class Answer:
    """How one request ended: an HTTP answer, or none (``status`` 0, ``error`` says why)."""

    status: int
    headers: dict[str, str]
    body: bytes
    error: str = ""


def check_url(url: str) -> str:
    """``url`` without a trailing slash; ValueError unless it is ``http(s)://HOST[:PORT][/PREFIX]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url}: expected http(s)://HOST[:PORT][/PREFIX]")
    try:
        parts.port  # noqa: B018 - the property raises for a bad port
    except ValueError as exc:
        raise ValueError(f"{url}: {exc}") from None
    return url.rstrip("/")


def request(method: str, url: str, path: str, body: bytes | None, headers: Mapping[str, str],
            timeout: float) -> Answer:
    """One request on a fresh connection to ``url`` + ``path``."""
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path.rstrip("/") + path, body=body, headers=dict(headers))
        response = conn.getresponse()
        data = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, {}, b"", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        conn.close()


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def backoff(attempt: int, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> float:
    """Exponential backoff with jitter (0.5x to 1.5x), so that retrying clients spread out."""
    return min(cap_s, base_s * 2 ** attempt) * (0.5 + random.random())
