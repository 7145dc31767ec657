"""Pre-processing: turn (reference, reference mask, background, target mask) into the network inputs.

This reproduces upstream AnyDoor's pair processing bit for bit (the reference cases in
``tests/fixtures/reference`` encode it), with two deliberate differences:

* upstream draws its three box-expansion ratios at random on every call; here they are explicit parameters with
  fixed defaults, so a result depends only on its inputs;
* inputs upstream would crash on or silently mangle (empty or near-empty masks, shape mismatches, degenerate
  boxes) are rejected with an :class:`~model.errors.InputError` naming the field.

All boxes are ``(y1, y2, x1, x2)`` tuples used as half-open slices ``[y1:y2, x1:x2]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.errors import ErrorCode, InputError

DEFAULT_REFERENCE_EXPAND_RATIO = 1.3
"""Padding around the reference object's box before it is squared (upstream: random in {1.1 .. 1.4})."""
DEFAULT_TARGET_BOX_EXPAND_RATIO = 1.1
"""Growth of the target region's box, the area the object may occupy (upstream: random in [1.1, 1.2))."""
DEFAULT_CROP_EXPAND_RATIO = 2.0
"""Growth of the target box into the square context crop the network sees (upstream: random in [1.3, 3.0))."""

MIN_MASK_PIXELS = 10
"""Masks with fewer pixels are rejected: upstream silently replaces their box by the whole image."""

REFERENCE_SIZE = 224  # DINOv2 input resolution
CROP_SIZE = 512  # Stable Diffusion / ControlNet resolution
HIGH_FREQ_SIZE = 256  # resolution of the Sobel high-frequency map
HIGH_FREQ_THRESHOLD = 50
MASK_PAD = 2  # marker for padded pixels in the hint's mask channel before it becomes -1

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class PreparedInputs:
    """Everything the networks and :func:`model.imaging.postprocess.paste_back` need for one region.

    The images are kept as the 8-bit arrays they are computed from (1.6 MiB a region instead of 7.6 MiB as
    float32, which matters for requests waiting in the queue); :attr:`ref`, :attr:`hint` and :attr:`jpg` give the
    float32 network inputs with upstream's arithmetic, so the values are bit for bit the same."""

    ref_u8: np.ndarray
    """(224, 224, 3) uint8: the masked object on white, padded to a square and resized."""
    collage_u8: np.ndarray
    """(512, 512, 3) uint8: the background crop with the object's high-frequency map pasted into the box."""
    mask_i8: np.ndarray
    """(512, 512) int8: the hint's mask channel, 1 in the box (or shape), 0 outside, -1 in the padding."""
    jpg_u8: np.ndarray
    """(512, 512, 3) uint8: the square crop of the background."""
    extra_sizes: np.ndarray
    """(4,) int64 ``[H1, W1, H2, W2]``: crop size before and after padding to a square."""
    tar_box_yyxx_crop: np.ndarray
    """(4,) int64: the crop box in background coordinates."""
    tar_box_yyxx: np.ndarray
    """(4,) int64: the expanded target box in background coordinates; outside it the output is the background."""

    @property
    def ref(self) -> np.ndarray:
        """(224, 224, 3) float32 in [0, 1]: the DINOv2 input."""
        return self.ref_u8.astype(np.float32) / 255

    @property
    def hint(self) -> np.ndarray:
        """(512, 512, 4) float32: collage in [-1, 1] plus the mask channel, the ControlNet's hint."""
        # float32 arithmetic throughout, as upstream, so the values match to the last bit.
        return np.concatenate([self.collage_u8.astype(np.float32) / 127.5 - 1.0,
                               self.mask_i8.astype(np.float32)[..., None]], axis=-1)

    @property
    def jpg(self) -> np.ndarray:
        """(512, 512, 3) float32 in [-1, 1]: the background crop, as the VAE encodes it."""
        return self.jpg_u8.astype(np.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------- box helpers


def bbox_from_mask(mask: np.ndarray) -> Box:
    """Upstream's mask bounding box: first and *last* occupied row and column.

    The end indices are inclusive, yet every caller uses them as exclusive slice ends (and ``expand_bbox`` adds
    one back when measuring the size). That loses the last row and column of the object; the reference data is
    computed that way, so it is kept. The caller guarantees a non-empty mask (upstream returns the whole image
    for masks under 10 pixels; :func:`prepare_inputs` rejects those instead).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def expand_box(box: Box, ratio: float, height: int, width: int) -> Box:
    """Grow ``box`` about its centre by ``ratio`` and clamp it to a ``height`` x ``width`` image.

    Sizes are measured as ``end - start + 1`` (upstream treats the ends as inclusive here) and the new edges are
    truncated towards zero with ``int``, exactly as upstream, so the boxes match the reference data.
    """
    y1, y2, x1, x2 = box
    yc, xc = 0.5 * (y1 + y2), 0.5 * (x1 + x2)
    h = ratio * (y2 - y1 + 1)
    w = ratio * (x2 - x1 + 1)
    return (
        max(0, int(yc - h * 0.5)),
        min(height, int(yc + h * 0.5)),
        max(0, int(xc - w * 0.5)),
        min(width, int(xc + w * 0.5)),
    )


def square_box(box: Box, height: int, width: int) -> Box:
    """Make ``box`` square around its centre using its longer side, clamped to the image (upstream ``box2squre``).

    Integer halving means an odd side loses one pixel, and clamping at the border can leave the box
    non-square; the crop is padded to a square afterwards.
    """
    y1, y2, x1, x2 = box
    cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
    h, w = y2 - y1, x2 - x1
    if h >= w:
        x1, x2 = cx - h // 2, cx + h // 2
    else:
        y1, y2 = cy - w // 2, cy + w // 2
    return max(0, y1), min(height, y2), max(0, x1), min(width, x2)


def square_padding(height: int, width: int) -> tuple[int, int]:
    """Pixels added before and after the shorter side to make a ``height`` x ``width`` array square."""
    pad = abs(height - width)
    before = pad // 2
    return before, pad - before


def pad_to_square(image: np.ndarray, value: int) -> np.ndarray:
    """Pad the shorter side of an (H, W) or (H, W, C) array symmetrically (extra pixel after) with ``value``."""
    height, width = image.shape[:2]
    if height == width:
        return image
    before, after = square_padding(height, width)
    spec = [(0, 0)] * image.ndim
    spec[1 if height > width else 0] = (before, after)
    return np.pad(image, spec, mode="constant", constant_values=value)


def resize(image: np.ndarray, width: int, height: int, *, nearest: bool = False) -> np.ndarray:
    """``cv2.resize`` to ``width`` x ``height`` (bilinear unless ``nearest``), as upstream does everywhere."""
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


# ------------------------------------------------------------------------------------------------ reference path


def high_frequency_map(image: np.ndarray, mask: np.ndarray, threshold: int = HIGH_FREQ_THRESHOLD) -> np.ndarray:
    """The object's high-frequency detail map, the part of the reference pasted into the collage.

    ``image`` is the (S, S, 3) uint8 reference and ``mask`` its (S, S) uint8 0..255 mask. The gradient magnitude
    (mean of |Sobel x| and |Sobel y|, max over channels) is computed on a 256x256 copy inside the mask eroded
    twice by 5x5, values below ``threshold`` are dropped, and the result scales the image; it is resized back.
    The float64 mask scale, uint8 saturation and the final float32 -> uint8 truncation follow upstream exactly.
    """
    height, width = image.shape[:2]
    small = resize(image, HIGH_FREQ_SIZE, HIGH_FREQ_SIZE)
    inside = (resize(mask / 255, HIGH_FREQ_SIZE, HIGH_FREQ_SIZE) > 0.5).astype(np.uint8)
    small_mask = cv2.erode(inside, np.ones((5, 5), np.uint8), iterations=2)

    grad_x = cv2.convertScaleAbs(cv2.Sobel(small, cv2.CV_64F, 1, 0, ksize=3))
    grad_y = cv2.convertScaleAbs(cv2.Sobel(small, cv2.CV_64F, 0, 1, ksize=3))
    magnitude = cv2.addWeighted(grad_x, 0.5, grad_y, 0.5, 0).max(axis=-1) * small_mask
    magnitude[magnitude < threshold] = 0

    detail = (magnitude[..., None].astype(np.float32) / 255 * small.astype(np.float32)).astype(np.uint8)
    return resize(detail, width, height)


def reference_view(reference: np.ndarray, mask: np.ndarray, expand_ratio: float) -> np.ndarray:
    """The reference as DINOv2 sees it: the masked object on white, padded, squared, (224, 224, 3) uint8."""
    return _prepare_reference(reference, mask, expand_ratio)[0]


def _prepare_reference(reference: np.ndarray, mask: np.ndarray, expand_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Masked, padded and squared reference at 224x224: returns (uint8 image, its high-frequency map)."""
    y1, y2, x1, x2 = bbox_from_mask(mask)
    if y2 <= y1 or x2 <= x1:
        # The inclusive-end quirk turns a one-pixel-thin object into an empty crop.
        raise InputError("reference_mask", ErrorCode.MASK_TOO_SMALL,
                         "the reference object is too thin (one pixel in height or width)")
    # Outside the object is white: DINOv2 and the detail map see the object alone.
    masked = np.where(mask[..., None], reference, np.uint8(255))[y1:y2, x1:x2]
    crop_mask = mask[y1:y2, x1:x2].astype(np.uint8)

    # Margin around the object (upstream expand_image_mask).
    h, w = crop_mask.shape
    grown_h, grown_w = int(h * expand_ratio), int(w * expand_ratio)
    top, left = (grown_h - h) // 2, (grown_w - w) // 2
    pads = ((top, grown_h - h - top), (left, grown_w - w - left))
    masked = np.pad(masked, (*pads, (0, 0)), mode="constant", constant_values=255)
    crop_mask = np.pad(crop_mask, pads, mode="constant", constant_values=0)

    image = resize(pad_to_square(masked, 255), REFERENCE_SIZE, REFERENCE_SIZE)
    # Upstream resizes a 3-channel copy and keeps channel 0; cv2 treats channels independently, so one suffices.
    mask_224 = resize(pad_to_square(crop_mask * np.uint8(255), 0), REFERENCE_SIZE, REFERENCE_SIZE)
    return image, high_frequency_map(image, mask_224)


# --------------------------------------------------------------------------------------------------- validation


def _check_image(name: str, image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(name, ErrorCode.INVALID_IMAGE, "expected an (H, W, 3) uint8 RGB image")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(name, ErrorCode.INVALID_IMAGE, "the image is empty")


def _check_mask(name: str, mask: np.ndarray, image: np.ndarray, image_name: str) -> np.ndarray:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise InputError(name, ErrorCode.INVALID_MASK, "expected an (H, W) mask")
    if mask.shape != image.shape[:2]:
        raise InputError(name, ErrorCode.SIZE_MISMATCH,
                         f"mask is {mask.shape[1]}x{mask.shape[0]} but {image_name} is "
                         f"{image.shape[1]}x{image.shape[0]}")
    mask = mask.astype(bool, copy=False)
    count = int(np.count_nonzero(mask))
    if count == 0:
        raise InputError(name, ErrorCode.EMPTY_MASK, "the mask is empty")
    if count < MIN_MASK_PIXELS:
        raise InputError(name, ErrorCode.MASK_TOO_SMALL,
                         f"the mask has {count} pixels; at least {MIN_MASK_PIXELS} are needed")
    return mask


def _check_ratio(name: str, value: float) -> float:
    """The ratio checked against its bounds in the request spec (the one definition of them)."""
    from model.spec.params import param_specs

    spec = next(s for s in param_specs() if s.name == name)
    return float(spec.check(value))


# ------------------------------------------------------------------------------------------------------ pipeline


def prepare_inputs(
    reference: np.ndarray,
    reference_mask: np.ndarray,
    background: np.ndarray,
    target_mask: np.ndarray,
    *,
    reference_expand_ratio: float = DEFAULT_REFERENCE_EXPAND_RATIO,
    target_box_expand_ratio: float = DEFAULT_TARGET_BOX_EXPAND_RATIO,
    crop_expand_ratio: float = DEFAULT_CROP_EXPAND_RATIO,
    shape_control: bool = False,
) -> PreparedInputs:
    """Build the network inputs for inserting the masked reference object into the target region.

    ``reference`` and ``background`` are (H, W, 3) uint8 RGB; the masks are (H, W) bool (any dtype is read as
    non-zero = inside) of their image's size. With ``shape_control`` the hint's mask channel is the target mask
    itself instead of its box, so the object follows the drawn shape. Deterministic: the same inputs give the
    same arrays.

    Raises :class:`InputError` (field ``reference``, ``reference_mask``, ``background``, ``background_mask`` or
    the ratio's name) for malformed images, size mismatches, empty or too small masks and ratios out of range.
    """
    _check_image("reference", reference)
    _check_image("background", background)
    reference_mask = _check_mask("reference_mask", reference_mask, reference, "the reference")
    target_mask = _check_mask("background_mask", target_mask, background, "the background")
    reference_expand_ratio = _check_ratio("reference_expand_ratio", reference_expand_ratio)
    target_box_expand_ratio = _check_ratio("target_box_expand_ratio", target_box_expand_ratio)
    crop_expand_ratio = _check_ratio("crop_expand_ratio", crop_expand_ratio)

    ref_image, detail = _prepare_reference(reference, reference_mask, reference_expand_ratio)

    # Target: the region's box (where the object goes) and a larger square crop around it (what the network sees).
    height, width = background.shape[:2]
    tar_box = expand_box(bbox_from_mask(target_mask), target_box_expand_ratio, height, width)
    crop_box = square_box(expand_box(tar_box, crop_expand_ratio, height, width), height, width)
    cy1, cy2, cx1, cx2 = crop_box
    crop = background[cy1:cy2, cx1:cx2]
    crop_mask = target_mask[cy1:cy2, cx1:cx2]
    crop_h, crop_w = crop.shape[:2]

    # The box inside the crop. Upstream does not clip it; squaring can shave one pixel off a crop whose box ends
    # at the image border, where upstream would fail to paste, so it is clipped (a no-op everywhere else).
    ty1, ty2, tx1, tx2 = tar_box
    by1, by2 = min(ty1 - cy1, crop_h), min(ty2 - cy1, crop_h)
    bx1, bx2 = min(tx1 - cx1, crop_w), min(tx2 - cx1, crop_w)
    if by2 <= by1 or bx2 <= bx1:
        # In practice only a one-pixel-thin region on the image's first row or column gets here.
        raise InputError("background_mask", ErrorCode.MASK_TOO_SMALL, "the target region is too thin")

    collage = crop.copy()
    collage[by1:by2, bx1:bx2] = resize(detail, bx2 - bx1, by2 - by1)

    if shape_control:
        collage_mask = crop_mask.astype(np.uint8)
    else:
        collage_mask = np.zeros((crop_h, crop_w), np.uint8)
        collage_mask[by1:by2, bx1:bx2] = 1

    side = max(crop_h, crop_w)
    jpg = resize(pad_to_square(crop, 0), CROP_SIZE, CROP_SIZE)
    collage = resize(pad_to_square(collage, 0), CROP_SIZE, CROP_SIZE)
    mask_channel = resize(pad_to_square(collage_mask, MASK_PAD), CROP_SIZE, CROP_SIZE, nearest=True)
    mask_channel = mask_channel.astype(np.int8)
    mask_channel[mask_channel == MASK_PAD] = -1

    assert ref_image.dtype == collage.dtype == jpg.dtype == np.uint8
    return PreparedInputs(
        ref_u8=ref_image,
        collage_u8=collage,
        mask_i8=mask_channel,
        jpg_u8=jpg,
        extra_sizes=np.array([crop_h, crop_w, side, side], dtype=np.int64),
        tar_box_yyxx_crop=np.array(crop_box, dtype=np.int64),
        tar_box_yyxx=np.array(tar_box, dtype=np.int64),
    )
