"""Counts, the progress bar, the messages about bad lines (stderr) and the summary of a run."""

from __future__ import annotations

import threading
import time

from anydoor_batch.dataset import Finished, Outputs, segmentations
from anydoor_batch.manifest import BadLine, Line
from model.errors import InputError
from model.progress import ProgressBar


class Report:
    """Counts, the progress bar and the messages about bad lines (stderr)."""

    def __init__(self, outputs: Outputs, total: int, skipped: int, quiet: bool) -> None:
        self.outputs = outputs
        self.total, self.skipped = total, skipped
        self.ok = self.failed = 0
        self.bar = ProgressBar("batch", not quiet, unit="images")
        self.lock = threading.Lock()
        self.bar.begin(skipped, total)

    def start_clock(self) -> None:
        """Count the rate and ETA from here (after the model loaded and the bad lines were reported), so they
        measure generation, not start-up or the lines refused at once."""
        self.bar.start_done, self.bar.t0 = self.skipped + self.ok + self.failed, time.monotonic()

    def _done(self) -> None:
        self.bar.update(self.skipped + self.ok + self.failed)

    def generated(self, line: Line, result: Finished) -> None:
        """A line an engine generated: its shape annotations added (:func:`segmentations`), then recorded ok; a
        mask that cannot be read for them fails the line alone. Every engine ends a generated line here."""
        try:
            seg = segmentations(line, result.boxes)
            if seg is not None:
                result.extra["segmentation"] = seg
            self.succeeded(line, result)
        except InputError as exc:
            self.input_error(line, exc, result.seed)

    def succeeded(self, line: Line, result: Finished) -> None:
        self.outputs.ok(line, result)
        with self.lock:
            self.ok += 1
            self._done()

    def line_failed(self, number: int, line_id: str, code: str, field_name: str | None, message: str,
                    seed: int | None = None, echo: bool = True) -> None:
        """A failed line, recorded; ``echo=False`` for lines a :meth:`note` already accounted for."""
        self.outputs.failed(number, line_id, code, field_name, message, seed)
        with self.lock:
            self.failed += 1
            if echo:
                where = f" {field_name}:" if field_name and not message.startswith(f"{field_name}:") else ""
                self._write(f"line {number} (id {line_id}) failed:{where} {message} [{code}]")
            self._done()

    def note(self, message: str) -> None:
        """One message about the run (stderr, above the progress bar)."""
        with self.lock:
            self._write(message)

    def _write(self, text: str) -> None:
        clear = "\r\x1b[K" if self.bar.tty and self.bar.enabled else ""
        self.bar.stream.write(f"{clear}{text}\n")

    def input_error(self, line: Line | BadLine, exc: InputError, seed: int | None = None) -> None:
        self.line_failed(line.number, line.id, exc.code.value, exc.field, exc.message, seed)

    def summary(self, loaded_s: float, wall_s: float) -> str:
        self.bar.end(self.skipped + self.ok + self.failed)
        busy = max(wall_s - loaded_s, 1e-9)
        return (f"batch: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (done before) of {self.total} "
                f"lines; {self.ok / busy:.3f} images/s over {busy:.1f} s, wall time {wall_s:.1f} s "
                f"(model load {loaded_s:.1f} s)")
