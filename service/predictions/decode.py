"""A prediction's ``input`` through the request spec's JSON codecs (:mod:`model.spec.codecs`, ``Wire.JSON``).

Nothing is decoded by hand: :func:`check_input` is phase 1 of :func:`~model.spec.codecs.decode_request` (names,
lengths, counts, targets) plus the parameters, and the form of each image value (a data URI, or an http(s) URL
whose host passes the guard), so a bad request is refused with its 4xx before it is stored. :func:`decode_input`
is the whole decode, images opened by :class:`~service.predictions.fetch.RemoteFiles`, run when the prediction
is taken off the queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.errors import ErrorCode, InputError
from model.spec.codecs import RawRequest, Wire, collect, decode_params, decode_request, items_of_json
from model.spec.inputs import FILE_FIELDS, GenerationInputs
from model.spec.limits import Limits
from model.spec.params import GenerationParams
from service.predictions.fetch import RemoteFiles


def _items(values: Any) -> list[tuple[str, Any]]:
    if not isinstance(values, Mapping):
        raise InputError("input", ErrorCode.INVALID_JSON, f"must be a JSON object, got {type(values).__name__}")
    return items_of_json(values)


def check_input(values: Any, limits: Limits, files: RemoteFiles) -> tuple[RawRequest, GenerationParams]:
    """Everything about ``input`` that needs no image: InputError naming the field otherwise."""
    raw = collect(_items(values), Wire.JSON, limits)
    params = decode_params(raw)
    for name in FILE_FIELDS:
        for value in raw.files(name):
            files.check(name, value)
    return raw, params


def decode_input(values: Any, limits: Limits, files: RemoteFiles) -> tuple[GenerationInputs, GenerationParams]:
    """The inputs and parameters of ``input``, its images fetched or decoded (blocking: on a thread)."""
    return decode_request(_items(values), Wire.JSON, limits=limits, open_file=files)
