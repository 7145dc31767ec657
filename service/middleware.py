"""Pure ASGI middleware (not ``BaseHTTPMiddleware``, which would hide client disconnects from the routes).

* :class:`RequestContextMiddleware`, outermost: a request id for every request, echoed as ``X-Request-ID``, and
  the request duration histogram by route template and status.
* :class:`AdmissionGate`: the API key for every route but the public ones, and admission of ``POST /predict``
  *before its body is read*: readiness, draining, room among the admitted requests and the concurrent uploads,
  and the body size, counted while it streams in, so an oversized or unwelcome upload is never read into memory
  or onto disk. Everything is keyed on the route path (the path under the app's ``root_path``), so it holds when
  the app runs behind a path prefix (``uvicorn --root-path /api``) or is mounted inside another ASGI app.
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
from service.errors import ServiceError, error_response, payload_too_large, too_many_parts
from service.inference import InferenceService, Slot
from service.metrics import Metrics
from service.security import DEFAULT_CSP

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed only if it is short and plain: it ends up in headers and logs.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
ROUTE_KEY = "anydoor.route"  # scope key: the route template of a request answered before routing
TICKET_KEY = "anydoor.ticket"  # scope key: the admission ticket of a /predict request
BODY_END_KEY = "anydoor.body_complete"  # scope key: True once the multipart body's closing delimiter arrived
PREDICT = "/predict"
# Routes anyone may call, key or not: probes and scrapers carry no key.
PUBLIC_ROUTES = frozenset({"/health/live", "/health/ready", "/health-check", "/metrics"})
# Browser pages and their static files: they hold no data and do nothing by themselves; the studio asks for the
# key and sends it with its API calls, /docs sends it with "Authorize". (The OpenAPI schema itself needs the key.)
PUBLIC_PAGES = frozenset({"/", "/studio", "/docs", "/docs/oauth2-redirect", "/redoc"})
PUBLIC_STATIC = ("/static/docs/", "/static/studio/")


def is_public(path: str, method: str) -> bool:
    """May ``method path`` (a route path) be called without the API key?"""
    if path in PUBLIC_ROUTES:
        return True
    if {".", ".."} & set(path.split("/")) or "\\" in path or "%" in path:
        return False  # never wave through a path that something downstream might normalise into another route
    return method in ("GET", "HEAD") and (path in PUBLIC_PAGES or path.startswith(PUBLIC_STATIC))
# Methods that get their own metrics label; anything else is counted as "other" (bounded label values).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``path`` without the ``root_path`` prefix (ASGI puts the full path in ``path``
    and the mount point or proxy prefix in ``root_path``), without a trailing slash."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):]
    return path.rstrip("/") or "/"


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
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                headers.setdefault("X-Content-Type-Options", "nosniff")
                if headers.get("content-type", "").startswith("text/html"):
                    # A page without its own policy (an error page, FastAPI's) gets the strictest one.
                    headers.setdefault("Content-Security-Policy", DEFAULT_CSP)
                    headers.setdefault("X-Frame-Options", "DENY")
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.http_duration.labels(self._route(scope), method, str(status)).observe(
                time.perf_counter() - start)

    @staticmethod
    def _route(scope: Scope) -> str:
        """The route's path template: a bounded set of label values. (A request that :class:`PredictGate` refused
        was never routed; the gate names its route.)"""
        template = getattr(scope.get("route"), "path", None) or scope.get(ROUTE_KEY)
        return str(template) if template else "unmatched"


class AdmissionGate:
    def __init__(self, app: ASGIApp, service: InferenceService) -> None:
        self.app = app
        self.service = service
        key = service.settings.api_key
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        predict = path == PREDICT and scope["method"] == "POST"
        headers = Headers(scope=scope)
        error = None
        if self._key_digest is not None and not is_public(path, scope["method"]) and not self._authorized(
                headers.get("authorization", "")):
            error = ServiceError(ErrorCode.UNAUTHORIZED, "missing or wrong API key; send `Authorization: Bearer "
                                 "<key>`", field="Authorization", headers={"WWW-Authenticate": "Bearer"})
        elif predict:
            error = self._predict_admission(headers)
        if error is not None:
            scope[ROUTE_KEY] = PREDICT if path == PREDICT else "unmatched"
            metrics = self.service.metrics if path == PREDICT else None
            await error_response(error, request_id_of(scope), metrics)(scope, receive, send)
            return
        if not predict:
            await self.app(scope, receive, send)
            return

        service = self.service
        tickets: list[Slot] = []

        def admit() -> None:
            """The body has shown it flows (or is complete): now it takes a place among the admitted requests."""
            ticket = service.admit()
            if ticket is None:
                raise service.overloaded(close=True)
            tickets.append(ticket)
            scope[TICKET_KEY] = ticket

        def on_evict() -> None:
            for ticket in tickets:
                ticket.release()

        reader = service.body_reader(receive, admit=admit, on_evict=on_evict)
        limit = service.settings.max_body_bytes
        max_parts = service.settings.max_form_fields
        delimiter = _delimiter(headers.get("content-type", ""))
        closing = delimiter + b"--" if delimiter else None
        marker = b"\r\n" + delimiter if delimiter else None  # a delimiter line (the first one: see tail)
        received = 0
        seen = 0  # delimiter lines so far: one per part, and the closing one
        tail = b"\r\n"  # as if a line ended before the body, so that its first delimiter counts
        scope[BODY_END_KEY] = False

        async def counted_receive() -> Message:
            nonlocal received, seen, tail
            message = await reader()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    # Raised inside the form parser; ServiceError is an HTTPException, so FastAPI passes it on to
                    # the app's handler, which answers 413. The spooled files are closed by the parser.
                    raise payload_too_large("body", None, limit)
                if marker and closing and not scope[BODY_END_KEY]:
                    # Delimiters may straddle chunks: search the previous chunk's tail too. Counting them counts
                    # the parts, fields and files together, before the parser builds any of them.
                    window = tail + chunk
                    seen += window.count(marker) - tail.count(marker)
                    scope[BODY_END_KEY] = closing in window
                    if seen - int(scope[BODY_END_KEY]) > max_parts:
                        raise too_many_parts(max_parts)
                    tail = window[-len(marker):]
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            reader.close()
            for ticket in tickets:
                ticket.release()

    def _predict_admission(self, headers: Headers) -> ServiceError | None:
        length = headers.get("content-length")
        limit = self.service.settings.max_body_bytes
        if length is not None and length.isdigit() and len(length) < 20 and int(length) > limit:
            return payload_too_large("body", int(length), limit)
        return self.service.admission_error()

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.strip().partition(" ")
        assert self._key_digest is not None
        # Comparing digests keeps the comparison constant-time in the key's length as well as its content.
        given = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._key_digest)


def _delimiter(content_type: str) -> bytes | None:
    """``--boundary`` of a multipart content type (RFC 2046 5.1.1), or None for anything else."""
    match = re.search(r"boundary=(\"[^\"]+\"|[^;\s]+)", content_type, re.IGNORECASE)
    if not content_type.lower().startswith("multipart/") or match is None:
        return None
    return b"--" + match.group(1).strip('"').encode("latin-1")
