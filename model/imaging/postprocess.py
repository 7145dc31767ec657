"""Post-processing: put the generated 512x512 crop back into the full-size background.

Reproduces upstream AnyDoor's ``crop_back`` followed by the demo's "keep background unchanged" step: the crop is
resized back to its padded square size, un-padded, pasted with a 3-pixel margin, and then only the expanded
target box is taken from that paste, so every pixel outside ``prepared.tar_box_yyxx`` is the input background.
"""

from __future__ import annotations

import cv2
import numpy as np

from model.errors import ErrorCode, InputError
from model.imaging.preprocess import CROP_SIZE, PreparedInputs, pad_to_square, resize, square_padding

PASTE_MARGIN = 3
"""Pixels at each edge of the crop that are not pasted back (the decoder's borders are least reliable)."""


def decoded_to_pixels(decoded: np.ndarray) -> np.ndarray:
    """Map the VAE output from [-1, 1] scale to float32 [0, 255], clipped, as upstream (before truncation)."""
    return np.clip(decoded.astype(np.float32, copy=False) * np.float32(127.5) + np.float32(127.5), 0, 255)


def feather_alpha(height: int, width: int, feather: int) -> np.ndarray:
    """(height, width) float32 paste weights for a box: 1 deeper than ``feather`` pixels inside it, falling
    linearly towards its edge, ``0.5 / feather`` on the outermost pixel ring (so the seam softens but every pixel of
    the box still takes some of the generated crop; outside the box nothing changes at all)."""
    if feather <= 0:
        return np.ones((height, width), np.float32)
    ys = np.arange(height, dtype=np.float32)
    xs = np.arange(width, dtype=np.float32)
    dy = np.minimum(ys, height - 1 - ys)[:, None]  # pixels to the nearest horizontal edge
    dx = np.minimum(xs, width - 1 - xs)[None, :]
    return np.clip((np.minimum(dy, dx) + 0.5) / feather, 0.0, 1.0).astype(np.float32)


def crop_like(image: np.ndarray, prepared: PreparedInputs) -> np.ndarray:
    """(512, 512, 3) uint8: ``image``'s square crop exactly as pre-processing cut the background's (same box,
    padding and resize), so a pasted result can be encoded and denoised again (the harmonising pass)."""
    cy1, cy2, cx1, cx2 = (int(v) for v in prepared.tar_box_yyxx_crop)
    return resize(pad_to_square(image[cy1:cy2, cx1:cx2], 0), CROP_SIZE, CROP_SIZE)


def paste_back(decoded: np.ndarray, background: np.ndarray, prepared: PreparedInputs, *,
               feather: int = 0) -> np.ndarray:
    """Return a new (H, W, 3) uint8 image: ``background`` with the generated crop inserted in the target box.

    ``decoded`` is the (512, 512, 3) float32 HWC decoder output in [-1, 1] scale, unclipped; ``background`` is the
    (H, W, 3) uint8 RGB image ``prepared`` was computed from. The input is not modified. With ``feather`` > 0 the
    crop fades into the background over that many pixels at the box's edge (:func:`feather_alpha`).
    """
    if decoded.shape != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"decoded must be ({CROP_SIZE}, {CROP_SIZE}, 3) HWC, got {decoded.shape}")
    if background.dtype != np.uint8 or background.ndim != 3 or background.shape[2] != 3:
        raise InputError("background", ErrorCode.INVALID_IMAGE, "expected an (H, W, 3) uint8 RGB image")

    crop_h, crop_w, side_h, side_w = (int(v) for v in prepared.extra_sizes)
    cy1, cy2, cx1, cx2 = (int(v) for v in prepared.tar_box_yyxx_crop)
    ty1, ty2, tx1, tx2 = (int(v) for v in prepared.tar_box_yyxx)
    height, width = background.shape[:2]
    if not (0 <= cy1 <= cy2 <= height and 0 <= cx1 <= cx2 <= width and (cy2 - cy1, cx2 - cx1) == (crop_h, crop_w)):
        raise ValueError("prepared inputs do not belong to this background (crop box outside it or mis-sized)")

    # Upstream drops the decoder's first row before resizing (its ``[1:, :, :]``); the reference output has it.
    pixels = decoded_to_pixels(decoded)[1:]
    pixels = cv2.resize(pixels, (side_w, side_h), interpolation=cv2.INTER_LINEAR)

    # Undo the square padding added in pre-processing (the crop's shorter side was padded).
    before, _ = square_padding(crop_h, crop_w)
    if crop_h > crop_w:
        pixels = pixels[:, before : before + crop_w]
    elif crop_w > crop_h:
        pixels = pixels[before : before + crop_h]

    # Paste the crop without its margin, then keep only the target box from it: outside that box the result is
    # the background, byte for byte. float -> uint8 truncates, as upstream's array assignment does.
    m = PASTE_MARGIN
    pasted = background.copy()
    if crop_h > 2 * m and crop_w > 2 * m:  # a smaller crop has nothing inside its margin (and would wrap indices)
        pasted[cy1 + m : cy2 - m, cx1 + m : cx2 - m] = pixels[m : crop_h - m, m : crop_w - m].astype(np.uint8)
    result = background.copy()
    if feather <= 0:
        result[ty1:ty2, tx1:tx2] = pasted[ty1:ty2, tx1:tx2]
        return result
    alpha = feather_alpha(ty2 - ty1, tx2 - tx1, feather)[..., None]
    new = pasted[ty1:ty2, tx1:tx2].astype(np.float32)
    old = background[ty1:ty2, tx1:tx2].astype(np.float32)
    result[ty1:ty2, tx1:tx2] = np.rint(alpha * new + (1.0 - alpha) * old).astype(np.uint8)
    return result
