"""``POST /predict``: the form is generated from the request spec (:mod:`model.spec`), never restated.

The multipart body is read through the spec's form codec (:mod:`model.spec.codecs`), strictly: every field must
be one of the spec's (an unknown one is 422 ``unknown_field`` with the closest known name), names, text lengths
and the counts of references, masks and regions are checked before any upload is read, parameters are parsed by
:meth:`FieldSpec.parse`, files must be file parts. The OpenAPI request body is built from the same spec
(:func:`request_body_schema`), with the placement object as its own schema component (``Placement``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from model.errors import ErrorCode, InputError
from model.pipeline.result import TIMING_NAMES
from model.spec.codecs import FilePart, RawRequest, Wire, collect, decode_params, inputs_of
from model.spec.inputs import FILE_FIELDS, INPUT_FIELDS, GenerationInputs
from model.spec.limits import Limits
from model.spec.params import OUTPUT_FORMATS, GenerationParams, param_specs
from service.api.deps import get_service
from service.api.schemas import CandidateBody, ErrorBody, PredictResponse, ScoresBody, Timings
from service.errors import ServiceError, client_gone, codes_with_status, generation_failed, payload_too_large
from service.inference import Prediction
from service.middleware import BODY_END_KEY, TICKET_KEY, request_id_of

log = logging.getLogger("anydoor.service")

router = APIRouter()

PLACEMENT_REF = "#/components/schemas/Placement"
# python-multipart's limit on one header line of a part (DEFAULT_MAX_HEADER_SIZE): a longer field name is refused.
PART_HEADER_LIMIT = 4096 + 128  # the component is model.spec.placement.placement_schema()


# --- the OpenAPI description, from the spec ----------------------------------------------------------------------


def request_body_schema() -> dict[str, Any]:
    """The multipart request body of /predict: the spec's input fields and parameters with their bounds."""
    properties: dict[str, Any] = {}
    encoding: dict[str, Any] = {}
    for f in INPUT_FIELDS:
        if f.kind == "image":
            one = {"type": "string", "format": "binary"}
            properties[f.name] = ({"type": "array", "items": one} if f.many else one) | {"description": f.help}
        elif f.kind == "placement":
            # An object in a multipart body is sent as a JSON part (OpenAPI's default encoding for objects).
            properties[f.name] = {"allOf": [{"$ref": PLACEMENT_REF}], "description": f.help}
            encoding[f.name] = {"contentType": "application/json"}
        else:
            properties[f.name] = {"type": "array", "items": {"type": "string", "example": "120,80,200,260"},
                                  "description": f.help}
            encoding[f.name] = {"style": "form", "explode": True}
    for spec in param_specs():
        properties[spec.name] = spec.json_schema()
    schema = {"type": "object", "properties": properties, "required": [f.name for f in INPUT_FIELDS if f.required],
              "additionalProperties": False}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema, "encoding": encoding}}}


def _error(status: int, summary: str) -> dict[str, Any]:
    codes = ", ".join(f"`{code.value}` ({code.meaning.rstrip('.')})" for code in codes_with_status(status))
    return {"model": ErrorBody, "description": f"{summary}: {codes}."}


IMAGE_TYPES = tuple(media for media, _ in OUTPUT_FORMATS.values())  # image/png, image/jpeg, image/webp

PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictResponse,
        "description": "The background with the object inserted, the size of the background, in `output_format` (PNG "
        "by default); with `Accept: application/json`, a JSON body with the image in base64; with "
        "`Accept: text/event-stream`, "
        "Server-Sent Events: `queued` {position}, `started`, `progress` {step, total, elapsed_s}, then exactly one "
        "`result` (the JSON answer) or `error` (the JSON error body). Errors found before the stream starts keep "
        "their status codes.",
        "content": {**{media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_TYPES},
                    "text/event-stream": {"schema": {"type": "string"}}},
        "headers": {
            "X-Request-ID": {"description": "The client's X-Request-ID if it sent a plain one, else a new id.",
                             "schema": {"type": "string"}},
            "X-Seed": {"description": "The seed used; send it back to get the same image.",
                       "schema": {"type": "integer", "format": "int64"}},
            "X-Boxes": {"description": "Each region's target box `x,y,w,h` in background pixels, `;`-separated, in "
                        "region order (the boxes a `placement` drew, too).", "schema": {"type": "string"}},
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
    settings = service.settings
    # Files: the background and its masks, plus a reference (and its mask) per region at most.
    max_files = len(FILE_FIELDS) + 2 * settings.max_regions
    form = await read_multipart(request, max_fields=settings.max_form_fields, max_part_chars=settings.max_field_chars,
                                max_files=max_files)
    try:
        inputs, params = await read_form(form, settings.limits)
    finally:
        await form.close()
    request_id = request_id_of(request.scope) or ""
    accept = request.headers.get("accept", "")
    if wants_stream(accept):
        return await _stream(request, inputs, params, request_id)
    # An image answer is the best candidate alone: the others are not encoded.
    prediction = await service.predict(inputs, params, request_id=request_id, receive=request.receive,
                                       ticket=request.scope.get(TICKET_KEY), all_candidates=wants_json(accept))
    log.info("request %s: %dx%d, %d region(s), seed %d, %s; %s", request_id, prediction.width, prediction.height,
             prediction.regions, prediction.seed, params.changed() or "defaults", prediction.server_timing())
    return _reply(prediction, request_id, accept)


def wants_stream(accept: str) -> bool:
    """``Accept: text/event-stream`` asks for Server-Sent Events (progress, then the result)."""
    return any(item.split(";")[0].strip().lower() == "text/event-stream" for item in accept.split(","))


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(request: Request, inputs: GenerationInputs, params: GenerationParams,
                  request_id: str) -> Response:
    """The event-stream answer: validation and preprocessing happen first, so their errors keep their status
    codes; from the first event on, a failure is an ``error`` event with the same body as a JSON error."""
    service = get_service(request)
    ticket = request.scope.get(TICKET_KEY)
    tracking = service.tracked(inputs)
    tracking.__enter__()
    try:
        prepared = await service.prepare(inputs, params)
    except BaseException:
        tracking.__exit__(None, None, None)
        raise

    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        task = asyncio.ensure_future(service.execute(
            prepared, request_id=request_id, receive=None, ticket=ticket,
            events=lambda name, data: queue.put_nowait((name, data))))
        try:
            while not task.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse(*getter.result())
                else:
                    getter.cancel()
            try:
                prediction = task.result()
            except ServiceError as exc:
                service.metrics.fail(exc.reason)
                yield sse("error", exc.body(request_id))
            except Exception:
                log.exception("request %s failed after its event stream started", request_id)
                error = generation_failed()
                service.metrics.fail(error.reason)
                yield sse("error", error.body(request_id))
            else:
                log.info("request %s: %dx%d, %d region(s), seed %d, streamed; %s", request_id, prediction.width,
                         prediction.height, prediction.regions, prediction.seed, prediction.server_timing())
                yield sse("result", json_body(prediction, request_id))
        finally:
            # The client left (the server cancels this generator) or the stream ended: a job still queued is
            # withdrawn, a running one stops at its next step (execute's own cleanup, run by the cancellation).
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                service.metrics.fail(client_gone().reason)
                log.info("request %s: the client closed its event stream; the job is cancelled", request_id)
            tracking.__exit__(None, None, None)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Vary": "Accept"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def read_multipart(request: Request, *, max_fields: int, max_part_chars: int, max_files: int) -> FormData:
    """The multipart form of ``request``, with the part-count and part-size limits; a body that is not complete
    multipart (no closing delimiter: a truncated upload) is 400, never a form with its last field dropped."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ServiceError(ErrorCode.BAD_REQUEST, f"the body must be multipart/form-data, got {content_type!r}",
                           field="body")
    try:
        # Text parts are held in memory: bound them a little above the field limit so read_form can name the
        # field; file parts are spooled to disk and bounded by the upload limit.
        form = await request.form(max_files=max_files, max_fields=max_fields,
                                  max_part_size=max_part_chars * 4 + 1024)
    except ClientDisconnect:
        # The client went away mid-upload (or the body deadline closed it): one log line, counted as cancelled.
        log.info("request %s: the client disconnected during its upload", request_id_of(request.scope))
        raise client_gone() from None
    except HTTPException as exc:
        if isinstance(exc, ServiceError):
            raise
        detail = str(exc.detail)
        if detail.startswith(("Too many fields", "Too many files")):
            raise ServiceError(ErrorCode.TOO_MANY_FIELDS, f"{detail.rstrip('.')}; at most {max_fields} parts (fields "
                               f"and files together), {max_files} of them files, are accepted", field="body") from None
        if detail.startswith("Part exceeded maximum size"):
            raise ServiceError(ErrorCode.FIELD_TOO_LONG, f"a text field is longer than {max_part_chars} "
                               "characters", field="body") from None
        if _caused_by(exc, "Maximum header size exceeded"):
            raise ServiceError(ErrorCode.FIELD_TOO_LONG, f"a part's header (its field name or file name) is longer "
                               f"than {PART_HEADER_LIMIT} bytes", field="body") from None
        raise ServiceError(ErrorCode.BAD_REQUEST, f"the multipart body cannot be read: {detail}",
                           field="body") from None
    if not request.scope.get(BODY_END_KEY, True):
        await form.close()
        raise ServiceError(ErrorCode.BAD_REQUEST, "the multipart body ends before its closing boundary (a truncated "
                           "upload?)", field="body")
    return form


def _caused_by(exc: BaseException, message: str) -> bool:
    """Whether ``message`` is in an exception behind ``exc`` (the multipart parser's own error, which Starlette
    wraps twice: in its ``MultiPartException``, then in a 400 ``HTTPException``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if message in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


async def read_form(form: FormData, limits: Limits) -> tuple[GenerationInputs, GenerationParams]:
    """The request's inputs and parameters from its multipart form, through the spec's form codec.

    Phase 1 (names, lengths, targets, counts) runs on the parts as they are, so a request that cannot be served
    is refused before a single upload is read into memory; then the uploads are read, each within its limit."""
    items: list[tuple[str, Any]] = []
    pending: dict[int, tuple[str, UploadFile]] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if not value.size and not value.filename:
                continue  # an empty, unnamed part is what a browser sends for an unused file input
            placeholder = FilePart(b"", value.filename)
            pending[id(placeholder)] = (name, value)
            items.append((name, placeholder))
        else:
            items.append((name, value))
    try:
        raw = collect(items, Wire.FORM, limits)
        for name, upload in pending.values():
            if upload.size is not None and upload.size > limits.max_upload_bytes:
                raise payload_too_large(name, upload.size, limits.max_upload_bytes)  # before reading any
        read = {key: FilePart(await _read_upload(name, upload, limits.max_upload_bytes), upload.filename)
                for key, (name, upload) in pending.items()}
        values = {name: tuple(read.get(id(v), v) for v in group) if name in FILE_FIELDS else group
                  for name, group in raw.values.items()}
        raw = RawRequest(values, raw.wire, raw.boxes, raw.placement)
        return inputs_of(raw), decode_params(raw)
    except InputError as exc:
        raise ServiceError.from_input_error(exc) from None


async def _read_upload(name: str, upload: UploadFile, limit: int) -> bytes:
    """The bytes of one file part; each was spooled to disk past 1 MiB, so its size is checked first."""
    if upload.size is not None and upload.size > limit:
        raise payload_too_large(name, upload.size, limit)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise payload_too_large(name, None, limit)
    return data


def wants_json(accept: str) -> bool:
    """Content negotiation between the image (the default; its format is the request's ``output_format``) and
    JSON, by the q-values of the Accept header."""
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
        elif media in IMAGE_TYPES:
            png_q = max(png_q, q)
        elif media in ("image/*", "*/*"):
            wildcard_q = max(wildcard_q, q)
    return json_q > 0 and json_q > png_q and json_q >= wildcard_q


def _reply(prediction: Prediction, request_id: str, accept: str) -> Response:
    headers = {"X-Seed": str(prediction.seed), "Server-Timing": prediction.server_timing(),
               "X-Boxes": ";".join(",".join(map(str, box)) for box in prediction.boxes),
               "Cache-Control": "no-store", "Vary": "Accept"}
    if prediction.demo:
        headers["X-AnyDoor-Demo"] = "true"
    if not wants_json(accept):
        return Response(prediction.data, media_type=prediction.media_type, headers=headers)
    return JSONResponse(json_body(prediction, request_id), headers=headers)


def json_body(prediction: Prediction, request_id: str) -> dict[str, Any]:
    """The JSON answer (also the ``result`` of the event stream)."""
    body = PredictResponse(
        image=base64.b64encode(prediction.data).decode("ascii"), media_type=prediction.media_type,  # type: ignore[arg-type]
        width=prediction.width, height=prediction.height,
        seed=prediction.seed, regions=prediction.regions, boxes=[list(b) for b in prediction.boxes],
        demo=prediction.demo, request_id=request_id,
        timings_ms=Timings(**{name: round(prediction.timings[name] * 1000, 3) for name in TIMING_NAMES}),
        scores=None if prediction.scores is None else ScoresBody.model_validate(prediction.scores.to_dict()),
        candidates=[CandidateBody(image=base64.b64encode(c.data).decode("ascii"), seed=c.seed,
                                  scores=None if c.scores is None else ScoresBody.model_validate(c.scores.to_dict()))
                    for c in prediction.candidates] or None,
    )
    return body.model_dump()
