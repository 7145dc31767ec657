"""The health and metrics routes: liveness, readiness (with the model), Cog's health-check, Prometheus.

:class:`HeadAsGet` answers ``HEAD`` wherever ``GET`` works (load balancers and uptime monitors probe with HEAD).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.nn.anydoor import dtype_name
from service.api.deps import get_service
from service.api.schemas import CogHealth, CogSetup, LiveResponse, ModelInfo, ReadyResponse
from service.inference import InferenceService

router = APIRouter()
Service = Annotated[InferenceService, Depends(get_service)]

# The response messages that carry the body (the last two: servers that can send a file by path or descriptor).
_BODY_MESSAGES = frozenset({"http.response.body", "http.response.pathsend", "http.response.zerocopysend"})


class HeadAsGet:
    """Route ``HEAD`` as ``GET`` and send the GET answer's status and headers without the body.

    FastAPI's routes accept only the methods they declare, so HEAD on a GET route is 405; declaring HEAD on each
    route (``api_route(methods=["GET", "HEAD"])``) would add a second operation per path to the OpenAPI schema.
    This covers every GET route, the docs pages and the static files included, and leaves the schema alone.

    The app below gets a copy of the scope: the server keeps seeing HEAD (uvicorn checks the method it holds to
    expect no body), and so does outer middleware, which also gets the routing results copied back (the route
    template for the metrics). ``Content-Length`` stays that of the GET body, as HEAD requires.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] in _BODY_MESSAGES:
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        routed = {**scope, "method": "GET"}
        try:
            await self.app(routed, receive, headers_only)
        finally:
            for key in routed.keys() - scope.keys():  # added by routing: route, endpoint, path_params, ...
                scope[key] = routed[key]


@router.get("/health/live", response_model=LiveResponse, tags=["health"], summary="The process is up")
async def live() -> LiveResponse:
    return LiveResponse()


@router.get(
    "/health/ready",
    response_model=ReadyResponse,
    tags=["health"],
    summary="200 once the weights are loaded and the warm-up generation passed; 503 before, and while draining",
    responses={503: {"model": ReadyResponse, "description": "Starting, setup failed, or draining."}},
)
async def ready(service: Service) -> JSONResponse:
    pipe = service.worker.pipeline
    model = None
    if pipe is not None:
        model = ModelInfo(weights=pipe.weights_name, device=str(pipe.device),
                          dtype=dtype_name(pipe.dtype), demo=pipe.is_demo,
                          mask_refiner=getattr(pipe, "mask_refiner", None) is not None)
    body = ReadyResponse(status=service.readiness(), model=model,  # type: ignore[arg-type]
                         queue_depth=service.worker.queue_depth, max_queue=service.settings.max_queue,
                         error=service.worker.setup_error)
    return JSONResponse(body.model_dump(), status_code=200 if service.ready else 503,
                        headers={"Cache-Control": "no-store"})


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


@router.get("/health-check", response_model=CogHealth, tags=["health"], summary="Cog's health-check")
async def cog_health_check(service: Service) -> CogHealth:
    worker = service.worker
    status = service.cog_status()
    setup_status = {"STARTING": "starting", "SETUP_FAILED": "failed"}.get(status, "succeeded")
    setup = CogSetup(started_at=_iso(worker.setup_started_at), completed_at=_iso(worker.setup_completed_at),
                     status=setup_status,  # type: ignore[arg-type]
                     logs=worker.setup_error or "")
    return CogHealth(status=status, setup=setup)  # type: ignore[arg-type]


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(service: Service) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)
