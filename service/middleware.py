"""Pure ASGI middleware (not ``BaseHTTPMiddleware``, which would hide client disconnects from the routes).

* :class:`RequestContextMiddleware`, outermost: a request id for every request, echoed as ``X-Request-ID``, and
  the request duration histogram by route template and status.
* :class:`PredictGate`: admission of ``POST /predict`` *before its body is read*: API key, readiness, draining,
  room in the queue, and the body size, counted while it streams in, so an oversized or unwelcome upload is
  never read into memory or onto disk.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.errors import ErrorCode
from service.errors import ServiceError, error_response, payload_too_large
from service.inference import InferenceService
from service.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed only if it is short and plain: it ends up in headers and logs.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
ROUTE_KEY = "anydoor.route"  # scope key: the route template of a request answered before routing


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state")
    return state.get("request_id") if isinstance(state, dict) else None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = given if given and _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.http_duration.labels(self._route(scope), scope["method"], str(status)).observe(
                time.perf_counter() - start)

    @staticmethod
    def _route(scope: Scope) -> str:
        """The route's path template: a bounded set of label values. (A request that :class:`PredictGate` refused
        was never routed; the gate names its route.)"""
        template = getattr(scope.get("route"), "path", None) or scope.get(ROUTE_KEY)
        return str(template) if template else "unmatched"


class PredictGate:
    def __init__(self, app: ASGIApp, service: InferenceService, path: str = "/predict") -> None:
        self.app = app
        self.service = service
        self.path = path
        key = service.settings.api_key
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        error = self._admission(Headers(scope=scope))
        if error is not None:
            scope[ROUTE_KEY] = self.path
            response = error_response(error, request_id_of(scope), self.service.metrics)
            await response(scope, receive, send)
            return

        limit = self.service.settings.max_body_bytes
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the form parser; ServiceError is an HTTPException, so FastAPI passes it on to
                    # the app's handler, which answers 413. The spooled files are closed by the parser.
                    raise payload_too_large("body", None, limit)
            return message

        await self.app(scope, counted_receive, send)

    def _admission(self, headers: Headers) -> ServiceError | None:
        if self._key_digest is not None and not self._authorized(headers.get("authorization", "")):
            return ServiceError(ErrorCode.UNAUTHORIZED, "missing or wrong API key; send `Authorization: Bearer <key>`",
                                field="Authorization", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        limit = self.service.settings.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            return payload_too_large("body", int(length), limit)
        return self.service.admission_error()

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        assert self._key_digest is not None
        # Comparing digests keeps the comparison constant-time in the key's length as well as its content.
        given = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._key_digest)
