"""The one error vocabulary: every code a user can be answered with, and the exceptions that carry them.

:class:`ErrorCode` lists each stable machine code with its meaning; the README's error table and the OpenAPI error
descriptions are generated from it, and a test checks that every code is raised somewhere and every raised code
is listed. The model layer raises :class:`InputError` ``(field, code, message)`` and knows nothing of HTTP: the
status each code is answered with is decided in one place, ``service/errors.py``. Internal invariants use
``assert``.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """A stable error code (the ``error`` of every rejection) with its meaning."""

    def __new__(cls, value: str, meaning: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning  # type: ignore[attr-defined]
        return member

    meaning: str

    # --- the request itself
    BAD_REQUEST = "bad_request", "The request could not be read as HTTP or as multipart form data."
    MISSING_FIELD = "missing_field", "A required field is missing."
    UNKNOWN_FIELD = "unknown_field", "A field that is not part of the request (the message names the closest one)."
    INVALID_PARAMETER = "invalid_parameter", "A parameter of the wrong type, not a number, or not one of its choices."
    OUT_OF_RANGE = "out_of_range", "A parameter outside its bounds."
    PAYLOAD_TOO_LARGE = "payload_too_large", "A file over the upload limit, or a request body over the body limit."
    TOO_MANY_FIELDS = "too_many_fields", "A multipart body with more parts (fields and files) than the limit."
    FIELD_TOO_LONG = "field_too_long", "A text field longer than the field-length limit."
    TOO_MANY_DIGITS = "too_many_digits", "A number written with more digits than any valid value has."
    INVALID_JSON = "invalid_json", ("A JSON body or manifest line that is not valid UTF-8 JSON, or not an object (the "
                                    "message says where).")
    DUPLICATE_KEY = "duplicate_key", "A JSON object (a body, a manifest line, a placement) with a key given twice."
    # --- images
    NOT_AN_IMAGE = "not_an_image", ("No image is recognised in the data: it has no known image signature, or an "
                                    "accepted format's signature with no header of that format behind it.")
    UNSUPPORTED_FORMAT = "unsupported_format", ("An image in a format that is not accepted (the message names it and "
                                                "the accepted ones: PNG, JPEG, WebP, GIF, BMP), or a refused variant "
                                                "of an accepted one (an RLE BMP, a JPEG with hundreds of scans).")
    TRUNCATED_IMAGE = "truncated_image", ("An image in an accepted format whose header fields or pixel data are cut "
                                          "short or corrupt.")
    TOO_MANY_PIXELS = "too_many_pixels", "An image over the pixel limit, read from its header before decoding."
    UNREADABLE_FILE = "unreadable_file", ("A file path (Python API, CLI, manifest) that does not exist or cannot be "
                                          "read.")
    NOT_A_FILE = "not_a_file", ("A file path (CLI, manifest) that names a directory, a device or a pipe, not a "
                                "regular file.")
    PATH_OUTSIDE_BASE = "path_outside_base", ("A manifest path that resolves (symlinks included) outside the "
                                              "manifest's directory; `anydoor batch --allow-paths-outside` allows it.")
    INVALID_FILE_NAME = "invalid_file_name", ("A file name that cannot be a label (a reference's name is its class in "
                                              "COCO and YOLO): it holds a newline or another control character.")
    INVALID_IMAGE = "invalid_image", "An array given as an image without the (H, W, 3) uint8 layout (Python API)."
    # --- masks
    INVALID_MASK = "invalid_mask", "An array given as a mask that is not two-dimensional (Python API)."
    SIZE_MISMATCH = "size_mismatch", "A mask whose size differs from its image's."
    EMPTY_MASK = "empty_mask", "A mask with no pixel inside."
    MASK_TOO_SMALL = "mask_too_small", "A mask (or every region of it) with too few pixels inside."
    MISSING_MASK = "missing_mask", "A reference without an alpha channel and without a reference mask."
    # --- targets
    INVALID_BOX = "invalid_box", "A box that is not four integers `x,y,w,h`, or smaller than the smallest box side."
    BOX_OUT_OF_IMAGE = "box_out_of_image", "A box that does not lie inside the background."
    MISSING_TARGET = "missing_target", "Neither a background mask nor a box was given."
    CONFLICTING_TARGET = "conflicting_target", "Both a background mask and boxes were given."
    REFINER_UNAVAILABLE = "refiner_unavailable", "`refine_reference_mask` was asked for and no refiner is configured."
    REFERENCE_COUNT_MISMATCH = "reference_count_mismatch", ("Several references whose count differs from the "
                                                            "regions', or reference masks whose count differs "
                                                            "from the references'.")
    TOO_MANY_REGIONS = "too_many_regions", "More target regions (boxes, or separate regions of a mask) than the limit."
    PLACEMENT_IMPOSSIBLE = "placement_impossible", ("A `placement` whose boxes cannot all be fitted into its allowed "
                                                "area: the area is too small for the count, no box of the "
                                                "minimum size fits in it, or the count is over the region "
                                                "limit (the message says which).")
    # --- the service
    UNAUTHORIZED = "unauthorized", "An API key is set and the `Authorization: Bearer` key is missing or wrong."
    NOT_FOUND = "not_found", "No such route."
    METHOD_NOT_ALLOWED = "method_not_allowed", "The route does not take this HTTP method."
    REQUEST_TIMEOUT = "request_timeout", ("The request head or body arrived too slowly: past a read deadline, an idle "
                                          "gap, or below the minimum body rate; the connection is closed.")
    OVERLOADED = "overloaded", "The queue is full; `Retry-After` says when a slot is expected to free."
    CLIENT_CLOSED_REQUEST = "client_closed_request", "The client went away before its answer (only logged and counted)."
    QUEUE_TIMEOUT = "queue_timeout", "The request waited in the queue past the queue timeout without starting."
    NOT_READY = "not_ready", "The model is still loading or warming up."
    SETUP_FAILED = "setup_failed", "The model failed to load; the message says why."
    DRAINING = "draining", "The server is shutting down and takes no new requests."
    SHUTTING_DOWN = "shutting_down", "The shutdown grace period ran out and the request was cancelled."
    GPU_OUT_OF_MEMORY = "gpu_out_of_memory", "The GPU ran out of memory for this request; the worker goes on."
    INTERNAL_ERROR = "internal_error", "A bug; the server log has the traceback under the request id."
    # --- async predictions (`/predictions`)
    PREDICTION_NOT_FOUND = "prediction_not_found", ("No prediction with this id: never created, or deleted after "
                                                    "`ANYDOOR_PREDICTION_TTL`.")
    PREDICTION_CONFLICT = "prediction_conflict", ("A prediction with this id exists with a different body (`PUT` is "
                                                  "idempotent only for the same body).")
    URL_FORBIDDEN = "url_forbidden", ("A webhook or input URL that is not http(s), or whose host resolves (on any "
                                      "redirect too) to a loopback, link-local, private or reserved address that "
                                      "`ANYDOOR_WEBHOOK_ALLOW_HOSTS` does not list.")
    FETCH_FAILED = "fetch_failed", ("An input URL that could not be fetched: unreachable, an HTTP error, too many "
                                    "redirects, too slow, or a data URI that is not valid base64 (the message says "
                                    "which).")
    # --- seen by clients only (the Python client, `anydoor batch --url`, the studio page): no server sends these
    UNREACHABLE = "unreachable", ("Client side: the server could not be reached (refused, reset, timed out or "
                                  "closed before answering).")
    BAD_RESPONSE = "bad_response", ("Client side: an answer that is not the documented one (a 200 whose body is not "
                                    "the JSON answer, an event stream that ends without its result).")
    HTTP_ERROR = "http_error", ("Client side: an HTTP error status without a JSON error body (a proxy's or load "
                                "balancer's page); the message has the status.")


CLIENT_SIDE = frozenset({ErrorCode.UNREACHABLE, ErrorCode.BAD_RESPONSE, ErrorCode.HTTP_ERROR})
"""The codes a client records for a failure no server described (no HTTP status belongs to them)."""


class InputError(ValueError):
    """Bad input from a user: names the field, carries an :class:`ErrorCode` and a readable message."""

    def __init__(self, field: str | None, code: ErrorCode, message: str) -> None:
        if not isinstance(code, ErrorCode):
            raise TypeError(f"code must be an ErrorCode, got {code!r}")
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str | None]:
        return {"error": self.code.value, "field": self.field, "message": str(self)}


class CheckpointError(ValueError):
    """A weights file that cannot be used: missing, unexpected or mis-shaped keys, or a damaged file."""


class Cancelled(RuntimeError):
    """Raised inside a generation when its cancellation check fires (client gone, shutdown)."""
