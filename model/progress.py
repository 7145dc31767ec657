"""The one progress bar of the command line: downloads, conversions, sampling steps, batch images.

On a terminal it is redrawn in place (at most ten times a second); on a log (a container, CI) it prints one line
per tenth of the way, so logs stay short. Standard library only: the downloader uses it without torch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _count(n: float) -> str:
    return f"{n:.0f}"


class ProgressBar:
    """``name: 42.0% 21/50 steps 2.10 steps/s ETA 0:13``; ``unit`` names what is counted ("" for bytes)."""

    def __init__(self, name: str, enabled: bool = True, stream: IO[str] | None = None, *, unit: str = "",
                 amount: Callable[[float], str] | None = None) -> None:
        self.name = name
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.unit = unit
        self.amount = amount or (human_bytes if not unit else _count)
        self.total: int | None = None
        self.start_done = 0
        self.t0 = time.monotonic()
        self.last_draw = 0.0
        self.last_decile = -1

    def begin(self, done: int, total: int | None) -> None:
        self.total, self.start_done, self.t0 = total, done, time.monotonic()
        if self.enabled and done:
            self.stream.write(f"{self.name}: resuming at {self.amount(done)}\n")
        self.update(done, force=True)

    def __call__(self, done: int, total: int, *_: object) -> None:
        """As a ``progress(done, total, ...)`` callback (sampling steps, converted tensors)."""
        if self.total is None:
            self.total = total  # the clock runs from construction: the first step's time counts
        self.update(done)
        if done >= total:
            self.end(done)

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        rate = (done - self.start_done) / max(now - self.t0, 1e-6)
        unit = f" {self.unit}" if self.unit else ""
        rate_text = f"{self.amount(rate)}/s" if not self.unit else f"{rate:.2f}{unit}/s"
        if self.total:
            frac = min(done / self.total, 1.0)
            eta = (self.total - done) / rate if rate > 0 else 0.0
            text = (f"{self.name}: {frac * 100:5.1f}% {self.amount(done)}/{self.amount(self.total)}{unit} "
                    f"{rate_text} ETA {int(eta) // 60}:{int(eta) % 60:02d}")
            decile = int(frac * 10)
        else:
            frac, decile = 0.0, -1
            text = f"{self.name}: {self.amount(done)}{unit} {rate_text}"
        if self.tty:
            if not force and now - self.last_draw < 0.1:
                return
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width)) if self.total else ""
            self.stream.write(f"\r[{bar}] {text}" if bar else f"\r{text}")
        elif force or decile > self.last_decile:
            self.stream.write(text + "\n")
            self.last_decile = decile
        self.last_draw = now
        self.stream.flush()

    def end(self, done: int) -> None:
        if not self.enabled:
            return
        if self.tty or self.last_decile < 10:  # on a log, the 100 % line may be out already
            self.update(done, force=True)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
