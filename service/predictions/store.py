"""The durable job store: every async prediction in one embedded SQLite database.

One row per prediction: the request (``input``, ``webhook``, the events filter) and its hash (for idempotent
``PUT``), the seed drawn for it when the input has none (so a prediction run again after a crash gives the bytes
it would have given), status, output or error, logs, metrics, timestamps, and whether its ``completed`` webhook is
still owed. The database runs in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the
process being killed (SIGKILL, OOM killer); only a power loss may lose the last commits. There is one connection
and one writer (a lock serialises every statement); the service calls it from one executor thread, never from
the event loop. ``:memory:`` keeps everything in memory (nothing survives a restart).

On start the service asks for :meth:`JobStore.active` (queued or running when the process stopped: run again) and
:meth:`JobStore.undelivered` (finished, ``completed`` webhook not acknowledged: sent again). Finished predictions
are deleted :meth:`expire` seconds after completion, and :meth:`count` bounds how many are held.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
# webhook_state: nothing owed, the completed webhook is owed, delivered, given up after the retry period.
NO_WEBHOOK, WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_ABANDONED = 0, 1, 2, 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    body_hash TEXT NOT NULL,
    input TEXT NOT NULL,
    webhook TEXT,
    events TEXT NOT NULL,
    seed INTEGER,
    status TEXT NOT NULL,
    output TEXT,
    error TEXT,
    error_code TEXT,
    logs TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    webhook_state INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS predictions_status ON predictions (status);
CREATE INDEX IF NOT EXISTS predictions_completed ON predictions (completed_at);
"""


def iso(timestamp: float | None) -> str | None:
    """A timestamp as Cog writes it: ISO 8601 in UTC."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


@dataclass(frozen=True)
class PredictionRecord:
    id: str
    body_hash: str
    input: dict[str, Any]
    webhook: str | None
    events: tuple[str, ...]
    seed: int | None
    status: str = "starting"
    output: list[str] | None = None  # data URIs, best first (Cog: the predictor's list of files)
    error: str | None = None
    error_code: str | None = None
    logs: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    webhook_state: int = NO_WEBHOOK

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def with_(self, **changes: Any) -> PredictionRecord:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The prediction object, as Cog's server answers it (plus ``input``, ``error_code`` and timestamps)."""
        return {"id": self.id, "input": self.input, "output": self.output, "status": self.status,
                "error": self.error, "error_code": self.error_code, "logs": self.logs, "metrics": self.metrics,
                "created_at": iso(self.created_at), "started_at": iso(self.started_at),
                "completed_at": iso(self.completed_at)}


_COLUMNS = tuple(f.name for f in fields(PredictionRecord))
_JSON_COLUMNS = {"input", "metrics", "events", "output"}


def _row(record: PredictionRecord) -> dict[str, Any]:
    row = asdict(record)
    for name in _JSON_COLUMNS:
        row[name] = json.dumps(row[name], separators=(",", ":"))
    return row


def _record(row: sqlite3.Row) -> PredictionRecord:
    values = {name: row[name] for name in _COLUMNS}
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name])
    values["events"] = tuple(values["events"])
    return PredictionRecord(**values)


class StoreFull(Exception):
    """The store holds ``max_predictions`` already; ``retry_after_s``: when the oldest finished one expires."""

    def __init__(self, retry_after_s: float | None) -> None:
        super().__init__("the prediction store is full")
        self.retry_after_s = retry_after_s


class JobStore:
    def __init__(self, path: str, *, max_predictions: int, ttl_s: float) -> None:
        self.path = path
        self.max_predictions = max_predictions
        self.ttl_s = ttl_s
        if path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            path = str(Path(path).expanduser())
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
        self.counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
        with self._lock:
            self._recount()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- reads ----------------------------------------------------------------------------------------------

    def get(self, prediction_id: str) -> PredictionRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        return _record(row) if row is not None else None

    def active(self) -> list[PredictionRecord]:
        """Queued and running predictions, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM predictions WHERE status IN ('starting', 'processing') ORDER BY seq").fetchall()
        return [_record(row) for row in rows]

    def undelivered(self) -> list[PredictionRecord]:
        """Finished predictions whose ``completed`` webhook was never acknowledged, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM predictions WHERE webhook_state = ? AND status IN "
                                      "('succeeded', 'failed', 'canceled') ORDER BY seq",
                                      (WEBHOOK_PENDING,)).fetchall()
        return [_record(row) for row in rows]

    def count(self) -> int:
        return sum(self.counts.values())

    # --- writes ---------------------------------------------------------------------------------------------

    def create(self, record: PredictionRecord) -> tuple[PredictionRecord, bool]:
        """Insert ``record``, or return the one stored under its id: (record, created). :class:`StoreFull` when
        the store holds ``max_predictions`` (after expiring what is due)."""
        with self._lock, self._transaction():
            row = self._conn.execute("SELECT * FROM predictions WHERE id = ?", (record.id,)).fetchone()
            if row is not None:
                return _record(row), False
            if sum(self.counts.values()) >= self.max_predictions:
                self._expire(time.time())
                self._recount()
                if sum(self.counts.values()) >= self.max_predictions:
                    oldest = self._conn.execute(
                        "SELECT MIN(completed_at) FROM predictions WHERE completed_at IS NOT NULL").fetchone()[0]
                    raise StoreFull(None if oldest is None else oldest + self.ttl_s - time.time())
            row_values = _row(record)
            self._conn.execute(f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES "
                               f"({', '.join(':' + c for c in _COLUMNS)})", row_values)
            self.counts[record.status] += 1
        return record, True

    def update(self, record: PredictionRecord) -> None:
        """Write every field of ``record`` (which exists) back."""
        row_values = _row(record)
        columns = [c for c in _COLUMNS if c != "id"]
        with self._lock, self._transaction():
            self._conn.execute(f"UPDATE predictions SET {', '.join(f'{c} = :{c}' for c in columns)} WHERE id = :id",
                               row_values)
            self._recount()

    def set_webhook_state(self, prediction_id: str, state: int) -> None:
        with self._lock, self._transaction():
            self._conn.execute("UPDATE predictions SET webhook_state = ? WHERE id = ?", (state, prediction_id))

    def expire(self, now: float | None = None) -> int:
        """Delete the finished predictions completed more than ``ttl_s`` ago; how many were deleted."""
        with self._lock, self._transaction():
            deleted = self._expire(time.time() if now is None else now)
            self._recount()
        return deleted

    def _expire(self, now: float) -> int:
        cursor = self._conn.execute(
            "DELETE FROM predictions WHERE completed_at IS NOT NULL AND completed_at <= ? AND status IN "
            "('succeeded', 'failed', 'canceled') AND webhook_state != ?", (now - self.ttl_s, WEBHOOK_PENDING))
        return cursor.rowcount

    def _recount(self) -> None:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._conn.execute("SELECT status, COUNT(*) FROM predictions GROUP BY status"):
            counts[status] = n
        self.counts = counts

    def _transaction(self) -> Any:
        return _Transaction(self._conn)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")

