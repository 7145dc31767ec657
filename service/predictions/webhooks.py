"""Webhooks: a sender that never blocks the GPU worker, the event loop, health checks or cancellation.

:meth:`WebhookSender.send` only puts an event into the prediction's channel (a lock and an assignment) and
returns; a few sender threads do the HTTP. Each prediction's channel is a bounded queue, sent in order, one request
at a time:

* ``start``, ``output`` and ``logs`` are coalesced: a channel sends at most one of them per ``interval_s``
  (500 ms); a newer ``output``/``logs`` event replaces a queued one (each carries the whole prediction), a queued
  ``start`` is kept, and a queued ``output``/``logs`` is dropped once ``completed`` is queued behind it (which
  carries everything). So a channel holds at most three events. Each is tried once.
* ``completed`` is always queued, and retried with exponential backoff (0.5 s doubling to 30 s) until it is
  answered with a 2xx or ``retry_s`` has passed; ``on_completed(prediction_id, delivered)`` then reports the
  outcome (the service records it in the job store, which resends an unacknowledged one after a restart).

Every request is signed per Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id`` (stable per
message, so a receiver can drop repeats, including those resent after a restart), ``webhook-timestamp`` (Unix
seconds of the attempt) and ``webhook-signature`` ``v1,<base64 HMAC-SHA256 over "id.timestamp.body">`` with the
key of a ``whsec_`` secret; and, as Cog sends it, ``Authorization: Bearer <WEBHOOK_AUTH_TOKEN>``. The URL goes
through the SSRF guard on every attempt and redirect (:mod:`service.predictions.urlguard`).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from model.errors import InputError
from service.predictions.urlguard import UrlGuard, guarded_request

log = logging.getLogger("anydoor.service.webhooks")

EVENTS = ("start", "output", "logs", "completed")
NON_TERMINAL = frozenset({"start", "output", "logs"})
CHANNEL_SIZE = 4  # start, the latest output/logs, completed (and one in flight): coalescing keeps it below
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
USER_AGENT = "anydoor-serve-webhooks/1"

# post(url, body, headers) -> the HTTP status; raises on a failed exchange. Replaceable in tests.
Post = Callable[[str, bytes, dict[str, str]], int]


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature header value of one message."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


@dataclass
class Delivery:
    event: str
    message_id: str
    body: bytes
    first_try: float | None = None
    attempts: int = 0


@dataclass
class _Channel:
    prediction_id: str
    url: str
    queue: deque[Delivery] = field(default_factory=lambda: deque(maxlen=CHANNEL_SIZE))
    busy: bool = False
    next_at: float = 0.0  # monotonic: when the head of the queue may be sent
    last_progress: float = float("-inf")  # when the last start/output/logs event was sent
    sequence: int = 0
    scheduled: bool = False
    closed: bool = False  # the prediction has finished: no event follows its completed one


class WebhookSender:
    def __init__(self, guard: UrlGuard, *, key: bytes | None, auth_token: str | None, timeout_s: float,
                 retry_s: float, interval_s: float = 0.5, threads: int = 4,
                 on_completed: Callable[[str, bool], None] | None = None,
                 on_result: Callable[[str, str], None] | None = None, post: Post | None = None) -> None:
        self.guard = guard
        self.key = key
        self.auth_token = auth_token
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.interval_s = interval_s
        self.on_completed = on_completed
        self.on_result = on_result  # (event, "delivered" | "failed" | "abandoned"), for the metrics
        self._post = post or self._http_post
        self._channels: dict[str, _Channel] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._tiebreak = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._main, name=f"anydoor-webhooks-{i}", daemon=True)
                         for i in range(threads)]
        self._started = False

    # --- the producer side (any thread; never blocks on the network) -------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def backlog(self) -> int:
        """Events queued and not yet sent (or being retried)."""
        with self._cond:
            return sum(len(c.queue) for c in self._channels.values())

    def send(self, prediction_id: str, url: str, event: str, payload: dict[str, Any],
             events: Collection[str] = EVENTS) -> None:
        """Queue ``event`` (with the prediction object ``payload``) for ``url`` if ``events`` lets it through."""
        assert event in EVENTS, event
        with self._cond:
            if self._stopped:
                return
            channel = self._channels.get(prediction_id)
            if event not in events:
                if event == "completed" and channel is not None:
                    channel.closed = True  # the last event: forget the channel once it is idle
                    self._forget_if_idle(channel)
                return
            body = json.dumps(payload, separators=(",", ":")).encode()
            if channel is None:
                channel = self._channels[prediction_id] = _Channel(prediction_id, url)
            channel.sequence += 1
            message_id = f"{prediction_id}.{event}" if event in ("start", "completed") else \
                f"{prediction_id}.{event}.{channel.sequence}"
            delivery = Delivery(event, message_id, body)
            queue = channel.queue
            if event == "completed":
                channel.closed = True
                # Everything an output/logs event would say, completed says too.
                kept = [d for i, d in enumerate(queue)
                        if d.event in ("start", "completed") or (i == 0 and channel.busy)]
                queue.clear()
                queue.extend(kept[-(CHANNEL_SIZE - 1):])
                queue.append(delivery)
            elif event == "start":
                if not any(d.event == "start" for d in queue):
                    queue.insert(1 if channel.busy and queue else 0, delivery)  # never ahead of the one in flight
            else:
                if any(d.event == "completed" for d in queue):
                    return  # too late: completed is on its way
                for index, queued in enumerate(queue):
                    if index == 0 and channel.busy:
                        continue  # in flight
                    if queued.event in ("output", "logs"):
                        queue[index] = delivery  # coalesced: the newest state replaces the queued one
                        break
                else:
                    queue.append(delivery)
            self._schedule(channel)

    # --- the sender threads --------------------------------------------------------------------------------

    def _schedule(self, channel: _Channel) -> None:
        """Put the channel on the timer heap for its head event (lock held)."""
        if channel.busy or channel.scheduled or not channel.queue:
            return
        head = channel.queue[0]
        due = channel.next_at
        if head.event in NON_TERMINAL:
            due = max(due, channel.last_progress + self.interval_s)
        channel.scheduled = True
        heapq.heappush(self._heap, (due, next(self._tiebreak), channel.prediction_id))
        self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                channel = self._next_channel()
                if channel is None:
                    return
                delivery = channel.queue[0]
                channel.busy = True
            ok = self._attempt(channel, delivery)
            with self._cond:
                channel.busy = False
                now = time.monotonic()
                if delivery.event in NON_TERMINAL:
                    channel.last_progress = now
                    self._pop(channel, delivery)
                    self._report(delivery.event, "delivered" if ok else "failed")
                elif ok:
                    self._pop(channel, delivery)
                    self._report("completed", "delivered")
                    self._completed(channel.prediction_id, True)
                elif delivery.first_try is not None and now - delivery.first_try >= self.retry_s:
                    log.warning("prediction %s: giving up its completed webhook after %d attempts in %.0f s",
                                channel.prediction_id, delivery.attempts, now - delivery.first_try)
                    self._pop(channel, delivery)
                    self._report("completed", "abandoned")
                    self._completed(channel.prediction_id, False)
                else:
                    self._report("completed", "failed")
                    backoff = min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (delivery.attempts - 1))
                    channel.next_at = now + backoff
                if channel.queue:
                    self._schedule(channel)
                else:
                    self._forget_if_idle(channel)

    def _forget_if_idle(self, channel: _Channel) -> None:
        """Drop a finished prediction's channel once nothing is queued or in flight (lock held). A running one's
        channel stays, so its interval between progress events holds while its queue is empty."""
        if channel.closed and not channel.queue and not channel.busy:
            self._channels.pop(channel.prediction_id, None)

    def _next_channel(self) -> _Channel | None:
        """Wait for the earliest due channel (lock held); None once stopped."""
        while not self._stopped:
            if self._heap:
                due, _, prediction_id = self._heap[0]
                wait = due - time.monotonic()
                if wait <= 0:
                    heapq.heappop(self._heap)
                    channel = self._channels.get(prediction_id)
                    if channel is None:
                        continue
                    channel.scheduled = False
                    if channel.busy or not channel.queue:
                        continue
                    return channel
                self._cond.wait(wait)
            else:
                self._cond.wait()
        return None

    def _pop(self, channel: _Channel, delivery: Delivery) -> None:
        if channel.queue and channel.queue[0] is delivery:
            channel.queue.popleft()

    def _report(self, event: str, outcome: str) -> None:
        if self.on_result is not None:
            self.on_result(event, outcome)

    def _completed(self, prediction_id: str, delivered: bool) -> None:
        if self.on_completed is not None:
            try:
                self.on_completed(prediction_id, delivered)
            except Exception:  # never kill a sender thread
                log.exception("recording the webhook outcome of %s failed", prediction_id)

    def _attempt(self, channel: _Channel, delivery: Delivery) -> bool:
        if delivery.first_try is None:
            delivery.first_try = time.monotonic()
        delivery.attempts += 1
        headers = self.headers(delivery.message_id, int(time.time()), delivery.body)
        try:
            status = self._post(channel.url, delivery.body, headers)
        except InputError as exc:
            log.warning("prediction %s: %s webhook refused: %s", channel.prediction_id, delivery.event, exc)
            return False
        except (OSError, http.client.HTTPException) as exc:
            log.info("prediction %s: %s webhook failed (attempt %d): %s: %s", channel.prediction_id,
                     delivery.event, delivery.attempts, type(exc).__name__, exc)
            return False
        except Exception:
            log.exception("prediction %s: %s webhook failed unexpectedly", channel.prediction_id, delivery.event)
            return False
        if not 200 <= status < 300:
            log.info("prediction %s: %s webhook answered %d (attempt %d)", channel.prediction_id, delivery.event,
                     status, delivery.attempts)
            return False
        return True

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": message_id,
                   "webhook-timestamp": str(timestamp)}
        if self.key is not None:
            headers["webhook-signature"] = sign(self.key, message_id, timestamp, body)
        if self.auth_token:
            headers["Authorization"] = f"Bearer {self.auth_token}"
        return headers

    def _http_post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        # Only 307/308 keep a POST a POST; a receiver that answers 301-303 has moved, and is not followed.
        answer = guarded_request(self.guard, "POST", url, field="webhook", timeout_s=self.timeout_s, body=body,
                                 headers=headers, max_bytes=64 << 10, follow=frozenset({307, 308}))
        return answer.status
