"""Every rejection the service makes, and the one place that maps error codes to HTTP statuses.

The codes and their meanings are :class:`model.errors.ErrorCode`; :data:`HTTP_STATUS` gives each its status and
the metrics ``reason`` it is counted under (see :data:`service.metrics.FAILURE_REASONS`). :class:`ServiceError`
subclasses Starlette's ``HTTPException`` so that one raised while the body is being read (the upload size limit,
counted in :mod:`service.middleware`) passes through FastAPI's body parsing untouched.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from model.errors import CLIENT_SIDE, ErrorCode, InputError
from service.metrics import Metrics

C = ErrorCode
# code -> (HTTP status, metrics reason). Every ErrorCode but the client-side ones has an entry (a test checks it).
HTTP_STATUS: dict[ErrorCode, tuple[int, str]] = {
    C.BAD_REQUEST: (400, "validation"),
    C.MISSING_FIELD: (422, "validation"),
    C.UNKNOWN_FIELD: (422, "validation"),
    C.INVALID_PARAMETER: (422, "validation"),
    C.OUT_OF_RANGE: (422, "validation"),
    C.PAYLOAD_TOO_LARGE: (413, "validation"),
    C.TOO_MANY_FIELDS: (413, "validation"),
    C.FIELD_TOO_LONG: (413, "validation"),
    C.TOO_MANY_DIGITS: (422, "validation"),
    C.INVALID_JSON: (400, "validation"),
    C.DUPLICATE_KEY: (422, "validation"),
    C.NOT_AN_IMAGE: (422, "validation"),
    C.UNSUPPORTED_FORMAT: (422, "validation"),
    C.TRUNCATED_IMAGE: (422, "validation"),
    C.TOO_MANY_PIXELS: (422, "validation"),
    C.UNREADABLE_FILE: (422, "validation"),
    C.NOT_A_FILE: (422, "validation"),
    C.PATH_OUTSIDE_BASE: (422, "validation"),
    C.INVALID_FILE_NAME: (422, "validation"),
    C.INVALID_IMAGE: (422, "validation"),
    C.INVALID_MASK: (422, "validation"),
    C.SIZE_MISMATCH: (422, "validation"),
    C.EMPTY_MASK: (422, "validation"),
    C.MASK_TOO_SMALL: (422, "validation"),
    C.MISSING_MASK: (422, "validation"),
    C.INVALID_BOX: (422, "validation"),
    C.BOX_OUT_OF_IMAGE: (422, "validation"),
    C.MISSING_TARGET: (422, "validation"),
    C.CONFLICTING_TARGET: (422, "validation"),
    C.TOO_MANY_REGIONS: (422, "validation"),
    C.PLACEMENT_IMPOSSIBLE: (422, "validation"),
    C.REFINER_UNAVAILABLE: (422, "validation"),
    C.REFERENCE_COUNT_MISMATCH: (422, "validation"),
    C.UNAUTHORIZED: (401, "unauthorized"),
    C.NOT_FOUND: (404, "validation"),
    C.METHOD_NOT_ALLOWED: (405, "validation"),
    C.REQUEST_TIMEOUT: (408, "timeout"),
    C.OVERLOADED: (429, "overloaded"),
    C.CLIENT_CLOSED_REQUEST: (499, "cancelled"),
    C.QUEUE_TIMEOUT: (504, "timeout"),
    C.NOT_READY: (503, "unavailable"),
    C.SETUP_FAILED: (503, "unavailable"),
    C.DRAINING: (503, "unavailable"),
    C.SHUTTING_DOWN: (503, "cancelled"),
    C.GPU_OUT_OF_MEMORY: (503, "oom"),
    C.INTERNAL_ERROR: (500, "internal"),
    C.PREDICTION_NOT_FOUND: (404, "validation"),
    C.PREDICTION_CONFLICT: (409, "validation"),
    C.URL_FORBIDDEN: (422, "validation"),
    C.FETCH_FAILED: (422, "validation"),
}


def status_of(code: ErrorCode) -> int:
    return HTTP_STATUS[code][0]


class ServiceError(HTTPException):
    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        if field and not message.startswith(f"{field}:"):
            message = f"{field}: {message}"  # the message names the field, for people reading it
        status, reason = HTTP_STATUS[code]
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.reason = reason
        self.errors = errors

    def __str__(self) -> str:
        return f"{self.status} {self.code.value}: {self.message}"

    def body(self, request_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code.value, "field": self.field, "message": self.message,
                                "request_id": request_id}
        if self.errors:
            body["errors"] = self.errors
        return body

    @classmethod
    def from_input_error(cls, exc: InputError) -> ServiceError:
        return cls(exc.code, exc.message, field=exc.field)


def error_response(exc: ServiceError, request_id: str | None, metrics: Metrics | None) -> JSONResponse:
    """Render ``exc`` as the JSON error body, counting it in ``metrics`` under its reason."""
    if metrics is not None:
        metrics.fail(exc.reason)
    headers = dict(exc.headers or {})
    headers["Cache-Control"] = "no-store"
    return JSONResponse(exc.body(request_id), status_code=exc.status, headers=headers)


def error_table() -> str:
    """The Markdown table of every error code, its HTTP status and meaning, as the README shows it."""
    rows = ["| Status | `error` | Meaning |", "| --- | --- | --- |"]
    for code in sorted(HTTP_STATUS, key=lambda c: (status_of(c), list(ErrorCode).index(c))):
        rows.append(f"| {status_of(code)} | `{code.value}` | {code.meaning} |")
    rows += [f"| client | `{code.value}` | {code.meaning} |" for code in ErrorCode if code in CLIENT_SIDE]
    return "\n".join(rows) + "\n"


def codes_with_status(status: int) -> list[ErrorCode]:
    return [code for code in HTTP_STATUS if status_of(code) == status]


# --- the errors raised in more than one place ----------------------------------------------------------------


def payload_too_large(field: str, size: int | None, limit: int) -> ServiceError:
    got = f"{size} bytes" if size is not None else "more"
    what = "the request body" if field == "body" else "the file"
    return ServiceError(C.PAYLOAD_TOO_LARGE, f"{what} is {got}; at most {limit} bytes are accepted", field=field)


def overloaded(retry_after_s: int, *, close: bool = False) -> ServiceError:
    """429 with ``Retry-After``; ``close`` when part of the body was read (the rest is not worth reading)."""
    headers = {"Retry-After": str(retry_after_s)} | ({"Connection": "close"} if close else {})
    return ServiceError(C.OVERLOADED, "the request queue is full; retry later", headers=headers)


def too_many_parts(limit: int) -> ServiceError:
    return ServiceError(C.TOO_MANY_FIELDS, f"the multipart body has more than {limit} parts (fields and files "
                        "together)", field="body")


def queue_timeout(waited_s: float) -> ServiceError:
    return ServiceError(C.QUEUE_TIMEOUT, f"the request waited {waited_s:.1f} s in the queue without starting")


def generation_failed() -> ServiceError:
    return ServiceError(C.INTERNAL_ERROR, "the generation failed unexpectedly; the server log has the details "
                        "under this request id")


def shutting_down() -> ServiceError:
    return ServiceError(C.SHUTTING_DOWN, "the server is shutting down; the request was cancelled, retry elsewhere")


def client_gone() -> ServiceError:
    return ServiceError(C.CLIENT_CLOSED_REQUEST, "the client closed the connection")


if __name__ == "__main__":
    print(error_table(), end="")
