"""The placement object of a request: how many objects to place inside an allowed area, how large, how far apart.

Its fields are described with the same metadata as the parameters (:mod:`model.spec.fields`), validated by the
same code, and published in OpenAPI as a JSON schema (:func:`placement_schema`), so a client can generate its
controls. The algorithm that draws the boxes is :func:`model.imaging.placement.place_boxes`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from model.errors import ErrorCode, InputError
from model.spec.fields import INT64_MAX, DuplicateKey, FieldSpec, spec_field, specs_of, strict_json

FIELD = "placement"
MIN_BOX_SIDE = 4
"""Boxes thinner than this in either direction are rejected: there is no room for an object."""
MAX_COUNT = 100
"""Most boxes one placement may ask for; a deployment's region limit (``max_regions``) is usually lower."""
MAX_SIDE = 16384
MIN_ASPECT, MAX_ASPECT = 0.1, 10.0
MAX_JSON_CHARS = 1024
"""A placement object is a handful of small numbers; longer text is refused before it is parsed."""
_SEED_SALT = 0x706C6163  # "plac": the placement's stream differs from the noise drawn from the same request seed
_REQUIRED = ("count", "min_size", "max_size")


def _invalid(message: str, code: ErrorCode = ErrorCode.INVALID_PARAMETER) -> InputError:
    return InputError(FIELD, code, message)


@dataclass(frozen=True)
class Placement:
    """How many objects to place and how: box sizes, aspect, spacing. Frozen; invalid values raise InputError."""

    count: int = spec_field(None, "Boxes to place.", "int", ge=1, le=MAX_COUNT, exact=True)
    min_size: int = spec_field(None, "Smallest longer side of a box, in pixels.", "int", ge=MIN_BOX_SIDE,
                               le=MAX_SIDE, exact=True)
    max_size: int = spec_field(None, "Largest longer side of a box, in pixels (at least `min_size`).", "int",
                               ge=MIN_BOX_SIDE, le=MAX_SIDE, exact=True)
    perspective: bool = spec_field(False, "Read the area as a ground plane: a box's size grows linearly with its "
                                   "bottom row, from `min_size` at the top of the area to `max_size` at its bottom.",
                                   "bool")
    aspect: float = spec_field(1.0, "Width / height of every box.", "float", ge=MIN_ASPECT, le=MAX_ASPECT)
    min_gap: int = spec_field(0, "Pixels between any two boxes (in x or in y).", "int", ge=0, le=MAX_SIDE, exact=True)
    seed: int | None = spec_field(None, "Seed of the layout; left out: derived from the request's seed (so the "
                                  "layout and the noise are independent, and both reproducible).", "int", ge=0,
                                  le=INT64_MAX, int64=True, exact=True)

    def __post_init__(self) -> None:
        for spec in placement_specs():
            value = getattr(self, spec.name)
            if value is None and spec.required:
                raise _invalid(f"{spec.name!r} is required (the keys {', '.join(_REQUIRED)} always are)")
            object.__setattr__(self, spec.name, spec.check(value))
        if self.max_size < self.min_size:
            raise _invalid(f"max_size ({self.max_size}) must not be below min_size ({self.min_size})",
                           ErrorCode.OUT_OF_RANGE)
        w, h = self.box_shape(self.min_size)
        if min(w, h) < MIN_BOX_SIDE:
            raise _invalid(f"min_size {self.min_size} at aspect {self.aspect:g} gives {w}x{h} boxes; both sides "
                           f"must be at least {MIN_BOX_SIDE} pixels", ErrorCode.OUT_OF_RANGE)

    # --- reading and writing --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Placement:
        """A placement from a mapping of its fields (a parsed JSON object): unknown or missing keys are errors."""
        if not isinstance(values, Mapping):
            raise _invalid(f"must be a JSON object with the keys {', '.join(PLACEMENT_KEYS)}, got "
                           f"{type(values).__name__}")
        unknown = [key for key in values if key not in PLACEMENT_KEYS]
        if unknown:
            raise _invalid(f"{unknown[0]!r} is not a placement key; the keys are {', '.join(PLACEMENT_KEYS)}")
        missing = [key for key in _REQUIRED if key not in values]
        if missing:
            raise _invalid(f"{missing[0]!r} is required (the keys {', '.join(_REQUIRED)} always are)")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Placement:
        """Strictly parse a JSON object (a form field, a flag): one object, no duplicate keys, no NaN."""
        if not isinstance(text, str):
            raise _invalid(f"must be JSON text, got {type(text).__name__}")
        if len(text) > MAX_JSON_CHARS:
            raise _invalid(f"is {len(text)} characters long; at most {MAX_JSON_CHARS} are accepted",
                           ErrorCode.FIELD_TOO_LONG)
        try:
            values = strict_json(text)
        except DuplicateKey as exc:
            raise _invalid(f"the key {exc.key!r} is given twice", ErrorCode.DUPLICATE_KEY) from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError, and so are our hooks'
            raise _invalid(f"is not a valid JSON object: {exc}") from None
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (a seed left to the request is left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not (f.name == "seed" and self.seed is None)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    # --- derived values ---------------------------------------------------------------------------------------

    def box_shape(self, size: int) -> tuple[int, int]:
        """``(w, h)`` of a box whose longer side is ``size`` at this aspect."""
        if self.aspect >= 1.0:
            return size, max(1, round(size / self.aspect))
        return max(1, round(size * self.aspect)), size

    def seed_for(self, request_seed: int) -> int:
        """The seed that places the boxes: :attr:`seed`, or one derived from the request's seed (so a request
        with a seed is reproducible without fixing this one, and its noise and its layout are independent)."""
        if self.seed is not None:
            return self.seed
        import numpy as np  # only where boxes are drawn: the spec itself imports no numpy

        state = np.random.SeedSequence([int(request_seed), _SEED_SALT]).generate_state(2, np.uint32)
        return (int(state[0]) << 32 | int(state[1])) & INT64_MAX


def placement_specs() -> tuple[FieldSpec, ...]:
    """The spec of every placement key, in declaration order."""
    return _SPECS


def placement_schema() -> dict[str, Any]:
    """The JSON schema of the placement object (the OpenAPI component ``Placement``)."""
    return {
        "title": "Placement", "type": "object", "additionalProperties": False, "required": list(_REQUIRED),
        "description": "Let the service place the objects inside `placement_area`: how many boxes, how large and "
        "how far apart. The boxes drawn come back with the image.",
        "properties": {spec.name: spec.json_schema() for spec in _SPECS},
    }


_SPECS = specs_of(Placement, owner=FIELD, required=_REQUIRED)
PLACEMENT_KEYS = tuple(spec.name for spec in _SPECS)
