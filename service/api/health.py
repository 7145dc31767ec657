"""The health and metrics routes: liveness, readiness (with the model), Cog's health-check, Prometheus."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from model.nn.anydoor import dtype_name
from service.api.deps import get_service
from service.api.schemas import CogHealth, CogSetup, LiveResponse, ModelInfo, ReadyResponse
from service.inference import InferenceService

router = APIRouter()
Service = Annotated[InferenceService, Depends(get_service)]


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
                          dtype=dtype_name(pipe.dtype), demo=pipe.is_demo)
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
