"""Upload admission for ``POST /predict``: which request bodies are read, and which are dropped as too slow.

A body is read in three phases (:class:`BodyReader`, the ``receive`` the app gets):

1. **Proving** (no slot, no queue place): the body is received until ``READY_BYTES`` have arrived or it is
   complete. That much is what uvicorn buffers for any connection anyway (it pauses reading at 64 KiB), so this
   costs no more memory than an unread body. A small request completes here and never needs an upload slot.
2. **Admitted**: it takes a place among the admitted requests (``ANYDOOR_MAX_QUEUE``; 429 when there is none, with
   at most ``READY_BYTES`` of the body read) and, if more body follows, waits for one of the ``ANYDOOR_MAX_UPLOADS``
   upload slots, unread (TCP backpressure keeps its bytes in the client's socket).
3. **Reading** with a slot, to the end of the body.

While the server is reading (phases 1 and 3, never while it waits for a slot or parses), the body must arrive at
``ANYDOOR_MIN_BODY_RATE`` bytes per second, judged over each ``ANYDOOR_BODY_RATE_WINDOW_S`` of waiting for the
client; a body below it gets 408 ``request_timeout`` and its place and slot are freed. When a request waits for a
slot, a slot holder that has waited on its client for ``EVICT_AFTER_S`` with less than the rate is dropped at once
rather than at the end of its window.

So a trickling client (a request head and a part header, then a byte now and then) never holds a slot or a queue
place: those are reserved for bodies that have shown they flow, and slow uploads can take neither all the slots
nor all the places, however many there are. The guard lives in the ASGI layer, so it holds under any server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Receive

from model.errors import ErrorCode
from service.errors import ServiceError

READY_BYTES = 64 * 1024  # uvicorn's HIGH_WATER_LIMIT: what it buffers of a body before it stops reading
EVICT_AFTER_S = 1.0  # with a request waiting for a slot: how long a holder below the rate may wait on its client
CHECK_INTERVAL_S = 0.25  # how often holders are looked at while requests wait for a slot


def request_timeout(rate: float, window_s: float, got: int, waited_s: float) -> ServiceError:
    return ServiceError(
        ErrorCode.REQUEST_TIMEOUT,
        f"the request body arrived too slowly: {got} bytes in {waited_s:.1f} s; at least {rate:g} bytes per second "
        f"over each {window_s:g} s are required", field="body", headers={"Connection": "close"})


class UploadSlots:
    """``limit`` slots, granted oldest waiter first; holders below the rate make room for waiters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.holders: set[BodyReader] = set()
        self._waiters: deque[tuple[BodyReader, asyncio.Future[None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, reader: BodyReader) -> None:
        if len(self.holders) < self.limit and not self._waiters:
            self.holders.add(reader)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((reader, future))
        self._make_room()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(reader)  # granted as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((reader, future))
            raise

    def release(self, reader: BodyReader) -> None:
        if reader in self.holders:
            self.holders.discard(reader)
            self._grant()

    def _grant(self) -> None:
        while self._waiters and len(self.holders) < self.limit:
            reader, future = self._waiters.popleft()
            if not future.done():
                self.holders.add(reader)
                future.set_result(None)

    def _make_room(self) -> None:
        """Drop the holders that keep waiters out by being below the rate; look again shortly while any wait."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        slow = sorted((h for h in self.holders if h.evictable(now)), key=lambda h: h.rate(now))
        for holder in slow[:len(self._waiters)]:
            holder.evict(now)
        if self._waiters:
            self._timer = loop.call_later(CHECK_INTERVAL_S, self._make_room)


class BodyReader:
    """One request's ``receive`` for its body, with the phases and the rate rule of the module docstring.

    ``admit()`` takes the request's place among the admitted ones (raising 429 when there is none); ``on_evict``
    is called when the request is dropped for slowness from outside its own task (to free its place at once).
    """

    def __init__(self, receive: Receive, slots: UploadSlots, *, admit: Callable[[], None],
                 on_evict: Callable[[], None], min_rate: float, window_s: float,
                 ready_bytes: int = READY_BYTES) -> None:
        self._receive = receive
        self._slots = slots
        self._admit = admit
        self._on_evict = on_evict
        self.min_rate = min_rate
        self.window_s = window_s
        self._ready_bytes = ready_bytes
        self._started = False
        self._done = False
        self._holding = False
        self._pending: asyncio.Task[Message] | None = None
        self._evicted: asyncio.Future[ServiceError] | None = None
        # The current window: time spent waiting on the client, and the bytes that arrived meanwhile.
        self._waited = 0.0
        self._window_bytes = 0
        self._blocked_since: float | None = None

    async def __call__(self) -> Message:
        if self._done:
            return await self._receive()  # after the body (disconnect watching): untouched
        if not self._started:
            self._started = True
            message = await self._prove()
            if message["type"] != "http.request":
                self._finish()
                return message
            self._admit()
            if message.get("more_body", False):
                await self._slots.acquire(self)
                self._holding = True
                self._waited, self._window_bytes = 0.0, 0
            else:
                self._finish()
            return message
        message = await self._timed_receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._finish()
        return message

    def close(self) -> None:
        """The request is over: cancel a pending read, free the slot."""
        self._finish()

    # --- phases -----------------------------------------------------------------------------------------------

    async def _prove(self) -> Message:
        """Receive until READY_BYTES or the end of the body, as one message."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._timed_receive()
            if message["type"] != "http.request":
                return message
            body = message.get("body", b"")
            chunks.append(body)
            size += len(body)
            more = bool(message.get("more_body", False))
            if not more or size >= self._ready_bytes:
                return {"type": "http.request", "body": b"".join(chunks), "more_body": more}

    def _finish(self) -> None:
        self._done = True
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        self._pending = None
        if self._holding:
            self._holding = False
            self._slots.release(self)

    async def _timed_receive(self) -> Message:
        loop = asyncio.get_running_loop()
        if self._evicted is None:
            self._evicted = loop.create_future()
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._receive())
            started = self._blocked_since = loop.time()
            budget = max(0.0, self.window_s - self._waited) if self.min_rate > 0 else None
            waiters: set[asyncio.Future[Any]] = {self._pending, self._evicted}
            await asyncio.wait(waiters, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
            self._blocked_since = None
            self._waited += loop.time() - started
            if self._pending.done():
                message = self._pending.result()
                self._pending = None
                self._window_bytes += len(message.get("body", b""))
                if self.min_rate > 0 and self._waited >= self.window_s:
                    self._judge()
                return message
            if self._evicted.done():
                self._finish()
                raise self._evicted.result()
            self._judge()

    def _judge(self) -> None:
        """The end of a window: too few bytes is a violation; else a new window begins."""
        if self._window_bytes < self.min_rate * self._waited:
            error = request_timeout(self.min_rate, self.window_s, self._window_bytes, self._waited)
            self._finish()
            raise error
        self._waited, self._window_bytes = 0.0, 0

    # --- seen by the slots ------------------------------------------------------------------------------------

    def _waited_now(self, now: float) -> float:
        return self._waited + (now - self._blocked_since if self._blocked_since is not None else 0.0)

    def rate(self, now: float) -> float:
        waited = self._waited_now(now)
        return self._window_bytes / waited if waited > 0 else float("inf")

    def evictable(self, now: float) -> bool:
        """Waiting on its client now, for EVICT_AFTER_S of this window, with less than the rate."""
        if self.min_rate <= 0 or self._blocked_since is None or self._evicted is None or self._evicted.done():
            return False
        waited = self._waited_now(now)
        return waited >= min(EVICT_AFTER_S, self.window_s) and self._window_bytes < self.min_rate * waited

    def evict(self, now: float) -> None:
        assert self._evicted is not None
        self._evicted.set_result(request_timeout(self.min_rate, self.window_s, self._window_bytes,
                                                 self._waited_now(now)))
        if self._holding:
            self._holding = False
            self._slots.release(self)
        self._on_evict()
