"""Pre-processing: exact parity with upstream on the reference cases, invariants elsewhere, input rejection."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

from model.errors import ErrorCode, InputError
from model.imaging.preprocess import (
    DEFAULT_CROP_EXPAND_RATIO,
    DEFAULT_REFERENCE_EXPAND_RATIO,
    DEFAULT_TARGET_BOX_EXPAND_RATIO,
    PreparedInputs,
    bbox_from_mask,
    expand_box,
    pad_to_square,
    prepare_inputs,
    square_box,
)

ARRAYS = ("ref", "hint", "jpg", "extra_sizes", "tar_box_yyxx_crop", "tar_box_yyxx")


def case_inputs(case) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The case's inputs as the reference README defines them (read with Pillow directly, not model.imageio)."""
    reference = np.asarray(Image.open(case.dir / "reference.png").convert("RGBA"))
    background = np.asarray(Image.open(case.dir / "background.png").convert("RGB"))
    target = np.asarray(Image.open(case.dir / "background_mask.png").convert("L")) > 128
    return np.ascontiguousarray(reference[..., :3]), reference[..., 3] > 128, background, target


def prepare_case(case) -> PreparedInputs:
    settings = case.settings
    return prepare_inputs(
        *case_inputs(case),
        reference_expand_ratio=settings["reference_expand_ratio"],
        target_box_expand_ratio=settings["target_box_expand_ratio"],
        crop_expand_ratio=settings["crop_expand_ratio"],
        shape_control=settings["enable_shape_control"],
    )


@pytest.mark.parity
@pytest.mark.parametrize("name", ARRAYS)
def test_prepare_inputs_matches_reference_exactly(case, name: str) -> None:
    actual = getattr(prepare_case(case), name)
    expected = case.expected[name]
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    # Exact: no resize rounds differently here, so not even the 1/255 the README allows is needed.
    assert np.abs(actual.astype(np.float64) - expected).max() == 0.0


def test_prepare_inputs_is_deterministic(case) -> None:
    first, second = prepare_case(case), prepare_case(case)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_prepare_inputs_does_not_modify_inputs(case) -> None:
    inputs = case_inputs(case)
    copies = [array.copy() for array in inputs]
    prepare_inputs(*inputs)
    for array, copy in zip(inputs, copies, strict=True):
        np.testing.assert_array_equal(array, copy)


def test_defaults_are_the_documented_values() -> None:
    defaults = (DEFAULT_REFERENCE_EXPAND_RATIO, DEFAULT_TARGET_BOX_EXPAND_RATIO, DEFAULT_CROP_EXPAND_RATIO)
    assert defaults == (1.3, 1.1, 2.0)


# ------------------------------------------------------------------------------------------------- box helpers


def test_bbox_from_mask_has_inclusive_ends() -> None:
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True
    assert bbox_from_mask(mask) == (2, 5, 3, 8)


def test_expand_box_grows_about_the_centre_and_clamps() -> None:
    # size 11 (inclusive), centre 15: 2.0 * 11 = 22 -> [4, 26)
    assert expand_box((10, 20, 10, 20), 2.0, 100, 100) == (4, 26, 4, 26)
    assert expand_box((0, 5, 90, 99), 3.0, 100, 100) == (0, 11, 79, 100)


def test_square_box_uses_the_longer_side() -> None:
    assert square_box((10, 30, 40, 50), 100, 100) == (10, 30, 35, 55)
    assert square_box((0, 20, 0, 5), 100, 100) == (0, 20, 0, 12)  # clamped at the left edge: not square
    # An odd longer side: the other axis becomes 2 * (7 // 2) = 6 wide, one pixel short of square.
    assert square_box((0, 7, 0, 7), 100, 100) == (0, 7, 0, 6)


def test_pad_to_square_pads_the_short_side_extra_pixel_after() -> None:
    padded = pad_to_square(np.ones((2, 5), np.uint8), 7)
    assert padded.shape == (5, 5)
    assert (padded[0] == 7).all() and (padded[3:] == 7).all() and (padded[1:3] == 1).all()


# -------------------------------------------------------------------------------------------- other geometries


def make_reference(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    mask = ((yy - height / 2) / (height * 0.4)) ** 2 + ((xx - width / 2) / (width * 0.4)) ** 2 <= 1
    return image, mask


def make_target(height: int, width: int, box: tuple[int, int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), bool)
    y1, y2, x1, x2 = box
    mask[y1:y2, x1:x2] = True
    return background, mask


def check_invariants(prepared: PreparedInputs, height: int, width: int) -> None:
    assert prepared.ref.shape == (224, 224, 3) and prepared.ref.dtype == np.float32
    assert prepared.hint.shape == (512, 512, 4) and prepared.hint.dtype == np.float32
    assert prepared.jpg.shape == (512, 512, 3) and prepared.jpg.dtype == np.float32
    for name in ("extra_sizes", "tar_box_yyxx_crop", "tar_box_yyxx"):
        assert getattr(prepared, name).shape == (4,) and getattr(prepared, name).dtype == np.int64
    assert 0.0 <= prepared.ref.min() and prepared.ref.max() <= 1.0
    assert -1.0 <= prepared.jpg.min() and prepared.jpg.max() <= 1.0
    assert -1.0 <= prepared.hint[..., :3].min() and prepared.hint[..., :3].max() <= 1.0
    assert set(np.unique(prepared.hint[..., 3])) <= {-1.0, 0.0, 1.0}
    assert (prepared.hint[..., 3] == 1.0).any()

    y1, y2, x1, x2 = (int(v) for v in prepared.tar_box_yyxx)
    cy1, cy2, cx1, cx2 = (int(v) for v in prepared.tar_box_yyxx_crop)
    assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
    assert 0 <= cy1 < cy2 <= height and 0 <= cx1 < cx2 <= width
    assert cy1 <= y1 and cx1 <= x1  # the crop starts before the box (it may end a pixel short at the border)
    crop_h, crop_w, side_h, side_w = (int(v) for v in prepared.extra_sizes)
    assert (crop_h, crop_w) == (cy2 - cy1, cx2 - cx1)
    assert side_h == side_w == max(crop_h, crop_w)
    # Padding shows as -1 in the mask channel exactly when the crop was not square.
    assert ((prepared.hint[..., 3] == -1.0).any()) == (crop_h != crop_w)


GEOMETRIES = {
    # name: (background H, W, target box y1, y2, x1, x2)
    "landscape_centre": (240, 400, (80, 160, 150, 260)),
    "portrait_centre": (400, 240, (150, 260, 80, 160)),
    "square_centre": (300, 300, (100, 180, 120, 200)),
    "top_left_corner": (240, 400, (0, 50, 0, 70)),
    "bottom_right_corner": (400, 240, (330, 400, 190, 240)),
    "full_height_strip": (200, 500, (0, 200, 220, 260)),
    "whole_image": (160, 160, (0, 160, 0, 160)),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("reference_size", [(80, 160), (160, 80)], ids=["ref_wide", "ref_tall"])
@pytest.mark.parametrize("shape_control", [False, True], ids=["box", "shape"])
def test_prepare_inputs_handles_other_geometries(
    geometry: str, reference_size: tuple[int, int], shape_control: bool
) -> None:
    height, width, box = GEOMETRIES[geometry]
    reference, reference_mask = make_reference(*reference_size, seed=1)
    background, target = make_target(height, width, box, seed=2)
    prepared = prepare_inputs(reference, reference_mask, background, target, shape_control=shape_control)
    check_invariants(prepared, height, width)


def test_prepare_inputs_random_geometries() -> None:
    """Random sizes, regions (often at the border) and ratios: never a crash, always the invariants."""
    rng = np.random.default_rng(1234)
    for seed in range(60):
        height, width = (int(v) for v in rng.integers(24, 260, size=2))
        y1, x1 = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        y2 = int(rng.integers(y1 + 4, height + 1)) if rng.random() < 0.7 else height
        x2 = int(rng.integers(x1 + 4, width + 1)) if rng.random() < 0.7 else width
        reference, reference_mask = make_reference(int(rng.integers(16, 120)), int(rng.integers(16, 120)), seed)
        background, target = make_target(height, width, (y1, y2, x1, x2), seed)
        prepared = prepare_inputs(
            reference,
            reference_mask,
            background,
            target,
            reference_expand_ratio=float(rng.uniform(1.0, 1.5)),
            target_box_expand_ratio=float(rng.uniform(1.0, 1.3)),
            crop_expand_ratio=float(rng.uniform(1.0, 3.0)),
            shape_control=bool(rng.random() < 0.5),
        )
        check_invariants(prepared, height, width)


def test_region_at_the_border_where_squaring_shaves_the_crop() -> None:
    """Box (1, 14, 37, 50) in a 50x50 image: its crop squares to (0, 21, 29, 49), one pixel short of the box.

    Upstream fails to paste the collage here (shape mismatch); the box is clipped to the crop instead.
    """
    reference, reference_mask = make_reference(60, 60, seed=7)
    background, target = make_target(50, 50, (3, 14, 39, 50), seed=7)
    prepared = prepare_inputs(reference, reference_mask, background, target)
    assert prepared.tar_box_yyxx.tolist() == [1, 14, 37, 50]
    assert prepared.tar_box_yyxx_crop.tolist() == [0, 21, 29, 49]
    check_invariants(prepared, 50, 50)


def test_reference_is_the_object_on_white() -> None:
    reference, reference_mask = make_reference(90, 150, seed=4)  # an ellipse: its box's corners are outside it
    background, target = make_target(200, 200, (50, 150, 50, 150), seed=4)
    prepared = prepare_inputs(reference, reference_mask, background, target)
    for corner in (prepared.ref[0, 0], prepared.ref[0, -1], prepared.ref[-1, 0], prepared.ref[-1, -1]):
        assert (corner == 1.0).all()
    assert (prepared.ref[112] < 1.0).any()  # the object crosses the middle row


def test_shape_control_uses_the_mask_shape() -> None:
    reference, reference_mask = make_reference(100, 100, seed=3)
    background = np.full((256, 256, 3), 128, np.uint8)
    yy, xx = np.mgrid[:256, :256]
    target = (yy - 128) ** 2 + (xx - 128) ** 2 <= 40**2  # a disc: its box's corners are outside the shape
    boxed = prepare_inputs(reference, reference_mask, background, target, shape_control=False)
    shaped = prepare_inputs(reference, reference_mask, background, target, shape_control=True)
    assert (shaped.hint[..., 3] == 1).sum() < (boxed.hint[..., 3] == 1).sum()
    np.testing.assert_array_equal(shaped.hint[..., :3], boxed.hint[..., :3])


# ------------------------------------------------------------------------------------------------- rejections


def valid_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    reference, reference_mask = make_reference(64, 48, seed=5)
    background, target = make_target(120, 160, (40, 80, 50, 110), seed=6)
    return reference, reference_mask, background, target


def assert_input_error(excinfo: pytest.ExceptionInfo[InputError], field: str, code: str) -> None:
    assert excinfo.value.field == field
    assert excinfo.value.code == code
    assert isinstance(excinfo.value.code, ErrorCode)


@pytest.mark.parametrize("which, field", [(1, "reference_mask"), (3, "background_mask")])
def test_empty_mask_is_rejected(which: int, field: str) -> None:
    inputs = list(valid_inputs())
    inputs[which] = np.zeros_like(inputs[which])
    with pytest.raises(InputError) as excinfo:
        prepare_inputs(*inputs)
    assert_input_error(excinfo, field, "empty_mask")


@pytest.mark.parametrize("which, field", [(1, "reference_mask"), (3, "background_mask")])
def test_mask_size_mismatch_is_rejected(which: int, field: str) -> None:
    inputs = list(valid_inputs())
    inputs[which] = inputs[which][:-1]
    with pytest.raises(InputError) as excinfo:
        prepare_inputs(*inputs)
    assert_input_error(excinfo, field, "size_mismatch")
    image_shape = inputs[which - 1].shape
    assert f"{image_shape[1]}x{image_shape[0]}" in excinfo.value.message
    assert f"{image_shape[1]}x{image_shape[0] - 1}" in excinfo.value.message


@pytest.mark.parametrize("pixels", [1, 2, 3])
@pytest.mark.parametrize("which, field", [(1, "reference_mask"), (3, "background_mask")])
def test_tiny_object_is_rejected(pixels: int, which: int, field: str) -> None:
    """Policy: masks under 10 pixels are rejected (upstream would silently use the whole image as the box)."""
    inputs = list(valid_inputs())
    tiny = np.zeros_like(inputs[which])
    tiny[20, 20 : 20 + pixels] = True
    inputs[which] = tiny
    with pytest.raises(InputError) as excinfo:
        prepare_inputs(*inputs)
    assert_input_error(excinfo, field, "mask_too_small")


def test_one_pixel_thin_reference_is_rejected() -> None:
    reference, _, background, target = valid_inputs()
    thin = np.zeros(reference.shape[:2], bool)
    thin[30, 5:40] = True  # 35 pixels, but one row: the inclusive-end crop would be empty
    with pytest.raises(InputError) as excinfo:
        prepare_inputs(reference, thin, background, target)
    assert_input_error(excinfo, "reference_mask", "mask_too_small")


def test_one_pixel_thin_target_on_the_first_row_is_rejected() -> None:
    reference, reference_mask, background, _ = valid_inputs()
    thin = np.zeros(background.shape[:2], bool)
    thin[0, 10:60] = True
    with pytest.raises(InputError) as excinfo:
        prepare_inputs(reference, reference_mask, background, thin)
    assert_input_error(excinfo, "background_mask", "mask_too_small")


def test_small_object_just_above_the_limit_works() -> None:
    reference, reference_mask, background, target = valid_inputs()
    small = np.zeros(reference.shape[:2], bool)
    small[10:14, 10:14] = True  # 16 pixels
    check_invariants(prepare_inputs(reference, small, background, target), *background.shape[:2])


@pytest.mark.parametrize(
    "which, bad, field",
    [
        (0, np.zeros((64, 48), np.uint8), "reference"),
        (0, np.zeros((64, 48, 3), np.float32), "reference"),
        (2, np.zeros((120, 160, 4), np.uint8), "background"),
    ],
)
def test_malformed_image_is_rejected(which: int, bad: np.ndarray, field: str) -> None:
    inputs = list(valid_inputs())
    inputs[which] = bad
    with pytest.raises(InputError) as excinfo:
        prepare_inputs(*inputs)
    assert_input_error(excinfo, field, "invalid_image")


@pytest.mark.parametrize(
    "name, value",
    [("reference_expand_ratio", 0.9), ("target_box_expand_ratio", float("nan")), ("crop_expand_ratio", 50.0)],
)
def test_ratio_out_of_range_is_rejected(name: str, value: float) -> None:
    with pytest.raises(InputError) as excinfo:
        prepare_inputs(*valid_inputs(), **cast(dict[str, Any], {name: value}))
    assert_input_error(excinfo, name, "out_of_range")
