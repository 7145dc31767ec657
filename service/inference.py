"""The inference service behind ``POST /predict``: admission, preprocessing, the queue wait, draining.

One :class:`InferenceService` per app. It owns the :class:`~service.worker.GpuWorker` (which owns the model) and
answers the questions the routes and middleware ask: may a request come in, is the model ready, what does
Cog's health-check say. :meth:`InferenceService.predict` is the whole life of one request after its upload.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.types import Receive

from model.errors import ErrorCode, InputError
from model.pipeline import STAGES, GenerationInputs, GenerationParams
from model.pipeline.result import server_timing
from service.errors import ServiceError, client_gone, overloaded, queue_timeout
from service.metrics import Metrics
from service.settings import Settings
from service.worker import GpuWorker, Outcome, Pipeline, QueuedJob, WorkerState

log = logging.getLogger("anydoor.service")

# Decoding and preprocessing run in threads beside the GPU worker; more at once than this only adds contention.
CPU_CONCURRENCY = 4


@dataclass(frozen=True)
class Prediction:
    png: bytes
    seed: int
    width: int
    height: int
    regions: int
    boxes: tuple[tuple[int, int, int, int], ...]
    demo: bool
    timings: dict[str, float]  # seconds, keys in TIMING_NAMES

    def server_timing(self) -> str:
        return server_timing(self.timings)


def load_from_settings(settings: Settings) -> Pipeline:
    """The pipeline the settings ask for (:func:`model.pipeline.loader.load_pipeline`)."""
    from model.pipeline.loader import load_pipeline

    return load_pipeline(settings.weights, demo=settings.demo, config=settings.config, device=settings.device,
                         dtype=settings.dtype, sha256=settings.weights_sha256, cache_dir=settings.cache_dir,
                         compile=settings.compile)


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
        if self.draining or state is WorkerState.STOPPED or self.worker.queue_full:
            return "BUSY"
        return "READY"

    def admission_error(self) -> ServiceError | None:
        """Why a /predict request cannot come in right now, checked before its body is read; None if it can."""
        if self.draining or self.worker.state is WorkerState.STOPPED:
            return ServiceError(ErrorCode.DRAINING, "the server is shutting down and takes no new requests")
        if self.worker.state is WorkerState.STARTING:
            return ServiceError(ErrorCode.NOT_READY, "the model is still loading; retry shortly",
                                headers={"Retry-After": "5"})
        if self.worker.state is WorkerState.FAILED:
            return ServiceError(ErrorCode.SETUP_FAILED, f"the model failed to load: {self.worker.setup_error}")
        if self.worker.queue_full:
            return overloaded(self.worker.retry_after_s())
        return None

    # --- one request ----------------------------------------------------------------------------------------

    async def predict(self, inputs: GenerationInputs, params: GenerationParams, *, request_id: str,
                      receive: Receive) -> Prediction:
        """Preprocess, queue, wait for the GPU worker, encode the PNG.

        ``receive`` is the request's ASGI receive channel (the body is already read): it is watched for the
        client's disconnect, which takes the job out of the queue or stops it at the next denoising step.
        """
        with self.metrics.in_flight.track_inprogress():
            return await self._predict(inputs, params, request_id=request_id, receive=receive)

    async def _predict(self, inputs: GenerationInputs, params: GenerationParams, *, request_id: str,
                       receive: Receive) -> Prediction:
        t0 = time.perf_counter()
        error = self.admission_error()  # again: draining may have begun during the upload
        if error is not None:
            raise error
        assert self._limiter is not None
        try:
            work = await anyio.to_thread.run_sync(
                functools.partial(self.worker.prepare, inputs, params, max_pixels=self.settings.max_pixels),
                limiter=self._limiter,
            )
        except InputError as exc:
            raise ServiceError.from_input_error(exc) from None

        loop = asyncio.get_running_loop()
        job = QueuedJob(request_id, work, loop, loop.create_future(),
                        deadline=time.monotonic() + self.settings.queue_timeout_s)
        self.worker.submit(job)
        outcome = await self._wait(job, receive)
        if isinstance(outcome, ServiceError):
            raise outcome

        t_png = time.perf_counter()
        png = await anyio.to_thread.run_sync(outcome.to_png, limiter=self._limiter)
        stages = outcome.timings
        assert job.started_at is not None
        timings = {"queue": job.started_at - job.enqueued_at}
        timings.update({stage: stages.get(stage, 0.0) for stage in STAGES})
        timings["postprocess"] += time.perf_counter() - t_png
        timings["total"] = time.perf_counter() - t0
        for stage in STAGES:
            self.metrics.stage_duration.labels(stage).observe(timings[stage])
        self.metrics.inference_duration.observe(timings["total"])
        width, height = outcome.image.size
        return Prediction(png, outcome.seed, width, height, outcome.regions, tuple(outcome.boxes), outcome.is_demo,
                          timings)

    async def _wait(self, job: QueuedJob, receive: Receive) -> Outcome:
        """The job's outcome; raises 499 if the client leaves, 504 if the job does not start in time."""
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        waiters: set[asyncio.Future[Any]] = {job.future, watcher}
        taken = False
        try:
            while True:
                timeout = None if taken else max(0.0, job.deadline - time.monotonic())
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if job.future.done():
                    return job.future.result()
                if watcher.done():
                    log.info("request %s: client disconnected, job %s", job.request_id,
                             "stopping" if job.started_at is not None else "removed from the queue")
                    raise client_gone()
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
