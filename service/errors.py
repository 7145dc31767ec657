"""Every rejection the service makes: an HTTP status, a stable ``error`` code, the field at fault, a message.

:class:`ServiceError` subclasses Starlette's ``HTTPException`` so that one raised while the body is being read
(the upload size limit, counted in :mod:`service.middleware`) passes through FastAPI's body parsing untouched.
Each error also names the metrics ``reason`` it is counted under (see :data:`service.metrics.FAILURE_REASONS`).
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from model.errors import InputError

from .metrics import Metrics


class ServiceError(HTTPException):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        reason: str = "validation",
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        if field and not message.startswith(f"{field}:"):
            message = f"{field}: {message}"  # the message names the field, for people reading it
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.reason = reason
        self.errors = errors

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self, request_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "field": self.field, "message": self.message,
                                "request_id": request_id}
        if self.errors:
            body["errors"] = self.errors
        return body

    @classmethod
    def from_input_error(cls, exc: InputError) -> ServiceError:
        status = exc.status if 400 <= exc.status < 500 else 422
        return cls(status, exc.code, exc.message, field=exc.field, reason="validation")


def error_response(exc: ServiceError, request_id: str | None, metrics: Metrics | None) -> JSONResponse:
    """Render ``exc`` as the JSON error body, counting it in ``metrics`` under its reason."""
    if metrics is not None:
        metrics.fail(exc.reason)
    headers = dict(exc.headers or {})
    headers["Cache-Control"] = "no-store"
    return JSONResponse(exc.body(request_id), status_code=exc.status, headers=headers)


# --- the errors raised in more than one place ----------------------------------------------------------------


def payload_too_large(field: str, size: int | None, limit: int) -> ServiceError:
    got = f"{size} bytes" if size is not None else "more"
    what = "the request body" if field == "body" else "the file"
    return ServiceError(413, "payload_too_large", f"{what} is {got}; at most {limit} bytes are accepted",
                        field=field)


def overloaded(retry_after_s: int) -> ServiceError:
    return ServiceError(429, "overloaded", "the request queue is full; retry later", reason="overloaded",
                        headers={"Retry-After": str(retry_after_s)})


def queue_timeout(waited_s: float) -> ServiceError:
    return ServiceError(504, "queue_timeout", f"the request waited {waited_s:.1f} s in the queue without starting",
                        reason="timeout")


def generation_failed() -> ServiceError:
    return ServiceError(500, "internal_error", "the generation failed unexpectedly; the server log has the details "
                        "under this request id", reason="internal")


def shutting_down() -> ServiceError:
    return ServiceError(503, "shutting_down", "the server is shutting down; the request was cancelled, retry "
                        "elsewhere", reason="cancelled")
