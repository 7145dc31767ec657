"""``POST /predict``: the form is generated from the request spec (:mod:`model.pipeline.params`), never restated.

The multipart body is parsed here, strictly: every field must be one of the spec's (an unknown one is 422
``unknown_field`` with the closest known name), parameters are parsed by :meth:`ParamSpec.parse`, files must be
file parts. The OpenAPI request body is built from the same spec (:func:`request_body_schema`).
"""

from __future__ import annotations

import base64
import difflib
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData, UploadFile

from model.errors import ErrorCode, InputError
from model.pipeline import INPUT_FIELDS, TIMING_NAMES, GenerationInputs, GenerationParams, param_specs
from model.pipeline.params import ParamSpec, boxes_of
from service.api.deps import get_service
from service.api.schemas import ErrorBody, PredictResponse, Timings
from service.errors import ServiceError, codes_with_status, payload_too_large
from service.inference import Prediction
from service.middleware import request_id_of

log = logging.getLogger("anydoor.service")

router = APIRouter()

_FILE_FIELDS = tuple(f.name for f in INPUT_FIELDS if f.kind == "image")
_SPECS = {spec.name: spec for spec in param_specs()}
KNOWN_FIELDS = (*(f.name for f in INPUT_FIELDS), *_SPECS)


# --- the OpenAPI description, from the spec ----------------------------------------------------------------------


def _param_schema(spec: ParamSpec) -> dict[str, Any]:
    schema: dict[str, Any] = {"description": spec.help}
    if spec.kind == "choice":
        schema.update(type="string", enum=list(spec.choices or ()))
    else:
        schema["type"] = {"int": "integer", "float": "number", "bool": "boolean"}[spec.kind]
        if spec.kind == "int" and spec.name == "seed":
            schema["format"] = "int64"
        if spec.ge is not None:
            cast = int if spec.kind == "int" else float
            schema.update(minimum=cast(spec.ge), maximum=cast(spec.le))
    if spec.default is not None:
        schema["default"] = spec.default
    return schema


def request_body_schema() -> dict[str, Any]:
    """The multipart request body of /predict: the spec's input fields and parameters with their bounds."""
    properties: dict[str, Any] = {}
    for f in INPUT_FIELDS:
        if f.kind == "image":
            properties[f.name] = {"type": "string", "format": "binary", "description": f.help}
        else:
            properties[f.name] = {"type": "array", "items": {"type": "string", "example": "120,80,200,260"},
                                  "description": f.help}
    for spec in param_specs():
        properties[spec.name] = _param_schema(spec)
    schema = {"type": "object", "properties": properties, "required": [f.name for f in INPUT_FIELDS if f.required],
              "additionalProperties": False}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema, "encoding": {
        "box": {"style": "form", "explode": True}}}}}


def _error(status: int, summary: str) -> dict[str, Any]:
    codes = ", ".join(f"`{code.value}` ({code.meaning.rstrip('.')})" for code in codes_with_status(status))
    return {"model": ErrorBody, "description": f"{summary}: {codes}."}


PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictResponse,
        "description": "The background with the object inserted, the size of the background. PNG by default; "
        "with `Accept: application/json`, a JSON body with the PNG in base64.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            "X-Request-ID": {"description": "The client's X-Request-ID if it sent a plain one, else a new id.",
                             "schema": {"type": "string"}},
            "X-Seed": {"description": "The seed used; send it back to get the same image.",
                       "schema": {"type": "integer", "format": "int64"}},
            "Server-Timing": {"description": "Milliseconds per stage: " + ", ".join(TIMING_NAMES)
                              + " (`queue;dur=0.4, preprocess;dur=21.0, ...`).", "schema": {"type": "string"}},
            "X-AnyDoor-Demo": {"description": "`true` in demo mode (tiny random model).",
                               "schema": {"type": "string"}},
        },
    },
    **{status: _error(status, summary) for status, summary in (
        (400, "An unreadable request"), (401, "Not authorized"), (413, "Too large"), (422, "Bad input, naming the "
         "field"), (429, "Overloaded, with `Retry-After`"), (500, "A bug"), (503, "Unavailable"),
        (504, "Waited too long"))},
}


# --- the route ---------------------------------------------------------------------------------------------------


@router.post(
    "/predict",
    operation_id="predict",
    summary="Insert the reference object into the marked region(s) of the background",
    response_class=Response,
    responses=PREDICT_RESPONSES,
    openapi_extra={"requestBody": request_body_schema()},
    tags=["inference"],
)
async def predict(request: Request) -> Response:
    service = get_service(request)
    form = await request.form()
    try:
        inputs, params = await read_form(form, service.settings.max_upload_bytes)
    finally:
        await form.close()
    request_id = request_id_of(request.scope) or ""
    prediction = await service.predict(inputs, params, request_id=request_id, receive=request.receive)
    log.info("request %s: %dx%d, %d region(s), seed %d, %s; %s", request_id, prediction.width, prediction.height,
             prediction.regions, prediction.seed, params.changed() or "defaults", prediction.server_timing())
    return _reply(prediction, request_id, request.headers.get("accept", ""))


async def read_form(form: FormData, max_upload_bytes: int) -> tuple[GenerationInputs, GenerationParams]:
    """The request's inputs and parameters from its multipart form, strictly."""
    files: dict[str, bytes] = {}
    boxes: list[str] = []
    texts: dict[str, str] = {}
    for name, value in form.multi_items():
        if name not in KNOWN_FIELDS:
            close = difflib.get_close_matches(name, KNOWN_FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(KNOWN_FIELDS)}"
            raise _invalid(name, ErrorCode.UNKNOWN_FIELD, f"is not a field of this request{hint}")
        if name in _FILE_FIELDS:
            if not isinstance(value, UploadFile):
                raise _invalid(name, ErrorCode.INVALID_PARAMETER, "must be a file upload (a part with a filename)")
            if name in files:
                raise _invalid(name, ErrorCode.INVALID_PARAMETER, "was given more than once")
            data = await _read_upload(name, value, max_upload_bytes)
            if data is not None:
                files[name] = data
            continue
        if isinstance(value, UploadFile):
            raise _invalid(name, ErrorCode.INVALID_PARAMETER, "must be a text field, not a file")
        if name == "box":
            boxes.append(value)
        elif name in texts:
            raise _invalid(name, ErrorCode.INVALID_PARAMETER, "was given more than once")
        else:
            texts[name] = value
    for f in INPUT_FIELDS:
        if f.required and f.name not in files:
            raise _invalid(f.name, ErrorCode.MISSING_FIELD, "is required")
    try:
        params = GenerationParams.from_text(texts)
        inputs = GenerationInputs(files["reference"], files["background"], files.get("reference_mask"),
                                  files.get("background_mask"), boxes_of(boxes) if boxes else None)
    except InputError as exc:
        raise ServiceError.from_input_error(exc) from None
    return inputs, params


def _invalid(field: str, code: ErrorCode, message: str) -> ServiceError:
    return ServiceError(code, message, field=field)


async def _read_upload(name: str, upload: UploadFile, limit: int) -> bytes | None:
    """The bytes of one file part; each was spooled to disk past 1 MiB, so its size is checked first."""
    if not upload.size and not upload.filename:
        return None  # an empty, unnamed part is what a browser sends for an unused file input
    if upload.size is not None and upload.size > limit:
        raise payload_too_large(name, upload.size, limit)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise payload_too_large(name, None, limit)
    return data


def wants_json(accept: str) -> bool:
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
    if not wants_json(accept):
        return Response(prediction.png, media_type="image/png", headers=headers)
    return JSONResponse(json_body(prediction, request_id), headers=headers)


def json_body(prediction: Prediction, request_id: str) -> dict[str, Any]:
    """The JSON answer (also the ``result`` of the event stream)."""
    body = PredictResponse(
        image=base64.b64encode(prediction.png).decode("ascii"), width=prediction.width, height=prediction.height,
        seed=prediction.seed, regions=prediction.regions, boxes=[list(b) for b in prediction.boxes],
        demo=prediction.demo, request_id=request_id,
        timings_ms=Timings(**{name: round(prediction.timings[name] * 1000, 3) for name in TIMING_NAMES}),
    )
    return body.model_dump()
