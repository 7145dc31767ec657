"""model.weights.download against a real HTTP server on 127.0.0.1 serving the tiny reference weights."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import model.weights.download
from model.progress import ProgressBar
from model.weights.download import (
    ChecksumError,
    DownloadError,
    cache_path,
    default_cache_dir,
    download,
    resolve_weights,
)

WEIGHTS = Path(__file__).parent / "fixtures" / "reference" / "case_a" / "model.safetensors"
BODY = WEIGHTS.read_bytes()
SHA = hashlib.sha256(BODY).hexdigest()
CHUNK = 64 * 1024


@dataclass
class ServerState:
    body: bytes = BODY
    honour_range: bool = True
    cut_next: int = 0  # this many coming responses stop halfway through and drop the connection
    requests: list[str | None] = field(default_factory=list)  # the Range header of each GET
    bytes_sent: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self.server.state  # type: ignore[attr-defined]
        if self.path.split("?")[0] != "/weights/model.safetensors":
            self.send_error(404, "Not Found")
            return
        rng = self.headers.get("Range")
        state.requests.append(rng)
        body, start = state.body, 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and state.honour_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if state.cut_next > 0:
            state.cut_next -= 1
            payload = payload[: len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)
        state.bytes_sent += len(payload)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model.weights.download, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/weights/model.safetensors", httpd.state  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.slow
def test_clean_download_lands_in_the_cache_by_url(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    out = download(url + "?X-Signature=abc", sha256=SHA, cache_dir=tmp_path, progress=False, chunk_size=CHUNK)
    port = url.split(":")[2].split("/")[0]
    assert out == tmp_path / f"127.0.0.1_{port}" / "weights" / "model.safetensors"
    assert out.read_bytes() == BODY
    assert files_under(tmp_path) == [out]  # no .partial left behind
    assert state.requests == [None]


@pytest.mark.slow
def test_resolve_weights_downloads_once_then_reuses_the_cache(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    first = resolve_weights(url, sha256=SHA, cache_dir=tmp_path, progress=False)
    second = resolve_weights(url, sha256=SHA, cache_dir=tmp_path, progress=False)
    third = resolve_weights(url, cache_dir=tmp_path, progress=False)
    assert first == second == third == cache_path(url, tmp_path)
    assert len(state.requests) == 1


@pytest.mark.slow
def test_interrupted_transfer_is_resumed_with_a_range_request(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    state.cut_next = 1
    with pytest.raises(DownloadError, match="run again to resume"):
        download(url, sha256=SHA, dest=tmp_path, progress=False, retries=0, chunk_size=CHUNK)
    partial = tmp_path / "model.safetensors.partial"
    half = len(BODY) // 2
    assert partial.stat().st_size == half
    assert not (tmp_path / "model.safetensors").exists()

    out = download(url, sha256=SHA, dest=tmp_path, progress=False, retries=0, chunk_size=CHUNK)
    assert out.read_bytes() == BODY
    assert state.requests == [None, f"bytes={half}-"]
    assert state.bytes_sent == len(BODY)  # the second request sent only the missing half
    assert files_under(tmp_path) == [out]


@pytest.mark.slow
def test_a_dropped_connection_is_retried_and_resumed_within_one_call(
    server: tuple[str, ServerState], tmp_path: Path
) -> None:
    url, state = server
    state.cut_next = 2
    out = download(url, sha256=SHA, dest=tmp_path, progress=False, retries=2, chunk_size=CHUNK)
    assert out.read_bytes() == BODY
    half, quarter = len(BODY) // 2, (len(BODY) - len(BODY) // 2) // 2
    assert state.requests == [None, f"bytes={half}-", f"bytes={half + quarter}-"]


@pytest.mark.slow
def test_a_server_that_ignores_range_restarts_from_zero(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    state.honour_range = False
    (tmp_path / "model.safetensors.partial").write_bytes(BODY[:1000])
    out = download(url, sha256=SHA, dest=tmp_path, progress=False, chunk_size=CHUNK)
    assert out.read_bytes() == BODY
    assert state.requests == ["bytes=1000-"]  # answered 200 with the whole body, written from the start


@pytest.mark.slow
def test_a_complete_partial_file_is_finished_on_416(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    (tmp_path / "model.safetensors.partial").write_bytes(BODY)
    out = download(url, sha256=SHA, dest=tmp_path, progress=False, chunk_size=CHUNK)
    assert out.read_bytes() == BODY
    assert state.bytes_sent == 0


@pytest.mark.slow
def test_wrong_checksum_is_rejected_and_leaves_nothing_in_the_cache(
    server: tuple[str, ServerState], tmp_path: Path
) -> None:
    url, _ = server
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=f"expected {wrong}"):
        download(url, sha256=wrong, cache_dir=tmp_path, progress=False, chunk_size=CHUNK)
    assert files_under(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # the directories made for it are gone too
    with pytest.raises(ChecksumError):
        resolve_weights(url, sha256=wrong, cache_dir=tmp_path, progress=False)
    assert files_under(tmp_path) == []


@pytest.mark.slow
def test_a_stale_partial_from_another_file_is_discarded_after_a_mismatch(
    server: tuple[str, ServerState], tmp_path: Path
) -> None:
    url, state = server
    (tmp_path / "model.safetensors.partial").write_bytes(b"\xff" * 4096)  # not the start of this file
    out = download(url, sha256=SHA, dest=tmp_path, progress=False, chunk_size=CHUNK)
    assert out.read_bytes() == BODY
    assert state.requests == ["bytes=4096-", None]


@pytest.mark.slow
def test_a_damaged_cached_file_is_downloaded_again(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    target = cache_path(url, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(BODY[:-1] + b"\x00")
    assert resolve_weights(url, sha256=SHA, cache_dir=tmp_path, progress=False).read_bytes() == BODY
    assert len(state.requests) == 1


@pytest.mark.slow
def test_http_errors_name_the_status_and_leave_nothing(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(
            url.replace("model.safetensors", "missing.safetensors"), sha256=SHA, cache_dir=tmp_path, progress=False
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_progress_bar_reports_on_stderr(
    server: tuple[str, ServerState], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    download(url, sha256=SHA, dest=tmp_path, chunk_size=CHUNK)
    err = capsys.readouterr().err
    assert "model.safetensors:" in err and "100.0%" in err
    # On a log (not a terminal) it prints one line per tenth, not one per chunk.
    assert 2 <= err.count("\n") <= 12


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    bar = ProgressBar("w.safetensors", True, stream)
    bar.begin(0, 1000)
    bar.end(1000)
    assert stream.getvalue().startswith("\r[") and "100.0%" in stream.getvalue()
    assert stream.getvalue().endswith("\n")


def test_local_paths_are_returned_as_they_are(tmp_path: Path) -> None:
    assert resolve_weights(str(WEIGHTS)) == WEIGHTS
    assert resolve_weights(WEIGHTS, sha256=SHA.upper()) == WEIGHTS
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        resolve_weights(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ChecksumError):
        resolve_weights(str(WEIGHTS), sha256="1" * 64)
    with pytest.raises(ValueError, match="unsupported weights URL scheme"):
        resolve_weights("s3://bucket/model.safetensors")


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download("http://127.0.0.1:9/w.safetensors", sha256="abc")
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        cache_path("http://example.com/a/%2e%2e/w.safetensors")
    with pytest.raises(ValueError, match="no file name"):
        cache_path("https://example.com/")


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANYDOOR_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ANYDOOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "anydoor"


@pytest.mark.slow
def test_concurrent_downloads_of_one_url_fetch_it_once(server: tuple[str, ServerState], tmp_path: Path) -> None:
    url, state = server
    results: list[Path] = []

    def fetch() -> None:
        results.append(download(url, sha256=SHA, cache_dir=tmp_path, progress=False, chunk_size=CHUNK))

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 3 and len(set(results)) == 1 and results[0].read_bytes() == BODY
    assert state.requests == [None]  # the others waited on the directory lock, then found the verified file
