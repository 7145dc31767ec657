"""Multi-region targets: split a mask into separate regions, or build region masks from ROI boxes.

Inserting one object across a large mask that covers several places distorts the background; instead each
connected region (or each box) becomes its own target, processed one after the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from model.errors import ErrorCode, InputError
from model.spec.inputs import MAX_COORDINATE_DIGITS, Box, parse_box, parse_boxes  # noqa: F401 (re-exported)
from model.spec.placement import MIN_BOX_SIDE

DEFAULT_MIN_REGION_AREA = 64
"""Connected components smaller than this many pixels (an 8x8 patch) are dropped as specks: stray brush dots or
compression noise, too small to hold a generated object."""


def _too_many(field: str, count: int, limit: int, what: str) -> InputError:
    return InputError(field, ErrorCode.TOO_MANY_REGIONS, f"{count} {what}; at most {limit} regions are accepted per "
                      "request")


def split_mask(
    mask: np.ndarray, *, min_area: int = DEFAULT_MIN_REGION_AREA, field: str = "background_mask",
    max_regions: int | None = None,
) -> list[np.ndarray]:
    """Split ``mask`` into its 8-connected regions of at least ``min_area`` pixels, each as an (H, W) bool mask.

    Regions are ordered top to bottom by their bounding box's top row, then left to right by its left column,
    so the order is stable for a given mask. Raises :class:`InputError` naming ``field`` if the mask is empty
    (``empty_mask``) or every region is smaller than ``min_area`` (``mask_too_small``), and, before any region's
    mask is built, if there are more than ``max_regions`` regions (``too_many_regions``).
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise InputError(field, ErrorCode.INVALID_MASK, "expected an (H, W) mask")
    if min_area < 1:
        raise ValueError(f"min_area must be at least 1, got {min_area}")
    binary = (mask != 0).astype(np.uint8)
    if not binary.any():
        raise InputError(field, ErrorCode.EMPTY_MASK, "the mask is empty")

    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    kept = [label for label in range(1, count) if stats[label, cv2.CC_STAT_AREA] >= min_area]
    if not kept:
        largest = int(stats[1:, cv2.CC_STAT_AREA].max())
        raise InputError(field, ErrorCode.MASK_TOO_SMALL,
                         f"every region is smaller than {min_area} pixels (the largest has {largest})")
    if max_regions is not None and len(kept) > max_regions:
        raise _too_many(field, len(kept), max_regions, f"separate regions of at least {min_area} pixels")
    kept.sort(key=lambda label: (stats[label, cv2.CC_STAT_TOP], stats[label, cv2.CC_STAT_LEFT], label))
    return [labels == label for label in kept]


def _check_box(index: int, box: object, height: int, width: int) -> Box:
    label = f"box {index}"
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        raise InputError("box", ErrorCode.INVALID_BOX, f"{label} must be four integers (x, y, w, h), got {box!r}")
    values: list[int] = []
    for value in box:
        # bool is an int subclass and a float like 1.5 would silently truncate: accept only true integers.
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise InputError("box", ErrorCode.INVALID_BOX, f"{label} must be four integers (x, y, w, h), got {box!r}")
        values.append(int(value))
    x, y, w, h = values
    if w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:
        raise InputError("box", ErrorCode.INVALID_BOX,
                         f"{label} is {w}x{h}; both sides must be at least {MIN_BOX_SIDE} pixels")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise InputError("box", ErrorCode.BOX_OUT_OF_IMAGE,
                         f"{label} (x={x}, y={y}, w={w}, h={h}) is not inside the {width}x{height} image")
    return x, y, w, h


def check_boxes(boxes: Sequence[Box], size: tuple[int, int], *, max_regions: int | None = None) -> list[Box]:
    """Every ``(x, y, w, h)`` box checked against an image of ``size`` = ``(height, width)``: each must lie fully
    inside the image and be at least ``MIN_BOX_SIDE`` pixels on each side; otherwise :class:`InputError` on field
    ``box`` (``invalid_box``, ``box_out_of_image``, or ``too_many_regions`` past ``max_regions``)."""
    height, width = (int(v) for v in size)
    if not boxes:
        raise InputError("box", ErrorCode.INVALID_BOX, "no box given")
    if max_regions is not None and len(boxes) > max_regions:
        raise _too_many("box", len(boxes), max_regions, "boxes")
    return [_check_box(index, box, height, width) for index, box in enumerate(boxes)]


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask of one checked box."""
    x, y, w, h = box
    mask = np.zeros(size, dtype=bool)
    mask[y : y + h, x : x + w] = True
    return mask


def boxes_to_masks(boxes: Sequence[Box], size: tuple[int, int], *, max_regions: int | None = None
                   ) -> list[np.ndarray]:
    """One (H, W) bool mask per ``(x, y, w, h)`` box (see :func:`check_boxes` for the errors)."""
    return [box_mask(box, (int(size[0]), int(size[1]))) for box in check_boxes(boxes, size, max_regions=max_regions)]
