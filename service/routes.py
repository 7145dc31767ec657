"""The HTTP routes: thin. They read the request, call :class:`~service.inference.InferenceService`, shape the reply."""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from model.errors import InputError
from model.pipeline import DEFAULT_CONTROL_STRENGTH, DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, PARAM_LIMITS
from model.regions import Box, parse_boxes

from .errors import ServiceError, payload_too_large
from .inference import TIMING_ORDER, InferenceService, Prediction, PredictParams
from .middleware import request_id_of
from .schemas import CogHealth, CogSetup, ErrorBody, LiveResponse, ModelInfo, PredictResponse, ReadyResponse, Timings

log = logging.getLogger("anydoor.service")
# The pipeline's SAMPLERS as a type, so the OpenAPI schema lists them (a test keeps the two equal).
Sampler = Literal["ddim", "dpmpp_2m"]


router = APIRouter()


def get_service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


Service = Annotated[InferenceService, Depends(get_service)]


def _limits(name: str) -> dict[str, Any]:
    low, high = PARAM_LIMITS[name]
    return {"ge": low, "le": high}


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictResponse,
        "description": "The background with the object inserted, the size of the background. PNG by default; "
        "with `Accept: application/json`, a JSON body with the PNG in base64.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
        "headers": {
            "X-Request-ID": {"description": "The client's X-Request-ID if it sent a plain one, else a new id.",
                             "schema": {"type": "string"}},
            "X-Seed": {"description": "The seed used; send it back to get the same image.",
                       "schema": {"type": "integer", "format": "int64"}},
            "Server-Timing": {"description": "Milliseconds per stage: queue, preprocess, encode, sample, decode, "
                              "postprocess, total (`queue;dur=0.4, preprocess;dur=21.0, ...`).",
                              "schema": {"type": "string"}},
            "X-AnyDoor-Demo": {"description": "`true` in demo mode (tiny random model).",
                               "schema": {"type": "string"}},
        },
    },
    401: _error("Missing or wrong API key (when `ANYDOOR_API_KEY` is set): `unauthorized`."),
    413: _error("An upload over `ANYDOOR_MAX_UPLOAD_MB`, or a body over four times that: `payload_too_large`."),
    422: _error("Bad input, naming the field: `not_an_image`, `truncated_image`, `too_many_pixels`, `empty_mask`, "
                "`size_mismatch`, `missing_mask`, `mask_too_small`, `invalid_box`, `box_out_of_image`, "
                "`missing_target`, `conflicting_target`, `out_of_range`, `invalid_parameter`, `missing_field`."),
    429: _error("The queue is full: `overloaded`, with a `Retry-After` header."),
    500: _error("A bug: `internal_error`; the server log has the details under the request id."),
    503: _error("Not ready (`not_ready`, `setup_failed`), draining (`draining`), cancelled by a shutdown "
                "(`shutting_down`) or the GPU ran out of memory (`gpu_out_of_memory`, with `Retry-After`)."),
    504: _error("The request waited in the queue past `ANYDOOR_QUEUE_TIMEOUT_S` without starting: `queue_timeout`."),
}


@router.post(
    "/predict",
    operation_id="predict",
    summary="Insert the reference object into the marked region(s) of the background",
    response_class=Response,
    responses=_PREDICT_RESPONSES,
    tags=["inference"],
)
async def predict(
    request: Request,
    service: Service,
    reference: Annotated[UploadFile, File(
        description="The object: an image (PNG, JPEG, WebP, ...). For an RGBA cut-out the alpha is the mask.")],
    background: Annotated[UploadFile, File(description="The scene to insert the object into, any size.")],
    reference_mask: Annotated[UploadFile | None, File(
        description="The object's mask (white = object), the reference's size; needed without an alpha.")] = None,
    background_mask: Annotated[UploadFile | None, File(
        description="Where to insert (white = target), the background's size; each separate region gets the "
        "object. Give this or `box`.")] = None,
    box: Annotated[list[str] | None, Form(
        description="A target box `x,y,w,h` in background pixels; repeat the field (or join with `;`) for several. "
        "Give this or `background_mask`.", examples=["120,80,200,260"])] = None,
    steps: Annotated[int, Form(description="DDIM denoising steps.", **_limits("steps"))] = DEFAULT_STEPS,
    guidance_scale: Annotated[float, Form(
        description="Classifier-free guidance scale (1 = no guidance).", **_limits("guidance_scale"))
    ] = DEFAULT_GUIDANCE_SCALE,
    control_strength: Annotated[float, Form(
        description="Scale of the ControlNet residuals (the detail collage).", **_limits("control_strength"))
    ] = DEFAULT_CONTROL_STRENGTH,
    shape_control: Annotated[bool, Form(
        description="Keep the target mask's shape instead of its bounding box.")] = False,
    seed: Annotated[int | None, Form(
        description="Random seed; omitted: a random one, returned in `X-Seed`.", **_limits("seed"))] = None,
    sampler: Annotated[Sampler, Form(
        description="`ddim` (upstream's sampler) or `dpmpp_2m` (DPM-Solver++(2M): similar quality in fewer steps, "
        "about 20).")] = "ddim",
) -> Response:
    uploads = await _read_uploads(
        {"reference": reference, "background": background, "reference_mask": reference_mask,
         "background_mask": background_mask},
        service.settings.max_upload_bytes,
    )
    reference_bytes, background_bytes = uploads["reference"], uploads["background"]
    assert reference_bytes is not None and background_bytes is not None  # required fields
    params = PredictParams(
        reference=reference_bytes, background=background_bytes, reference_mask=uploads["reference_mask"],
        background_mask=uploads["background_mask"], boxes=_boxes(box), steps=steps, guidance_scale=guidance_scale,
        control_strength=control_strength, shape_control=shape_control, seed=seed, sampler=sampler,
    )
    request_id = request_id_of(request.scope) or ""
    prediction = await service.predict(params, request_id=request_id, receive=request.receive)
    log.info("request %s: %dx%d, %d region(s), seed %d, %d steps, %s", request_id, prediction.width,
             prediction.height, prediction.regions, prediction.seed, steps, prediction.server_timing())
    return _reply(prediction, request_id, request.headers.get("accept", ""))


async def _read_uploads(files: dict[str, UploadFile | None], limit: int) -> dict[str, bytes | None]:
    """The uploaded bytes by field; each file was spooled to disk past 1 MiB, so its size is checked first."""
    out: dict[str, bytes | None] = {}
    for name, upload in files.items():
        if upload is None or (not upload.size and not upload.filename):
            out[name] = None  # an empty, unnamed part is what a browser sends for an unused file input
            continue
        if upload.size is not None and upload.size > limit:
            raise payload_too_large(name, upload.size, limit)
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise payload_too_large(name, None, limit)
        out[name] = data
    return out


def _boxes(values: list[str] | None) -> list[Box] | None:
    if not values:
        return None
    try:
        return [box for value in values for box in parse_boxes(value)]
    except InputError as exc:
        raise ServiceError.from_input_error(exc) from None


def _wants_json(accept: str) -> bool:
    """Content negotiation between PNG (the default) and JSON, by the q-values of the Accept header."""
    json_q = png_q = wildcard_q = 0.0
    for item in accept.split(","):
        media, *options = (part.strip().lower() for part in item.split(";"))
        q = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    q = float(option[2:])
                except ValueError:
                    q = 0.0
        if media == "application/json":
            json_q = max(json_q, q)
        elif media == "image/png":
            png_q = max(png_q, q)
        elif media in ("image/*", "*/*"):
            wildcard_q = max(wildcard_q, q)
    return json_q > 0 and json_q > png_q and json_q >= wildcard_q


def _reply(prediction: Prediction, request_id: str, accept: str) -> Response:
    headers = {"X-Seed": str(prediction.seed), "Server-Timing": prediction.server_timing(),
               "Cache-Control": "no-store", "Vary": "Accept"}
    if prediction.demo:
        headers["X-AnyDoor-Demo"] = "true"
    if not _wants_json(accept):
        return Response(prediction.png, media_type="image/png", headers=headers)
    body = PredictResponse(
        image=base64.b64encode(prediction.png).decode("ascii"), width=prediction.width, height=prediction.height,
        seed=prediction.seed, regions=prediction.regions, demo=prediction.demo, request_id=request_id,
        timings_ms=Timings(**{name: round(prediction.timings[name] * 1000, 3) for name in TIMING_ORDER}),
    )
    return JSONResponse(body.model_dump(), headers=headers)


# --- health and metrics --------------------------------------------------------------------------------------


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
                          dtype=str(pipe.dtype).removeprefix("torch."), demo=pipe.is_demo)
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
