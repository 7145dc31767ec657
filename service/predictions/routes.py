"""The Cog prediction API: ``POST /predictions``, ``PUT /predictions/{id}``, ``GET /predictions/{id}``,
``POST /predictions/{id}/cancel``, with Cog's JSON shapes so Cog and Replicate clients work unchanged.

Synchronous by default, as Cog is: the answer (200) is the finished prediction. ``Prefer: respond-async`` answers
202 at once with the prediction as stored. The body is read with a limit (the ``/predict`` body limit, plus the
base64 overhead of data URIs) and parsed strictly (``invalid_json``, ``duplicate_key``); ``input`` is checked by
the request spec's JSON codec before the prediction is stored, so a bad field is refused with the same code and
status as on ``/predict``. The API key, when set, is checked by the middleware, as for ``/predict``.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from model.errors import ErrorCode, InputError
from model.spec.codecs import parse_json_object, unknown_field
from model.spec.inputs import INPUT_FIELDS
from model.spec.params import param_specs
from service.api.schemas import ErrorBody
from service.errors import ServiceError, payload_too_large
from service.predictions.service import PredictionService
from service.predictions.webhooks import EVENTS

router = APIRouter(tags=["predictions"])

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
BODY_KEYS = ("id", "input", "webhook", "webhook_events_filter")
# Keys Cog's request model has that mean nothing here: accepted and ignored, so Cog clients work unchanged.
IGNORED_KEYS = ("created_at", "output_file_prefix", "context")


def get_predictions(request: Request) -> PredictionService:
    predictions: PredictionService = request.app.state.predictions
    return predictions


def wants_async(request: Request) -> bool:
    """``Prefer: respond-async`` (RFC 7240), among other preferences."""
    prefer = ",".join(request.headers.getlist("prefer"))
    return any(item.split(";")[0].strip().lower() == "respond-async" for item in prefer.split(","))


def _prediction_schema() -> dict[str, Any]:
    status = {"type": "string", "enum": ["starting", "processing", "succeeded", "failed", "canceled"]}
    stamp = {"type": "string", "format": "date-time", "nullable": True}
    return {"type": "object", "properties": {
        "id": {"type": "string"}, "input": {"type": "object"},
        "output": {"type": "array", "items": {"type": "string"}, "nullable": True,
                   "description": "The images as data URIs (in `output_format`, PNG by default), as the Cog "
                   "predictor's list of files: the `num_outputs` candidates best first, one for a single output."},
        "status": status, "error": {"type": "string", "nullable": True},
        "error_code": {"type": "string", "nullable": True, "description": "The `error` code of the failure."},
        "logs": {"type": "string"},
        "metrics": {"type": "object", "description": "`predict_time` (s), `seed`, `seeds` and `scores` "
                    "(per candidate, best first), `regions`, `timing` (s per stage)."},
        "created_at": stamp, "started_at": stamp, "completed_at": stamp}}


def _request_schema(with_id: bool) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for f in INPUT_FIELDS:
        one = {"type": "string", "description": "A data URI or an http(s) URL. " + f.help} if f.kind == "image" \
            else {"description": f.help}
        inputs[f.name] = {"oneOf": [one, {"type": "array", "items": one}]} if f.many else one
    for spec in param_specs():
        inputs[spec.name] = spec.json_schema()
    properties: dict[str, Any] = {
        "input": {"type": "object", "properties": inputs, "required": [f.name for f in INPUT_FIELDS if f.required],
                  "additionalProperties": False},
        "webhook": {"type": "string", "format": "uri", "description": "Where to POST the prediction as it changes."},
        "webhook_events_filter": {"type": "array", "items": {"type": "string", "enum": list(EVENTS)},
                                  "description": "Which events to send (default: all)."},
    }
    if with_id:
        properties = {"id": {"type": "string", "pattern": ID_PATTERN.pattern}, **properties}
    schema = {"type": "object", "properties": properties, "required": ["input"]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        200: {"description": "The prediction (finished, unless `Prefer: respond-async` was sent).",
              "content": {"application/json": {"schema": _prediction_schema()}}}}
    text = {202: "Accepted (`Prefer: respond-async`): the prediction as stored.", 404: "No such prediction.",
            409: "A different body for a known id.", 413: "Too large.", 422: "Bad input, naming the field.",
            429: "The store is full; `Retry-After`.", 503: "Unavailable."}
    for status in statuses:
        if status == 202:
            out[202] = {"description": text[202], "content": {"application/json": {"schema": _prediction_schema()}}}
        else:
            out[status] = {"model": ErrorBody, "description": text[status]}
    return out


async def read_body(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object of the body, read up to ``limit`` bytes (413 beyond)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise ServiceError(ErrorCode.BAD_REQUEST, f"the body must be application/json, got {content_type!r}",
                           field="body")
    length = request.headers.get("content-length", "")
    if length.isdigit() and len(length) < 20 and int(length) > limit:
        raise payload_too_large("body", int(length), limit)
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise payload_too_large("body", None, limit)
    try:
        return parse_json_object(bytes(chunks))
    except InputError as exc:
        raise ServiceError.from_input_error(exc) from None


def _check_keys(body: dict[str, Any], *, allow_id: bool) -> None:
    for key in body:
        if key in IGNORED_KEYS or (key == "id" and allow_id):
            continue
        if key not in BODY_KEYS or key == "id":
            error = unknown_field(key, tuple(k for k in BODY_KEYS if allow_id or k != "id"),
                                  "a key of a prediction request")
            raise ServiceError.from_input_error(error)
    if "input" not in body:
        raise ServiceError(ErrorCode.MISSING_FIELD, "is required", field="input")


def _check_id(prediction_id: Any) -> str:
    if not isinstance(prediction_id, str) or not ID_PATTERN.match(prediction_id):
        raise ServiceError(ErrorCode.INVALID_PARAMETER, "must be 1-128 letters, digits, '.', '_', ':' or '-', "
                           "starting with a letter or digit", field="id")
    return prediction_id


def _limit(service: PredictionService) -> int:
    # Data URIs are base64: 4 bytes per 3, plus room for the keys and parameters.
    return service.settings.max_body_bytes * 4 // 3 + (64 << 10)


async def _submit(request: Request, prediction_id: str, body: dict[str, Any]) -> JSONResponse:
    service = get_predictions(request)
    record, _ = await service.create(prediction_id, body)
    headers = {"Cache-Control": "no-store"}
    if wants_async(request):
        return JSONResponse(record.to_json(), status_code=202, headers=headers)
    record = await service.wait(record.id)
    return JSONResponse(record.to_json(), status_code=200, headers=headers)


@router.post("/predictions", operation_id="create_prediction", summary="Create a prediction (Cog's API)",
             responses=_responses(202, 409, 413, 422, 429, 503), openapi_extra=_request_schema(True))
async def create_prediction(request: Request) -> JSONResponse:
    service = get_predictions(request)
    body = await read_body(request, _limit(service))
    _check_keys(body, allow_id=True)
    prediction_id = _check_id(body["id"]) if body.get("id") is not None else secrets.token_hex(10)
    return await _submit(request, prediction_id, body)


@router.put("/predictions/{prediction_id}", operation_id="put_prediction",
            summary="Create a prediction with this id; idempotent for the same body",
            responses=_responses(202, 409, 413, 422, 429, 503), openapi_extra=_request_schema(False))
async def put_prediction(prediction_id: str, request: Request) -> JSONResponse:
    service = get_predictions(request)
    _check_id(prediction_id)
    body = await read_body(request, _limit(service))
    if body.get("id") is not None and body["id"] != prediction_id:
        raise ServiceError(ErrorCode.INVALID_PARAMETER, "differs from the id in the path", field="id")
    body.pop("id", None)
    _check_keys(body, allow_id=False)
    return await _submit(request, prediction_id, body)


@router.get("/predictions/{prediction_id}", operation_id="get_prediction", summary="The prediction (polling)",
            responses=_responses(404))
async def get_prediction(prediction_id: str, request: Request) -> JSONResponse:
    record = await get_predictions(request).get(prediction_id)
    return JSONResponse(record.to_json(), headers={"Cache-Control": "no-store"})


@router.post("/predictions/{prediction_id}/cancel", operation_id="cancel_prediction",
             summary="Cancel: a queued prediction ends at once, a running one at its next step",
             responses=_responses(404))
async def cancel_prediction(prediction_id: str, request: Request) -> JSONResponse:
    record = await get_predictions(request).cancel(prediction_id)
    return JSONResponse(record.to_json(), headers={"Cache-Control": "no-store"})
