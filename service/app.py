"""The app factory: ``uvicorn service.app:create_app --factory`` or ``anydoor serve``.

The lifespan starts the GPU worker, which loads the weights and runs a warm-up generation in the background
(``/health/ready`` answers 503 meanwhile), and on shutdown drains it. Draining starts the moment SIGTERM or
SIGINT arrives, before uvicorn's own shutdown: the lifespan chains a handler in front of uvicorn's that marks the
service as draining (``/health/ready`` and new ``/predict`` requests get 503) and, with
``ANYDOOR_SHUTDOWN_DELAY_S``, holds uvicorn's handler back that long so load balancers can notice. Uvicorn then
stops listening and waits for the open requests, which the worker finishes, or cancels once
``ANYDOOR_SHUTDOWN_GRACE_S`` has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.pipeline import PARAM_LIMITS

from .config import Settings
from .errors import ServiceError, error_response
from .inference import InferenceService
from .metrics import Metrics
from .middleware import PredictGate, RequestContextMiddleware, request_id_of
from .routes import router
from .worker import Pipeline

log = logging.getLogger("anydoor.service")

API_VERSION = "1.0.0"
_FILE_FIELDS = ("reference", "background", "reference_mask", "background_mask")
_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def create_app(settings: Settings | None = None, *, load: Callable[[], Pipeline] | None = None) -> FastAPI:
    """Build the app. ``settings`` default to the environment; ``load`` replaces the pipeline loader (tests)."""
    settings = settings if settings is not None else Settings.from_env()
    metrics = Metrics()
    service = InferenceService(settings, metrics, load=load)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting with %s", settings.public())
        service.start()
        with _drain_on_signals(service, asyncio.get_running_loop()):
            try:
                yield
            finally:
                await service.shutdown()

    app = FastAPI(
        title="AnyDoor Serve",
        version=API_VERSION,
        summary="Zero-shot object insertion: a cut-out object and a background with a marked region in, the "
        "background with the object placed there out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    app.include_router(router)
    app.add_middleware(PredictGate, service=service)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # added last: outermost

    def count(request: Request) -> Metrics | None:
        """Failures are counted for /predict only."""
        return metrics if request.url.path.rstrip("/") == "/predict" else None

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(exc, request_id_of(request.scope), count(request))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(_from_validation_error(exc), request_id_of(request.scope), count(request))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        error = ServiceError(exc.status_code, code, str(exc.detail), reason="validation",
                             headers=dict(exc.headers or {}))
        return error_response(error, request_id_of(request.scope), count(request))

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", request_id_of(request.scope), exc_info=exc)
        error = ServiceError(500, "internal_error", "unexpected error; the server log has the details under this "
                             "request id", reason="internal")
        return error_response(error, request_id_of(request.scope), count(request))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    return app


def _from_validation_error(exc: RequestValidationError) -> ServiceError:
    """FastAPI's form validation errors, as the service's error body: the first problem, and all of them."""
    problems: list[dict[str, Any]] = []
    for err in exc.errors():
        names = [part for part in err.get("loc", ()) if isinstance(part, str) and part != "body"]
        field = names[0] if names else None
        kind = str(err.get("type", ""))
        given = err.get("input")
        if kind == "missing":
            code, message = "missing_field", "is required"
        elif field in _FILE_FIELDS:
            code, message = "invalid_parameter", "must be a file upload (a multipart part with a filename)"
        elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "finite_number") and (
            field in PARAM_LIMITS
        ):
            low, high = PARAM_LIMITS[field]
            code, message = "out_of_range", f"must be between {low:g} and {high:g}, got {given!r}"
        elif kind.endswith("_parsing") or kind.endswith("_type"):
            code, message = "invalid_parameter", f"{err.get('msg', 'invalid value')}, got {given!r}"
        else:
            code, message = "invalid_parameter", str(err.get("msg", "invalid value"))
        problems.append({"error": code, "field": field, "message": f"{field}: {message}" if field else message})
    if not problems:
        return ServiceError(422, "invalid_parameter", "invalid request")
    first = problems[0]
    return ServiceError(422, str(first["error"]), str(first["message"]), field=first["field"],
                        errors=problems if len(problems) > 1 else None)


@contextlib.contextmanager
def _drain_on_signals(service: InferenceService, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Chain a handler in front of the server's SIGTERM/SIGINT handlers (uvicorn's) that starts draining first."""
    if threading.current_thread() is not threading.main_thread():  # signals are only delivered to the main thread
        yield
        return
    previous: dict[int, Any] = {}
    delayed: set[int] = set()

    def forward(sig: int) -> None:
        handler = previous.get(sig)
        if callable(handler):
            handler(sig, None)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        # Only thread-safe calls here: the handler interrupts the event loop's thread at an arbitrary point.
        loop.call_soon_threadsafe(service.begin_drain)
        delay = service.settings.shutdown_delay_s
        if sig == signal.SIGTERM and delay > 0 and sig not in delayed:
            delayed.add(sig)
            log.info("SIGTERM: draining; the listener stays open %.1f s more", delay)
            loop.call_soon_threadsafe(loop.call_later, delay, forward, sig)
        else:
            forward(sig)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            if signal.getsignal(number) is on_signal:
                signal.signal(number, handler)
