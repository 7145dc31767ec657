"""The inference service behind ``POST /predict``: admission, preprocessing, the queue wait, draining.

One :class:`InferenceService` per app. It owns the :class:`~service.worker.GpuWorker` (which owns the model) and
answers the questions the routes and middleware ask: may a request come in, is the model ready, what does
Cog's health-check say. :meth:`InferenceService.predict` is the whole life of one request after its upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.types import Receive

from model.errors import ErrorCode, InputError
from model.pipeline import STAGES, GenerationInputs, GenerationParams, Job
from model.pipeline.result import OUTPUT_STAGE, Scores, server_timing
from model.spec.params import OUTPUT_FORMATS
from service.errors import ServiceError, client_gone, overloaded, queue_timeout
from service.metrics import STAGES as METRIC_STAGES
from service.metrics import Metrics
from service.settings import Settings
from service.uploads import BodyReader, UploadSlots
from service.worker import GpuWorker, Outcome, Pipeline, QueuedJob, WorkerState

log = logging.getLogger("anydoor.service")

# Decoding and preprocessing run in threads beside the GPU worker; more at once than this only adds contention.
CPU_CONCURRENCY = 4
# After a request with more upload bytes than this, free heap pages are handed back to the OS.
LARGE_REQUEST_BYTES = 256 << 10


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps what a large request freed (decoded images, spooled parts,
    preprocessing arrays) in its per-thread arenas, so RSS would stay at the high-water mark of the largest
    request seen; ``malloc_trim(0)`` releases the free pages."""
    if _TRIM is not None:
        _TRIM(0)


# A consumer of a request's progress events, called on the event loop: (event name, JSON-able data).
EventSink = Callable[[str, dict[str, Any]], None]
POSITION_POLL_S = 0.25  # how often a streaming request's queue position is looked at


@dataclass(frozen=True)
class PreparedRequest:
    work: Job
    t0: float  # when preprocessing began (perf_counter), for the total
    candidates: tuple[Job, ...] = ()  # the other candidates' jobs (num_outputs > 1)


@dataclass(frozen=True)
class Candidate:
    """One of a request's candidates (num_outputs > 1), encoded like the answer."""

    data: bytes
    seed: int
    scores: Scores | None


@dataclass(frozen=True)
class Prediction:
    data: bytes  # the image, encoded as the request's output_format asks
    seed: int
    width: int
    height: int
    regions: int
    boxes: tuple[tuple[int, int, int, int], ...]
    demo: bool
    timings: dict[str, float]  # seconds, keys in TIMING_NAMES
    scores: Scores | None = None
    media_type: str = "image/png"
    candidates: tuple[Candidate, ...] = ()  # with num_outputs > 1: all of them, best first (the first is this one)

    def server_timing(self) -> str:
        return server_timing(self.timings)


def uploaded_bytes(inputs: GenerationInputs) -> int:
    """The bytes of every uploaded file of a request: several references and their masks included."""
    return sum(len(v) for v in inputs.uploads() if isinstance(v, bytes | bytearray | memoryview))


def load_from_settings(settings: Settings) -> Pipeline:
    """The pipeline the settings ask for (:func:`model.pipeline.loader.load_pipeline`)."""
    from model.pipeline.loader import load_pipeline

    return load_pipeline(settings.load_spec())


class Slot:
    """One unit taken from a :class:`BoundedCount`; :meth:`release` is idempotent and thread-safe."""

    def __init__(self, owner: BoundedCount) -> None:
        self._owner = owner
        self._held = True

    def release(self) -> None:
        with self._owner.lock:
            if self._held:
                self._held = False
                self._owner.value -= 1


class BoundedCount:
    """A count with a limit, shared by the event loop and the worker thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.value = 0
        self.lock = threading.Lock()

    def take(self) -> Slot | None:
        with self.lock:
            if self.value >= self.limit:
                return None
            self.value += 1
            return Slot(self)

    @property
    def full(self) -> bool:
        return self.value >= self.limit


class InferenceService:
    def __init__(self, settings: Settings, metrics: Metrics, load: Callable[[], Pipeline] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.worker = GpuWorker(
            load or functools.partial(load_from_settings, settings),
            max_queue=settings.max_queue, metrics=metrics, warmup_steps=settings.warmup_steps,
            max_batch=settings.max_batch, batch_delay_s=settings.max_batch_delay_ms / 1000,
        )
        self.draining = False
        # Requests admitted and not yet started on the GPU: uploading, preprocessing or queued. Counting them from
        # the moment their headers arrive is what lets 429 come before an upload is read.
        self.pending = BoundedCount(settings.max_queue)
        self.uploads = UploadSlots(settings.max_uploads)  # request bodies read at once past their first 64 KiB
        self._limiter: anyio.CapacityLimiter | None = None
        metrics.queue_depth.set_function(lambda: self.worker.queue_depth)
        metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading in the background: the server answers health checks (not ready) meanwhile."""
        self._limiter = anyio.CapacityLimiter(CPU_CONCURRENCY)
        self.worker.start()

    def begin_drain(self) -> None:
        """Stop admitting requests; queued and running ones get ``shutdown_grace_s`` to finish. Idempotent."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: no new requests; %d queued, waiting up to %.0f s for them", self.worker.queue_depth,
                 self.settings.shutdown_grace_s)
        self.worker.begin_drain(self.settings.shutdown_grace_s)

    async def shutdown(self) -> None:
        self.begin_drain()
        # The grace period is enforced by the worker itself (it cancels at the deadline); the margin covers one
        # denoising step and the decode of a job that was running when it expired.
        ended = await anyio.to_thread.run_sync(self.worker.stop, self.settings.shutdown_grace_s + 10.0)
        log.info("GPU worker %s", "stopped" if ended else "did not stop in time; exiting anyway")

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.worker.state is WorkerState.READY and not self.draining

    def readiness(self) -> str:
        """``ready``, ``starting``, ``setup_failed``, ``draining`` or ``stopped``."""
        if self.draining and self.worker.state is not WorkerState.FAILED:
            return "draining"
        return self.worker.state.value

    def cog_status(self) -> str:
        """Cog's health-check status. BUSY: a new request would be refused (queue full, or draining)."""
        state = self.worker.state
        if state is WorkerState.FAILED:
            return "SETUP_FAILED"
        if state is WorkerState.STARTING:
            return "STARTING"
        if self.draining or state is WorkerState.STOPPED or self.pending.full:
            return "BUSY"
        return "READY"

    def admission_error(self) -> ServiceError | None:
        """Why a /predict request cannot come in right now, checked before its body is read; None if it can."""
        error = self.availability_error()
        if error is None and self.pending.full:
            return self.overloaded()
        return error

    def availability_error(self) -> ServiceError | None:
        """Why no request can be served now (draining, loading, setup failed); None if requests can be."""
        if self.draining or self.worker.state is WorkerState.STOPPED:
            return ServiceError(ErrorCode.DRAINING, "the server is shutting down and takes no new requests")
        if self.worker.state is WorkerState.STARTING:
            return ServiceError(ErrorCode.NOT_READY, "the model is still loading; retry shortly",
                                headers={"Retry-After": "5"})
        if self.worker.state is WorkerState.FAILED:
            return ServiceError(ErrorCode.SETUP_FAILED, f"the model failed to load: {self.worker.setup_error}")
        return None

    def overloaded(self, *, close: bool = False) -> ServiceError:
        return overloaded(self.worker.retry_after_s(self.pending.value), close=close)

    def admit(self) -> Slot | None:
        """A place among the admitted requests (None when there is none); released when the job starts running
        on the GPU or the request ends, whichever comes first."""
        return self.pending.take()

    def body_reader(self, receive: Receive, *, admit: Callable[[], None],
                    on_evict: Callable[[], None]) -> BodyReader:
        """The ``receive`` a /predict request's body is read through (:mod:`service.uploads`): its first 64 KiB
        without a slot, then an upload slot, the minimum body rate throughout."""
        return BodyReader(receive, self.uploads, admit=admit, on_evict=on_evict,
                          min_rate=self.settings.min_body_rate, window_s=self.settings.body_rate_window_s)

    # --- one request ----------------------------------------------------------------------------------------

    async def predict(self, inputs: GenerationInputs, params: GenerationParams, *, request_id: str,
                      receive: Receive | None, ticket: Slot | None = None,
                      events: EventSink | None = None, all_candidates: bool = True) -> Prediction:
        """Preprocess, queue, wait for the GPU worker, encode the PNG: :meth:`prepare` then :meth:`execute`."""
        with self.tracked(inputs):
            prepared = await self.prepare(inputs, params)
            return await self.execute(prepared, request_id=request_id, receive=receive, ticket=ticket, events=events,
                                      all_candidates=all_candidates)

    @contextlib.contextmanager
    def tracked(self, inputs: GenerationInputs) -> Iterator[None]:
        """Count the request as in flight; afterwards, hand a large request's freed memory back to the OS."""
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            if uploaded_bytes(inputs) > LARGE_REQUEST_BYTES:
                # The uploads and arrays are garbage by now; trimming walks the heap, so not on the event loop.
                asyncio.get_running_loop().run_in_executor(None, release_free_memory)

    async def prepare(self, inputs: GenerationInputs, params: GenerationParams) -> PreparedRequest:
        """Decode and preprocess on a CPU thread; bad input raises its 4xx here, before anything is queued."""
        t0 = time.perf_counter()
        error = self.availability_error()  # again: draining may have begun during the upload
        if error is not None:
            raise error
        assert self._limiter is not None
        try:
            work = await anyio.to_thread.run_sync(
                functools.partial(self.worker.prepare, inputs, params, limits=self.settings.limits),
                limiter=self._limiter,
            )
        except InputError as exc:
            raise ServiceError.from_input_error(exc) from None
        return PreparedRequest(work[0], t0, tuple(work[1:]))

    async def execute(self, prepared: PreparedRequest, *, request_id: str, receive: Receive | None,
                      ticket: Slot | None = None, events: EventSink | None = None,
                      queue_timeout_s: float | None = None, all_candidates: bool = True) -> Prediction:
        """Queue the prepared job, wait for the GPU worker, encode the PNG.

        ``receive`` is the request's ASGI receive channel (the body is already read): it is watched for the
        client's disconnect, which takes the job out of the queue or stops it at the next denoising step. With
        None the caller watches (a streaming response is cancelled by its server when the client leaves). With
        ``events``, ``queued`` (position), ``started`` and ``progress`` are reported to it on the event loop.
        ``queue_timeout_s`` replaces ``ANYDOOR_QUEUE_TIMEOUT_S`` (async predictions wait as long as it takes).
        With ``all_candidates`` False (an image answer, which carries the best candidate alone) only the best is
        encoded and the prediction lists no candidates.
        """
        loop = asyncio.get_running_loop()
        sink = None
        if events is not None:
            def sink(name: str, data: dict[str, Any]) -> None:  # called from the worker thread
                loop.call_soon_threadsafe(events, name, data)
        job = QueuedJob(request_id, prepared.work, loop, loop.create_future(), candidates=prepared.candidates,
                        deadline=time.monotonic() + (self.settings.queue_timeout_s if queue_timeout_s is None
                                                     else queue_timeout_s),
                        on_start=ticket.release if ticket is not None else None, events=sink)
        self.worker.submit(job)
        outcome = await self._wait(job, receive, events)
        if isinstance(outcome, ServiceError):
            raise outcome

        t_png = time.perf_counter()
        params = prepared.work.params
        ranked = (outcome.candidates or (outcome,)) if all_candidates else (outcome,)

        def encode_all() -> list[bytes]:
            return [result.encode(params.output_format, params.output_quality) for result in ranked]

        encoded = await anyio.to_thread.run_sync(encode_all, limiter=self._limiter)
        data = encoded[0]
        candidates = tuple(Candidate(blob, result.seed, result.scores)
                           for blob, result in zip(encoded, ranked, strict=True)) if len(ranked) > 1 else ()
        stages = outcome.timings
        assert job.started_at is not None
        timings = {"queue": job.started_at - job.enqueued_at}
        timings.update({stage: stages.get(stage, 0.0) for stage in STAGES})
        timings[OUTPUT_STAGE] = time.perf_counter() - t_png
        timings["total"] = time.perf_counter() - prepared.t0
        for stage in METRIC_STAGES:
            self.metrics.stage_duration.labels(stage).observe(timings[stage])
        self.metrics.inference_duration.observe(timings["total"])
        width, height = outcome.image.size
        return Prediction(data, outcome.seed, width, height, outcome.regions, tuple(outcome.boxes), outcome.is_demo,
                          timings, outcome.scores, OUTPUT_FORMATS[params.output_format][0], candidates)

    async def _wait(self, job: QueuedJob, receive: Receive | None, events: EventSink | None) -> Outcome:
        """The job's outcome; raises 499 if the client leaves, 504 if the job does not start in time."""
        watcher = asyncio.ensure_future(_until_disconnected(receive) if receive is not None else asyncio.Event().wait())
        waiters: set[asyncio.Future[Any]] = {job.future, watcher}
        taken = False
        position = None
        try:
            while True:
                timeout = None if taken else max(0.0, job.deadline - time.monotonic())
                if events is not None and job.started_at is None:
                    now = self.worker.position(job)
                    if now is not None and now != position:
                        position = now
                        events("queued", {"position": now, "request_id": job.request_id})
                    timeout = min(timeout if timeout is not None else POSITION_POLL_S, POSITION_POLL_S)
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if job.future.done():
                    return job.future.result()
                if watcher.done():
                    log.info("request %s: client disconnected, job %s", job.request_id,
                             "stopping" if job.started_at is not None else "removed from the queue")
                    raise client_gone()
                if time.monotonic() < job.deadline and job.started_at is None:
                    continue  # woke up to report the queue position
                if self.worker.withdraw(job):
                    raise queue_timeout(time.monotonic() - job.enqueued_at)
                taken = True  # the worker took it just now: wait for the result
        finally:
            watcher.cancel()
            # Leaving without an outcome (client gone, or this task cancelled by the server's shutdown): take the
            # job out of the queue, or make the pipeline stop before its next step.
            if not job.future.done() and not self.worker.withdraw(job):
                job.cancel_event.set()


async def _until_disconnected(receive: Receive) -> None:
    """Return when the client disconnects (the request body has been read completely before this runs)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # a server that answers with empty body chunks must not make this spin
