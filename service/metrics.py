"""Prometheus metrics of one app instance, in its own registry (several apps may live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from model.pipeline.result import OUTPUT_STAGE
from model.pipeline.result import STAGES as RESULT_STAGES

FAILURE_REASONS = (
    "validation",  # bad input: 4xx naming a field (413 and 422 included)
    "unauthorized",  # missing or wrong API key
    "unavailable",  # not ready yet, setup failed, or draining
    "overloaded",  # queue full: 429
    "timeout",  # waited in the queue past ANYDOOR_QUEUE_TIMEOUT_S (504), or a body below the minimum rate (408)
    "cancelled",  # the client went away, or shutdown cancelled the work
    "oom",  # GPU out of memory
    "internal",  # a bug: 500
)
STAGES = (*RESULT_STAGES, OUTPUT_STAGE)  # one definition: model.pipeline.result

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_duration = Histogram(
            "anydoor_http_request_duration_seconds", "HTTP requests by route template, method and status code.",
            ["route", "method", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "anydoor_queue_wait_seconds", "Time a /predict job waited in the queue before the GPU worker started it.",
            buckets=_QUEUE_BUCKETS, registry=r)
        self.stage_duration = Histogram(
            "anydoor_inference_stage_seconds", "Time per pipeline stage of successful /predict requests.",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "anydoor_inference_duration_seconds",
            "End to end time of successful /predict requests, uploads excluded: queue wait, all stages, PNG encoding.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.failures = Counter(
            "anydoor_requests_failed", "/predict requests that did not produce an image, by reason.", ["reason"],
            registry=r)
        self.queue_depth = Gauge("anydoor_queue_depth", "Jobs waiting for the GPU worker.", registry=r)
        self.in_flight = Gauge(
            "anydoor_in_flight_requests", "/predict requests being handled: preprocessing, queued or generating.",
            registry=r)
        self.running = Gauge("anydoor_running_jobs", "Jobs the GPU worker is generating right now.", registry=r)
        self.batch_size = Histogram(
            "anydoor_batch_size", "Jobs the GPU worker generated together in one batch.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.steps = Counter(
            "anydoor_denoising_steps", "Denoising steps run, summed over jobs.", registry=r)
        self.ready = Gauge("anydoor_ready", "1 when the model is loaded, warmed up and not draining.", registry=r)
        self.model_info = Info("anydoor_model", "The model being served.", registry=r)
        # Async predictions (/predictions): labels are bounded (five statuses, four events, three outcomes).
        self.predictions = Gauge(
            "anydoor_predictions", "Async predictions in the job store, by status (starting: queued).", ["status"],
            registry=r)
        self.prediction_queue_depth = Gauge(
            "anydoor_prediction_queue_depth", "Async predictions waiting to be taken to the GPU queue.", registry=r)
        self.webhooks = Counter(
            "anydoor_webhooks", "Webhook requests by event and outcome (delivered, failed: a failed attempt, "
            "abandoned: a completed webhook given up after its retry period).", ["event", "outcome"], registry=r)
        self.webhook_backlog = Gauge("anydoor_webhook_backlog", "Webhook events queued and not yet sent.",
                                     registry=r)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        for stage in STAGES:
            self.stage_duration.labels(stage)

    def set_model(self, *, weights: str, device: str, dtype: str, demo: bool) -> None:
        self.model_info.info({"weights": weights, "device": device, "dtype": dtype, "demo": str(demo).lower()})
        if device.startswith("cuda"):
            self._track_gpu_memory(device)

    def _track_gpu_memory(self, device: str) -> None:
        import torch

        allocated = Gauge("anydoor_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch allocator).",
                          registry=self.registry)
        reserved = Gauge("anydoor_gpu_memory_reserved_bytes", "GPU memory reserved by the torch caching allocator.",
                         registry=self.registry)
        allocated.set_function(lambda: float(torch.cuda.memory_allocated(device)))
        reserved.set_function(lambda: float(torch.cuda.memory_reserved(device)))

    def fail(self, reason: str) -> None:
        assert reason in FAILURE_REASONS, reason
        self.failures.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
