"""One codec per input kind and wire format: how a request arrives (and is sent) on every surface.

A request is a sequence of ``(name, value)`` items, as every wire has them: the parts of a multipart form, the
keys of a JSON object (a manifest line, a prediction's ``input``), the flags of a command, the arguments of the
Cog predictor. :func:`decode_request` turns them into ``(GenerationInputs, GenerationParams)`` in two phases:

1. names and counts, cheaply: unknown names (with the closest known one), fields given twice, required fields,
   text lengths, exactly one target, and the counts of references, masks and regions against each other and
   :class:`~model.spec.limits.Limits` (boxes and a placement's count are parsed for this; no image is read);
2. values: each field through its kind's codec for the wire, files through the surface's ``open_file``.

The kinds: ``image`` (bytes on a form; a path or a data URI/URL in JSON, opened by the surface), ``boxes``
(``"x,y,w,h"`` text, several joined by ``;``, everywhere; JSON may also give ``[x, y, w, h]`` lists),
``placement`` (a JSON object: text on a form or a flag, an object or its text in JSON), and the parameters
(text on a form, a flag or Cog, typed values in JSON). :func:`encode_form` and :func:`encode_json` are the
inverses a client uses, so the client and the server cannot drift. Standard library only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from model.errors import ErrorCode, InputError
from model.spec.fields import DuplicateKey, FieldSpec, strict_json, suggest
from model.spec.inputs import (
    FILE_FIELDS,
    INPUT_FIELDS,
    TARGETS,
    Box,
    GenerationInputs,
    InputField,
    box_of_list,
    box_text,
    check_counts,
    parse_boxes,
)
from model.spec.limits import Limits
from model.spec.params import PARAM_NAMES, GenerationParams, param_specs
from model.spec.placement import Placement


class Wire(str, enum.Enum):
    """How a request arrives: values as text (form, flags, Cog's strings) or typed (JSON)."""

    FORM = "form"
    JSON = "json"
    CLI = "cli"
    COG = "cog"


OpenFile = Callable[[str, Any], Any]
"""``open_file(field, value)``: the image a surface's file value names (a path, a data URI, a URL) as bytes, a
path or any image source; raises :class:`InputError` naming ``field``."""

_FIELDS: dict[str, InputField] = {f.name: f for f in INPUT_FIELDS}
_PARAMS: dict[str, FieldSpec] = {spec.name: spec for spec in param_specs()}
KNOWN_FIELDS: tuple[str, ...] = (*_FIELDS, *_PARAMS)


def _many(name: str) -> bool:
    return name in _FIELDS and _FIELDS[name].many


@dataclass(frozen=True)
class FilePart:
    """A file as a form carries it: its bytes and the name the client gave."""

    data: bytes
    filename: str | None = None


# --- phase 1: names, lengths and counts ------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRequest:
    """A request's items grouped by name, with names, lengths and counts checked; nothing decoded but boxes and a
    placement (cheap, and needed for the counts)."""

    values: Mapping[str, tuple[Any, ...]]
    wire: Wire
    boxes: tuple[Box, ...] | None
    placement: Placement | None

    def files(self, name: str) -> tuple[Any, ...]:
        return self.values.get(name, ())


def unknown_field(name: str, known: Sequence[str] = KNOWN_FIELDS, what: str = "a field of this request"
                  ) -> InputError:
    close = suggest(name, tuple(known))
    hint = f"; did you mean {close!r}?" if close else f"; known fields: {', '.join(known)}"
    return InputError(name[:100], ErrorCode.UNKNOWN_FIELD, f"is not {what}{hint}")


def collect(items: Iterable[tuple[str, Any]], wire: Wire, limits: Limits) -> RawRequest:
    """Phase 1 of :func:`decode_request` (also run by the service before it reads an upload)."""
    grouped: dict[str, list[Any]] = {}
    for name, value in items:
        if name not in _FIELDS and name not in _PARAMS:
            raise unknown_field(name)
        if name in grouped and not _many(name):
            raise InputError(name, ErrorCode.INVALID_PARAMETER, "was given more than once")
        if value is None and wire is not Wire.FORM:
            continue  # a flag or argument left at None: not given
        _check_shape(name, value, wire, limits)
        grouped.setdefault(name, []).append(value)
    for f in INPUT_FIELDS:
        if f.required and f.name not in grouped:
            raise InputError(f.name, ErrorCode.MISSING_FIELD, "is required")
    boxes = decode_boxes(grouped["box"], limits) if "box" in grouped else None
    placement = decode_placement(grouped["placement"][0], wire) if "placement" in grouped else None
    targets = [name for name in TARGETS if name in grouped]
    check_counts(references=len(grouped["reference"]), reference_masks=len(grouped.get("reference_mask", ())),
                 targets=targets, regions=len(boxes) if boxes is not None else (
                     placement.count if placement is not None else None), max_regions=limits.max_regions)
    if placement is not None and "placement_area" not in grouped:
        raise InputError("placement_area", ErrorCode.MISSING_FIELD, "a placement needs its allowed area")
    if "placement_area" in grouped and placement is None:
        raise InputError("placement_area", ErrorCode.INVALID_PARAMETER, "is only used with a placement")
    return RawRequest({k: tuple(v) for k, v in grouped.items()}, wire, boxes, placement)


def _check_shape(name: str, value: Any, wire: Wire, limits: Limits) -> None:
    """The value's form fits its field on this wire: files are files, text is text and not too long."""
    is_file = name in FILE_FIELDS
    if wire is Wire.FORM:
        if is_file and not isinstance(value, FilePart | bytes):
            raise InputError(name, ErrorCode.INVALID_PARAMETER, "must be a file upload (a part with a filename)")
        if not is_file and not isinstance(value, str):
            raise InputError(name, ErrorCode.INVALID_PARAMETER, "must be a text field, not a file")
    if isinstance(value, str) and not is_file and len(value) > limits.max_field_chars:
        raise InputError(name, ErrorCode.FIELD_TOO_LONG,
                         f"is {len(value)} characters long; at most {limits.max_field_chars} are accepted")


# --- the kinds' codecs -----------------------------------------------------------------------------------------


def decode_boxes(values: Sequence[Any], limits: Limits | None = None) -> tuple[Box, ...]:
    """Boxes from their items: ``"x,y,w,h"`` text (several joined by ``;``), or ``[x, y, w, h]`` lists (JSON)."""
    boxes: list[Box] = []
    for value in values:
        if isinstance(value, str):
            boxes.extend(parse_boxes(value))
        elif isinstance(value, list | tuple) and value and all(isinstance(v, list | tuple | str) for v in value):
            boxes.extend(decode_boxes(value, limits))  # a list of boxes
        else:
            boxes.append(box_of_list(value))
        if limits is not None and len(boxes) > 4 * limits.max_regions + 64:
            break  # enough to say "too many" (check_counts names the count); no need to parse the rest
    return tuple(boxes)


def decode_placement(value: Any, wire: Wire) -> Placement:
    if isinstance(value, Placement):
        return value
    if isinstance(value, str):
        return Placement.from_json(value)
    if wire is Wire.JSON and isinstance(value, Mapping):
        return Placement.from_dict(value)
    raise InputError("placement", ErrorCode.INVALID_PARAMETER,
                     f"must be a JSON object{' or its text' if wire is Wire.JSON else ' (as text)'}, got "
                     f"{type(value).__name__}")


def decode_param(spec: FieldSpec, value: Any, wire: Wire) -> Any:
    """A parameter: text is parsed strictly where the wire carries text; JSON carries typed values."""
    if isinstance(value, str) and wire is not Wire.JSON:
        return spec.parse(value)
    return spec.check(value)


def decode_params(raw: RawRequest) -> GenerationParams:
    return GenerationParams(**{name: decode_param(_PARAMS[name], raw.values[name][0], raw.wire)
                               for name in PARAM_NAMES if name in raw.values})


def _file_value(value: Any) -> Any:
    return value.data if isinstance(value, FilePart) else value


def decode_request(items: Iterable[tuple[str, Any]], wire: Wire, *, limits: Limits | None = None,
                   open_file: OpenFile | None = None) -> tuple[GenerationInputs, GenerationParams]:
    """The inputs and parameters of a request from its items; :class:`InputError` naming the field otherwise.

    Everything that needs no image is checked before ``open_file`` is called for any file."""
    limits = limits or Limits()
    raw = collect(items, wire, limits)
    return inputs_of(raw, open_file), decode_params(raw)


def inputs_of(raw: RawRequest, open_file: OpenFile | None = None) -> GenerationInputs:
    def image(name: str, value: Any) -> Any:
        value = _file_value(value)
        return open_file(name, value) if open_file is not None else value

    def one(name: str) -> Any:
        values = raw.files(name)
        return image(name, values[0]) if values else None

    references = tuple(image("reference", v) for v in raw.files("reference"))
    masks = tuple(image("reference_mask", v) for v in raw.files("reference_mask"))
    return GenerationInputs(references, one("background"), masks or None, one("background_mask"), raw.boxes,
                            raw.placement, one("placement_area"))


# --- JSON objects (manifest lines, a prediction's input) -------------------------------------------------------


def items_of_json(values: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The items of a JSON object: a list under a repeatable field is one item per element (a single
    ``[x, y, w, h]`` under ``box`` is one box)."""
    if not isinstance(values, Mapping):
        raise InputError(None, ErrorCode.INVALID_JSON, f"a request must be a JSON object, got {type(values).__name__}")
    items: list[tuple[str, Any]] = []
    for name, value in values.items():
        if _many(name) and isinstance(value, list):
            if name == "box" and len(value) == 4 and all(isinstance(v, int) for v in value):
                items.append((name, value))
                continue
            if not value:
                raise InputError(name, ErrorCode.INVALID_PARAMETER, "is an empty list")
            items.extend((name, v) for v in value)
        else:
            items.append((name, value))
    return items


def parse_json_object(text: str | bytes, what: str = "the body") -> dict[str, Any]:
    """Strict JSON text to an object: bad UTF-8, bad JSON, a non-object and duplicate keys each have a code."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(None, ErrorCode.INVALID_JSON, f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = strict_json(text)
    except DuplicateKey as exc:
        raise InputError(exc.key, ErrorCode.DUPLICATE_KEY, f"is given twice in {what}") from None
    except (ValueError, RecursionError) as exc:
        raise InputError(None, ErrorCode.INVALID_JSON, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(None, ErrorCode.INVALID_JSON, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# --- encoders: what a client sends ------------------------------------------------------------------------------


FormItem = tuple[str, "str | tuple[str, bytes]"]


def _as_list(name: str, value: Any) -> list[Any]:
    if _many(name) and isinstance(value, list | tuple) and not (name == "box" and _is_box(value)):
        return list(value)
    return [value]


def _is_box(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 4 and all(isinstance(v, int) for v in value)


def _checked_values(values: Mapping[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in _FIELDS and name not in _PARAMS:
            raise unknown_field(name)
        out[name] = _as_list(name, value)
    return out


def encode_form(values: Mapping[str, Any]) -> list[FormItem]:
    """The multipart items of a request: files as ``(name, (filename, bytes))`` (a value may be bytes or a
    ``(filename, bytes)`` pair), everything else as text that :func:`decode_request` reads back. Parameters are
    validated on the way: a bad value fails here, before anything is sent."""
    items: list[FormItem] = []
    for name, value_list in _checked_values(values).items():
        for index, value in enumerate(value_list):
            if name in FILE_FIELDS:
                filename, data = value if isinstance(value, tuple) else (f"{name}{index or ''}", value)
                if not isinstance(data, bytes | bytearray):
                    raise TypeError(f"{name}: a file must be bytes (or (filename, bytes)), got {type(data).__name__}")
                items.append((name, (str(filename), bytes(data))))
            elif name == "box":
                items.append((name, ";".join(box_text(b) for b in decode_boxes([value]))))
            elif name == "placement":
                items.append((name, decode_placement(value, Wire.JSON).to_json()))
            else:
                spec = _PARAMS[name]
                items.append((name, spec.to_text(spec.check(value))))
    return items


def encode_json(values: Mapping[str, Any], encode_file: Callable[[str, Any], Any]) -> dict[str, Any]:
    """The JSON object of a request (a manifest line, a prediction's input); ``encode_file(field, value)`` turns
    a file value into what the receiver's ``open_file`` reads (a path, a data URI)."""
    body: dict[str, Any] = {}
    for name, value_list in _checked_values(values).items():
        if name in FILE_FIELDS:
            encoded = [encode_file(name, v) for v in value_list]
            body[name] = encoded if _many(name) and len(encoded) > 1 else encoded[0]
        elif name == "box":
            body[name] = [box_text(b) for b in decode_boxes(value_list)]
        elif name == "placement":
            body[name] = decode_placement(value_list[0], Wire.JSON).to_dict()
        else:
            body[name] = _PARAMS[name].check(value_list[0])
    return body


def data_uri(data: bytes, media_type: str = "application/octet-stream") -> str:
    import base64

    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


__all__ = [
    "KNOWN_FIELDS", "FilePart", "RawRequest", "Wire", "collect", "data_uri", "decode_boxes", "decode_param",
    "decode_params", "decode_placement", "decode_request", "encode_form", "encode_json", "inputs_of",
    "items_of_json", "parse_json_object", "unknown_field",
]
