"""Robust decoding of user images and masks into the arrays the pipeline works on.

Accepts encoded bytes (PNG, JPEG, WebP and anything else Pillow reads), file paths, Pillow images and numpy
arrays. Every failure a user can cause becomes an :class:`~model.errors.InputError` (status 422) naming the field:

* ``not_an_image``     the data is not a readable image;
* ``truncated_image``  the header is fine but the pixel data is cut short or corrupt (never silently padded);
* ``too_many_pixels``  the header announces more than ``max_pixels`` pixels: rejected *before* decoding, which is
  also the defence against decompression bombs;
* ``size_mismatch``    a mask whose size differs from its image;
* ``empty_mask`` / ``mask_too_small`` / ``missing_mask`` for masks without a usable object.

Conventions: images come back as (H, W, 3) uint8 RGB with the EXIF orientation applied; masks as (H, W) bool.
Sizes passed as ``size`` are ``(height, width)``, the order of ``array.shape[:2]``; messages say ``WIDTHxHEIGHT``.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model.errors import ErrorCode, InputError
from model.imaging.preprocess import MIN_MASK_PIXELS

# A truncated upload must be an error, not an image with a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest accepted image, in pixels (a 48 MP phone photo fits; ~150 MB as RGB)."""
MASK_THRESHOLD = 128
"""A mask pixel is inside when its 8-bit value is above this (upstream's ``> 128``)."""

ImageSource = bytes | bytearray | memoryview | str | Path | Image.Image | np.ndarray

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, zlib.error)


# ----------------------------------------------------------------------------------------------------- decoding


def _too_many_pixels(field: str, width: int, height: int, max_pixels: int) -> InputError:
    return InputError(field, ErrorCode.TOO_MANY_PIXELS,
                      f"the image is {width}x{height} ({width * height} pixels); at most {max_pixels} pixels are "
                      "accepted")


def _open(data: ImageSource, field: str) -> Image.Image:
    """Open ``data`` lazily: only the header is read, no pixels are decoded yet."""
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise InputError(field, ErrorCode.UNREADABLE_FILE,
                             f"cannot read file {str(data)!r}: {exc.strerror}") from exc
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"unsupported input type {type(data).__name__}")
    if len(data) == 0:
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, "the file is empty")
    # Pillow's own bomb check runs inside ``open``: above its limit it warns (an exception where warnings are
    # errors), above twice that it raises. Ours, checked right after opening, is the one that normally decides.
    # (``warnings.catch_warnings`` is not used to silence it: it swaps process-wide state and races in threads.)
    try:
        return Image.open(io.BytesIO(bytes(data)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(field, ErrorCode.TOO_MANY_PIXELS, f"the image is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, "the data is not an image in a supported format") from exc
    except _DECODE_ERRORS as exc:
        if "Decompressed Data Too Large" in str(exc):  # a PNG text chunk bomb
            raise InputError(field, ErrorCode.TOO_MANY_PIXELS, "the image metadata is too large") from exc
        # A format was recognised (its plugin got past the magic bytes) but could not be read: damaged data.
        raise InputError(field, ErrorCode.TRUNCATED_IMAGE, f"the image data is truncated or corrupt: {exc}") from exc


def _load(image: Image.Image, field: str, max_pixels: int) -> Image.Image:
    """Check the announced size, fully decode, and apply the EXIF orientation."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many_pixels(field, width, height, max_pixels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # re-asserted in case anything in the process flipped the global
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(field, ErrorCode.TOO_MANY_PIXELS, f"the image is too large: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise InputError(field, ErrorCode.TRUNCATED_IMAGE, f"the image data is truncated or corrupt: {exc}") from exc
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not sink a decodable image: keep it as stored
        transposed = None
    return transposed if transposed is not None else image


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples (0..65535; wider integer modes are clipped to that range) to 0..255."""
    return np.rint(np.clip(values.astype(np.float64), 0, 65535) / 257).astype(np.uint8)


def _pil_to_arrays(image: Image.Image, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Split a decoded image into colour (H, W) grey or (H, W, 3) RGB uint8 and an (H, W) uint8 alpha or None."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_uint8(np.asarray(image)), None
    if mode == "F":
        return np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 255)).astype(np.uint8), None
    if mode == "P":
        # A palette's transparency (a colour index or per-index alpha table) becomes a real alpha channel.
        target = "RGBA" if "transparency" in image.info else "RGB"
    elif mode in ("PA", "RGBa", "RGBA"):
        target = "RGBA"
    elif mode in ("La", "LA"):
        target = "LA"
    elif mode in ("1", "L"):
        target = "L"
    else:
        target = "RGB"  # RGB itself, CMYK, YCbCr, LAB, HSV, RGBX, ...
    if mode != target:
        try:
            image = image.convert(target)
        except ValueError as exc:
            raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"unsupported image mode {mode}") from exc

    array = np.asarray(image)
    if target == "LA":
        return array[..., 0], array[..., 1]
    if target == "RGBA":
        return array[..., :3], array[..., 3]
    return array, None


def _array_to_uint8(array: np.ndarray, field: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint16:
        return _sixteen_bit_to_uint8(array)
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() <= 255:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
        return np.rint(array * 255).astype(np.uint8)
    raise InputError(field, ErrorCode.NOT_AN_IMAGE,
                     f"unsupported array of dtype {array.dtype}: use uint8, uint16, bool or floats in [0, 1]")


def _ndarray_to_arrays(array: np.ndarray, field: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Same split as :func:`_pil_to_arrays` for an array already in memory (assumed RGB(A) channel order)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(field, ErrorCode.NOT_AN_IMAGE,
                         f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got {array.shape}")
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"the image has no pixels ({width}x{height})")
    if height * width > max_pixels:
        raise _too_many_pixels(field, width, height, max_pixels)
    array = _array_to_uint8(array, field)
    if array.ndim == 3 and array.shape[2] == 4:
        return array[..., :3], array[..., 3]
    return array, None


def _decode(data: ImageSource, field: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(data, np.ndarray):
        return _ndarray_to_arrays(data, field, max_pixels)
    image = data if isinstance(data, Image.Image) else _open(data, field)
    try:
        return _pil_to_arrays(_load(image, field, max_pixels), field)
    finally:
        if image is not data:
            image.close()


def _to_rgb(color: np.ndarray) -> np.ndarray:
    if color.ndim == 2:
        color = np.repeat(color[..., None], 3, axis=2)
    return np.ascontiguousarray(color, dtype=np.uint8)


def _size_text(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


# --------------------------------------------------------------------------------------------------- public API


def load_image(data: ImageSource, *, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image to (H, W, 3) uint8 RGB.

    EXIF orientation is applied; greyscale is replicated to three channels; 16-bit samples are scaled to 8 bits
    (``round(v / 257)``); CMYK and other colour spaces go through Pillow's RGB conversion; an alpha channel is
    dropped without compositing (the colour values are kept as stored, as upstream does). Arrays are taken as
    RGB(A) order. Raises :class:`InputError` naming ``field`` (see the module docstring for the codes).
    """
    color, _ = _decode(data, field, max_pixels)
    return _to_rgb(color)


def mask_from_arrays(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """The mask rule, applied to decoded colour (grey or RGB uint8) and optional alpha.

    * With an alpha channel that is not fully opaque, the alpha is the mask (``alpha > 128``): a cut-out or a
      stroke drawn on a transparent layer, whatever its colour.
    * Otherwise greyscale is ``value > 128`` and RGB is "any channel": ``max(R, G, B) > 128``. For grey masks
      this equals the luminance rule; unlike luminance it also accepts strokes in a saturated colour (pure red
      has luminance 76), which is how masks are often drawn.
    """
    if alpha is not None and alpha.min() < 255:
        return alpha > MASK_THRESHOLD
    if color.ndim == 3:
        color = color.max(axis=2)
    return color > MASK_THRESHOLD


def load_mask(
    data: ImageSource,
    *,
    field: str,
    size: tuple[int, int] | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode a mask to (H, W) bool.

    Files may be 1-bit, L, LA, P (through its palette, transparency as alpha), RGB(A), I;16 or I (16-bit range);
    :func:`mask_from_arrays` gives the rule. Arrays may be bool, 0/1 integers (non-zero is inside), uint8 or
    uint16 (``> 128`` on the 8-bit scale) or floats in [0, 1]. ``size`` is the ``(height, width)`` the mask must
    have (its image's ``shape[:2]``), or None to skip the check.

    Raises :class:`InputError` naming ``field``: decoding codes, ``size_mismatch`` with both sizes, and
    ``empty_mask`` if no pixel is inside.
    """
    if (
        isinstance(data, np.ndarray)
        and data.ndim == 2
        and np.issubdtype(data.dtype, np.integer)
        and data.size
        and 0 <= data.min()
        and data.max() <= 1
    ):
        if data.size > max_pixels:
            raise _too_many_pixels(field, data.shape[1], data.shape[0], max_pixels)
        mask = data != 0
    else:
        mask = mask_from_arrays(*_decode(data, field, max_pixels))
    if size is not None and mask.shape != tuple(size):
        raise InputError(field, ErrorCode.SIZE_MISMATCH,
                         f"the mask is {_size_text(mask.shape)} but its image is {_size_text(tuple(size))}")
    if not mask.any():
        raise InputError(field, ErrorCode.EMPTY_MASK, "the mask is empty (no pixel above 128)")
    return mask


def load_reference(
    data: ImageSource,
    mask: ImageSource | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the reference object: (H, W, 3) uint8 RGB and its (H, W) bool mask.

    With ``mask`` given it is loaded as field ``reference_mask`` and must match the reference's size. Without
    one, the reference's alpha channel (RGBA, LA, PA or a palette with transparency) is the mask,
    ``alpha > 128``; a reference without alpha then fails with ``missing_mask`` on ``reference_mask``, and one
    whose alpha hides everything fails with ``empty_mask`` on ``reference``. Masks under the pre-processing
    minimum of pixels fail with ``mask_too_small`` on the field the mask came from.
    """
    color, alpha = _decode(data, "reference", max_pixels)
    rgb = _to_rgb(color)
    if mask is not None:
        field = "reference_mask"
        object_mask = load_mask(mask, field=field, size=rgb.shape[:2], max_pixels=max_pixels)
    elif alpha is None:
        raise InputError("reference_mask", ErrorCode.MISSING_MASK,
                         "the reference has no alpha channel: send an RGBA cut-out or a reference_mask")
    else:
        field = "reference"
        object_mask = alpha > MASK_THRESHOLD
        if not object_mask.any():
            raise InputError(field, ErrorCode.EMPTY_MASK, "the reference's alpha channel is fully transparent")
    count = int(np.count_nonzero(object_mask))
    if count < MIN_MASK_PIXELS:
        raise InputError(field, ErrorCode.MASK_TOO_SMALL,
                         f"the object has {count} pixels; at least {MIN_MASK_PIXELS} are needed")
    return rgb, object_mask
