"""How good a result is, measured on the result itself: object identity per region and background preservation.

- **Identity** (DINO-I, as in the AnyDoor paper's evaluation): the cosine similarity, in [-1, 1], of the DINOv2
  class-token features of the reference *as the model sees it* (the masked object on white, squared, 224x224:
  :attr:`PreparedInputs.ref_u8`) and of the generated region: the region's box cut from the result, padded to a
  square with white and resized the same way. It uses the DINOv2 encoder the pipeline has loaded (the backbone's
  final-normed class token, before the projection into the UNet's context), so it costs two encoder passes per
  region and no other model. With demo weights the number is meaningless.
- **Background PSNR**: the peak signal-to-noise ratio, in dB, of the result against the input background over
  every pixel outside the target regions (the boxes; for a mask, its regions). Only the crop around each region
  may differ, so a high value says the scene was left alone; ``keep_background`` and ``feather`` raise it. ``None``
  when those pixels are identical (the PSNR is infinite) or when there are none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from model.imaging.preprocess import pad_to_square, resize
from model.imaging.regions import Box
from model.pipeline.job import freeze

WHITE = 255  # the reference's padding (upstream pads the masked object with white)


def region_view(image: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The region ``box`` (x, y, w, h) of ``image`` as the identity encoder sees it: (size, size, 3) uint8."""
    x, y, w, h = box
    return resize(pad_to_square(np.ascontiguousarray(image[y:y + h, x:x + w]), WHITE), size, size)


@torch.no_grad()
def identity_scores(embed: torch.nn.Module | object, references: Sequence[np.ndarray],
                    generated: Sequence[np.ndarray]) -> list[float]:
    """Cosine similarity of ``embed``'s features for each (reference, generated) pair of (S, S, 3) uint8 views.

    ``embed`` maps (B, 3, S, S) float images in [0, 1] to (B, C) features (:meth:`AnyDoorModel.embed_images`)."""
    if not references:
        return []
    batch = np.stack([*references, *generated]).astype(np.float32) / 255
    features = embed(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous())  # type: ignore[operator]
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    n = len(references)
    return [float(v) for v in (features[:n] * features[n:]).sum(dim=-1).clamp(-1.0, 1.0).cpu()]


def background_psnr(result: np.ndarray, background: np.ndarray, targets: np.ndarray) -> float | None:
    """PSNR (dB, peak 255) of ``result`` against ``background`` (both (H, W, 3) uint8) where ``targets`` (H, W
    bool) is False; ``None`` where those pixels are all equal or there are none."""
    outside = ~targets
    count = int(np.count_nonzero(outside))
    if count == 0:
        return None
    diff = result[outside].astype(np.int32) - background[outside].astype(np.int32)
    squared = float(np.einsum("ij,ij->", diff, diff, dtype=np.int64))
    if squared == 0:
        return None
    mse = squared / (count * result.shape[2])
    return 10 * math.log10(255.0**2 / mse)


def pack_targets(mask: np.ndarray) -> np.ndarray:
    """An (H, W) bool mask stored in 1 bit a pixel (a queued job keeps it: 2 MiB at 16.7 MP)."""
    return freeze(np.packbits(mask, axis=None))


def unpack_targets(bits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    return np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, peak 255) of two
    same-size uint8 images, on their luma (ITU-R BT.601), averaged over the image."""
    import cv2

    def luma(image: np.ndarray) -> np.ndarray:
        image = image.astype(np.float64)
        return image @ np.array([0.299, 0.587, 0.114]) if image.ndim == 3 else image

    x, y = luma(a), luma(b)
    if x.shape != y.shape:
        raise ValueError(f"ssim needs images of one size, got {a.shape} and {b.shape}")

    def blur(image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(value.mean())
