"""The GPU worker: one thread owns the model, takes jobs off a bounded queue and runs them one after the other.

Requests are validated and preprocessed on the request's side (CPU, :meth:`GpuWorker.prepare`); only the
encode/sample/decode part (:meth:`AnyDoorPipeline.run`) runs on this thread, so blocking GPU work never
touches the event loop and a bad upload is rejected without waiting in the queue. Results go back to the waiting
request through its asyncio future (``call_soon_threadsafe``).

The queue is a deque under a condition variable rather than a ``queue.Queue`` because jobs must be removable
from the middle: a client that disconnects, or that waited past its deadline, is taken out before it costs GPU
time. A running job is stopped at the next denoising step through the ``should_cancel`` check handed to ``run``.

Dynamic batching: :meth:`GpuWorker._take_jobs` takes the oldest job, then further queued jobs that can share its
batch (the same :attr:`Job.batch_key`: step count and sampler), waiting up to ``batch_delay_s`` for them, until
the batch holds ``max_batch`` target regions; :meth:`GpuWorker._run` hands them to ``run`` together. Each job
keeps its own seed, guidance scale and control strength, so its image is the one it would get alone (within float
tolerance). A batch stops early only when every job in it is cancelled; a job whose client left mid-batch is
answered 499 at the end.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import gc
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from model.diffusion.samplers import ProgressFn
from model.errors import Cancelled, ErrorCode, InputError
from model.nn.anydoor import dtype_name
from model.pipeline import GenerationInputs, GenerationParams, GenerationResult, Job
from model.pipeline.result import rank_candidates
from model.pipeline.warmup import warmup_request
from model.spec.limits import Limits
from service.errors import (
    ServiceError,
    client_gone,
    generation_failed,
    overloaded,
    queue_timeout,
    shutting_down,
)
from service.metrics import Metrics

log = logging.getLogger("anydoor.service.worker")

# torch >= 2.5 has the device-generic torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class there.
EWMA_WEIGHT = 0.3  # the weight of the newest batch in the step and batch time means

OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


class Pipeline(Protocol):
    """What the worker needs of :class:`model.pipeline.AnyDoorPipeline` (tests substitute fakes)."""

    is_demo: bool
    weights_name: str

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def prepare(self, inputs: GenerationInputs, params: GenerationParams, *,
                limits: Limits | None = None) -> Job: ...

    def prepare_candidates(self, inputs: GenerationInputs, params: GenerationParams, *,
                           limits: Limits | None = None) -> Sequence[Job]: ...

    def run(self, jobs: Sequence[Job], *, progress: ProgressFn | None = None,
            should_cancel: Callable[[], bool] | None = None) -> list[GenerationResult]: ...


class WorkerState(str, enum.Enum):
    STARTING = "starting"  # loading the weights or running the warm-up generation
    READY = "ready"
    FAILED = "setup_failed"
    STOPPED = "stopped"


Outcome = GenerationResult | ServiceError


@dataclass(eq=False)  # identity semantics: removal from the queue must find this very job
class QueuedJob:
    request_id: str
    work: Job
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Outcome]
    deadline: float  # time.monotonic() by which the job must have started
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    on_start: Callable[[], None] | None = None  # called (on the worker thread) when the job leaves the queue to run
    # Progress events for a streaming client, called from the worker thread: ("started" | "progress", data).
    events: Callable[[str, dict[str, Any]], None] | None = None
    # The request's other candidates (num_outputs > 1): they run in the same batch as ``work`` and the request is
    # answered with the best of all (rank_candidates).
    candidates: tuple[Job, ...] = ()

    @property
    def jobs(self) -> tuple[Job, ...]:
        return (self.work, *self.candidates)

    @property
    def size(self) -> int:
        """Batch items: target regions times candidates, what counts against ``max_batch``."""
        return sum(len(job.regions) for job in self.jobs)

    def resolve(self, outcome: Outcome) -> None:
        """Hand ``outcome`` to the waiting request (from any thread). A request that is gone ignores it."""

        def deliver() -> None:
            if not self.future.done():
                self.future.set_result(outcome)

        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


class GpuWorker:
    def __init__(
        self,
        load: Callable[[], Pipeline],
        *,
        max_queue: int,
        metrics: Metrics,
        warmup_steps: int = 2,
        max_batch: int = 1,
        batch_delay_s: float = 0.0,
    ) -> None:
        self._load = load
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_delay_s = batch_delay_s
        self._metrics = metrics
        self._warmup_steps = warmup_steps
        self._queue: deque[QueuedJob] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, name="anydoor-gpu-worker", daemon=True)
        self._running: list[QueuedJob] = []
        self._drain_deadline: float | None = None
        self._stopping = False
        # For Retry-After: exponentially weighted means, per batch size (target regions), of one denoising step
        # and of the rest of a batch (encode, decode); and where the running batch is.
        self._step_s: dict[int, float] = {}
        self._overhead_s: dict[int, float] = {}
        self._batch_started: float | None = None
        self._batch_size = 0
        self._batch_steps = 0  # the running batch's step count
        self._steps_done = 0
        self._last_step_at: float | None = None
        self._step_times: list[float] = []  # the running batch's step intervals
        self._first_step_s: float | None = None  # and its first (encode included)
        self.pipeline: Pipeline | None = None
        self.state = WorkerState.STARTING
        self.setup_error: str | None = None
        self.setup_started_at: float | None = None  # wall-clock times, for Cog's health-check
        self.setup_completed_at: float | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread: it loads the model, runs the warm-up generation, then serves the queue."""
        self._thread.start()

    def begin_drain(self, grace_s: float) -> None:
        """Keep serving the queue for ``grace_s`` seconds more; after that, cancel what is running or queued."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace_s
            self._cond.notify_all()

    def stop(self, timeout: float | None) -> bool:
        """Refuse new jobs, let the queue run out (until the drain deadline), end the thread; True if it ended."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the request side -------------------------------------------------------------------------------------

    def prepare(self, inputs: GenerationInputs, params: GenerationParams, *, limits: Limits) -> list[Job]:
        """Validate and preprocess one request (CPU only, any thread): its jobs, one per candidate
        (:meth:`AnyDoorPipeline.prepare_candidates`)."""
        pipe = self.pipeline
        if pipe is None:
            raise RuntimeError("the model is not loaded yet")
        if params.num_outputs > 1:
            return list(pipe.prepare_candidates(inputs, params, limits=limits))
        return [pipe.prepare(inputs, params, limits=limits)]

    def submit(self, job: QueuedJob) -> None:
        """Queue ``job``; raise 429 ``overloaded`` when the queue is full, 503 when shutting down."""
        with self._cond:
            if self._stopping or self._drain_expired():
                raise shutting_down()
            if len(self._queue) >= self.max_queue:
                raise overloaded(self.retry_after_s())
            self._queue.append(job)
            self._cond.notify()

    def withdraw(self, job: QueuedJob) -> bool:
        """Take ``job`` out of the queue if it has not started; False if the worker already took it."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            return True

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def position(self, job: QueuedJob) -> int | None:
        """``job``'s place in the queue, 1 for the next to start; None once it has left the queue."""
        with self._cond:
            for index, queued in enumerate(self._queue):
                if queued is job:
                    return index + 1
        return None

    def retry_after_s(self, waiting: int | None = None, places: int | None = None) -> int:
        """A ``Retry-After`` hint: when a place among the admitted requests should free, from the real work ahead.

        ``waiting`` requests are admitted and not started (the queue if not given), ``places`` the most there may be
        (the queue's size if not given). A place frees when one of them starts, so the hint is the time until the
        ``waiting - places + 1``-th of them starts: what is left of the running batch (its remaining steps times the
        measured step time, plus its decode), then the batches the queue forms ahead of it (each its steps times the
        step time for its size, plus its encode and decode). Step and batch times are exponentially weighted means
        per batch size. Rounded up; at least 1 s, at most 300 s."""
        with self._cond:
            queued = [(job.work.batch_key, job.size, job.work.params.steps) for job in self._queue]
            running = self._remaining_s()
        waiting = len(queued) if waiting is None else waiting
        places = self.max_queue if places is None else places
        needed = max(1, waiting - places + 1)  # starts before a place frees
        # Admitted requests not queued yet (uploading, preprocessing) start after the queued ones; count each as a
        # queued job on average.
        if queued and needed > len(queued):
            queued = queued + [queued[-1]] * (needed - len(queued))
        total = running
        for size, steps, jobs in self._batches(queued):
            needed -= jobs
            if needed <= 0:
                break
            total += steps * self._step_time(size) + self._overhead(size)
        return max(1, min(300, math.ceil(total)))

    def _batches(self, queued: list[tuple[Any, int, int]]) -> list[tuple[int, int, int]]:
        """(regions, steps, jobs) of the batches the queue would form, in order (as :meth:`_take_jobs` takes them,
        without the wait for more)."""
        left = list(queued)
        batches = []
        while left:
            key, size, steps = left.pop(0)
            jobs = 1
            for item in list(left):
                if item[0] == key and size + item[1] <= self.max_batch:
                    left.remove(item)
                    size += item[1]
                    jobs += 1
            batches.append((size, steps, jobs))
        return batches

    def _remaining_s(self) -> float:
        """What is left of the running batch (0 when none runs). Called with the lock held."""
        started = self._batch_started
        if started is None:
            return 0.0
        now = time.monotonic()
        # Its own step intervals so far, once it has some: the best estimate of its next ones.
        live = _median(self._step_times)
        step = live if live is not None else self._step_time(self._batch_size)
        since = now - (self._last_step_at if self._last_step_at is not None else started)
        left = max(0.0, (self._batch_steps - self._steps_done) * step - since)
        overhead = self._overhead(self._batch_size)
        return left + (overhead / 2 if self._steps_done else overhead)  # its decode (and, before step 1, encode)

    def _step_time(self, size: int) -> float:
        """The mean step time for a batch of ``size`` regions; unmeasured sizes scale the nearest measured one."""
        if size in self._step_s:
            return self._step_s[size]
        if not self._step_s:
            return 1.0
        nearest = min(self._step_s, key=lambda known: abs(known - size))
        return self._step_s[nearest] * max(size, 1) / nearest

    def _overhead(self, size: int) -> float:
        if size in self._overhead_s:
            return self._overhead_s[size]
        if not self._overhead_s:
            return 1.0
        nearest = min(self._overhead_s, key=lambda known: abs(known - size))
        return self._overhead_s[nearest]

    def _measured(self, size: int, steps: int, seconds: float, step_s: float | None,
                  first_s: float | None = None) -> None:
        """Fold one finished batch into the means: its step time (the median of its step intervals after the
        first, which holds the encode), and what the rest of it took. A batch of one step has only the first
        interval: it stands in, an upper bound, until a longer batch of that size is measured."""
        if step_s is None and size not in self._step_s and first_s is not None:
            step_s = first_s
        if step_s is None:
            step_s = self._step_time(size) if self._step_s else seconds / max(steps + 1, 1)
        else:
            self._step_s[size] = step_s if size not in self._step_s else (
                (1 - EWMA_WEIGHT) * self._step_s[size] + EWMA_WEIGHT * step_s)
        overhead = max(0.0, seconds - steps * step_s)
        self._overhead_s[size] = overhead if size not in self._overhead_s else (
            (1 - EWMA_WEIGHT) * self._overhead_s[size] + EWMA_WEIGHT * overhead)

    # --- the worker thread ----------------------------------------------------------------------------------

    def _main(self) -> None:
        self.setup_started_at = time.time()
        try:
            self._setup()
        except BaseException as exc:  # any failure to load becomes SETUP_FAILED, reported by the health routes
            log.exception("model setup failed")
            self.setup_error = f"{type(exc).__name__}: {exc}"
            self.state = WorkerState.FAILED
            self.setup_completed_at = time.time()
            return
        self.setup_completed_at = time.time()
        self.state = WorkerState.READY
        while jobs := self._take_jobs():
            try:
                self._run(jobs)
            except Exception:  # the worker thread must outlive any bug: answer the jobs and go on
                log.exception("unexpected failure in the worker handling %s", _ids(jobs))
                for job in jobs:
                    job.resolve(generation_failed())
                with self._cond:
                    self._running = []
        self.state = WorkerState.STOPPED

    def _setup(self) -> None:
        t0 = time.perf_counter()
        pipe = self._load()
        log.info("loaded %s on %s (%s) in %.1f s%s", pipe.weights_name, pipe.device, pipe.dtype,
                 time.perf_counter() - t0, " [DEMO MODE: tiny random model]" if pipe.is_demo else "")
        self._metrics.set_model(weights=pipe.weights_name, device=str(pipe.device),
                                dtype=dtype_name(pipe.dtype), demo=pipe.is_demo)
        t0 = time.perf_counter()
        inputs, params = warmup_request(self._warmup_steps)
        job = pipe.prepare(inputs, params)
        step_times: list[float] = []
        last = [time.perf_counter()]

        first: list[float] = []

        def timed(step: int, total: int, t: int) -> None:
            now = time.perf_counter()
            (step_times if step > 1 else first).append(now - last[0])  # the first interval holds the encode
            last[0] = now

        result = pipe.run([job], progress=timed)[0]
        background = inputs.background
        assert isinstance(background, np.ndarray) and result.image.size == background.shape[1::-1]
        seconds = time.perf_counter() - t0
        self._measured(len(job.regions), params.steps, seconds, _median(step_times), first[0] if first else None)
        log.info("warm-up generation (%d steps) passed in %.2f s", self._warmup_steps, seconds)
        self.pipeline = pipe

    def _take_jobs(self) -> list[QueuedJob]:
        """Wait for work and take the oldest job plus the queued jobs that can share its batch; [] to stop.

        Jobs that must not start are answered here and skipped: their client is gone, they waited past their
        deadline, or the shutdown grace period is over. Once a first job is taken, compatible jobs (same steps and
        sampler) join it, oldest first, up to ``max_batch`` target regions in all, waiting up to ``batch_delay_s``
        for more to arrive; others keep their place in the queue.
        """
        with self._cond:
            first: QueuedJob | None = None
            while first is None:
                first = self._pop_startable(lambda job: True)
                if first is None:
                    if self._stopping:
                        return []
                    self._cond.wait()
            taken = [first]
            size = first.size
            key = first.work.batch_key
            wait_until = time.monotonic() + self.batch_delay_s
            while size < self.max_batch:
                room = self.max_batch - size

                def fits(job: QueuedJob, room: int = room) -> bool:
                    return job.work.batch_key == key and job.size <= room

                job = self._pop_startable(fits)
                if job is not None:
                    taken.append(job)
                    size += job.size
                    continue
                remaining = wait_until - time.monotonic()
                if remaining <= 0 or self._stopping or self._drain_expired():
                    break
                self._cond.wait(remaining)
            now = time.monotonic()
            self._batch_started = now
            self._batch_size = size
            self._batch_steps = first.work.params.steps
            self._steps_done = 0
            self._last_step_at = None
            self._step_times = []
            self._first_step_s = None
            for job in taken:
                job.started_at = now
                if job.on_start is not None:
                    job.on_start()
                if job.events is not None:
                    job.events("started", {"request_id": job.request_id})
            self._running = taken
            return taken

    def _pop_startable(self, accept: Callable[[QueuedJob], bool]) -> QueuedJob | None:
        """Remove and return the oldest queued job that ``accept``s and may start; answer dead ones on the way.

        Called with the lock held."""
        now = time.monotonic()
        for job in list(self._queue):
            if job.cancel_event.is_set():
                self._queue.remove(job)
                job.resolve(client_gone())
            elif self._drain_expired(now):
                self._queue.remove(job)
                job.resolve(shutting_down())
            elif now > job.deadline:
                self._queue.remove(job)
                job.resolve(queue_timeout(now - job.enqueued_at))
            elif accept(job):
                self._queue.remove(job)
                return job
        return None

    def _run(self, jobs: list[QueuedJob]) -> None:
        pipe = self.pipeline
        assert pipe is not None
        for job in jobs:
            assert job.started_at is not None
            self._metrics.queue_wait.observe(job.started_at - job.enqueued_at)
        self._metrics.running.set(len(jobs))
        self._metrics.batch_size.observe(len(jobs))
        t0 = time.perf_counter()
        results: list[GenerationResult] | None = None
        failure: ServiceError | None = None
        out_of_memory = False
        try:
            flat = [work for job in jobs for work in job.jobs]
            outputs = pipe.run(flat, progress=self._on_step,
                               should_cancel=functools.partial(self._batch_cancelled, jobs))
            if len(outputs) != len(flat):
                raise RuntimeError(f"run returned {len(outputs)} results for {len(flat)} jobs")
            results, at = [], 0
            for job in jobs:  # each request gets the best of its candidates, carrying all of them
                results.append(rank_candidates(outputs[at:at + len(job.jobs)]))
                at += len(job.jobs)
        except Cancelled:
            failure = shutting_down() if self._drain_expired() else client_gone()
            log.info("stopped %s at a denoising step: %s", _ids(jobs), failure.message)
        except InputError as exc:
            failure = ServiceError.from_input_error(exc)
        except OOM_ERRORS:
            out_of_memory = True
            log.error("GPU out of memory running %s; the cache is emptied and the worker goes on", _ids(jobs))
            failure = ServiceError(ErrorCode.GPU_OUT_OF_MEMORY, "the GPU ran out of memory for this request; retry",
                                   headers={"Retry-After": "1"})
        except Exception:
            log.exception("generation failed for %s", _ids(jobs))
            failure = generation_failed()
        finally:
            self._metrics.running.set(0)
            with self._cond:
                self._running = []
                self._batch_started = None
                size, steps, step_times, first_s = (self._batch_size, self._batch_steps, self._step_times,
                                                    self._first_step_s)
        if out_of_memory:
            # Outside the except block, so the traceback's frames (and the tensors they hold) are already gone.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if results is not None:
            with self._cond:
                self._measured(size, steps, time.perf_counter() - t0, _median(step_times), first_s)
            for job, result in zip(jobs, results, strict=True):
                job.resolve(result)
        else:
            assert failure is not None
            for job in jobs:
                job.resolve(failure)

    def _on_step(self, step: int, total: int, t: int) -> None:
        self._metrics.steps.inc()
        now = time.monotonic()
        if step > 1 and self._last_step_at is not None:  # the first interval holds the encode
            self._step_times.append(now - self._last_step_at)
        elif step == 1 and self._batch_started is not None:
            self._first_step_s = now - self._batch_started
        self._last_step_at = now
        self._steps_done = step
        self._batch_steps = total
        running = self._running
        for job in running:
            if job.events is not None and job.started_at is not None:
                job.events("progress", {"step": step, "total": total,
                                        "elapsed_s": round(time.monotonic() - job.started_at, 3)})

    def _batch_cancelled(self, jobs: Sequence[QueuedJob]) -> bool:
        """A batch stops only when every job in it is cancelled (or the grace period is over)."""
        return self._drain_expired() or all(job.cancel_event.is_set() for job in jobs)

    def _drain_expired(self, now: float | None = None) -> bool:
        deadline = self._drain_deadline
        return deadline is not None and (time.monotonic() if now is None else now) >= deadline


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _ids(jobs: Sequence[QueuedJob]) -> str:
    return ", ".join(f"request {job.request_id}" for job in jobs)
