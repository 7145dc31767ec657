"""Several servers: each request goes to the one with the fewest requests in flight, ties taken in turn."""

from __future__ import annotations

import threading
from collections.abc import Sequence


class ServerPool:
    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("at least one base URL is needed")
        self.urls = list(urls)
        self.busy = [0] * len(self.urls)
        self._turn = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            n = len(self.urls)
            order = [(self._turn + k) % n for k in range(n)]
            index = min(order, key=lambda i: self.busy[i])
            self._turn = (index + 1) % n
            self.busy[index] += 1
            return index

    def release(self, index: int) -> None:
        with self._lock:
            self.busy[index] -= 1
