"""The images and targets of a request: every input field described once, and the rules between them.

:data:`INPUT_FIELDS` describes each input with its kind (an image, boxes, the placement object), its cardinality
(one, or one per region) and whether it is required. The counting rules (exactly one target; one reference, or
one per region; no reference masks, or one per reference; at most ``max_regions`` regions) are
:func:`check_counts`, used before anything is decoded by every surface and by the pipeline. The values travel as
:class:`GenerationInputs`. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from model.errors import ErrorCode, InputError
from model.spec.placement import Placement

Box = tuple[int, int, int, int]
ImageSource = Any  # a path, bytes, a PIL image or an (H, W, 3) uint8 array; decoded by model.imaging.decode
TARGETS = ("background_mask", "box", "placement")
_INT = re.compile(r"[+-]?\d+")
MAX_COORDINATE_DIGITS = 9
"""A box coordinate has at most this many digits (no image is a billion pixels wide); longer is refused before
``int()`` runs, which would otherwise spend quadratic time on (or refuse, past 4300 digits) a huge number."""

Kind = Literal["image", "boxes", "placement"]


@dataclass(frozen=True)
class InputField:
    """One image or target field of a request. ``many``: the field may be repeated (one per region, or several
    boxes); ``group`` says where the studio shows it."""

    name: str
    kind: Kind
    required: bool
    help: str
    many: bool = False

    @property
    def is_file(self) -> bool:
        return self.kind == "image"


INPUT_FIELDS: tuple[InputField, ...] = (
    InputField("reference", "image", True,
               "The object: an image (PNG, JPEG, WebP, GIF, BMP). For an RGBA cut-out the alpha channel is the mask. "
               "Repeat it for one object per region, in region order (boxes as given; mask regions top to bottom, "
               "then left to right).", many=True),
    InputField("reference_mask", "image", False,
               "The object's mask (white = object), the reference's size; needed when the reference has no alpha. "
               "With several references: none, or one for each.", many=True),
    InputField("background", "image", True, "The scene to insert the object into, any size; the output has its size."),
    InputField("background_mask", "image", False,
               "Where to insert (white = target), the background's size; each separate region gets the object. "
               "Give this, `box` or `placement`."),
    InputField("box", "boxes", False,
               "A target box `x,y,w,h` in background pixels; several: repeat it (HTTP, CLI) or join boxes with `;` "
               "(a JSON body or manifest may also give `[x, y, w, h]` lists). Give this, `background_mask` or "
               "`placement`.", many=True),
    InputField("placement", "placement", False,
               "Instead of boxes, let the service place the objects: a JSON object (the `Placement` schema: "
               "`{\"count\": 3, \"min_size\": 40, \"max_size\": 120}` and optional `perspective`, `aspect`, "
               "`min_gap`, `seed`) with `placement_area`; the boxes drawn come back with the image."),
    InputField("placement_area", "image", False,
               "With `placement`: where objects may go (white = allowed, e.g. the road), the background's size."),
)
INPUT_NAMES = tuple(f.name for f in INPUT_FIELDS)
FILE_FIELDS = tuple(f.name for f in INPUT_FIELDS if f.is_file)
# File fields that may be given once per region (one reference per region, each with its own mask).
REPEATABLE_FILES = tuple(f.name for f in INPUT_FIELDS if f.is_file and f.many)


def input_field(name: str) -> InputField:
    return next(f for f in INPUT_FIELDS if f.name == name)


# --- boxes -------------------------------------------------------------------------------------------------------


def parse_box(text: str) -> Box:
    """Parse ``"x,y,w,h"`` (integers, optional spaces) into a tuple; :class:`InputError` on field ``box`` otherwise.

    Only the syntax and signs are checked here; the box is checked against the image when it is decoded.
    """
    parts = [part.strip() for part in str(text).split(",")]
    if any(len(part.lstrip("+-")) > MAX_COORDINATE_DIGITS for part in parts):
        raise InputError("box", ErrorCode.TOO_MANY_DIGITS,
                         f"a coordinate has more than {MAX_COORDINATE_DIGITS} digits in {text[:40]!r}...")
    if len(parts) != 4 or not all(_INT.fullmatch(part) for part in parts):
        raise InputError("box", ErrorCode.INVALID_BOX, f"expected 'x,y,w,h' with four integers, got {text!r}")
    return _signs(tuple(int(part) for part in parts), text)  # type: ignore[arg-type]


def _signs(box: Box, shown: object) -> Box:
    x, y, w, h = box
    if x < 0 or y < 0:
        raise InputError("box", ErrorCode.INVALID_BOX, f"x and y must not be negative, got {shown!r}")
    if w <= 0 or h <= 0:
        raise InputError("box", ErrorCode.INVALID_BOX, f"width and height must be positive, got {shown!r}")
    return box


def parse_boxes(text: str) -> list[Box]:
    """Parse one or more boxes separated by ``;`` (``"x,y,w,h;x,y,w,h"``)."""
    items = [item for item in str(text).split(";") if item.strip()]
    if not items:
        raise InputError("box", ErrorCode.INVALID_BOX, "no box given")
    return [parse_box(item) for item in items]


def box_of_list(value: Any) -> Box:
    """A box given as a JSON list ``[x, y, w, h]`` of integers."""
    if (not isinstance(value, list | tuple) or len(value) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise InputError("box", ErrorCode.INVALID_BOX, f"a box must be four integers [x, y, w, h], got {value!r}")
    if any(len(str(abs(v))) > MAX_COORDINATE_DIGITS for v in value):
        raise InputError("box", ErrorCode.TOO_MANY_DIGITS, f"a coordinate has more than {MAX_COORDINATE_DIGITS} "
                         f"digits in {value!r}")
    return _signs(tuple(int(v) for v in value), list(value))  # type: ignore[arg-type]


def box_text(box: Box) -> str:
    return ",".join(str(int(v)) for v in box)


# --- the counting rules ------------------------------------------------------------------------------------------


def check_target(given: list[str]) -> None:
    """Exactly one of the targets: a background mask, boxes or a placement."""
    if len(given) != 1:
        code = ErrorCode.MISSING_TARGET if not given else ErrorCode.CONFLICTING_TARGET
        raise InputError("placement" if "placement" in given else "background_mask", code,
                         "give exactly one target: a background_mask, one or more boxes, or a placement"
                         + (f" (got {' and '.join(given)})" if given else ""))


def check_reference_count(references: int, regions: int) -> None:
    """One reference for all regions, or one per region."""
    if references not in (1, regions):
        raise InputError("reference", ErrorCode.REFERENCE_COUNT_MISMATCH,
                         f"{references} references for {regions} target regions: give one for all, or one per "
                         "region (boxes in the order given, mask regions top to bottom, then left to right)")


def check_region_count(count: int, max_regions: int | None, field: str, what: str) -> None:
    if max_regions is not None and count > max_regions:
        raise InputError(field, ErrorCode.TOO_MANY_REGIONS,
                         f"{count} {what}; at most {max_regions} regions are accepted per request")


def check_counts(*, references: int, reference_masks: int, targets: list[str], regions: int | None,
                 max_regions: int | None) -> None:
    """Every rule between the counts of a request's inputs that holds before anything is decoded.

    ``reference_masks`` 0 means none; ``regions`` is the number of target regions where it is known from the
    request itself (boxes, a placement's count), None for a mask (known once decoded)."""
    check_target(targets)
    if reference_masks and reference_masks != references:
        raise InputError("reference_mask", ErrorCode.REFERENCE_COUNT_MISMATCH,
                         f"{reference_masks} reference masks for {references} references: give none or one for each")
    check_region_count(references, max_regions, "reference", "references")
    if regions is not None:
        field = "placement" if "placement" in targets else "box"
        check_region_count(regions, max_regions, field, "boxes" if field == "box" else "regions to place")
        check_reference_count(references, regions)


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

    @property
    def targets(self) -> list[str]:
        return [name for name, value in (("background_mask", self.background_mask), ("box", self.boxes),
                                         ("placement", self.placement)) if value is not None]

    @property
    def regions_known(self) -> int | None:
        """The number of target regions where the request says it (boxes, a placement's count)."""
        if self.boxes is not None:
            return len(self.boxes)
        return self.placement.count if self.placement is not None else None

    def check(self, max_regions: int | None = None) -> None:
        """:func:`check_counts` on these inputs, and a placement's area: every rule that needs no decoding."""
        masks = self.reference_mask
        check_counts(references=len(self.references),
                     reference_masks=len(masks) if isinstance(masks, tuple) else 0,
                     targets=self.targets, regions=self.regions_known, max_regions=max_regions)
        if self.placement is not None and self.placement_area is None:
            raise InputError("placement_area", ErrorCode.MISSING_FIELD, "a placement needs its allowed area")

    def uploads(self) -> list[Any]:
        """Every image of the request, one entry per file (several references and masks included)."""
        out: list[Any] = []
        for value in (self.reference, self.background, self.reference_mask, self.background_mask,
                      self.placement_area):
            if isinstance(value, tuple):
                out.extend(v for v in value if v is not None)
            elif value is not None:
                out.append(value)
        return out
