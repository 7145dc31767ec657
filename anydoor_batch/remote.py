"""The remote engine: each line sent through :class:`client.AnyDoorClient` from ``concurrency`` threads (the least
busy server, ``Retry-After`` honoured, transient failures retried); this thread writes what comes back."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anydoor_batch.dataset import Finished
from anydoor_batch.manifest import Line
from anydoor_batch.report import Report
from client import AnyDoorClient, AnyDoorError
from model.errors import ErrorCode, InputError
from model.spec.files import LocalFiles
from model.spec.params import OUTPUT_FORMATS

BACKOFF_BASE_S = 0.5  # the client's backoff base; tests make it shorter
NOT_SENT = "not sent: no server answers"  # the message of the lines left once every server is down


def form_values(line: Line, files: LocalFiles | None = None) -> dict[str, Any]:
    """The line as :meth:`client.AnyDoorClient.predict`'s keywords, its files read here as ``(name, bytes)``, by
    the same checks as when the manifest was read."""
    files = files or LocalFiles()

    def read(name: str, value: Any) -> Any:
        if isinstance(value, list):
            return [read(name, v) for v in value]
        if isinstance(value, Path):
            return value.name, files(name, value)
        return value

    return {name: read(name, value) for name, value in line.values().items()}


@dataclass
class RemoteOptions:
    urls: Sequence[str]
    concurrency: int
    api_key: str | None
    retries: int
    timeout_s: float
    files: LocalFiles | None = None


Failure = tuple[str, "str | None", str]  # (code, field, message) of a line that failed


def send_line(line: Line, anydoor: AnyDoorClient, files: LocalFiles | None = None
              ) -> tuple[Finished | None, Failure | None]:
    """One line through the client: it retries transient failures (429/503 after Retry-After, 5xx, no answer)."""
    try:
        items = anydoor.form(form_values(line, files))
    except InputError as exc:
        return None, (exc.code.value, exc.field, exc.message)
    try:
        result = anydoor.send(items)
    except AnyDoorError as exc:
        return None, (exc.error, exc.field, exc.message)
    timings = {name: ms / 1000 for name, ms in result.timings_ms.items()}
    extra: dict[str, Any] = {"server": result.server, "attempts": result.attempts}
    if result.scores is not None:
        extra["scores"] = result.scores
    if result.candidates:  # num_outputs > 1: the answer is the best; the record keeps every seed and its scores
        extra["candidates"] = [{"seed": c["seed"], "scores": c["scores"]} for c in result.candidates]
    return Finished(result.png, result.width, result.height, result.seed, list(result.boxes), timings, extra,
                    OUTPUT_FORMATS[line.params.output_format][1]), None


def run_remote(lines: Sequence[Line], report: Report, options: RemoteOptions) -> None:
    """``concurrency`` threads send the lines; this thread writes what they bring back (one writer)."""
    anydoor = AnyDoorClient(options.urls, options.api_key, timeout=options.timeout_s, retries=options.retries,
                            backoff_base_s=BACKOFF_BASE_S)
    todo: queue.Queue[Line] = queue.Queue()
    done: queue.Queue[tuple[Line, Finished | None, Any]] = queue.Queue()
    stop = threading.Event()
    down = threading.Event()  # a line gave up unreachable and then no server answered a health probe either
    probe = threading.Lock()
    for line in lines:
        todo.put(line)

    def gave_up(line: Line) -> None:
        # One slow or unlucky line is not an outage: stop sending only when no server answers at all, so that a
        # dead fleet fails the rest of a long manifest in seconds instead of a full retry budget per line.
        with probe:
            if not down.is_set() and not anydoor.alive():
                down.set()
                report.note(f"no server answers ({', '.join(anydoor.urls)}) after line {line.number} gave up: "
                            f"the {todo.qsize()} lines not yet sent fail as unreachable without being sent; "
                            "run the same command again to retry them")

    def worker() -> None:
        while not stop.is_set():
            try:
                line = todo.get_nowait()
            except queue.Empty:
                return
            if down.is_set():
                done.put((line, None, (ErrorCode.UNREACHABLE.value, None, NOT_SENT)))
                continue
            try:
                result, error = send_line(line, anydoor, options.files)
            except Exception as exc:  # a bug in one line must not strand the others
                result, error = None, (ErrorCode.INTERNAL_ERROR.value, None, f"{type(exc).__name__}: {exc}")
            if error is not None and error[0] == ErrorCode.UNREACHABLE.value:
                gave_up(line)
            done.put((line, result, error))

    # Daemon threads: on Ctrl-C the process exits without waiting for requests in flight (they are redone later).
    threads = [threading.Thread(target=worker, name=f"batch-{i}", daemon=True)
               for i in range(min(options.concurrency, max(len(lines), 1)))]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(lines)):
            line, result, error = done.get()
            if result is not None:
                report.generated(line, result)
            else:
                code, field_name, message = error
                report.line_failed(line.number, line.id, code, field_name, message, line.params.seed,
                                   echo=message != NOT_SENT)
    finally:
        stop.set()
        anydoor.close()
