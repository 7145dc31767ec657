"""Download weights over HTTP(S) into a local cache: progress, resume, checksum, atomic rename.

Standard library only (``urllib``), so the service image needs nothing more to fetch multi-gigabyte weights.

* **Resume**: bytes land in ``NAME.partial`` next to the final file. A later attempt (the automatic retry after a
  dropped connection, or the next run after a crash) asks for the rest with ``Range: bytes=N-``; a server that
  ignores the range and answers ``200`` gets a clean restart.
* **Checksum**: SHA-256 is computed while streaming (the bytes of a resumed ``.partial`` are hashed first). A
  mismatch deletes the partial file and raises :class:`ChecksumError`: nothing of it stays in the cache.
* **Atomic rename**: the finished, verified file is ``os.replace``-d to its final name, so a file under its final
  name is always complete. A reader never sees half a file, and the cache can trust what it finds.
* **Cache layout**: ``$ANYDOOR_CACHE_DIR`` (else ``$XDG_CACHE_HOME/anydoor``, else ``~/.cache/anydoor``), then the
  URL's host and path: ``https://example.com/m/anydoor-fp16.safetensors`` is cached as
  ``<cache>/example.com/m/anydoor-fp16.safetensors``. Named by URL rather than by content so that an operator can
  see what is cached, and so that the file keeps its suffix (the loader picks ``.safetensors``/``.ckpt`` by it).
  The query string is not part of the name: a pre-signed URL whose signature changes on each run still finds
  the same cached file.
* **Concurrency**: replicas sharing a cache volume take an exclusive ``flock`` on the target directory, so one
  downloads while the others wait and then find the finished file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from model.progress import ProgressBar, human_bytes

__all__ = [
    "ChecksumError",
    "DownloadError",
    "cache_path",
    "default_cache_dir",
    "download",
    "file_sha256",
    "is_url",
    "resolve_weights",
]

DEFAULT_CHUNK_SIZE = 1 << 20
_USER_AGENT = "anydoor-serve-download/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Statuses worth another try: the server or a proxy in front of it is briefly unwell.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
RETRY_BACKOFF_S = 0.5
"""First wait before a retry; doubled each time, at most 10 s."""


class DownloadError(RuntimeError):
    """A download that could not be completed (HTTP error, network failure, bad URL)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected SHA-256; nothing was left in the cache."""


def is_url(spec: str) -> bool:
    return urlsplit(str(spec)).scheme in ("http", "https")


def default_cache_dir() -> Path:
    """``$ANYDOOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/anydoor`` (Cog sets it to ``/src/.cache``), else
    ``~/.cache/anydoor``."""
    if os.environ.get("ANYDOOR_CACHE_DIR"):
        return Path(os.environ["ANYDOOR_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "anydoor"
    return Path.home() / ".cache" / "anydoor"


def _url_parts(url: str) -> tuple[str, list[str]]:
    """The URL's host (with port) and its decoded path segments, checked to be safe as file names."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    if parts.port is not None:
        host = f"{host}_{parts.port}"
    segments = []
    for raw in parts.path.split("/"):
        segment = unquote(raw)
        if not segment:
            continue
        # A decoded segment must not climb out of the cache or hide as a dot file.
        if segment in (".", "..") or "/" in segment or "\x00" in segment or segment.startswith("."):
            raise ValueError(f"URL path segment {segment!r} cannot be used as a file name: {url!r}")
        segments.append(segment)
    if not segments:
        raise ValueError(f"URL has no file name: {url!r}")
    return host, segments


def cache_path(url: str, cache_dir: Path | None = None) -> Path:
    """Where ``url`` lives in the cache: ``<cache>/<host>/<path>`` (query and fragment dropped)."""
    host, segments = _url_parts(url)
    return (cache_dir if cache_dir is not None else default_cache_dir()).joinpath(host, *segments)


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256.fullmatch(value):
        raise ValueError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    return value


def file_sha256(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --- progress -----------------------------------------------------------------------------------------------


# --- the transfer -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` itself, so no lock file is left behind."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            # NFS emulates flock with POSIX locks, which refuse an exclusive lock on a read-only descriptor (and
            # some filesystems have no locks at all): carry on unlocked, as a single downloader would.
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class _Digest:
    """A SHA-256 that can start over when the transfer does."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def reset(self) -> None:
        self._h = hashlib.sha256()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class _Restart(Exception):
    """The partial file cannot be resumed: drop it and fetch from byte 0."""


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (None, 200)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    # identity: a compressed body would make Range offsets and Content-Length refer to different bytes.
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    # urllib follows redirects (object stores, CDNs) and keeps the Range header on the redirected request.
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)  # noqa: S310


def _transfer(url: str, partial: Path, digest: _Digest, bar: ProgressBar, chunk_size: int, timeout: float) -> None:
    """Append the rest of ``url`` to ``partial`` (whose bytes ``digest`` has seen); raise on any interruption."""
    offset = partial.stat().st_size if partial.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            _, full = _content_range(exc.headers.get("Content-Range"))
            exc.close()
            if full == offset:  # the partial file already holds the whole body
                bar.begin(offset, full)
                return
            raise _Restart(f"the server refused to resume at byte {offset}") from exc
        raise
    with response:
        total: int | None
        if offset and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise _Restart(f"the server resumed at byte {start}, not {offset}")
        else:
            if offset:
                # 200 to a Range request: the server ignores ranges and sends the whole body, so start over.
                partial.unlink()
                digest.reset()
                offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        bar.begin(offset, total)
        done = offset
        with open(partial, "ab") as out:
            while chunk := response.read(chunk_size):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                bar.update(done)
            out.flush()
            os.fsync(out.fileno())
    # http.client returns a short body without raising when the peer closes early; Content-Length tells.
    if total is not None and done != total:
        raise http.client.IncompleteRead(b"", total - done)


def _hash_existing(partial: Path, digest: _Digest, chunk_size: int) -> int:
    if not partial.exists():
        return 0
    with open(partial, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return partial.stat().st_size


def _remove_empty_dirs(created: list[Path]) -> None:
    for directory in reversed(created):  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


def download(
    url: str,
    *,
    sha256: str | None,
    dest: Path | None = None,
    progress: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    retries: int = 3,
    timeout: float = 60.0,
    cache_dir: Path | None = None,
) -> Path:
    """Download ``url`` and return the path of the complete file.

    ``dest`` is a directory (the file keeps the URL's file name); without it the file goes to
    :func:`cache_path` under ``cache_dir`` (default :func:`default_cache_dir`). With ``sha256`` an existing
    file that matches is returned without a transfer (without it, the file is fetched again), and a transfer
    whose bytes do not match raises :class:`ChecksumError`, leaving nothing behind; when the bytes came partly
    from an earlier run's ``.partial`` file, which may belong to another version of the file, the transfer is
    first retried once from byte 0. A dropped connection is retried ``retries`` times, each
    resuming where the last stopped; when retries run out the ``.partial`` file stays so that the next call
    resumes. HTTP errors other than transient ones (429, 5xx) raise :class:`DownloadError` at once.
    """
    expected = _check_sha256(sha256)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    target = cache_path(url, cache_dir) if dest is None else Path(dest).expanduser() / _url_parts(url)[1][-1]
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()][::-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    existed = target.is_file()
    with _locked(target.parent):
        if target.is_file():
            if not existed and expected is None:
                return target  # another process finished it while this one waited for the lock
            if expected is not None and file_sha256(target, chunk_size) == expected:
                return target
            # otherwise a stale or damaged copy: fetch again, and replace it only once the new one is verified
        partial = target.with_name(target.name + ".partial")
        bar = ProgressBar(target.name, progress)
        for fresh in (False, True):
            digest = _Digest()
            if fresh:
                partial.unlink(missing_ok=True)
            resumed = _hash_existing(partial, digest, chunk_size) > 0
            attempt = 0
            while True:
                try:
                    _transfer(url, partial, digest, bar, chunk_size, timeout)
                    break
                except _Restart:
                    partial.unlink(missing_ok=True)
                    digest.reset()
                except urllib.error.HTTPError as exc:
                    if exc.code not in _RETRY_STATUS or attempt >= retries:
                        if not partial.exists():
                            _remove_empty_dirs(created)
                        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
                except (OSError, http.client.HTTPException) as exc:
                    if attempt >= retries:
                        have = partial.stat().st_size if partial.exists() else 0
                        raise DownloadError(
                            f"download of {url} interrupted after {human_bytes(have)} ({exc!r}); "
                            f"run again to resume from {partial}"
                        ) from exc
                attempt += 1
                time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), 10.0))
            bar.end(partial.stat().st_size if partial.exists() else 0)
            actual = digest.hexdigest()
            if expected is None or actual == expected:
                break
            partial.unlink(missing_ok=True)
            if resumed and not fresh:
                continue  # the partial file may have come from another version of the file: retry from zero
            _remove_empty_dirs(created)
            raise ChecksumError(f"{url}: sha256 is {actual}, expected {expected}; the download was deleted")
        os.replace(partial, target)
        _fsync_dir(target.parent)
    return target


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_weights(
    spec: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Turn an ``ANYDOOR_WEIGHTS`` value into a local file.

    An http(s) URL is downloaded into the cache once and reused afterwards: a cached file is complete by
    construction (atomic rename), and with ``sha256`` it is also verified. Anything else is a local path, which
    must exist (and match ``sha256`` when given).
    """
    expected = _check_sha256(sha256)
    text = os.fspath(spec)
    if is_url(text):
        target = cache_path(text, cache_dir)
        if target.is_file() and expected is None:
            return target
        return download(text, sha256=expected, dest=target.parent, progress=progress)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise ValueError(f"unsupported weights URL scheme in {text!r}: use http(s) or a local path")
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if expected is not None:
        actual = file_sha256(path)
        if actual != expected:
            raise ChecksumError(f"{path}: sha256 is {actual}, expected {expected}")
    return path
