"""The app factory: ``uvicorn service.app:create_app --factory`` or ``anydoor serve``.

Both get the connection guards of :mod:`service.connections`: ``anydoor serve`` passes them to uvicorn, and under
plain uvicorn the app installs them itself at the lifespan startup (:class:`service.connections.ConnectionGuards`).

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
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import ErrorCode
from service.api import router
from service.api.health import HeadAsGet
from service.api.studio import STUDIO_ASSETS, STUDIO_ASSETS_URL, StudioFiles
from service.connections import ConnectionGuards
from service.errors import ServiceError, error_response
from service.inference import InferenceService
from service.metrics import Metrics
from service.middleware import PREDICT, AdmissionGate, RequestContextMiddleware, request_id_of, route_path
from service.predictions.routes import router as predictions_router
from service.predictions.service import PredictionService
from service.security import page_headers, page_policy
from service.settings import Settings
from service.worker import Pipeline

log = logging.getLogger("anydoor.service")

API_VERSION = "1.0.0"
# Swagger UI and ReDoc, vendored (see its README): /docs and /redoc work without internet access.
DOCS_ASSETS = Path(__file__).parent / "static" / "docs"
DOCS_ASSETS_URL = "/static/docs"
# Starlette's own HTTP errors (routing, unreadable bodies) in the service's vocabulary.
_STATUS_CODES = {400: ErrorCode.BAD_REQUEST, 404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED,
                 413: ErrorCode.PAYLOAD_TOO_LARGE}


def create_app(settings: Settings | None = None, *, load: Callable[[], Pipeline] | None = None) -> FastAPI:
    """Build the app. ``settings`` default to the environment; ``load`` replaces the pipeline loader (tests)."""
    settings = settings if settings is not None else Settings.from_env()
    metrics = Metrics()
    service = InferenceService(settings, metrics, load=load)
    predictions = PredictionService(settings, service, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("starting with %s", settings.public())
        service.start()
        await predictions.start()
        with _drain_on_signals(service, asyncio.get_running_loop()):
            try:
                yield
            finally:
                try:
                    await service.shutdown()
                finally:
                    await predictions.stop()

    app = FastAPI(
        title="AnyDoor Serve",
        version=API_VERSION,
        summary="Zero-shot object insertion: a cut-out object and a background with a marked region in, the "
        "background with the object placed there out.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own /docs and /redoc load their scripts from a CDN; ours are below
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    _publish_placement_schema(app)
    app.state.service = service
    app.state.predictions = predictions
    app.include_router(router)
    app.include_router(predictions_router)
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount(STUDIO_ASSETS_URL, StudioFiles(directory=STUDIO_ASSETS), name="studio-assets")  # the page at /

    def docs_base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")  # behind a proxy prefix, as FastAPI's own

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = docs_base(request)
        page = get_swagger_ui_html(
            openapi_url=f"{base}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}{DOCS_ASSETS_URL}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{DOCS_ASSETS_URL}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{base}{DOCS_ASSETS_URL}/swagger-ui/favicon-32x32.png",
            # No badge from validator.swagger.io: it would send the schema's URL to a third party, and fail offline.
            swagger_ui_parameters={"validatorUrl": None})
        return _with_policy(page)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = docs_base(request)
        page = get_redoc_html(
            openapi_url=f"{base}{app.openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{DOCS_ASSETS_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{base}{DOCS_ASSETS_URL}/swagger-ui/favicon-32x32.png", with_google_fonts=False)
        return _with_policy(page, inline_styles=True, blob_workers=True)

    app.add_middleware(HeadAsGet)  # added first: innermost, so the outer middleware sees and counts HEAD as HEAD
    app.add_middleware(AdmissionGate, service=service)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.add_middleware(ConnectionGuards, settings=settings)  # on the lifespan: the protocol guards under uvicorn

    def count(request: Request) -> Metrics | None:
        """Failures are counted for /predict only."""
        return metrics if route_path(request.scope) == PREDICT else None

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(exc, request_id_of(request.scope), count(request))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(_from_validation_error(exc), request_id_of(request.scope), count(request))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, ErrorCode.BAD_REQUEST)
        error = ServiceError(code, str(exc.detail), headers=dict(exc.headers or {}))
        return error_response(error, request_id_of(request.scope), count(request))

    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("request %s failed", request_id_of(request.scope), exc_info=exc)
        error = ServiceError(ErrorCode.INTERNAL_ERROR, "unexpected error; the server log has the details under "
                             "this request id")
        return error_response(error, request_id_of(request.scope), count(request))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    return app


def _with_policy(page: HTMLResponse, **options: bool) -> HTMLResponse:
    html = bytes(page.body).decode("utf-8")
    page.headers.update(page_headers(page_policy(html, **options)))
    return page


def _from_validation_error(exc: RequestValidationError) -> ServiceError:
    """FastAPI's own validation errors (routes other than /predict, whose form is parsed by the spec)."""
    problems: list[dict[str, Any]] = []
    codes: list[ErrorCode] = []
    for err in exc.errors():
        names = [part for part in err.get("loc", ()) if isinstance(part, str) and part not in ("body", "query")]
        field = names[0] if names else None
        code = ErrorCode.MISSING_FIELD if err.get("type") == "missing" else ErrorCode.INVALID_PARAMETER
        message = str(err.get("msg", "invalid value"))
        codes.append(code)
        problems.append({"error": code.value, "field": field, "message": f"{field}: {message}" if field else message})
    if not problems:
        return ServiceError(ErrorCode.INVALID_PARAMETER, "invalid request")
    first = problems[0]
    return ServiceError(codes[0], str(first["message"]), field=first["field"],
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


def _publish_placement_schema(app: FastAPI) -> None:
    """Add the placement object's JSON schema (from the request spec) to the OpenAPI components, where the
    ``placement`` field of ``/predict`` refers to it; FastAPI only generates components for pydantic models."""
    from model.spec.placement import placement_schema

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {})["Placement"] = placement_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
