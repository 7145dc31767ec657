"""The client's one exception: a refused or failed prediction, carrying the server's :class:`ErrorCode`."""

from __future__ import annotations

from model.errors import ErrorCode

_CODES = {code.value: code for code in ErrorCode}


class AnyDoorError(Exception):
    """A prediction that did not succeed.

    ``code`` is the :class:`~model.errors.ErrorCode` the server answered with (``out_of_range``, ``overloaded``,
    ...), or a client-side one (``unreachable``, ``bad_response``, ``http_error``) where no server described the
    failure; a request the client refused to send carries the spec's code (``invalid_parameter``, ...).
    ``error`` is the code's text as received (a newer server may send a code this client does not know: ``code``
    is then ``http_error``). ``status`` is the HTTP status (0: no answer), ``field`` the request field at fault,
    ``server`` the base URL that answered last and ``attempts`` how many requests were sent."""

    def __init__(self, code: ErrorCode, message: str, *, field: str | None = None, status: int = 0,
                 error: str | None = None, request_id: str | None = None, server: str | None = None,
                 attempts: int = 0, retry_after_s: float | None = None) -> None:
        super().__init__(f"{field}: {message}" if field and not message.startswith(f"{field}:") else message)
        self.code = code
        self.error = error or code.value
        self.message = message
        self.field = field
        self.status = status
        self.request_id = request_id
        self.server = server
        self.attempts = attempts
        self.retry_after_s = retry_after_s

    @property
    def transient(self) -> bool:
        """Whether sending the same request again may succeed (no answer, overload, draining, a server fault)."""
        return self.status == 0 and self.code is ErrorCode.UNREACHABLE or self.status in (429, 503) or \
            self.status >= 500

    @classmethod
    def from_body(cls, status: int, body: bytes, *, server: str | None = None,
                  retry_after_s: float | None = None) -> AnyDoorError:
        """The error a non-200 answer describes: the service's JSON error body, else ``http_error``."""
        import json

        try:
            data = json.loads(body)
            error, field, message = str(data["error"]), data.get("field"), str(data.get("message", ""))
            request_id = data.get("request_id")
        except (ValueError, KeyError, TypeError):
            text = body[:200].decode("utf-8", errors="replace").strip()
            return cls(ErrorCode.HTTP_ERROR, f"HTTP {status}" + (f": {text}" if text else ""), status=status,
                       server=server, retry_after_s=retry_after_s)
        code = _CODES.get(error, ErrorCode.HTTP_ERROR)
        return cls(code, message, field=field if isinstance(field, str) else None, status=status, error=error,
                   request_id=request_id if isinstance(request_id, str) else None, server=server,
                   retry_after_s=retry_after_s)
