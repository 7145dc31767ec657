"""Field metadata: one typed description of a scalar value, shared by the parameters and the placement object.

A field is declared on a frozen dataclass with :func:`spec_field` (its type, default, bounds or choices and one
description); :func:`specs_of` reads them back as :class:`FieldSpec` objects, which validate values
(:meth:`FieldSpec.check`), strictly parse text (:meth:`FieldSpec.parse`) and describe themselves as JSON schema
(:meth:`FieldSpec.json_schema`). Every surface (the form, OpenAPI, Cog, the CLI, the README) is generated from
these, never restated. Standard library only: light clients import the spec without torch or numpy.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from model.errors import ErrorCode, InputError

INT64_MAX = 2**63 - 1
# Text values longer than this are refused before any parsing; numbers with more digits than this are refused
# before int()/float() see them (a 10,000-digit integer is not a seed: the largest valid value has 19 digits).
MAX_TEXT_LENGTH = 64
MAX_DIGITS = 24
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE_TEXT = ("true", "1", "yes", "on")
_FALSE_TEXT = ("false", "0", "no", "off")

Kind = Literal["int", "float", "bool", "choice"]


def spec_field(default: Any, help: str, kind: Kind, *, ge: float | None = None, le: float | None = None,
               choices: tuple[str, ...] | None = None, int64: bool = False, basic: bool = False,
               exact: bool = False) -> Any:
    """A dataclass field described for every surface. ``int64`` marks an integer that needs 64 bits (JSON schema
    ``format: int64``, bounds shown as powers of two); ``basic`` puts it in the studio's basic group; ``exact``
    refuses a float with an integral value for an int (a count is a JSON integer, never ``3.0``)."""
    return field(default=default, metadata={"help": help, "kind": kind, "ge": ge, "le": le, "choices": choices,
                                            "int64": int64, "basic": basic, "exact": exact})


@dataclass(frozen=True)
class FieldSpec:
    """One scalar field as every surface sees it. ``owner`` names it in messages (``placement``: a key of the
    placement object, reported on the ``placement`` field)."""

    name: str
    kind: Kind
    default: Any
    help: str
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    int64: bool = False
    basic: bool = False
    exact: bool = False
    required: bool = False
    owner: str | None = None

    @property
    def python_type(self) -> type:
        return {"int": int, "float": float, "bool": bool, "choice": str}[self.kind]

    @property
    def optional(self) -> bool:
        """Its default is None: left out, the pipeline chooses (a random seed)."""
        return self.default is None and not self.required

    def _error(self, code: ErrorCode, message: str) -> InputError:
        if self.owner:
            return InputError(self.owner, code, f"{self.name} {message}")
        return InputError(self.name, code, message)

    def bounds_text(self) -> str:
        if self.choices:
            return " or ".join(f"`{c}`" for c in self.choices)
        if self.ge is None or self.le is None:
            return ""
        high = "2^63-1" if self.int64 and self.le == INT64_MAX else f"{self.le:g}"
        return f"{self.ge:g}–{high}"

    def check(self, value: Any) -> Any:
        """``value`` validated and normalised (an int for a float field becomes a float); InputError otherwise."""
        if value is None and self.optional:
            return None
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise self._error(ErrorCode.INVALID_PARAMETER, f"must be true or false, got {value!r}")
        if self.kind == "choice":
            if isinstance(value, str) and self.choices and value in self.choices:
                return value
            raise self._error(ErrorCode.INVALID_PARAMETER,
                              f"must be one of {', '.join(self.choices or ())}, got {value!r}")
        # Not bool (an int subclass), and only true numbers: numpy scalars have __index__/__float__ and pass.
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            what = "an integer" if self.kind == "int" else "a number"
            raise self._error(ErrorCode.INVALID_PARAMETER, f"must be {what}, got {value!r}")
        if not isinstance(value, int | float):
            if hasattr(value, "__index__"):
                value = int(value)
            elif self.kind == "float" and hasattr(value, "__float__") and not isinstance(value, str | bytes):
                value = float(value)
            else:
                what = "an integer" if self.kind == "int" else "a number"
                raise self._error(ErrorCode.INVALID_PARAMETER, f"must be {what}, got {value!r}")
        integral = isinstance(value, int) or (not self.exact and math.isfinite(value) and float(value).is_integer())
        if self.kind == "int" and not integral:
            raise self._error(ErrorCode.INVALID_PARAMETER, f"must be an integer, got {value!r}")
        assert self.ge is not None and self.le is not None
        if not math.isfinite(value) or not self.ge <= value <= self.le:
            between = self.bounds_text().replace("–", " and ")
            raise self._error(ErrorCode.OUT_OF_RANGE, f"must be between {between}, got {value!r}")
        return int(value) if self.kind == "int" else float(value)

    def parse(self, text: str) -> Any:
        """Strictly parse one text value (a form field, a flag, a Cog input): no empty values, no ``1_0``, no
        ``1e999``."""
        raw = text.strip()
        if not raw:
            raise self._error(ErrorCode.INVALID_PARAMETER, "is empty; leave the field out to use its default")
        if len(raw) > MAX_TEXT_LENGTH:
            raise self._error(ErrorCode.FIELD_TOO_LONG,
                              f"is {len(raw)} characters long; at most {MAX_TEXT_LENGTH} are accepted")
        if self.kind == "bool":
            lowered = raw.lower()
            if lowered in _TRUE_TEXT:
                return True
            if lowered in _FALSE_TEXT:
                return False
            raise self._error(ErrorCode.INVALID_PARAMETER, f"must be true or false, got {raw!r}")
        if self.kind == "choice":
            return self.check(raw)
        if sum(c.isdigit() for c in raw) > MAX_DIGITS:
            raise self._error(ErrorCode.TOO_MANY_DIGITS, f"has more than {MAX_DIGITS} digits")
        if self.kind == "int":
            if not _INT_TEXT.fullmatch(raw):
                raise self._error(ErrorCode.INVALID_PARAMETER, f"must be an integer, got {raw!r}")
            return self.check(int(raw))
        if not _FLOAT_TEXT.fullmatch(raw):
            raise self._error(ErrorCode.INVALID_PARAMETER, f"must be a number, got {raw!r}")
        return self.check(float(raw))

    def to_text(self, value: Any) -> str:
        """The text form of a valid value, as :meth:`parse` reads it back (``true``, ``4.5``, ``ddim``)."""
        if self.kind == "bool":
            return "true" if value else "false"
        return str(value)

    def json_schema(self) -> dict[str, Any]:
        """The JSON schema of the field: type, bounds, choices, default and description."""
        schema: dict[str, Any] = {"description": self.help}
        if self.kind == "choice":
            schema.update(type="string", enum=list(self.choices or ()))
        else:
            schema["type"] = {"int": "integer", "float": "number", "bool": "boolean"}[self.kind]
            if self.int64:
                schema["format"] = "int64"
            if self.ge is not None and self.le is not None:
                cast = int if self.kind == "int" else float
                schema.update(minimum=cast(self.ge), maximum=cast(self.le))
        if self.default is not None:
            schema["default"] = self.default
        if self.basic:
            schema["x-group"] = "basic"
        return schema


def specs_of(cls: type, *, owner: str | None = None, required: tuple[str, ...] = ()) -> tuple[FieldSpec, ...]:
    """The :class:`FieldSpec` of every :func:`spec_field` of the dataclass ``cls``, in declaration order."""
    return tuple(
        FieldSpec(f.name, f.metadata["kind"], None if f.default is MISSING else f.default, f.metadata["help"],
                  f.metadata["ge"], f.metadata["le"], f.metadata["choices"], f.metadata["int64"],
                  f.metadata["basic"], f.metadata["exact"], f.name in required, owner)
        for f in fields(cls) if "kind" in f.metadata
    )


def suggest(name: str, known: tuple[str, ...]) -> str | None:
    """The known name closest to ``name``, case-insensitively and token by token (``STEPS`` -> ``steps``,
    ``refine_mask`` -> ``refine_reference_mask``, ``guidance`` -> ``guidance_scale``); None when nothing is close."""
    import difflib

    lowered = name.strip().lower().replace("-", "_")
    by_lower = {k.lower(): k for k in known}
    if lowered in by_lower:
        return by_lower[lowered]
    tokens = set(filter(None, lowered.split("_")))

    def score(candidate: str) -> float:
        cand_tokens = set(candidate.lower().split("_"))
        shared = len(tokens & cand_tokens) / max(len(tokens | cand_tokens), 1)
        ratio = difflib.SequenceMatcher(None, lowered, candidate.lower()).ratio()
        # All of the user's tokens appear in the candidate: a strong hint (refine_mask -> refine_reference_mask).
        contained = 0.35 if tokens and tokens <= cand_tokens else 0.0
        return max(ratio, shared) + contained

    best = max(known, key=score, default=None)
    if best is None or score(best) < 0.6:
        return None
    return best


def strict_json(text: str | bytes) -> Any:
    """JSON parsed strictly: a key given twice and the non-standard ``NaN``/``Infinity`` are errors
    (``ValueError``), as everywhere a request arrives as JSON (a placement field, a manifest line, a prediction)."""
    import json

    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


class DuplicateKey(ValueError):
    """A JSON object with a key given twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key!r} appears twice")
        self.key = key
