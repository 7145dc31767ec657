"""The request contract: every user parameter of a generation, defined once.

:class:`GenerationParams` is frozen; each field carries its type, default, bounds or choices and one description
in its metadata (:func:`param_specs` reads them). Every surface is generated from it and never restates it: the
``/predict`` form and its OpenAPI schema, the Cog predictor's inputs, the ``anydoor generate`` flags and the README
table (:func:`params_table`). Validation happens here and only here (``__post_init__``), and
:meth:`GenerationParams.from_text` is the one strict parser of parameters that arrive as text (form fields, Cog).

The images and targets of a request are :data:`INPUT_FIELDS` (files and boxes), described the same way, and travel
as :class:`GenerationInputs`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal

from model.diffusion.samplers import SAMPLERS
from model.errors import ErrorCode, InputError
from model.imaging.decode import ImageSource
from model.imaging.placement import Placement
from model.imaging.regions import Box

SEED_MAX = 2**63 - 1
# Text values longer than this are refused before any parsing; numbers with more digits than this are refused
# before int()/float() see them (a 10,000-digit integer is not a seed: the largest valid value has 19 digits).
MAX_TEXT_LENGTH = 64
MAX_DIGITS = 24
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE_TEXT = ("true", "1", "yes", "on")
_FALSE_TEXT = ("false", "0", "no", "off")

Kind = Literal["int", "float", "bool", "choice"]


def _param(default: Any, help: str, kind: Kind, *, ge: float | None = None, le: float | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "ge": ge, "le": le, "choices": choices})


@dataclass(frozen=True)
class ParamSpec:
    """One user parameter as every surface sees it."""

    name: str
    kind: Kind
    default: Any
    help: str
    ge: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def python_type(self) -> type:
        return {"int": int, "float": float, "bool": bool, "choice": str}[self.kind]

    @property
    def optional(self) -> bool:
        """Its default is None: left out, the pipeline chooses (a random seed)."""
        return self.default is None

    def bounds_text(self) -> str:
        if self.choices:
            return " or ".join(f"`{c}`" for c in self.choices)
        if self.ge is None:
            return ""
        low, high = self.ge, self.le
        if self.name == "seed":
            return "0–2^63-1"
        return f"{low:g}–{high:g}"

    def check(self, value: Any) -> Any:
        """``value`` validated and normalised (an int for a float field becomes a float); InputError otherwise."""
        name = self.name
        if value is None and self.optional:
            return None
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise InputError(name, ErrorCode.INVALID_PARAMETER, f"must be true or false, got {value!r}")
        if self.kind == "choice":
            if isinstance(value, str) and self.choices and value in self.choices:
                return value
            raise InputError(name, ErrorCode.INVALID_PARAMETER,
                             f"must be one of {', '.join(self.choices or ())}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            what = "an integer" if self.kind == "int" else "a number"
            raise InputError(name, ErrorCode.INVALID_PARAMETER, f"must be {what}, got {value!r}")
        if self.kind == "int" and not (isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())):
            raise InputError(name, ErrorCode.INVALID_PARAMETER, f"must be an integer, got {value!r}")
        assert self.ge is not None and self.le is not None
        if not math.isfinite(value) or not self.ge <= value <= self.le:
            between = self.bounds_text().replace("–", " and ")
            raise InputError(name, ErrorCode.OUT_OF_RANGE, f"must be between {between}, got {value!r}")
        return int(value) if self.kind == "int" else float(value)

    def parse(self, text: str) -> Any:
        """Strictly parse one text value (a form field, a Cog input): no empty values, no ``1_0``, no ``1e999``."""
        name = self.name
        raw = text.strip()
        if not raw:
            raise InputError(name, ErrorCode.INVALID_PARAMETER, "is empty; leave the field out to use its default")
        if len(raw) > MAX_TEXT_LENGTH:
            raise InputError(name, ErrorCode.FIELD_TOO_LONG,
                             f"is {len(raw)} characters long; at most {MAX_TEXT_LENGTH} are accepted")
        if self.kind == "bool":
            lowered = raw.lower()
            if lowered in _TRUE_TEXT:
                return True
            if lowered in _FALSE_TEXT:
                return False
            raise InputError(name, ErrorCode.INVALID_PARAMETER, f"must be true or false, got {raw!r}")
        if self.kind == "choice":
            return self.check(raw)
        if sum(c.isdigit() for c in raw) > MAX_DIGITS:
            raise InputError(name, ErrorCode.TOO_MANY_DIGITS, f"has more than {MAX_DIGITS} digits")
        if self.kind == "int":
            if not _INT_TEXT.fullmatch(raw):
                raise InputError(name, ErrorCode.INVALID_PARAMETER, f"must be an integer, got {raw!r}")
            return self.check(int(raw))
        if not _FLOAT_TEXT.fullmatch(raw):
            raise InputError(name, ErrorCode.INVALID_PARAMETER, f"must be a number, got {raw!r}")
        return self.check(float(raw))


@dataclass(frozen=True)
class GenerationParams:
    """Every parameter of one generation besides its images. Frozen; invalid values raise :class:`InputError`."""

    steps: int = _param(
        50, "Denoising steps, exactly this many (any count from 1 to 1000). About 20 suffice for `dpmpp_2m`.", "int",
        ge=1, le=1000)
    sampler: str = _param(
        "ddim", "The sampler: " + "; ".join(f"`{name}`: {info.description}" for name, info in SAMPLERS.items())
        + ".", "choice", choices=tuple(SAMPLERS))
    guidance_scale: float = _param(
        4.5, "Classifier-free guidance scale; 1 turns the unconditional branch off (half the work).", "float",
        ge=0.0, le=30.0)
    control_strength: float = _param(
        1.0, "Scale of the ControlNet residuals (the detail collage).", "float", ge=0.0, le=2.0)
    shape_control: bool = _param(
        False, "Follow the target mask's shape instead of filling its bounding box.", "bool")
    seed: int | None = _param(
        None, "Random seed; the same inputs, parameters and seed give the same PNG, byte for byte. Left out: a "
        "random one, returned with the result.", "int", ge=0, le=SEED_MAX)
    reference_expand_ratio: float = _param(
        1.3, "How much the object's crop is enlarged around its mask before it goes to DINOv2 (upstream draws it "
        "at random).", "float", ge=1.0, le=3.0)
    target_box_expand_ratio: float = _param(
        1.1, "How much the target box is enlarged around the target region (upstream: random).", "float",
        ge=1.0, le=3.0)
    crop_expand_ratio: float = _param(
        2.0, "How much larger than the target box the square background crop is (upstream: random).", "float",
        ge=1.0, le=4.0)
    refine_reference_mask: bool = _param(
        False, "Refine the reference's mask with upstream's demo segmentation network before anything else "
        "(needs the refiner's weights, `ANYDOOR_MASK_REFINE_WEIGHTS`).", "bool")
    keep_background: bool = _param(
        False, "Keep the background inside the crop: from `blend_start` of the steps on, the latent outside the "
        "(dilated) target region is replaced by the background's, noised to the step (Blended Latent Diffusion).",
        "bool")
    blend_start: float = _param(
        0.25, "With `keep_background`: the fraction of the steps after which the background is re-imposed.",
        "float", ge=0.0, le=1.0)
    feather: int = _param(
        0, "Feathered paste: pixels over which the generated crop fades into the background at the target box's "
        "edge (0: a hard edge, as upstream). Outside the box the background stays byte-identical.", "int",
        ge=0, le=64)
    harmonize: float = _param(
        0.0, "Harmonising pass: after pasting, the crop is noised to this fraction of the schedule and denoised "
        "again with the same conditioning and the background kept (SDEdit); 0 turns it off.", "float",
        ge=0.0, le=0.3)

    def __post_init__(self) -> None:
        for spec in param_specs():
            object.__setattr__(self, spec.name, spec.check(getattr(self, spec.name)))

    @classmethod
    def from_text(cls, values: Mapping[str, str]) -> GenerationParams:
        """Parse parameters that arrive as text; a name that is not a parameter is an ``invalid_parameter``."""
        specs = {spec.name: spec for spec in param_specs()}
        parsed: dict[str, Any] = {}
        for name, text in values.items():
            if name not in specs:
                raise InputError(name, ErrorCode.INVALID_PARAMETER, "is not a generation parameter")
            parsed[name] = specs[name].parse(text)
        return cls(**parsed)

    def with_seed(self, seed: int) -> GenerationParams:
        return replace(self, seed=seed)

    def changed(self) -> dict[str, Any]:
        """The parameters that differ from their defaults (for logs)."""
        return {s.name: getattr(self, s.name) for s in param_specs() if getattr(self, s.name) != s.default}


def param_specs() -> tuple[ParamSpec, ...]:
    """The spec of every :class:`GenerationParams` field, in declaration order."""
    return _SPECS


_SPECS = tuple(
    ParamSpec(f.name, f.metadata["kind"], None if f.default is MISSING else f.default, f.metadata["help"],
              f.metadata["ge"], f.metadata["le"], f.metadata["choices"])
    for f in fields(GenerationParams)
)
PARAM_NAMES = tuple(spec.name for spec in _SPECS)


# --- images and targets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputField:
    """One image or target field of a request."""

    name: str
    kind: Literal["image", "boxes", "json"]
    required: bool
    help: str


INPUT_FIELDS: tuple[InputField, ...] = (
    InputField("reference", "image", True,
               "The object: an image (PNG, JPEG, WebP, GIF, BMP). For an RGBA cut-out the alpha channel is the mask. "
               "Repeat it for one object per region, in region order (boxes as given; mask regions top to bottom, "
               "then left to right)."),
    InputField("reference_mask", "image", False,
               "The object's mask (white = object), the reference's size; needed when the reference has no alpha. "
               "With several references: none, or one for each."),
    InputField("background", "image", True, "The scene to insert the object into, any size; the output has its size."),
    InputField("background_mask", "image", False,
               "Where to insert (white = target), the background's size; each separate region gets the object. "
               "Give this or `box`."),
    InputField("box", "boxes", False,
               "A target box `x,y,w,h` in background pixels; several: repeat it (HTTP, CLI) or join boxes with `;`. "
               "Give this, `background_mask` or `placement`."),
    InputField("placement", "json", False,
               "Instead of boxes, let the service place the objects: a JSON object `{\"count\": 3, \"min_size\": 40, "
               "\"max_size\": 120, \"perspective\": true, \"aspect\": 1.0, \"min_gap\": 8, \"seed\": 7}` with "
               "`placement_area`; the boxes drawn come back with the image."),
    InputField("placement_area", "image", False,
               "With `placement`: where objects may go (white = allowed, e.g. the road), the background's size."),
)
# File fields that may be given once per region (one reference per region, each with its own mask).
REPEATABLE_FILES = ("reference", "reference_mask")


@dataclass(frozen=True)
class GenerationInputs:
    """The images and targets of one generation: paths, bytes, PIL images or arrays; boxes as ``(x, y, w, h)``.

    ``reference`` is one image, or one per region (a tuple, matched to the regions in order: boxes as given, mask
    regions top to bottom then left to right); ``reference_mask`` likewise (None, or one per reference). The
    target is exactly one of ``background_mask``, ``boxes`` or ``placement`` (with its ``placement_area``)."""

    reference: ImageSource | tuple[ImageSource, ...]
    background: ImageSource
    reference_mask: ImageSource | tuple[ImageSource | None, ...] | None = None
    background_mask: ImageSource | None = None
    boxes: tuple[Box, ...] | None = None
    placement: Placement | None = None
    placement_area: ImageSource | None = None

    def __post_init__(self) -> None:
        # Every surface hands over lists as they arrive (repeated fields, flags, Cog lists): normalised here once.
        if self.boxes is not None:
            object.__setattr__(self, "boxes", tuple(self.boxes) if len(self.boxes) else None)
        if isinstance(self.reference, list | tuple):
            refs = tuple(self.reference)
            object.__setattr__(self, "reference", refs[0] if len(refs) == 1 else refs)
        if isinstance(self.reference_mask, list | tuple):
            # Kept as a sequence, never collapsed: its count is checked against the references'.
            object.__setattr__(self, "reference_mask", tuple(self.reference_mask) or None)

    @property
    def references(self) -> tuple[ImageSource, ...]:
        return self.reference if isinstance(self.reference, tuple) else (self.reference,)

    @property
    def reference_masks(self) -> tuple[ImageSource | None, ...]:
        """One mask (or None) per reference."""
        masks = self.reference_mask
        if isinstance(masks, tuple):
            return masks
        return (masks,) * len(self.references)


def params_table() -> str:
    """The Markdown table of the request fields (images, targets and parameters), as the README shows it."""
    rows = ["| Field | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    for f in INPUT_FIELDS:
        kind = {"image": "file", "boxes": "`x,y,w,h`, repeatable", "json": "JSON object"}[f.kind]
        kind += ", repeatable" if f.name in REPEATABLE_FILES else ""
        kind += ", required" if f.required else ""
        rows.append(f"| `{f.name}` | {kind} | | {f.help} |")
    for spec in param_specs():
        kind = {"int": "int", "float": "float", "bool": "bool", "choice": "one of"}[spec.kind]
        bounds = spec.bounds_text()
        type_text = f"{kind} {bounds}".strip() if spec.kind != "choice" else bounds
        shown = str(spec.default).lower() if spec.kind == "bool" else spec.default
        default = "random" if spec.default is None else f"`{shown}`"
        rows.append(f"| `{spec.name}` | {type_text} | {default} | {spec.help} |")
    return "\n".join(rows) + "\n"


def boxes_of(values: Sequence[str]) -> tuple[Box, ...]:
    """Every box of some text values, each ``x,y,w,h`` or several joined with ``;``."""
    from model.imaging.regions import parse_boxes

    return tuple(box for value in values for box in parse_boxes(value))


if __name__ == "__main__":
    print(params_table(), end="")
