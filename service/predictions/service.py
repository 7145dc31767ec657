"""Async predictions: the Cog prediction API's life cycle on top of the service's one GPU queue.

A prediction is stored (:mod:`.store`) the moment it is accepted, queued in memory in arrival order, and taken off
that queue by the dispatcher when the model is ready: at most ``max_batch`` async predictions are being decoded or
sit in the GPU worker's queue at once, so they batch with each other and leave room for ``/predict`` requests.
Each runs exactly like a ``/predict`` request (:meth:`InferenceService.prepare` then :meth:`execute`, the same
worker, progress events and cancellation), without the queue timeout. Status changes are written to the store and
reported as webhooks (:mod:`.webhooks`); ``logs`` and ``output`` stay in memory while a prediction runs.

Cancellation: a queued prediction is ended at once and never runs; a running one is ended at once too, and its
job is taken out of the worker's queue or stopped at its next denoising step (in a batch with others, the batch
runs on and its result is dropped). A finished one is unchanged.

On start, predictions that were queued or running when the process stopped are queued again in their original
order (with their stored seed, so they give the bytes they would have given) and undelivered ``completed``
webhooks are sent again. On shutdown, what has not finished within the grace period stays queued in the store.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from model.errors import ErrorCode, InputError
from model.pipeline.result import TIMING_NAMES, timings_text
from model.spec.fields import INT64_MAX
from service.errors import ServiceError, overloaded
from service.inference import (
    LARGE_REQUEST_BYTES,
    Candidate,
    InferenceService,
    Prediction,
    release_free_memory,
    uploaded_bytes,
)
from service.metrics import Metrics
from service.predictions.decode import check_input, decode_input
from service.predictions.fetch import RemoteFiles
from service.predictions.store import (
    NO_WEBHOOK,
    STATUSES,
    WEBHOOK_ABANDONED,
    WEBHOOK_DELIVERED,
    WEBHOOK_PENDING,
    JobStore,
    PredictionRecord,
    StoreFull,
)
from service.predictions.urlguard import UrlGuard
from service.predictions.webhooks import EVENTS, WebhookSender
from service.settings import Settings, default_job_store, webhook_key
from service.worker import WorkerState

log = logging.getLogger("anydoor.service.predictions")

T = TypeVar("T")
NO_QUEUE_TIMEOUT_S = 365 * 24 * 3600.0  # async predictions wait as long as it takes
RETRY_SUBMIT_S = 0.2  # the GPU queue was full (of /predict requests): try again after this long
WAIT_POLL_S = 0.5  # how often a synchronous request looks whether its prediction can still finish here
# The codes that end a prediction only because this process is stopping: it stays queued for the next start.
_STOPPING = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.DRAINING})


def _has_url(values: Any) -> bool:
    """Does a prediction's input name an http(s) URL (whose host must be resolved to be checked)?"""
    if not isinstance(values, dict):
        return False
    items = [v for value in values.values() for v in (value if isinstance(value, list) else [value])]
    return any(isinstance(v, str) and v[:8].lower().startswith(("http://", "https://")) for v in items)


def body_hash(request: dict[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class _Live:
    """A prediction queued or running in this process: the record as it stands, and its task."""

    record: PredictionRecord
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class PredictionService:
    def __init__(self, settings: Settings, inference: InferenceService, metrics: Metrics, *,
                 guard: UrlGuard | None = None) -> None:
        self.settings = settings
        self.inference = inference
        self.metrics = metrics
        self.guard = guard or UrlGuard(settings.webhook_allow_hosts)
        self.files = RemoteFiles(self.guard, max_bytes=settings.limits.max_upload_bytes,
                                 timeout_s=settings.fetch_timeout_s)
        self.store_path = default_job_store(settings)
        self.store: JobStore | None = None
        self.webhooks = WebhookSender(
            self.guard, key=webhook_key(settings.webhook_secret) if settings.webhook_secret else None,
            auth_token=settings.webhook_auth_token, timeout_s=settings.webhook_timeout_s,
            retry_s=settings.webhook_retry_s, on_completed=self._on_webhook_completed,
            on_result=lambda event, outcome: metrics.webhooks.labels(event, outcome).inc())
        self.slots = max(1, settings.max_batch)  # async predictions decoding or in the GPU queue at once
        self._db: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue: deque[str] = deque()
        self._live: dict[str, _Live] = {}
        self._wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        metrics.prediction_queue_depth.set_function(lambda: float(len(self._queue)))
        metrics.webhook_backlog.set_function(lambda: float(self.webhooks.backlog))
        for status in STATUSES:
            metrics.predictions.labels(status).set_function(functools.partial(self._count, status))

    def _count(self, status: str) -> float:
        return float(self.store.counts.get(status, 0)) if self.store is not None else 0.0

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, queue what a previous process left unfinished, resend owed webhooks."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="anydoor-job-store")
        settings = self.settings
        self.store = await self._call(JobStore, self.store_path, max_predictions=settings.max_predictions,
                                      ttl_s=settings.prediction_ttl_s)
        self.webhooks.start()
        active = await self._call(self.store.active)
        for record in active:
            record = record.with_(status="starting", started_at=None, logs="", output=None, metrics={})
            await self._call(self.store.update, record)
            self._live[record.id] = _Live(record)
            self._queue.append(record.id)
        undelivered = await self._call(self.store.undelivered)
        for record in undelivered:
            if record.webhook:
                self.webhooks.send(record.id, record.webhook, "completed", record.to_json(), record.events)
        if active or undelivered:
            log.info("job store %s: %d prediction(s) queued again, %d completed webhook(s) sent again",
                     self.store_path, len(active), len(undelivered))
        self._wake.set()
        self._spawn(self._dispatch())
        self._spawn(self._sweep())

    async def stop(self) -> None:
        """Stop dispatching; what has not finished stays in the store for the next start."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        running = [live.task for live in self._live.values() if live.task is not None and not live.task.done()]
        if running:  # the inference service's shutdown has already answered their jobs; let them record it
            await asyncio.wait(running, timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self.webhooks.stop()
        if self.store is not None:
            await self._call(self.store.close)
        if self._db is not None:
            self._db.shutdown(wait=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store's one thread (SQLite never runs on the event loop)."""
        assert self._db is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, functools.partial(fn, *args, **kwargs))

    # --- the API --------------------------------------------------------------------------------------------

    async def create(self, prediction_id: str, body: dict[str, Any]) -> tuple[PredictionRecord, bool]:
        """Accept a prediction (checked, stored, queued), or return the stored one with the same id and body.

        Raises 4xx for a bad input or URL, 409 for a known id with another body, 429 when the store is full,
        503 while draining or when the model failed to load."""
        assert self.store is not None
        request = {"input": body.get("input"), "webhook": body.get("webhook"),
                   "webhook_events_filter": body.get("webhook_events_filter")}
        digest = body_hash(request)
        existing = self._live.get(prediction_id)
        record = existing.record if existing is not None else await self._call(self.store.get, prediction_id)
        if record is not None:
            return self._same(record, digest), False
        error = self.inference.availability_error()
        if self._stopping or (error is not None and error.code is not ErrorCode.NOT_READY):
            raise error or ServiceError(ErrorCode.DRAINING, "the server is shutting down and takes no new "
                                        "requests")
        events = self._events_filter(body.get("webhook_events_filter"))
        webhook = body.get("webhook")
        limits = self.settings.limits

        def checked() -> int | None:
            if webhook is not None:
                if not isinstance(webhook, str):
                    raise InputError("webhook", ErrorCode.INVALID_PARAMETER, "must be a URL (a string)")
                self.guard.check(webhook, "webhook")
            _, params = check_input(body.get("input"), limits, self.files)
            return params.seed

        try:
            if webhook is None and not _has_url(body.get("input")):
                seed = checked()  # no host to resolve: cheap enough for the event loop (a 202 is due at once)
            else:
                seed = await anyio.to_thread.run_sync(checked)  # DNS lookups: off the event loop
        except InputError as exc:
            raise ServiceError.from_input_error(exc) from None
        if seed is None:
            seed = random.SystemRandom().randrange(INT64_MAX)  # drawn once: a rerun after a crash gives the same
        record = PredictionRecord(prediction_id, digest, body["input"], webhook, events, seed,
                                  webhook_state=WEBHOOK_PENDING if webhook and "completed" in events else NO_WEBHOOK)
        try:
            stored, created = await self._call(self.store.create, record)
        except StoreFull as exc:
            raise self._full(exc) from None
        if not created:  # the same id arrived twice at once
            return self._same(stored, digest), False
        self._live[prediction_id] = _Live(stored)
        self._queue.append(prediction_id)
        assert self._wake is not None
        self._wake.set()
        log.info("prediction %s: queued (%d waiting)", prediction_id, len(self._queue))
        return stored, True

    def _same(self, record: PredictionRecord, digest: str) -> PredictionRecord:
        if record.body_hash != digest:
            raise ServiceError(ErrorCode.PREDICTION_CONFLICT, f"a prediction with the id {record.id!r} exists with "
                               "a different body; use a new id", field="id")
        return record

    def _events_filter(self, value: Any) -> tuple[str, ...]:
        if value is None:
            return EVENTS
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ServiceError(ErrorCode.INVALID_PARAMETER, f"must be a list of events ({', '.join(EVENTS)})",
                               field="webhook_events_filter")
        unknown = [v for v in value if v not in EVENTS]
        if unknown:
            raise ServiceError(ErrorCode.INVALID_PARAMETER, f"unknown event {unknown[0]!r}; the events are "
                               f"{', '.join(EVENTS)}", field="webhook_events_filter")
        return tuple(e for e in EVENTS if e in value)

    def _full(self, exc: StoreFull) -> ServiceError:
        if exc.retry_after_s is not None:
            retry = max(1, min(3600, math.ceil(exc.retry_after_s)))
        else:
            retry = self.inference.worker.retry_after_s(len(self._queue))
        error = overloaded(retry)
        return ServiceError(error.code, f"the prediction store holds its limit of {self.settings.max_predictions} "
                            "predictions; retry later", headers=dict(error.headers or {}))

    async def get(self, prediction_id: str) -> PredictionRecord:
        live = self._live.get(prediction_id)
        if live is not None:
            return live.record
        assert self.store is not None
        record = await self._call(self.store.get, prediction_id)
        if record is None:
            raise ServiceError(ErrorCode.PREDICTION_NOT_FOUND, f"no prediction with the id {prediction_id!r}",
                               field="id")
        return record

    async def wait(self, prediction_id: str) -> PredictionRecord:
        """The prediction once it has finished (at once if it has). 503 if it cannot finish in this process: the
        model failed to load, or the server is draining and it was not started (it stays queued in the store)."""
        live = self._live.get(prediction_id)
        while live is not None and not live.done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(live.done.wait(), timeout=WAIT_POLL_S)
            if live.done.is_set():
                break
            if self.inference.worker.state is WorkerState.FAILED:
                error = self.inference.availability_error()
                assert error is not None
                raise error
            started = live.task is not None and not live.task.done()
            if (self.inference.draining or self._stopping) and not started:
                raise ServiceError(ErrorCode.DRAINING, f"the server is shutting down; the prediction "
                                   f"{prediction_id!r} stays queued and runs after the restart (poll "
                                   "GET /predictions/{id})")
        if live is not None:
            return live.record
        return await self.get(prediction_id)

    async def cancel(self, prediction_id: str) -> PredictionRecord:
        live = self._live.get(prediction_id)
        if live is None or live.record.terminal:
            return await self.get(prediction_id)  # finished (unchanged) or unknown (404)
        if prediction_id in self._queue:
            self._queue.remove(prediction_id)
            log.info("prediction %s: canceled while queued", prediction_id)
        elif live.task is not None:
            live.task.cancel()  # its job leaves the GPU queue, or stops at the next denoising step
            log.info("prediction %s: canceled while %s", prediction_id, live.record.status)
        await self._finish(live, status="canceled", error=None, error_code=None)
        return live.record

    # --- running ---------------------------------------------------------------------------------------------

    def _running(self) -> int:
        return sum(1 for live in self._live.values() if live.task is not None and not live.task.done())

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while (self._queue and not self._stopping and self._running() < self.slots
                   and self.inference.worker.state is WorkerState.READY and not self.inference.draining):
                prediction_id = self._queue.popleft()
                live = self._live.get(prediction_id)
                if live is None or live.record.terminal:
                    continue
                live.task = asyncio.ensure_future(self._run(live))
                live.task.add_done_callback(lambda _: self._wake.set() if self._wake is not None else None)
            if self._queue and self.inference.worker.state is WorkerState.STARTING:
                await asyncio.sleep(0.2)  # the model is loading: look again shortly
                self._wake.set()

    async def _run(self, live: _Live) -> None:
        record = live.record
        try:
            inputs, params = await anyio.to_thread.run_sync(decode_input, record.input, self.settings.limits,
                                                             self.files)
            if params.seed is None and record.seed is not None:
                params = params.with_seed(record.seed)
            large = uploaded_bytes(inputs) > LARGE_REQUEST_BYTES
            prepared = await self.inference.prepare(inputs, params)
            del inputs
            while True:
                try:
                    result = await self.inference.execute(
                        prepared, request_id=record.id, receive=None, queue_timeout_s=NO_QUEUE_TIMEOUT_S,
                        events=lambda name, data: self._on_event(live, name, data, params.steps))
                    break
                except ServiceError as exc:
                    if exc.code is not ErrorCode.OVERLOADED:
                        raise
                    await asyncio.sleep(RETRY_SUBMIT_S)  # the GPU queue is full of /predict requests
        except asyncio.CancelledError:
            return  # canceled: cancel() has recorded it
        except InputError as exc:
            await self._finish(live, status="failed", error=str(exc), error_code=exc.code.value)
        except ServiceError as exc:
            if exc.code in _STOPPING or self._stopping:
                log.info("prediction %s: left queued for the next start (%s)", record.id, exc.code.value)
                return
            await self._finish(live, status="failed", error=exc.message, error_code=exc.code.value)
        except Exception:
            log.exception("prediction %s failed", record.id)
            await self._finish(live, status="failed", error="the generation failed unexpectedly; the server log "
                               "has the details under this prediction id", error_code=ErrorCode.INTERNAL_ERROR.value)
        else:
            del prepared
            await self._succeed(live, result)
            if large:  # the decoded images are garbage now: hand the freed heap back, off the event loop
                asyncio.get_running_loop().run_in_executor(None, release_free_memory)

    def _on_event(self, live: _Live, name: str, data: dict[str, Any], total: int) -> None:
        """A progress event of the running job (on the event loop)."""
        if live.record.terminal:
            return
        if name == "started":
            live.record = live.record.with_(status="processing", started_at=time.time())
            self._spawn(self._call(self._store().update, live.record))
            self._webhook(live, "start")
        elif name == "progress":
            step = int(data["step"])
            if step == total or step % max(1, total // 10) == 0:  # as the Cog predictor logs
                live.record = live.record.with_(logs=live.record.logs + f"step {step}/{total}\n")
                self._webhook(live, "logs")

    async def _succeed(self, live: _Live, result: Prediction) -> None:
        if live.record.terminal:
            return
        timings = {stage: round(result.timings[stage], 4) for stage in TIMING_NAMES}
        started = live.record.started_at or time.time()
        # As the Cog predictor: a list of files, the candidates best first (one for a single output).
        ranked = result.candidates or (Candidate(result.data, result.seed, result.scores),)
        metrics: dict[str, Any] = {"predict_time": round(time.time() - started, 6), "seed": result.seed,
                                   "seeds": [c.seed for c in ranked], "regions": result.regions, "timing": timings}
        if result.scores is not None:
            metrics["scores"] = [c.scores.to_dict() if c.scores is not None else None for c in ranked]
        stage_text = timings_text({stage: result.timings[stage] for stage in TIMING_NAMES if stage != "queue"})
        logs = live.record.logs + f"seed={result.seed} regions={result.regions} {stage_text}\n"
        output = [f"data:{result.media_type};base64," + base64.b64encode(c.data).decode("ascii") for c in ranked]
        live.record = live.record.with_(logs=logs, output=output, metrics=metrics)
        self._webhook(live, "output")
        await self._finish(live, status="succeeded", error=None, error_code=None)

    async def _finish(self, live: _Live, *, status: str, error: str | None, error_code: str | None) -> None:
        """The one terminal transition: recorded in memory at once (a second one is ignored), then stored."""
        if live.record.terminal:
            return
        now = time.time()
        record = live.record.with_(status=status, error=error, error_code=error_code, completed_at=now)
        if status == "succeeded" and "predict_time" not in record.metrics:
            record = record.with_(metrics={**record.metrics, "predict_time": now - (record.started_at or now)})
        live.record = record
        if status != "succeeded":
            log.info("prediction %s: %s%s", record.id, status, f" ({error_code}: {error})" if error_code else "")
        try:
            await asyncio.shield(self._call(self._store().update, record))  # written even if the task is cancelled
        finally:
            self._webhook(live, "completed")
            live.done.set()
            self._live.pop(record.id, None)
            if self._wake is not None:
                self._wake.set()

    def _webhook(self, live: _Live, event: str) -> None:
        record = live.record
        if record.webhook:
            self.webhooks.send(record.id, record.webhook, event, record.to_json(), record.events)

    def _on_webhook_completed(self, prediction_id: str, delivered: bool) -> None:
        """From a sender thread: record that the completed webhook was acknowledged (or given up)."""
        loop, store, db = self._loop, self.store, self._db
        if loop is None or store is None or db is None:
            return
        state = WEBHOOK_DELIVERED if delivered else WEBHOOK_ABANDONED
        with contextlib.suppress(RuntimeError):  # the store's executor is shut down: the next start resends it
            db.submit(store.set_webhook_state, prediction_id, state)

    def _store(self) -> JobStore:
        assert self.store is not None
        return self.store

    async def _sweep(self) -> None:
        """Delete expired predictions now and then."""
        interval = max(1.0, min(60.0, self.settings.prediction_ttl_s / 4))
        while not self._stopping:
            await asyncio.sleep(interval)
            deleted = await self._call(self._store().expire)
            if deleted:
                log.info("job store: %d expired prediction(s) deleted", deleted)
